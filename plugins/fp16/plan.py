"""Where the fp16 pass puts each node: the fp32 blocklist, the range guard over calibration data, precision propagation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.graph import flatten_outputs

FP16_MAX = 65504.0
# Underflow: a value below the smallest fp16 subnormal (2**-24, 6e-8) rounds to 0 or to 2**-24
# itself, so nothing of it survives. It counts only if it is significant next to its tensor's
# largest value (above max |x| * 2**-11, fp16's relative precision): smaller ones are lost in
# that value's rounding anyway, as are a masked softmax's exp(-100)s. (Values between 2**-24 and
# the smallest normal, 6.1e-5, keep fewer significant bits but stay usable: not counted.)
TINY = 2.0 ** -24
NEGLIGIBLE = 2.0 ** -11
# A sum or mean of more elements than this per output stays fp32: an fp16 accumulator stops
# adding small terms once the total reaches ~2048 times them (11-bit significand).
LARGE_REDUCTION = 4096

# Ops always kept in fp32, after PyTorch autocast's fp32 list and onnxconverter-common's default
# op_block_list (TopK, CumSum, ...), trimmed to inference ops. Names are torch function, Tensor
# method or (see MODULE_OPS) module names.
BLOCKLIST = frozenset({
    "softmax", "log_softmax", "softmin",                    # exp of logits, sums of many terms
    "layer_norm", "group_norm", "instance_norm", "rms_norm",  # mean/variance of many values, eps
    "normalize", "norm", "cdist", "logsumexp",              # sums of squares or exps
    "exp", "expm1", "log", "log1p", "log2", "log10", "pow", "rsqrt", "reciprocal",
    "softplus",                                             # leave fp16's range fast
    "cumsum", "cumprod",                                    # error accumulates along the axis
    "topk", "sort",                                         # rounding ties reorder the results
})
REDUCTIONS = frozenset({"sum", "mean", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"})
# Compute-heavy functions that run in fp16 (modules with floating parameters do too). Every
# other op follows its inputs: fp16 when they all are, so no cast is inserted just for it.
HEAVY = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                   "linear", "matmul", "bmm", "mm", "addmm", "baddbmm", "einsum", "embedding",
                   "scaled_dot_product_attention"})
MODULE_OPS = {nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax", nn.Softmin: "softmin",
              nn.LayerNorm: "layer_norm", nn.GroupNorm: "group_norm", nn.RMSNorm: "rms_norm",
              nn.InstanceNorm1d: "instance_norm", nn.InstanceNorm2d: "instance_norm",
              nn.InstanceNorm3d: "instance_norm", nn.Softplus: "softplus",
              nn.AdaptiveAvgPool1d: "adaptive_avg_pool1d", nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d",
              nn.AdaptiveAvgPool3d: "adaptive_avg_pool3d"}
CALLS = ("call_module", "call_function", "call_method")


@dataclass
class Range:
    """What a node's fp32 values looked like over the calibration batches."""

    max_abs: float = 0.0
    tiny: int = 0         # significant values with |v| < TINY
    significant: int = 0  # values with |v| > max |v| * NEGLIGIBLE (in their tensor)
    numel: int = 0        # elements of its float32 tensors (last batch)
    tensor: bool = False  # the value is one tensor (not a tuple of them): a cast can take it

    def add(self, value: Any) -> None:
        tensors = [t for t in flatten_outputs(value) if t.dtype == torch.float32]
        if not tensors:
            return
        self.numel, self.tensor = sum(t.numel() for t in tensors), isinstance(value, torch.Tensor)
        for t in tensors:
            a = t.detach().abs().flatten()
            if a.numel():
                peak = a.max().item()
                self.max_abs = max(self.max_abs, peak)
                significant = a[a > peak * NEGLIGIBLE]
                self.significant += significant.numel()
                self.tiny += int((significant < TINY).sum())

    def problem(self, max_abs: float, max_underflow: float) -> str | None:
        """Why these values do not fit fp16 (None: they do)."""
        if not self.max_abs <= max_abs:
            return f"max |x| {self.max_abs:.2g} > max_abs={max_abs:g} (fp16 ends at {FP16_MAX:g})"
        if self.significant and self.tiny / self.significant > max_underflow:
            return (f"{self.tiny / self.significant:.0%} of its values vanish in fp16 (below 2**-24, "
                    f"not negligible next to its max; max_underflow={max_underflow:g})")
        return None


def tensor_problem(tensor: torch.Tensor, opts: dict) -> str | None:
    """Why a weight does not fit fp16 under the pass's ``max_abs`` and ``max_underflow``."""
    r = Range()
    r.add(tensor)
    return r.problem(opts["max_abs"], opts["max_underflow"])


def batches(ctx_data: dict, example_inputs: tuple) -> list[tuple]:
    """The calibration batches (``ctx.data["calibration"]``: input tuples), else the example inputs."""
    given = ctx_data.get("calibration")
    if given is None:
        return [tuple(example_inputs)]
    return [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in given]


class _Recorder(fx.Interpreter):
    """A plain run of the graph that hands each node's value to ``record`` (annotate's run also counts MACs, a
    FLOP-counting dispatch on every op: 14 ms a batch against 1 on the demo's CNN)."""

    def __init__(self, gm: fx.GraphModule, record):
        super().__init__(gm)
        self.record = record

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.record(n, value)
        return value


def ranges(gm: fx.GraphModule, inputs: Iterable[Sequence[torch.Tensor]]) -> dict[fx.Node, Range]:
    """Run the fp32 graph on every batch, recording each node's :class:`Range`."""
    out: dict[fx.Node, Range] = {n: Range() for n in gm.graph.nodes}
    recorder = _Recorder(gm, lambda n, v: out[n].add(v))
    with torch.no_grad():
        for batch in inputs:
            recorder.run(*batch)
    return out


def attribute(gm: fx.GraphModule, target: str) -> Any:
    """What a get_attr node of ``target`` reads."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """``softmax``, ``layer_norm``, ``conv2d``...: the function, method or module kind."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return MODULE_OPS.get(type(module), type(module).__name__)
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def casts_to_fp32(node: fx.Node) -> bool:
    """``node`` is the model's own ``.float()`` / ``.to(torch.float32)``: fp32 whatever it reads."""
    if node.op != "call_method":
        return False
    return node.target == "float" or (node.target in ("to", "type") and
                                      torch.float32 in (*node.args[1:], *node.kwargs.values()))


@dataclass
class Plan:
    """``precision`` of every floating node ("fp16"/"fp32"); ``reasons`` why call nodes are fp32."""

    precision: dict[fx.Node, str] = field(default_factory=dict)
    reasons: dict[fx.Node, str] = field(default_factory=dict)
    forced: set[fx.Node] = field(default_factory=set)   # fp32 by blocklist or range, not by their inputs


class Planner:
    """Decides each node's precision from the fp32 ranges: blocklisted and out-of-range nodes
    (and calls sharing a module with them) are fp32; heavy ops are fp16; the rest follow their
    non-constant inputs; get_attrs, and ops on constants only, are fp16 only if all readers are."""

    def __init__(self, gm: fx.GraphModule, seen: dict[fx.Node, Range], opts: dict):
        self.gm, self.seen, self.opts = gm, seen, opts
        self.keep = {s.strip() for s in opts["keep_fp32"].split(",") if s.strip()}

    def floating(self, node: fx.Node) -> bool:
        return self.seen[node].numel > 0

    def _forced(self, node: fx.Node) -> str | None:
        """Why ``node`` must compute in fp32 whatever its neighbours do (None: it need not)."""
        name, r = op_name(self.gm, node), self.seen[node]
        kind = type(self.gm.get_submodule(node.target)).__name__ if node.op == "call_module" else name
        if {node.name, name, kind} & self.keep:
            return "listed in keep_fp32"
        if name in BLOCKLIST:
            return f"{name} is on the fp32 blocklist"
        source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        reduced = self.seen[source].numel // r.numel if source is not None and r.numel else 0
        if name in REDUCTIONS and reduced > LARGE_REDUCTION:
            return f"{name} reduces {reduced} elements into each output (> {LARGE_REDUCTION})"
        limits = self.opts["max_abs"], self.opts["max_underflow"]
        problem = r.problem(*limits)
        if problem:
            return problem
        for i in node.all_input_nodes:
            problem = self.seen[i].problem(*limits)
            if problem:
                return f"its input {i.name}: {problem}"
        if node.op == "call_module":
            for pname, p in self.gm.get_submodule(node.target).named_parameters():
                problem = tensor_problem(p, self.opts)
                if problem:
                    return f"parameter {pname}: {problem}"
        return None

    def _spread(self, reasons: dict[fx.Node, str]) -> None:
        """Calls of one module (or of modules sharing a parameter) must agree: one fp32, all fp32."""
        groups: dict[int, list[fx.Node]] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                module = self.gm.get_submodule(node.target)
                for key in {id(module), *(id(p) for p in module.parameters())}:
                    groups.setdefault(key, []).append(node)
        changed = True
        while changed:
            changed = False
            for nodes in groups.values():
                first = next((n for n in nodes if n in reasons), None)
                for n in nodes if first else ():
                    if n not in reasons:
                        reasons[n] = f"it shares weights with {first.name}, which stays fp32"
                        changed = True

    def _follow(self, node: fx.Node, plan: Plan, constants: set[fx.Node]) -> tuple[str | None, str | None]:
        """Precision and reason of an op that is neither heavy nor forced: that of its inputs
        (fp32 if any is fp32); None when it reads constants only (its readers decide)."""
        live = [i for i in node.all_input_nodes if i in plan.precision]
        fp32 = [i for i in live if plan.precision[i] == "fp32"]
        if fp32:
            return "fp32", f"follows its fp32 input {fp32[0].name}"
        if live:
            return "fp16", None
        if any(i in constants for i in node.all_input_nodes):
            return None, None
        return "fp32", "it creates its value in fp32"

    def plan(self, io: str) -> Plan:
        """The plan for a graph whose floating inputs and outputs are ``io`` ("fp32"/"fp16")."""
        calls = [n for n in self.gm.graph.nodes if n.op in CALLS and self.floating(n)]
        reasons = {n: why for n in calls if not casts_to_fp32(n) and (why := self._forced(n))}
        self._spread(reasons)
        plan = Plan(forced=set(reasons))
        constants = {n for n in self.gm.graph.nodes if n.op == "get_attr" and self.floating(n)}
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" and self.floating(node):
                plan.precision[node] = io
            elif node in reasons:
                plan.precision[node], plan.reasons[node] = "fp32", reasons[node]
            elif node in calls and casts_to_fp32(node):
                plan.precision[node], plan.reasons[node] = "fp32", "the model casts to fp32 here"
            elif node in calls and (op_name(self.gm, node) in HEAVY or self._has_weights(node)):
                plan.precision[node] = "fp16"
            elif node in calls:
                precision, why = self._follow(node, plan, constants)
                if precision is None:
                    constants.add(node)
                    continue
                plan.precision[node] = precision
                if why:
                    plan.reasons[node] = why
        self._constants(plan, constants, io)
        return plan

    def _constants(self, plan: Plan, constants: set[fx.Node], io: str) -> None:
        """get_attrs and the ops that read only them take the precision their readers want
        (fp16 only if all of them do), last reader first. A tensor is stored once: every
        get_attr of it agrees, and a tensor of a module some call converts has that call's."""
        for node in reversed(self.gm.graph.nodes):
            if node in constants:
                wanted = {io if u.op == "output" else plan.precision.get(u) for u in node.users} - {None}
                plan.precision[node] = "fp16" if wanted == {"fp16"} else "fp32"
                if node.op != "get_attr" and wanted != {"fp16"}:
                    plan.reasons[node] = "it reads constants only, for fp32 readers"
        owner: dict[int, str] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module" and node in plan.precision:
                module = self.gm.get_submodule(node.target)
                for t in (*module.parameters(), *module.buffers()):
                    owner[id(t)] = plan.precision[node]
        reads: dict[int, list[fx.Node]] = {}
        for node in constants:
            if node.op == "get_attr":
                reads.setdefault(id(attribute(self.gm, node.target)), []).append(node)
        for key, nodes in reads.items():
            half = "fp16" if all(plan.precision[n] == "fp16" for n in nodes) else "fp32"
            for n in nodes:
                plan.precision[n] = owner.get(key, half)

    def _has_weights(self, node: fx.Node) -> bool:
        return node.op == "call_module" and any(
            p.is_floating_point() for p in self.gm.get_submodule(node.target).parameters())
