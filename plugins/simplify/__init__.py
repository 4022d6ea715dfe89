"""Constant subgraph => buffer; x * 1, x + 0, x - 0, x / 1 => x; redundant contiguous, clone,
detach, cast => x; permute -> inverse permute => x; reshape -> reshape back => x;
reshape chain => one reshape."""
from __future__ import annotations

import torch.fx as fx

import graphopt
from graphopt import Effect, Pass, PassContext, PassResult
from graphopt.rewrite import rewrite_pass

from . import layout, noops
from .constants import fold_constants

_rewrite = rewrite_pass([*noops.REWRITES, *layout.REWRITES])


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    folded = fold_constants(gm, ctx)
    noops.note_contiguity(gm, ctx.example_inputs)
    result = _rewrite(gm, ctx)
    stats = {**folded, **result.stats, "rejected": folded["rejected"] + result.stats["rejected"]}
    return PassResult(result.graph_module, result.modified or folded["constant"] > 0, stats)


@graphopt.hookimpl
def graphopt_register_passes():
    return [Pass("simplify", "Fold constant subgraphs into buffers; remove x*1, x+0, redundant copies and "
                             "casts, permutes that cancel; collapse reshape chains", run, Effect.EXACT)]
