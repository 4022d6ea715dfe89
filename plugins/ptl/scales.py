"""The quantization a .ptl holds, read back from the saved file, against the graph's
(``graphopt.testing.quantization``): weights position by position; activations in graph order, each
grid once, since the lowering quantizes a value once and ops that keep a grid (pooling, reshapes)
write none."""
from __future__ import annotations

import io

import torch
import torch.fx as fx

from graphopt import EmitError
from graphopt.fxutil import input_dependent
from graphopt.quant import is_fake_quant
from graphopt.testing.quantization import QTensor, check_grids, check_qtensors, graph_qtensors

_QUINT8 = 13    # torch's ScalarType code of quint8, as a TorchScript constant carries it
_OWN_GRIDS = {(1 / 256, -128), (2 / 256, 0)}   # sigmoid's, tanh's: the kernels pick them, the file says nothing
_QUANTIZE = ("aten::quantize_per_tensor", "aten::fake_quantize_per_tensor_affine")


def _nodes(block):
    """A TorchScript graph's nodes in order, those in the blocks of ``prim::If``/``prim::Loop`` too."""
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _nodes(inner)


def _constant(value: torch._C.Value):
    return value.toIValue() if value.node().kind() == "prim::Constant" else None


def file_qtensors(data: bytes) -> tuple[list[QTensor], list[QTensor], list[QTensor]]:
    """The grids of a saved TorchScript module, in its graph's order: activations (each
    ``quantize_per_tensor`` and each quantized kernel's output grid, in int8 terms: quint8 zero
    point less 128; fake quants left in float too), weights (each packed weight a quantized kernel
    reads, per channel) and constants (quantized tensors freezing folded, e.g. a position embedding)."""
    module = torch.jit.load(io.BytesIO(data))
    acts, weights, constants = [], [], []
    for node in _nodes(module.inlined_graph):
        kind = node.kind()
        if kind == "prim::Constant" and isinstance(t := _constant(node.output()), torch.Tensor) and t.is_quantized:
            constants.append(QTensor(f"{node.output().debugName()} (a quantized constant)", (t.q_scale(),),
                                     (t.q_zero_point() - (128 if t.dtype == torch.quint8 else 0),)))
        if kind not in _QUANTIZE and not kind.startswith("quantized::"):
            continue
        args, name = [_constant(v) for v in node.inputs()], f"{node.outputsAt(0).debugName()} ({kind})"
        if kind == "aten::quantize_per_tensor":
            acts.append(QTensor(name, (float(args[1]),), (int(args[2]) - (128 if args[3] == _QUINT8 else 0),)))
        elif kind == "aten::fake_quantize_per_tensor_affine":   # what the lowering could not reach (partitions)
            acts.append(QTensor(name, (float(args[1]),), (int(args[2]) - (128 if args[3] == 0 else 0),)))
        elif kind.startswith("quantized::") and len(args) >= 3 and isinstance(args[-2], float):
            acts.append(QTensor(name, (args[-2],), (int(args[-1]) - 128,)))    # quint8: the kernels' only kind
            packed = args[1] if hasattr(args[1], "unpack") else None
            if packed is not None:
                w = packed.unpack()[0]
                scales = w.q_per_channel_scales() if w.qscheme() == torch.per_channel_affine else \
                    torch.tensor([w.q_scale()])
                weights.append(QTensor(name, tuple(scales.double().tolist()), (0,) * len(scales)))
    return acts, weights, constants


def scale_check(data: bytes, gm: fx.GraphModule) -> dict:
    """Raise EmitError naming the first tensor whose grid differs from the graph's; returns how many
    were compared (weights: "computed in float" where the lowering reached no layer)."""
    acts, weights, constants = file_qtensors(data)
    graph_acts, graph_weights = graph_qtensors(gm)
    variable = input_dependent(gm)        # the rest freezing folds into constants
    of_constants = {n.name for n in gm.graph.nodes if is_fake_quant(n) and n not in variable}

    def fail(what: str) -> None:
        raise EmitError(f"the int8 .ptl does not hold the graph's quantization: {what}")

    check_grids("quantized constant", graph_acts, constants, optional=lambda g: True, fail=fail)
    emulated = not weights and bool(graph_weights and acts)   # fake quants in float, weights folded into constants
    return {"activations": check_grids("quantized tensor", graph_acts, acts, in_order=True, fail=fail,
                                       optional=lambda g: (g.scale[0], g.zero_point[0]) in _OWN_GRIDS
                                       or g.name in of_constants),
            "constants": len(constants),
            "weights": "computed in float" if emulated else
            check_qtensors("int8 weight", graph_weights, weights, fail=fail)}
