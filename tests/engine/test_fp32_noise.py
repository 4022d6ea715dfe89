"""An exact rewrite is judged against the model's own fp32 rounding, never below it: a deep net's
fp32 outputs sit ~1e-5 from a float64 run (ResNeXt-50), and re-associating its sums moves them
that much. A rewrite that changes more than a few times that is still refused."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import Effect, Pass, PassResult

X = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))


class Cancelling(nn.Module):
    """(x + 1e4) - 1e4: fp32 keeps x to 1e4's spacing (~1e-3), float64 keeps it whole."""

    def forward(self, x):
        return (x + 1e4) - 1e4


def _reassociate(gm, ctx):
    """(x + c) - c => x + (c - c): the same function, rounded differently (exactly x in fp32)."""
    for node in gm.graph.nodes:
        if node.target is operator.sub and getattr(node.args[0], "target", None) is operator.add:
            x, c = node.args[0].args
            node.args = (x, c - node.args[1])
            node.target = operator.add
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, True)


def _off_by_a_percent(gm, ctx):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        out.args = (gm.graph.call_function(operator.mul, (out.args[0], 1.01)),)
    gm.recompile()
    return PassResult(gm, True)


@pytest.fixture
def rewrites(registry):
    registry.passes["reassociate"] = Pass("reassociate", "re-associates a sum", _reassociate, Effect.EXACT)
    registry.passes["off"] = Pass("off", "scales the output by 1.01", _off_by_a_percent, Effect.EXACT)
    yield registry
    del registry.passes["reassociate"], registry.passes["off"]


def test_an_exact_rewrite_is_judged_above_the_models_own_rounding(rewrites):
    graph = graphopt.capture(Cancelling(), (X,))
    noise = graph.fp32_noise()
    assert 1e-4 < noise < 1e-3           # the model's own fp32 error, far above the 1e-5 exact tolerance
    run = graphopt.run_pipeline(graph, "reassociate", rewrites)
    moved = graphopt.compare(graph.run(), run.graph.run()).max_rel
    assert 1e-5 < moved <= 4 * noise and run.records[0].verified
    with pytest.raises(graphopt.PassError, match=r"max relative error 0\.0\d+ > 0\.00"):
        graphopt.run_pipeline(graph, "off", rewrites)


def test_a_well_conditioned_model_keeps_the_exact_tolerance(rewrites):
    graph = graphopt.capture(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval(), (X,))
    assert graph.fp32_noise() < 2.5e-6
    assert graphopt.Effect.EXACT.tolerance.above(graph.fp32_noise()) == graphopt.Effect.EXACT.tolerance
    assert graph.replace(graph.module).fp32_noise() == graph.fp32_noise()
    half = graph.clone()
    half.meta["precision"] = "fp16"
    assert half.fp32_noise() == 0.0
