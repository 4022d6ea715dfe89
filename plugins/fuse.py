"""The fuse family in order: simplify, fold-bn, fold-affine, merge-linear, fuse-act (each an
exact pass of its own plugin); stats per member, explanations prefixed by the member's name."""
from __future__ import annotations

import torch.fx as fx

import graphopt
from graphopt import Effect, Pass, PassContext, PassResult
from graphopt.graph import annotate
from graphopt_plugins import fold_affine, fold_bn, fuse_act, merge_linear, simplify

# simplify first (constants become buffers that fold-affine can take; no-ops stop hiding
# patterns), then the folds into layer weights, then merging, and activation fusion last:
# a fused module is opaque to the passes before it.
MEMBERS = (("simplify", simplify.run), ("fold-bn", fold_bn.run), ("fold-affine", fold_affine.run),
           ("merge-linear", merge_linear.run), ("fuse-act", fuse_act.run))


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    stats, modified, changed = {}, False, False
    for name, member in MEMBERS:
        if changed:
            annotate(gm, ctx.example_inputs)   # shapes for the nodes the member before created
        sub = PassContext(options={}, graph=ctx.graph.replace(gm), data=ctx.data)
        result = member(gm, sub)
        gm, changed = result.graph_module, result.modified
        modified = modified or changed
        stats[name] = dict(result.stats)
        for line in sub.explanations:
            ctx.explain(f"{name}: {line}")
    return PassResult(gm, modified, stats)


@graphopt.hookimpl
def graphopt_register_passes():
    return [Pass("fuse", "Operator fusion: " + ", ".join(name for name, _ in MEMBERS) + ", in that order",
                 run, Effect.EXACT, default_order=30)]
