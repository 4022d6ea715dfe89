"""``quantize(prefer=speed)``: which layers int8 really speeds up, measured in onnxruntime.

Each int8 layer is cut out of the graph twice: in fp32, and in int8 with its scales and
int8 tensors in and out (the boundary Q/DQ stripped, as inside an int8 region). Both are
exported with the ONNX emitter and timed side by side in onnxruntime, one thread, in
alternation; a layer stays int8 only if it runs at least ``margin`` faster (on this CPU
depthwise convolutions, hardswish and squeeze-excitation often do not).
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

import graphopt
from graphopt.quant import QParams, insert_fake_quant, is_fake_quant, quantize_weight

MARGIN = 0.9          # int8 stays when it takes at most this fraction of the fp32 time


def onnx_emitter(registry) -> graphopt.Emitter | None:
    """The registered onnx emitter when it and onnxruntime can run (None: layers cannot be timed)."""
    emitter = registry.emitters.get("onnx") if registry is not None else None
    return emitter if emitter is not None and not emitter.missing() else None


def _cut(gm: fx.GraphModule, layer, qp: dict[str, QParams] | None) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """``layer`` (its op and activation) alone; with ``qp``, int8 in and out with its weights."""
    root, g, env = nn.Module(), fx.Graph(), {}
    inputs = []
    for x in layer.inputs:
        env[x] = g.placeholder(f"in_{len(inputs)}")
        inputs.append(torch.randn(*x.meta["graphopt.shape"], generator=torch.Generator().manual_seed(len(inputs))))
    tail = [layer.node] + ([layer.end] if layer.end is not layer.node else [])
    for node in tail:
        if node.op == "call_module":
            module = copy.deepcopy(gm.get_submodule(node.target))
            root.add_module(node.target.replace(".", "_"), module)
            new = g.call_module(node.target.replace(".", "_"), tuple(env.get(a, a) for a in node.args))
        else:
            new = g.node_copy(node, lambda n: env[n])
        env[node] = new
    g.output(env[layer.end])
    cut = fx.GraphModule(root, g)
    if qp is not None:
        values = [n for n in cut.graph.nodes if n.op == "placeholder"]
        output = next(n for n in cut.graph.nodes if n.op == "output")
        values.append(output.args[0])
        for value, source in zip(values, [*layer.inputs, layer.end]):
            users = list(value.users)
            fq = insert_fake_quant(cut, value, qp[source.name])
            for user in users:
                user.replace_input_with(value, fq)
        if layer.kind == "weighted":
            quantize_weight(cut.get_submodule(layer.node.target.replace(".", "_")))
    cut.recompile()
    return cut, inputs


def _strip_boundaries(model) -> None:
    """Graph inputs feed QuantizeLinear and outputs come from DequantizeLinear in the exported
    int8 model: make the graph take and return the int8 tensors instead."""
    import onnx
    from onnx import TensorProto
    g = model.graph
    inputs = {i.name for i in g.input}
    outputs = {o.name for o in g.output}
    for node in list(g.node):
        if node.op_type == "QuantizeLinear" and node.input[0] in inputs:
            zp = next((i for i in g.initializer if i.name == node.input[2]), None)
            dtype = zp.data_type if zp is not None else TensorProto.UINT8
            for i in g.input:
                if i.name == node.input[0]:
                    i.type.tensor_type.elem_type = dtype
            for other in g.node:
                for k, name in enumerate(other.input):
                    if name == node.output[0]:
                        other.input[k] = node.input[0]
            g.node.remove(node)
        elif node.op_type == "DequantizeLinear" and node.output[0] in outputs:
            for o in g.output:
                if o.name == node.output[0]:
                    o.name = node.input[0]
                    zp = next((i for i in g.initializer if i.name == node.input[2]), None)
                    o.type.tensor_type.elem_type = zp.data_type if zp is not None else TensorProto.UINT8
            g.node.remove(node)
    onnx.checker.check_model(model)


def _session(path: Path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(session) -> dict:
    feeds = {}
    for i, arg in enumerate(session.get_inputs()):
        shape = [d if isinstance(d, int) else 1 for d in arg.shape]
        rng = np.random.default_rng(i)
        feeds[arg.name] = rng.integers(0, 255, shape).astype(np.uint8) if "uint8" in arg.type else \
            rng.integers(-128, 127, shape).astype(np.int8) if "int8" in arg.type else \
            rng.standard_normal(shape).astype(np.float32)
    return feeds


def measure(emitter: graphopt.Emitter, gm: fx.GraphModule, layers, qp: dict[str, QParams],
            runs: int = 40) -> dict[str, tuple[float, float]]:
    """Per layer: (fp32 ms, int8 ms), medians of alternating runs in onnxruntime."""
    import onnx

    out: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layer in layers:
            sessions = []
            for variant, q in (("fp32", None), ("int8", qp)):
                cut, inputs = _cut(gm, layer, q)
                graph = graphopt.Graph(cut, tuple(inputs), f"{layer.node.name}_{variant}",
                                       {"precision": "int8" if q else "fp32"})
                artifact = emitter.emit(graph, {"simplify": False}, Path(tmp))
                if variant == "int8":
                    model = onnx.load(str(artifact.path))
                    _strip_boundaries(model)
                    onnx.save(model, str(artifact.path))
                session = _session(artifact.path)
                sessions.append((session, _feeds(session)))
            fp32, int8 = _medians(sessions, runs)
            out[layer.node.name] = (fp32, int8)
    return out


def _medians(sessions: list, runs: int, warmup: int = 5) -> list[float]:
    """Median ms of each ``(session, feeds)``, one call of each per round."""
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(runs + warmup):
        for k, (session, feeds) in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feeds)
            if r >= warmup:
                times[k].append(time.perf_counter() - start)
    return [1e3 * float(np.median(t)) for t in times]


def time_graphs(emitter: graphopt.Emitter, graphs: list[fx.GraphModule], example_inputs,
                runs: int = 20) -> list[float]:
    """Median onnxruntime ms of each whole graph (exported with the ONNX emitter), timed in
    alternation: per-layer timings miss what a layer's precision does to its neighbours."""

    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for i, gm in enumerate(graphs):
            int8 = any(is_fake_quant(n) for n in gm.graph.nodes)
            graph = graphopt.Graph(gm, tuple(example_inputs), f"candidate_{i}", {"precision": "int8" if int8 else "fp32"})
            artifact = emitter.emit(graph, {}, Path(tmp))
            session = _session(artifact.path)
            names = [a.name for a in session.get_inputs()]
            sessions.append((session, {n: t.numpy() for n, t in zip(names, example_inputs)}))
        return _medians(sessions, runs, warmup=3)
