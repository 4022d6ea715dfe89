"""int8 QDQ ONNX from a fake-quant graph: `QuantizeLinear(constant weight)` => an int8
initializer; `Conv`/`Gemm` fp32 bias => an int32 initializer -> `DequantizeLinear` (scale =
input scale * weight scale, zero point 0), the node units onnxruntime fuses into QLinearConv
and QGemm; then every Q/DQ scale in the file is checked against the graph's."""
from __future__ import annotations

import re
from typing import Any, Iterator

import numpy as np
import torch.fx as fx

from graphopt import EmitError
from graphopt.quant import activation_qparams, is_fake_quant, weight_quant
from graphopt.testing.quantization import QTensor, check_qtensors, graph_qtensors

from .rewrite import attribute, drop_unused_initializers

_PARAMETRIZED = re.compile(r"\.parametrizations\.(\w+)\.original$")
_BUFFER = re.compile(r"\.parametrizations\.(\w+)\.\d+\.(\w+)$")


def _graph_index(graph: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Initializers and node producers by output name."""
    return {i.name: i for i in graph.initializer}, {o: n for n in graph.node for o in n.output}


def _array(inits: dict, name: str) -> np.ndarray | None:
    from onnx import numpy_helper
    return numpy_helper.to_array(inits[name]) if name in inits else None


def _rename_inputs(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _constants_to_initializers(graph: Any) -> None:
    """`Constant` nodes become initializers and `Identity` of an initializer is bypassed, so
    every scale, zero point and weight is an initializer (the form QDQ selectors read)."""
    from onnx import numpy_helper

    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t),
                                                             node.output[0]))
        elif node.op_type == "Identity" and node.output[0] not in outputs and \
                node.input[0] in {i.name for i in graph.initializer}:
            _rename_inputs(graph, node.output[0], node.input[0])
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point), per ``axis``
    when ``scale`` is 1-D."""
    shape = [1] * x.ndim
    if scale.ndim == 1:
        shape[axis] = -1
    info = np.iinfo(zero_point.dtype)
    q = np.rint(x / scale.reshape(shape)) + zero_point.reshape(shape).astype(np.int64)
    return np.clip(q, info.min, info.max).astype(zero_point.dtype)


def _fold_weight_quantizers(graph: Any) -> int:
    """`QuantizeLinear` of a float initializer => its int8 values as an initializer
    ``<name>_quantized`` (a parametrized ``<module>.parametrizations.weight.original`` is
    named ``<module>.weight``); returns how many."""
    from onnx import numpy_helper

    inits, _ = _graph_index(graph)
    keep, folded = [], 0
    for node in graph.node:
        w = _array(inits, node.input[0]) if node.op_type == "QuantizeLinear" and len(node.input) == 3 else None
        if w is None or w.dtype != np.float32 or w.ndim == 0:    # a 0-d constant is no per-channel weight
            keep.append(node)
            continue
        scale, zero_point = _array(inits, node.input[1]), _array(inits, node.input[2])
        q = _quantize(w, scale, zero_point, attribute(node, "axis", 1) % w.ndim)
        name = _PARAMETRIZED.sub(r".\1", node.input[0]) + "_quantized"
        graph.initializer.append(numpy_helper.from_array(q, name))
        _rename_inputs(graph, node.output[0], name)
        folded += 1
    del graph.node[:]
    graph.node.extend(keep)
    return folded


def _fold_weight_transposes(graph: Any) -> None:
    """`DequantizeLinear(int8 2-D weight, axis a)` -> `Transpose` => `DequantizeLinear(its
    transpose, axis 1 - a)`, so a MatMul reads the DQ directly (the exporter transposes
    Linear weights for inputs of more than two dims)."""
    from onnx import helper, numpy_helper

    inits, producers = _graph_index(graph)
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    keep = []
    for node in graph.node:
        dq = producers.get(node.input[0]) if node.op_type == "Transpose" else None
        q = _array(inits, dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.ndim != 2 or q.dtype != np.int8 or readers[dq.output[0]] != 1 or \
                readers[dq.input[0]] != 1:
            keep.append(node)
            continue
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(q.T), dq.input[0]))
        axis = attribute(dq, "axis", 1) % 2
        del dq.attribute[:]
        dq.attribute.append(helper.make_attribute("axis", 1 - axis))
        _rename_inputs(graph, node.output[0], dq.output[0])
    del graph.node[:]
    graph.node.extend(keep)


def _dq_scale(node: Any, inits: dict) -> np.ndarray | None:
    """The constant scale of a `DequantizeLinear` node, else None."""
    return _array(inits, node.input[1]) if node is not None and node.op_type == "DequantizeLinear" else None


def _biased_layers(graph: Any) -> Iterator[tuple[Any, int, Any, Any, int]]:
    """``(node holding the bias, its input index, layer input producer, weight producer,
    weight axis of the output channels)`` for each `Conv`, `Gemm`, and `MatMul` -> `Add`."""
    _, producers = _graph_index(graph)
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for node in graph.node:
        x, w = (producers.get(name) for name in node.input[:2]) if len(node.input) > 1 else (None, None)
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2:
            yield node, 2, x, w, 1 if node.op_type == "Gemm" and not attribute(node, "transB", 0) else 0
        elif node.op_type == "MatMul" and [n.op_type for n in readers.get(node.output[0], [])] == ["Add"]:
            add = readers[node.output[0]][0]
            yield add, 1 - list(add.input).index(node.output[0]), x, w, 1


def _quantize_biases(graph: Any) -> int:
    """The fp32 bias of each `Conv`, `Gemm` or `MatMul` -> `Add` whose input and weight come
    through `DequantizeLinear` => int32 ``<bias>_quantized`` -> `DequantizeLinear` (scale = input
    scale * weight scale per output channel, axis 0, zero point left out: 0); returns how many."""
    from onnx import helper, numpy_helper

    inits, _ = _graph_index(graph)
    dequantizers, taken = [], set(inits)
    for node, slot, x_dq, w_dq, out_axis in list(_biased_layers(graph)):
        bias = _array(inits, node.input[slot])
        x_scale, w_scale = _dq_scale(x_dq, inits), _dq_scale(w_dq, inits)
        if bias is None or bias.dtype != np.float32 or bias.ndim != 1 or x_scale is None or \
                w_scale is None or x_scale.size != 1 or w_dq.input[0] not in inits or \
                (w_scale.size > 1 and (w_scale.size != bias.size or attribute(w_dq, "axis", 1) != out_axis)):
            continue   # not an int8 layer, or its weight scales do not run along the output channels
        scale = np.broadcast_to(x_scale.astype(np.float32) * w_scale.astype(np.float32), bias.shape).copy()
        q = np.clip(np.rint(bias.astype(np.float64) / np.maximum(scale, 1e-30)), -2**31, 2**31 - 1)
        # named after the layer (its weight's <module>.weight_quantized): layers may share one bias
        # initializer (the exporter and onnxsim merge equal constants, e.g. zero biases), never one int32 bias
        layer = w_dq.input[0][:-len(".weight_quantized")] if w_dq.input[0].endswith(".weight_quantized") else ""
        stem = f"{layer}.bias" if layer else node.input[slot]
        stem = next(f"{stem}{suffix}" for suffix in ("", *(f"_{i}" for i in range(1, len(taken) + 2)))
                    if f"{stem}{suffix}_quantized" not in taken)
        taken.add(f"{stem}_quantized")
        graph.initializer.extend([numpy_helper.from_array(q.astype(np.int32), f"{stem}_quantized"),
                                  numpy_helper.from_array(scale, f"{stem}_scale")])
        dequantizers.append(helper.make_node("DequantizeLinear", [f"{stem}_quantized", f"{stem}_scale"],
                                             [f"{stem}_dequantized"], axis=0))
        node.input[slot] = f"{stem}_dequantized"
    nodes = [*dequantizers, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(dequantizers)


def _tidy_names(graph: Any) -> None:
    """Parametrization buffers by their plain names (``conv.parametrizations.weight.0.scale``
    => ``conv.weight_scale``); the DQ of ``<name>_quantized`` outputs ``<name>`` (``conv.weight``,
    ``conv.bias``) and is called ``<name>_DequantizeLinear``."""
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output} | \
        {i.name for i in graph.input}
    for init in graph.initializer:
        plain = _BUFFER.sub(r".\1_\2", init.name)
        if plain != init.name and plain not in taken:
            _rename_inputs(graph, init.name, plain)
            taken.add(plain)
            init.name = plain
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        source = node.input[0] if node.op_type == "DequantizeLinear" else ""
        plain = source[:-len("_quantized")]
        if source in inits and source.endswith("_quantized") and plain not in taken and \
                node.output[0] not in outputs:
            _rename_inputs(graph, node.output[0], plain)
            taken.add(plain)
            node.output[0], node.name = plain, f"{plain}_DequantizeLinear"


def lower(model: Any) -> dict:
    """Rewrite the exported fake-quant model (Q -> DQ everywhere, fp32 weights) in place into
    int8 QDQ form; returns counts for the artifact's meta."""
    graph = model.graph
    _constants_to_initializers(graph)
    weights = _fold_weight_quantizers(graph)
    _fold_weight_transposes(graph)
    biases = _quantize_biases(graph)
    drop_unused_initializers(graph)
    _tidy_names(graph)
    return {"int8_weights": weights, "int32_biases": biases}


def check_scales(model: Any, gm: fx.GraphModule) -> dict:
    """Check every Q/DQ node's scale and zero point in ``model`` against ``gm``'s (the contract
    of ``graphopt.quant.check_qtensors``): activation quantizers in file order against the
    fake-quant nodes in graph order (a DQ after a Q: that Q's grid), weight DQs against
    ``weight_quant`` of their modules in graph order (int8 values too), bias DQs against the
    graph's input scale * weight scale. Raises EmitError naming the first tensor that differs;
    returns ``{"activations": n, "weights": n, "biases": n}`` compared."""
    inits, _ = _graph_index(model.graph)
    modules = dict(gm.named_modules())
    input_scale = {f"{prefix}{'.' if prefix else ''}{n.target}": activation_qparams(n.args[0]).scale
                   for prefix, sub in gm.named_modules() if isinstance(sub, fx.GraphModule) for n in sub.graph.nodes
                   if n.op == "call_module" and n.args and isinstance(n.args[0], fx.Node)
                   and is_fake_quant(n.args[0])}     # partitions' layers too
    acts: list[QTensor] = []
    weights: list[QTensor] = []
    quantized: dict[str, QTensor] = {}       # Q output -> its grid
    biases = 0

    def fail(what: str) -> None:
        raise EmitError(f"the int8 ONNX model does not hold the graph's quantization: {what}")

    def module(source: str, suffix: str) -> str | None:
        name = source[:-len(suffix)] if source.endswith(suffix) else None
        return name if name in modules else None

    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = _array(inits, node.input[1])
        zero_point = _array(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1, np.int8)
        if scale is None or zero_point is None:
            fail(f"{node.name} reads a scale or zero point that is not an initializer")
        source = node.input[0]
        zero_point = np.broadcast_to(zero_point.astype(np.int64) - (128 if zero_point.dtype == np.uint8 else 0),
                                     scale.shape)
        grid = QTensor(source, tuple(scale.astype(np.float64).ravel().tolist()), tuple(zero_point.ravel().tolist()))
        weight, bias = module(source, ".weight_quantized"), module(source, ".bias_quantized")
        if weight:
            quant = weight_quant(modules[weight])
            if quant is None:
                fail(f"{weight} has int8 weights in the file but not in the graph")
            q, _, axis = quant
            stored = _array(inits, source)
            if attribute(node, "axis", 1) != axis and stored.ndim == 2:   # folded into a Transpose
                stored, axis = stored.T, 1 - axis
            if attribute(node, "axis", 1) != axis or not np.array_equal(stored, q.numpy()):
                fail(f"the int8 weights of {weight} differ from the graph's")
            weights.append(QTensor(weight, grid.scale, grid.zero_point))
        elif bias:
            quant = weight_quant(modules[bias])
            if quant is None or bias not in input_scale:
                fail(f"{bias} has an int32 bias but no int8 input and weights in the graph")
            expected = np.float32(input_scale[bias]) * quant[1].numpy().astype(np.float32)
            check_qtensors("bias", [QTensor(bias, tuple(np.broadcast_to(expected, scale.shape).tolist()),
                                            (0,) * scale.size)], [grid], fail=fail)
            biases += 1
        elif node.op_type == "QuantizeLinear" or source not in quantized:
            quantized[node.output[0]] = grid
            acts.append(grid)
        elif (quantized[source].scale, quantized[source].zero_point) != (grid.scale, grid.zero_point):
            fail(f"{node.name} dequantizes {source} on another grid than its QuantizeLinear")
    graph_acts, graph_weights = graph_qtensors(gm)
    return {"activations": check_qtensors("activation quantizer", graph_acts, acts, fail=fail),
            "weights": check_qtensors("int8 weight", graph_weights, weights, fail=fail), "biases": biases}
