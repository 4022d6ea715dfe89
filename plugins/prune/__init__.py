"""prune: structured channel pruning. Conv/Linear/... channels are removed physically, with
every channel coupled to them (``rules``), constants in the graph updated, and the
result verified against the mask-then-prune oracle: the unpruned graph with the same
channels zeroed must give the same outputs."""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

import graphopt
from graphopt import Effect, Option, Pass, PassContext, PassResult
from graphopt.graph import annotate, flatten_outputs
from graphopt.metrics import compare

from .apply import Surgery, apply, pins, plan, scalars
from .oracle import MaskedRun, diverging
from .deps import Analysis, Group
from .importance import CRITERIA, Choice, parse_overrides, select, unit_scores
from .rules import propagate

PLAN = "graphopt.prune.plan"      # gm.meta key: the surgeries applied so far, in order

OPTIONS = (
    Option("ratio", float, 0.5, "fraction of each group's channels to remove",
           tune=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)),
    Option("criterion", str, "l1", "channel importance", CRITERIA, tune=("l1", "l2", "bn")),
    Option("aggregate", str, "mean", "how a group's layers combine their importance", ("mean", "max", "sum")),
    Option("scope", str, "uniform", "uniform: each group loses ratio; global: rank channels across groups",
           ("uniform", "global")),
    Option("max_ratio", float, 0.9, "never remove more than this fraction of one group"),
    Option("round_to", int, 1, "keep a multiple of this many channels in each group (e.g. 8)",
           tune=(1, 8)),
    Option("ignore", str, "", "comma-separated layer-name globs whose output channels stay"),
    Option("override", str, "", "per-layer ratios: 'layer1.*:0.3,fc1:0'"),
    Option("target_macs", float, 0.0, "prune until at most this fraction of the MACs is left (0: use ratio)"),
    Option("target_params", float, 0.0, "prune until at most this fraction of the parameters is left"),
    Option("steps", int, 1, "prune in this many steps, re-ranking the channels after each"),
    Option("seed", int, 0, "seed of criterion=random"),
)


def _check(o: dict) -> None:
    problems = [msg for bad, msg in [
        (not 0 <= o["ratio"] < 1, "ratio must be in [0, 1)"),
        (not 0 < o["max_ratio"] <= 1, "max_ratio must be in (0, 1]"),
        (o["round_to"] < 1, "round_to must be at least 1"),
        (o["steps"] < 1, "steps must be at least 1"),
        (not 0 <= o["target_macs"] < 1 or not 0 <= o["target_params"] < 1, "targets must be in [0, 1)"),
        (o["target_macs"] and o["target_params"], "give target_macs or target_params, not both")] if bad]
    if problems:
        raise ValueError("; ".join(problems))


def split_attention(gm: fx.GraphModule, ctx: PassContext) -> list[str]:
    """nn.MultiheadAttention => its q/k/v/out Linear layers and matmuls, whose channels the
    rules can follow (head dims are then pruned, the head count kept). Returns the modules
    split."""
    from graphopt_plugins.tflite_compat.attention import split_multihead_attention

    return split_multihead_attention(gm, ctx)


def _measure(a: Analysis, choices: dict[int, Choice], groups: list[Group], inputs, what: str) -> int:
    pruned = copy.deepcopy(a.gm)
    apply(pruned, plan(a, _removed(a, groups, choices)))
    if what == "params":
        return sum(p.numel() for p in pruned.parameters())
    annotate(pruned, inputs)
    return sum(int(n.meta.get("graphopt.macs", 0)) for n in pruned.graph.nodes)


def _removed(a: Analysis, groups: list[Group], choices: dict[int, Choice]) -> np.ndarray:
    removed = np.zeros(a.size, dtype=bool)
    for g in groups:
        for i in choices[g.index].removed:
            removed[g.units[i]] = True
    return removed


def _choose(a: Analysis, groups, scores, o: dict, ratio: float, goal: tuple[str, int] | None, inputs):
    """Selection at ``ratio``, or at the smallest ratio whose result meets ``goal``."""
    kw = dict(scope=o["scope"], max_ratio=o["max_ratio"], round_to=o["round_to"],
              ignore=[p.strip() for p in o["ignore"].split(",") if p.strip()],
              overrides=parse_overrides(o["override"]))
    if goal is None:
        return select(groups, scores, ratio=ratio, **kw)
    what, limit = goal
    lo, hi = 0.0, 0.99
    best = select(groups, scores, ratio=hi, **kw)
    for _ in range(12):
        mid = (lo + hi) / 2
        choice = select(groups, scores, ratio=mid, **kw)
        if _measure(a, choice, groups, inputs, what) <= limit:
            hi, best = mid, choice
        else:
            lo = mid
    return best


def _explain(ctx: PassContext, g: Group, scores: np.ndarray, choice: Choice, prefix: str) -> None:
    names = list(dict.fromkeys(g.owners + g.members))          # the layers making the channels first
    members = ", ".join(names[:8]) + (f" +{len(names) - 8} more" if len(names) > 8 else "")
    total = len(g.units)
    width = max(s.size for s in g.spaces)
    size = f"{total} channels" if width == total else f"{total} units of {width // total} channels"
    known = scores[~np.isnan(scores)]
    spread = f"importance {known.min():.3g}..{known.max():.3g} (median {np.median(known):.3g}); " if known.size else ""
    frozen = f"; {len(g.frozen)} frozen: {next(iter(g.frozen.values()))}" if g.frozen else ""
    if choice.removed:
        what = f"removed {len(choice.removed)}, kept {total - len(choice.removed)}"
    else:
        what = f"kept all ({choice.reason})"
    ctx.explain(f"{prefix}group {g.index} [{members}]: {size}, {spread}{what}{frozen}")


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    o = ctx.options
    _check(o)
    inputs = ctx.example_inputs
    split = split_attention(gm, ctx)
    plans = list(gm.meta.get(PLAN, []))
    annotate(gm, inputs)
    start = {"macs": sum(int(n.meta.get("graphopt.macs", 0)) for n in gm.graph.nodes),
             "params": sum(p.numel() for p in gm.parameters())}
    target = ("macs", o["target_macs"]) if o["target_macs"] else ("params", o["target_params"]) \
        if o["target_params"] else None
    steps, stats = o["steps"], {"groups": 0, "pruned_groups": 0, "frozen_groups": 0, "channels_removed": 0}
    for step in range(steps):
        before = scalars(gm, inputs)            # annotates gm too
        clock = time.perf_counter()
        a = propagate(gm)
        groups = a.groups()
        stats["analysis_seconds"] = round(stats.get("analysis_seconds", 0) + time.perf_counter() - clock, 4)
        scores = unit_scores(a, groups, o["criterion"], o["aggregate"], o["seed"], ctx.data.get("loss"))
        ratio = 1 - (1 - o["ratio"]) ** (1 / steps)
        goal = (target[0], int(start[target[0]] * target[1] ** ((step + 1) / steps))) if target else None
        choices = _choose(a, groups, scores, o, ratio, goal, inputs)
        removed = _removed(a, groups, choices)
        surgery = plan(a, removed)
        surgery.decomposed = split if step == 0 else []
        pruned = copy.deepcopy(gm)
        apply(pruned, surgery)
        if pinned := pins(pruned, before, scalars(pruned, inputs)):
            apply(pruned, Surgery(constants=pinned))
            for name, changes in pinned.items():
                surgery.constants.setdefault(name, []).extend(changes)
        prefix = f"step {step + 1}: " if steps > 1 else ""
        for g in groups:
            _explain(ctx, g, scores[g.index], choices[g.index], prefix)
        _verify_step(a, removed, pruned, inputs, step + 1 if steps > 1 else None)
        plans.append(surgery.as_dict())
        stats["groups"] = len(groups)
        stats["pruned_groups"] += sum(1 for c in choices.values() if c.removed)
        stats["frozen_groups"] = sum(1 for g in groups if g.frozen and not g.prunable)
        stats["channels_removed"] += sum(len(c.removed) for c in choices.values())
        ctx.scratch["oracle"] = (a, removed)
        gm = pruned
    gm.meta[PLAN] = plans
    return PassResult(gm, stats["channels_removed"] > 0 or bool(split), stats)


def _verify_step(a: Analysis, removed: np.ndarray, pruned: fx.GraphModule, inputs, step: int | None) -> None:
    """Each step checked against its own mask oracle here, where a difference can be traced to the
    first node that makes it (the pass manager checks the outputs of the last on every input set)."""
    problems = graphopt.Effect.STRUCTURAL.tolerance.violations(
        compare(_masked(a, removed, inputs), flatten_outputs(pruned(*inputs))))
    if problems:
        where = diverging(a, removed, pruned, inputs)
        raise ValueError(f"{f'step {step} ' if step else 'the pruned graph '}does not match its mask oracle: "
                         f"{'; '.join(problems)}" + (f"; first diverging node {where}" if where else ""))


def _masked(a: Analysis, removed: np.ndarray, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return flatten_outputs(MaskedRun(a, removed).run(*inputs))


def oracle(before: fx.GraphModule, after: fx.GraphModule, ctx: PassContext) -> list[torch.Tensor]:
    """Mask-then-prune: the unpruned graph with the removed channels zeroed after every node."""
    a, removed = ctx.scratch["oracle"]
    return _masked(a, removed, ctx.example_inputs)


@graphopt.hookimpl
def graphopt_register_passes():
    return [Pass("prune", "Structured channel pruning: remove coupled channel groups physically, "
                          "constants updated, verified against the mask-then-prune oracle",
                 run, Effect.STRUCTURAL, OPTIONS, oracle=oracle)]
