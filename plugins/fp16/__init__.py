"""fp32 ops => fp16 ops, fp32 kept where blocklisted or out of range, casts at borders; mode=weights: fp16 weight storage."""
from __future__ import annotations

import torch
import torch.fx as fx

import graphopt
from graphopt import Effect, Option, Pass, PassContext, PassResult
from graphopt.cli.calibration import graphopt_add_options, graphopt_data_hint, graphopt_run_data  # noqa: F401  --calib

from . import weights as fp16_weights
from .plan import CALLS, FP16_MAX, Plan, Planner, attribute, batches, casts_to_fp32, ranges

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
OPTIONS = (
    Option("mode", str, "full", "full: weights and activations in fp16; weights: fp16 storage, fp32 "
           "compute (parameters stored as fp16 buffers, upcast at use)", choices=("full", "weights")),
    Option("keep_io_types", bool, True, "inputs and outputs stay fp32 (false: the graph takes and returns "
           "fp16; mode=full only)"),
    Option("max_abs", float, 60000.0, f"a node whose fp32 values (calibration data, else the example inputs) "
           f"exceed this stays fp32 (fp16 ends at {FP16_MAX:g})"),
    Option("max_underflow", float, 0.01, "a node with more than this fraction of its values below 2**-24 "
           "(which fp16 flushes to zero) stays fp32; values below max |x| * 2**-11 do not count"),
    Option("keep_fp32", str, "", "comma-separated node names, function or method names (conv2d, matmul) "
           "and module class names (Conv2d) kept fp32 besides the blocklist"),
)


def _cast(graph: fx.Graph, value: fx.Node, precision: str) -> fx.Node:
    cast = graph.call_method("to", (value, DTYPES[precision]))
    cast.meta["graphopt.precision"] = precision
    return cast


class _Casts:
    """One cast per (value, precision), placed before its first reader."""

    def __init__(self, gm: fx.GraphModule, plan: Plan, tensors: set[fx.Node]):
        self.gm, self.plan, self.tensors = gm, plan, tensors
        self.made: dict[tuple[fx.Node, str], fx.Node] = {}

    def feed(self, reader: fx.Node, precision: str) -> None:
        """Rewire ``reader``'s floating tensor arguments that are not in ``precision`` to casts."""
        def convert(value: fx.Node) -> fx.Node:
            have = self.plan.precision.get(value)
            if have is None or have == precision or value not in self.tensors:
                return value
            if (value, precision) not in self.made:
                with self.gm.graph.inserting_before(reader):
                    self.made[value, precision] = _cast(self.gm.graph, value, precision)
            return self.made[value, precision]

        reader.args = fx.map_arg(reader.args, convert)
        reader.kwargs = fx.map_arg(reader.kwargs, convert)


def _entry_casts(gm: fx.GraphModule, plan: Plan) -> list[fx.Node]:
    """keep_io_types=false: each floating input is rounded to fp16 on entry (a no-op for the fp16
    tensors the graph declares; it lets fp32 callers, such as verify-each, run it too)."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n in plan.precision]
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    made = []
    for node in inputs:
        with gm.graph.inserting_before(first):
            cast = _cast(gm.graph, node, "fp16")
        node.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
        plan.precision[cast] = "fp16"
        made.append(cast)
    return made


def _store(gm: fx.GraphModule, plan: Plan) -> None:
    """Convert the weights of fp16 modules and the tensors fp16 get_attrs read, in place."""
    for node in gm.graph.nodes:
        if plan.precision.get(node) != "fp16":
            continue
        if node.op == "call_module":
            gm.get_submodule(node.target).half()
        elif node.op == "get_attr":
            tensor = attribute(gm, node.target)
            tensor.data = tensor.data.half()


def _full(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    opts = ctx.options
    io = "fp32" if opts["keep_io_types"] else "fp16"
    seen = ranges(gm, batches(ctx.data, ctx.example_inputs))
    plan = Planner(gm, seen, opts).plan(io)
    calls = [n for n in gm.graph.nodes if n.op in CALLS and n in plan.precision]
    entry = _entry_casts(gm, plan) if io == "fp16" else []
    casts = _Casts(gm, plan, {n for n, r in seen.items() if r.tensor} | set(entry))
    for node in list(gm.graph.nodes):
        if node in calls and not casts_to_fp32(node):
            casts.feed(node, plan.precision[node])
        elif node.op == "output":
            casts.feed(node, io)
    _store(gm, plan)
    for node, precision in plan.precision.items():
        node.meta["graphopt.precision"] = precision
    for node in calls:
        why = plan.reasons.get(node)
        ctx.explain(f"{node.name}: fp32, {why}" if why else f"{node.name}: fp16")
    half = sum(plan.precision[n] == "fp16" for n in calls)
    stats = {"fp16": half, "fp32": len(calls) - half, "kept_fp32": len(plan.forced),
             "casts": len(casts.made) + len(entry)}
    ctx.explain(f"{stats['fp16']} nodes fp16, {stats['fp32']} fp32 ({stats['kept_fp32']} kept by the "
                f"blocklist, keep_fp32 or the range guard), {stats['casts']} casts")
    return PassResult(gm, half > 0, stats)


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = fp16_weights.run(gm, ctx) if ctx.options["mode"] == "weights" else _full(gm, ctx)
    gm.recompile()
    return result


@graphopt.hookimpl
def graphopt_register_passes():
    return [Pass("fp16", "Half precision: weights and activations in fp16 except blocklisted and "
                         "out-of-range nodes, casts only at the borders (mode=weights: fp16 storage only)",
                 run, Effect.FP16, OPTIONS)]
