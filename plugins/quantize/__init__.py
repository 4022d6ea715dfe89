"""quantize: post-training static int8. Conv/Linear(+activation), add/mul(+ReLU), matmul and
cat get int8 inputs and outputs (fake-quant nodes, ``quant_modules``) and per-channel
symmetric int8 weights; pooling and reshapes pass their input's scale on; sigmoid,
hardsigmoid, softmax and tanh get fixed scales. Ranges come from the calibration data
through an observer. Every quantized layer's SQNR against fp32 is ranked, and
``target_cosine`` keeps the most sensitive layers in fp32 until the outputs reach it."""
from __future__ import annotations

import copy
import math
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt import Effect, Option, Pass, PassContext, PassResult
from graphopt.graph import annotate, flatten_outputs
from graphopt.metrics import compare
from graphopt.fused import AddReLU
from graphopt.fxutil import describe
from graphopt.quant import insert_fake_quant, quantize_weight
from .observers import OBSERVERS, Observer, QParams, qparams
from .cli import graphopt_add_options, graphopt_data_hint, graphopt_run_data  # noqa: F401  its CLI hooks

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_ACTIVATION_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh}
_BINARY = {operator.add: "add", torch.add: "add", operator.iadd: "add", operator.mul: "mul", torch.mul: "mul",
           operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "matmul"}
_PASS_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                 nn.modules.pooling._AdaptiveMaxPoolNd, nn.Flatten, nn.Identity, nn.ReLU, nn.ReLU6)
_PASS_METHODS = {"flatten", "reshape", "view", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                 "mean", "relu"}
_PASS_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                   F.relu, torch.relu, F.adaptive_avg_pool2d, F.avg_pool2d, torch.mean}
_FIXED = {nn.Sigmoid: (1 / 256, 0), nn.Hardsigmoid: (1 / 256, 0), nn.Softmax: (1 / 256, 0), nn.Tanh: (1 / 128, 128),
          torch.sigmoid: (1 / 256, 0), F.sigmoid: (1 / 256, 0), F.hardsigmoid: (1 / 256, 0),
          F.softmax: (1 / 256, 0), torch.softmax: (1 / 256, 0), torch.tanh: (1 / 128, 128),
          "sigmoid": (1 / 256, 0), "softmax": (1 / 256, 0), "tanh": (1 / 128, 128)}

OPTIONS = (
    Option("observer", str, "minmax", "how activation ranges are calibrated", OBSERVERS),
    Option("activations", str, "uint8", "uint8: asymmetric; int8: symmetric", ("uint8", "int8")),
    Option("exclude", str, "", "comma-separated node names, module names/types or re:REGEX kept in fp32"),
    Option("prefer", str, "speed", "speed: keep in fp32 the layers int8 does not speed up in onnxruntime "
                                   "(measured); size: quantize every layer", ("speed", "size")),
    Option("target_cosine", float, 0.0, "keep the most sensitive layers in fp32 until the outputs' cosine "
                                        "vs fp32 on the calibration data reaches this (0: off)"),
)


@dataclass
class Layer:
    """A quantized op: ``node``, the node whose output is quantized (``end``: the op or its
    activation), and the values it reads in int8."""

    node: fx.Node
    kind: str
    end: fx.Node
    inputs: list[fx.Node] = field(default_factory=list)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node) and "graphopt.shape" in a.meta]


def unfuse_activations(gm: fx.GraphModule) -> list[str]:
    """A fused Conv/Linear whose activation int8 kernels cannot fuse (hardswish...) => the
    plain layer, then the activation as its own node, so its output can be quantized before
    the activation. Returns the layers split."""
    from graphopt.fused import FUSED

    split = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        act = getattr(m, "act", None)
        base = next((c for c in type(m).__mro__ if c in FUSED), None)
        if base is None or type(m) is base or act is None or isinstance(act, _ACTIVATIONS) \
                or not isinstance(getattr(m, "bn", None), nn.Identity):
            continue
        plain = copy.copy(m)
        plain.__class__ = base
        del plain.act, plain.bn
        gm.add_submodule(node.target, plain)
        act = copy.deepcopy(act)
        if hasattr(act, "inplace"):
            act.inplace = False                          # its input is now a value of its own
        gm.add_submodule(f"{node.target}_act", act)
        with gm.graph.inserting_after(node):
            after = gm.graph.call_module(f"{node.target}_act", (node,))
        node.replace_all_uses_with(after, delete_user_cb=lambda u: u is not after)
        split.append(node.name)
    gm.recompile()
    return split


def _kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, _WEIGHTED):
            return "weighted"
        return "add" if isinstance(m, AddReLU) else None
    if node.op == "call_function" and node.target is torch.cat:
        return "cat"
    kind = _BINARY.get(node.target) if node.op == "call_function" else \
        {"add": "add", "mul": "mul", "matmul": "matmul"}.get(node.target) if node.op == "call_method" else None
    return kind if kind and len(_tensor_args(node)) == 2 else None


def _why_fp32(gm: fx.GraphModule, node: fx.Node, patterns: list[str]) -> str | None:
    names = [node.name]
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        names += [node.target, type(m).__name__]
        bn = getattr(m, "bn", None)
        if bn is not None and not isinstance(bn, nn.Identity):
            return "its BatchNorm is not folded"
    for p in patterns:
        hit = any(re.fullmatch(p[3:], n) for n in names) if p.startswith("re:") else p in names
        if hit:
            return f"excluded ({p})"
    return None


def _end(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The op's output, or the ReLU/ReLU6/Hardtanh right after it when it is its only user."""
    if len(node.users) != 1:
        return node
    user = next(iter(node.users))
    fused = user.op == "call_module" and isinstance(gm.get_submodule(user.target), _ACTIVATIONS)
    return user if fused or (user.op == "call_function" and user.target in _ACTIVATION_FUNCTIONS) else node


def _fixed(gm: fx.GraphModule, node: fx.Node):
    if node.op == "call_module":
        return _FIXED.get(type(gm.get_submodule(node.target)))
    return _FIXED.get(node.target) if node.op in ("call_function", "call_method") else None


def _passes(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _PASS_MODULES)
    return (node.op == "call_function" and node.target in _PASS_FUNCTIONS) or \
        (node.op == "call_method" and node.target in _PASS_METHODS)


@dataclass
class Plan:
    layers: list[Layer]
    observed: list[fx.Node]                        # values whose range is calibrated
    derived: dict[fx.Node, fx.Node | tuple]        # value -> the value whose qparams it reuses, or fixed
    kept: dict[str, str]                           # fp32 layer -> why


def plan(gm: fx.GraphModule, patterns: list[str], excluded: dict[str, str]) -> Plan:
    """Which values are int8, walking the graph in order."""
    layers, observed, derived, kept, int8 = [], [], {}, {}, set()
    skip: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node in skip:
            continue
        kind = _kind(gm, node)
        if kind:
            why = _why_fp32(gm, node, patterns) or excluded.get(node.name)
            if why:
                kept[node.name] = why
                continue
            end = _end(gm, node)
            skip.add(end)
            inputs = _tensor_args(node) if kind != "cat" else [a for a in node.args[0] if isinstance(a, fx.Node)]
            for x in inputs:
                if x not in int8:
                    observed.append(x)
                    int8.add(x)
            observed.append(end)
            int8.add(end)
            layers.append(Layer(node, kind, end, inputs))
        elif node.op in ("call_module", "call_function", "call_method"):
            source = _tensor_args(node)[:1]
            fixed = _fixed(gm, node)
            if source and source[0] in int8 and fixed:
                derived[node] = fixed
                int8.add(node)
            elif source and source[0] in int8 and _passes(gm, node):
                derived[node] = source[0]
                int8.add(node)
    return Plan(layers, observed, derived, kept)


def calibration_batches(ctx: PassContext) -> list[tuple[torch.Tensor, ...]]:
    """``ctx.data["calibration"]`` as input tuples, checked against the example inputs."""
    batches = []
    for i, item in enumerate(ctx.data["calibration"]):
        batch = (item,) if isinstance(item, torch.Tensor) else tuple(item)
        if len(batch) != len(ctx.example_inputs):
            raise ValueError(f"calibration sample {i} has {len(batch)} inputs, the model takes "
                             f"{len(ctx.example_inputs)}")
        for t, ex in zip(batch, ctx.example_inputs):
            if t.shape[1:] != ex.shape[1:]:
                raise ValueError(f"calibration sample {i} has shape {tuple(t.shape)}, the model takes "
                                 f"{tuple(ex.shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"calibration sample {i} holds NaN or Inf; clean the data before calibrating")
        batches.append(batch)
    if not batches:
        raise ValueError("the calibration data is empty")
    return batches


def _values(gm: fx.GraphModule, batches, nodes: set[str]) -> list[dict[str, torch.Tensor]]:
    """The values of the named nodes for every batch."""
    out = []
    for batch in batches:
        seen: dict[str, torch.Tensor] = {}

        def record(n, v):
            if n.name in nodes and isinstance(v, torch.Tensor):
                seen[n.name] = v.detach().clone()        # a later in-place op must not change it
        annotate(gm, batch, record=record)
        out.append(seen)
    return out


def _insert(gm: fx.GraphModule, p: Plan, ranges: dict[str, QParams]) -> dict[str, QParams]:
    """Fake-quant nodes after every int8 value, weights quantized; the qparams of each value."""
    chosen: dict[str, QParams] = {}
    for node in list(gm.graph.nodes):
        if node.name in ranges:
            q = ranges[node.name]
        elif node in p.derived:
            how = p.derived[node]
            q = QParams(how[0], how[1], "uint8") if isinstance(how, tuple) else chosen.get(how.name)
            if q is None:
                continue
        else:
            continue
        chosen[node.name] = q
        users = list(node.users)
        fq = insert_fake_quant(gm, node, q)
        for user in users:
            user.replace_input_with(node, fq)
    for layer in p.layers:
        if layer.kind == "weighted":
            quantize_weight(gm.get_submodule(layer.node.target))
    gm.recompile()
    return chosen


def _sqnr(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Signal to quantization noise of ``got`` against ``ref``, in dB."""
    signal = sum(float(r.double().pow(2).sum()) for r in ref)
    noise = sum(float((r.double() - g.double()).pow(2).sum()) for r, g in zip(ref, got))
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


class _Calibrated:
    """The fp32 graph's values on the calibration data, observed once per value."""

    def __init__(self, gm: fx.GraphModule, batches, observer: str, activations: str):
        self.gm, self.batches, self.observer, self.activations = gm, batches, observer, activations
        self.values = _values(gm, batches, {n.name for n in gm.graph.nodes})
        with torch.no_grad():
            self.outputs = [flatten_outputs(gm(*b)) for b in batches]
        self._ranges: dict[str, QParams] = {}

    def qparams(self, names) -> dict[str, QParams]:
        for name in names:
            if name not in self._ranges:
                obs = Observer(self.observer)
                for values in self.values:
                    obs.observe(values[name])
                self._ranges[name] = qparams(*obs.range(), self.activations)
        return {n: self._ranges[n] for n in names}

    def quantized(self, patterns: list[str], excluded: dict[str, str], batches: int | None = None):
        """A quantized copy of the graph keeping ``excluded`` in fp32, its plan, its qparams and
        the SQNR of its outputs (on the first ``batches`` calibration batches)."""
        work = copy.deepcopy(self.gm)
        p = plan(work, patterns, excluded)
        chosen = _insert(work, p, self.qparams([n.name for n in p.observed]))
        use = self.batches[:batches]
        with torch.no_grad():
            got = [t for b in use for t in flatten_outputs(work(*b))]
        ref = [t for out in self.outputs[:len(use)] for t in out]
        return work, p, chosen, _sqnr(ref, got), compare(ref, got).cosine


def _slow_layers(cal: _Calibrated, patterns: list[str], ctx: PassContext) -> dict[str, str]:
    """prefer=speed: the layers int8 does not speed up in onnxruntime, with their timings."""
    from . import speed as quant_speed

    emitter = quant_speed.onnx_emitter(ctx.registry)
    if emitter is None:
        ctx.explain("prefer=speed measures layers in onnxruntime through the onnx emitter, and one of them "
                    "is missing: every layer is quantized (prefer=size)")
        return {}
    probe, dry = copy.deepcopy(cal.gm), copy.deepcopy(cal.gm)
    p, p_dry = plan(probe, patterns, {}), plan(dry, patterns, {})
    chosen = _insert(dry, p_dry, cal.qparams([n.name for n in p_dry.observed]))
    timings = quant_speed.measure(emitter, probe, p.layers, chosen)
    slow = {}
    for name, (fp32, int8) in timings.items():
        verdict = "int8" if int8 <= quant_speed.MARGIN * fp32 else "fp32"
        ctx.explain(f"{name}: {int8:.3f} ms int8 vs {fp32:.3f} ms fp32 in onnxruntime -> {verdict}")
        if verdict == "fp32":
            slow[name] = f"int8 is not faster in onnxruntime ({int8:.3f} ms vs {fp32:.3f} ms fp32)"
    ctx.scratch["timings"] = timings
    # per-layer timings miss neighbours (an fp32 layer beside int8 ones can cost more): the
    # whole graph decides between that mix, every layer int8 and none
    mixed, every = cal.quantized(patterns, slow, 1)[0], cal.quantized(patterns, {}, 1)[0]
    t_mixed, t_every, t_fp32 = quant_speed.time_graphs(emitter, [mixed, every, cal.gm], cal.batches[0])
    ctx.explain(f"whole graph in onnxruntime: {t_mixed:.3f} ms with the slower layers in fp32, "
                f"{t_every:.3f} ms with every layer int8, {t_fp32:.3f} ms in fp32")
    ctx.scratch["whole_ms"] = {"mixed": round(t_mixed, 3), "all_int8": round(t_every, 3), "fp32": round(t_fp32, 3)}
    if t_fp32 < min(t_mixed, t_every):
        why = f"int8 does not speed this graph up in onnxruntime ({min(t_mixed, t_every):.3f} ms vs {t_fp32:.3f} ms fp32)"
        return {name: why for name in timings}
    if t_every <= t_mixed:
        return {}
    return slow


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    from graphopt_plugins.fuse.fold_bn import fold_batchnorms

    o = ctx.options
    batches = calibration_batches(ctx)
    if fold_batchnorms(gm, lambda line: None)["folded"]:
        gm.recompile()
    for name in unfuse_activations(gm):
        ctx.explain(f"{name}: activation split from the layer, int8 kernels do not fuse it")
    annotate(gm, ctx.example_inputs)
    cal = _Calibrated(gm, batches, o["observer"], o["activations"])
    patterns = [t.strip() for t in o["exclude"].split(",") if t.strip()]
    excluded = _slow_layers(cal, patterns, ctx) if o["prefer"] == "speed" else {}
    work, p, chosen, db, cosine = cal.quantized(patterns, excluded)
    # sensitivity: the outputs' SQNR with one layer (and the int8 tensors it reads and
    # writes) quantized and the rest in fp32, on up to 4 calibration batches
    everyone = {layer.node.name for layer in p.layers}
    sensitivity = {name: cal.quantized(patterns, {k: "probe" for k in everyone - {name}} | excluded, 4)[3]
                   for name in everyone}
    ranked = sorted(sensitivity.items(), key=lambda kv: (kv[1], kv[0]))
    for name, layer_db in ranked:
        if not o["target_cosine"] or cosine >= o["target_cosine"]:
            break
        excluded[name] = f"kept for accuracy (target_cosine={o['target_cosine']})"
        ctx.explain(f"cosine {cosine:.6f} < {o['target_cosine']}: {name} ({layer_db:.1f} dB alone) kept in fp32")
        work, p, chosen, db, cosine = cal.quantized(patterns, excluded)
    for name, layer_db in ranked:
        if name not in excluded:
            ctx.explain(f"{name}: int8; quantized alone, the outputs' SQNR is {layer_db:.1f} dB")
    for name, why in p.kept.items():
        node = next(n for n in work.graph.nodes if n.name == name)
        ctx.explain(f"{name} ({describe(work, node)}): fp32, {why}")
    stats = {"int8_layers": len(p.layers), "fp32_layers": sorted(p.kept), "calibration_batches": len(batches),
             "sqnr_calibration": round(db, 2), "cosine_calibration": round(cosine, 6),
             "sensitivity": [[n, round(v, 2)] for n, v in ranked], "observer": o["observer"],
             "prefer": o["prefer"], "whole_graph_ms": ctx.scratch.get("whole_ms"), "timings_ms": {n: [round(f, 4), round(q, 4)]
                                                   for n, (f, q) in ctx.scratch.get("timings", {}).items()}}
    return PassResult(work, bool(p.layers), stats)


@graphopt.hookimpl
def graphopt_register_passes():
    return [Pass("quantize", "Post-training static int8: Q/DQ (fake-quant) on conv/linear/add/mul/matmul/cat "
                             "inputs and outputs, per-channel int8 weights, calibrated ranges, per-layer "
                             "sensitivity and mixed precision", run, Effect.INT8, OPTIONS,
                 needs=("calibration",))]
