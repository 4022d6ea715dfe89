"""partition: nodes a backend supports => maximal cycle-free partitions, each a submodule
``<backend>_<i>`` (``call_module``); the rest stays on the CPU with the reason why.

Grouping is capability-based and deterministic: every supported node starts alone, then
partitions joined by an edge merge (in graph order, until nothing changes) unless the merge
would let a value leave the partition and come back into it. A fake quant (a Q/DQ pair)
read by another partition is copied into it (fake quantization is idempotent, so the numbers
do not change), so a backend never sees a quantized op without its Q/DQ. A partition of
fewer than ``min_size`` non-trivial nodes (views, getitem, ...) is not worth delegating.
"""
from __future__ import annotations

from typing import Sequence

import torch.fx as fx

import graphopt
from graphopt import Effect, Option, Pass, PassContext, PassResult, Tolerance
from graphopt.errors import UsageError
from graphopt.quant import is_fake_quant

from . import hookspecs
from .backend import Backend, NodeInfo, all_of, max_channels, max_rank, op_kinds, static_shapes
from .capability import node_infos
from .cli import (graphopt_add_commands, graphopt_add_options, graphopt_configure_run, graphopt_pass_done,
                  graphopt_run_done)
from .extract import META, extract, inline

__all__ = ["Backend", "NodeInfo", "all_of", "max_channels", "max_rank", "op_kinds", "static_shapes",
           "registered_backends", "META"]


def _path_back(members: set[fx.Node], position: dict[fx.Node, int]) -> fx.Node | None:
    """A node outside ``members`` on a path from them back into them (None: no cycle)."""
    ordered = sorted(members, key=position.__getitem__)
    last = position[ordered[-1]]
    start = [u for n in ordered for u in n.users if u not in members and position[u] < last]
    seen: dict[fx.Node, fx.Node] = {u: u for u in start}    # node -> first outside node on its path
    stack = list(reversed(start))
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in members:
                return seen[node]
            if user not in seen and position[user] < last:
                seen[user] = seen[node]
                stack.append(user)
    return None


def group(gm: fx.GraphModule, supported: Sequence[fx.Node]) -> tuple[list[list[fx.Node]], list[str]]:
    """Maximal cycle-free groups of ``supported`` (in graph order) and the refused merges."""
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    part = {n: i for i, n in enumerate(supported)}
    members: dict[int, set[fx.Node]] = {i: {n} for n, i in part.items()}
    refused: dict[tuple[int, int], str] = {}
    changed = True
    while changed:
        changed = False
        for node in supported:
            for arg in node.all_input_nodes:
                a, b = part.get(arg), part[node]
                if a is None or a == b or (min(a, b), max(a, b)) in refused:
                    continue
                via = _path_back(members[a] | members[b], position)
                if via is not None:
                    refused[(min(a, b), max(a, b))] = (f"{arg.name} and {node.name} stay apart: merging them "
                                                       f"would make a cycle through {via.name}")
                    continue
                keep, gone = min(a, b), max(a, b)
                moved = members.pop(gone)
                for n in moved:
                    part[n] = keep
                members[keep] |= moved
                refused = {k: v for k, v in refused.items() if keep not in k and gone not in k}
                changed = True
    groups = [sorted(m, key=position.__getitem__) for m in members.values()]
    return sorted(groups, key=lambda g: position[g[0]]), sorted(refused.values())


def _copy_shared_fake_quants(gm: fx.GraphModule, groups: list[list[fx.Node]]) -> int:
    """Give every partition its own copy of each fake quant it reads from outside; returns the
    number of copies."""
    owner = {n: i for i, g in enumerate(groups) for n in g}
    copies = 0
    for fq in [n for n in gm.graph.nodes if is_fake_quant(n)]:
        made: dict[int, fx.Node] = {}
        for user in list(fq.users):
            p = owner.get(user)
            if p is None or owner.get(fq) == p:
                continue
            if p not in made:
                with gm.graph.inserting_after(fq):
                    made[p] = gm.graph.call_function(fq.target, (fq, *fq.args[1:]), dict(fq.kwargs))
                made[p].meta = dict(fq.meta)
                groups[p].insert(0, made[p])
                copies += 1
            user.replace_input_with(fq, made[p])
    return copies


def _report(backend: Backend, infos: dict[fx.Node, NodeInfo], groups: list[list[fx.Node]],
            names: list[str], reasons: dict[fx.Node, str], min_size: int) -> dict:
    owner = {n: names[i] for i, g in enumerate(groups) for n in g}
    nodes = [{"name": n.name, "kinds": list(i.kinds), "dtype": i.dtype,
              "shape": list(i.shape) if i.shape is not None else None, "macs": i.macs,
              "placement": owner.get(n, "cpu"), "reason": None if n in owner else reasons[n],
              "inputs": [a.name for a in n.all_input_nodes if a.op != "get_attr"]}
             for n, i in infos.items()]
    total = sum(i.macs for i in infos.values())
    on_backend = sum(infos[n].macs for g in groups for n in g if n in infos)
    counts = {backend.name: {"nodes": sum(1 for r in nodes if r["placement"] != "cpu"), "macs": on_backend},
              "cpu": {"nodes": sum(1 for r in nodes if r["placement"] == "cpu"), "macs": total - on_backend}}
    return {
        "backend": backend.name, "min_size": min_size,
        "partitions": [{"name": name, "nodes": [n.name for n in g],
                        "macs": sum(infos[n].macs for n in g if n in infos)} for name, g in zip(names, groups)],
        "nodes": nodes,
        "summary": {"backends": counts, "delegated_share": on_backend / total if total else 0.0,
                    "estimated_time": (total - on_backend + on_backend * backend.cost) / total if total else None},
    }


def registered_backends(registry) -> dict[str, Backend]:
    """Every plugin's backends by name (the ``graphopt_register_backends`` hook)."""
    return registry.collect("graphopt_register_backends", Backend, "name") if registry else {}


def backend_named(ctx: PassContext, name: str) -> Backend:
    backends = registered_backends(ctx.registry)
    if name not in backends:
        raise UsageError(f"unknown backend {name!r}; registered backends: {', '.join(sorted(backends)) or 'none'}")
    return backends[name]


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    backend = backend_named(ctx, ctx.options["backend"])
    min_size = ctx.options["min_size"]
    was_partitioned = META in getattr(gm, "meta", {})
    gm = inline(gm)
    infos = node_infos(gm, ctx.example_inputs)
    reasons = {n: f"{backend.name} is the fallback: nothing to delegate" if backend.fallback
               else backend.why_not(i) for n, i in infos.items()}
    supported = [n for n, r in reasons.items() if r is None]
    groups, refused = group(gm, supported)
    kept = []
    for g in groups:
        work = sum(1 for n in g if not infos[n].trivial)
        if work >= max(min_size, 1):
            kept.append(g)
            continue
        why = (f"not worth a partition: {len(g)} trivial node{'s' * (len(g) > 1)}" if not work else
               f"not worth a partition: {work} node{'s' * (work > 1)} < min_size={min_size}")
        reasons.update(dict.fromkeys(g, why))
    prefix = backend.name.replace("-", "_")
    names = [f"{prefix}_{i}" for i in range(len(kept))]
    report = _report(backend, infos, kept, names, reasons, min_size)
    report["qdq_copies"] = _copy_shared_fake_quants(gm, kept)
    report["refused_merges"] = refused
    for row in report["nodes"]:
        if row["reason"]:
            ctx.explain(f"{row['name']} ({', '.join(row['kinds'])}) stays on the CPU: {row['reason']}")
    for line in refused:
        ctx.explain(line)
    new, _ = extract(gm, kept, prefix, f"{prefix.title().replace('_', '')}Partition")
    new.meta[META] = {"backend": backend.name, "partitions": names}
    return PassResult(new, bool(kept) or was_partitioned, report)


PARTITION = Pass(
    name="partition",
    description="Split the graph into maximal cycle-free partitions a backend supports, one submodule each",
    run=run,
    effect=Effect.EXACT,
    tolerance=Tolerance(max_rel=1e-6),     # it only moves nodes into submodules
    options=(
        Option("backend", str, "xnnpack", "backend to partition for (graphopt backends lists them)"),
        Option("min_size", int, 1, "fewest non-trivial nodes a partition must hold to be delegated"),
    ),
)


@graphopt.hookimpl
def graphopt_addhooks(pluginmanager):
    pluginmanager.add_hookspecs(hookspecs)


@graphopt.hookimpl
def graphopt_configure(registry) -> None:
    registered_backends(registry)          # bad or clashing backend definitions fail at load


@graphopt.hookimpl
def graphopt_register_passes():
    return [PARTITION]
