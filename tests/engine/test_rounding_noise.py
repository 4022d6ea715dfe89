"""A pass is judged against the model's own rounding, never below it. An exact rewrite: a deep net's
fp32 outputs sit ~1e-5 from a float64 run (ResNeXt-50), and re-associating its sums moves them
that much. An fp16 pass: the fp16 model a deep net stands for is 1-2.6e-2 from it (ResNeXt-50,
RegNet, GoogLeNet at 224), above the 1e-2 a small one meets. A rewrite that changes more than a
few times that is still refused."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import Effect, Pass, PassResult
from graphopt.driver import emit_all

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
    noise = graph.rounding_noise()
    assert 1e-4 < noise < 1e-3           # the model's own fp32 error, far above the 1e-5 exact tolerance
    run = graphopt.run_pipeline(graph, "reassociate", rewrites)
    moved = graphopt.compare(graph.run(), run.graph.run()).max_rel
    assert 1e-5 < moved <= 4 * noise and run.records[0].verified
    with pytest.raises(graphopt.PassError, match=r"max relative error 0\.0\d+ > 0\.00"):
        graphopt.run_pipeline(graph, "off", rewrites)


def test_a_well_conditioned_model_keeps_the_exact_tolerance(rewrites):
    graph = graphopt.capture(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval(), (X,))
    assert graph.rounding_noise() < 2.5e-6
    assert graphopt.Effect.EXACT.tolerance.above(graph.rounding_noise()) == graphopt.Effect.EXACT.tolerance
    assert graph.replace(graph.module).rounding_noise() == graph.rounding_noise()
    half = graph.clone()
    half.meta["precision"] = "fp16"
    assert half.rounding_noise() == 0.0


class Offset(nn.Module):
    """(x + 200) - 200: half's spacing at 200 is 0.125, so its fp16 model is ~2 % of x's scale off."""

    def forward(self, x):
        return (x + 200) - 200


def _cast(dtype):
    def run(gm, ctx):
        """The whole graph in ``dtype``: its weights, its input cast in, its output cast back to float32."""
        g = gm.graph
        x, out = next(n for n in g.nodes if n.op == "placeholder"), next(n for n in g.nodes if n.op == "output")
        with g.inserting_after(x):
            low = g.call_method("to", (x, dtype))
        x.replace_all_uses_with(low, delete_user_cb=lambda user: user is not low)
        with g.inserting_before(out):
            out.args = (g.call_method("float", (out.args[0],)),)
        gm.to(dtype).recompile()
        return PassResult(gm, True)
    return run


@pytest.fixture
def casts(registry):
    registry.passes["half"] = Pass("half", "runs in fp16", _cast(torch.float16), Effect.FP16)
    registry.passes["bf16"] = Pass("bf16", "runs in bfloat16 but says fp16", _cast(torch.bfloat16), Effect.FP16)
    yield registry
    del registry.passes["half"], registry.passes["bf16"]


def test_an_fp16_pass_is_judged_against_the_fp16_model_the_graph_stands_for(casts):
    graph = graphopt.capture(Offset(), (torch.randn(1, 256, generator=torch.Generator().manual_seed(1)),))
    noise = graph.rounding_noise("fp16")
    assert 1.5e-2 < noise < 4e-2 and graph.rounding_noise() < noise / 100
    run = graphopt.run_pipeline(graph, "half", casts)
    moved = graphopt.compare(graph.run(), run.graph.run()).max_rel
    assert 1e-2 < moved <= 2 * noise and run.records[0].verified and run.graph.precision == "fp16"
    with pytest.raises(graphopt.PassError, match=r"beyond its fp16 tolerance \(max relative error 0\.\d+ > 0\.\d+"):
        graphopt.run_pipeline(graph, "bf16", casts)    # bfloat16's 8 bits: 8x half's error, refused


def test_a_small_model_keeps_the_fp16_tolerance(casts):
    graph = graphopt.capture(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval(), (X,))
    assert graph.rounding_noise("fp16") < 2.5e-3
    assert graphopt.run_pipeline(graph, "half", casts).records[0].verified


def _half_artifact(dtype):
    """An emitter whose file computes Offset in ``dtype``, and says it is fp16."""
    def emit(graph, options, out):
        (out / "offset.half").write_bytes(b"offset")
        return graphopt.Artifact("half", out / "offset.half", {"precision": "fp16"})
    return graphopt.Emitter("half", "Offset in low precision", ".half", emit,
                            lambda artifact, threads=None: (lambda xs: [Offset()(xs[0].to(dtype)).float()]))


def test_an_fp16_artifact_is_judged_against_the_fp16_model_the_graph_stands_for(registry, tmp_path):
    graph = graphopt.capture(Offset(), (torch.randn(1, 256, generator=torch.Generator().manual_seed(1)),))
    (honest,) = emit_all(graph, [(_half_artifact(torch.float16), {})], tmp_path / "fp16", graph.run(), registry)
    assert honest.verified and honest.vs_graph.max_rel > 1e-2, honest.problems
    (bf16,) = emit_all(graph, [(_half_artifact(torch.bfloat16), {})], tmp_path / "bf16", graph.run(), registry)
    assert not bf16.verified and bf16.problems[0].startswith("max relative error")


def test_an_fp16_graph_keeps_the_bound_its_fp32_graph_measured(casts, registry, tmp_path):
    """onnxruntime computes an fp16 file in fp32 here: its outputs are as far from torch's fp16 graph as
    that graph is from fp32, and the fp16 graph (whose own float64 run cannot say so) keeps that bound."""
    graph = graphopt.capture(Offset(), (torch.randn(1, 256, generator=torch.Generator().manual_seed(1)),))
    run = graphopt.run_pipeline(graph, "half", casts)
    assert run.graph.precision == "fp16" and run.graph.rounding_noise("fp16") == graph.rounding_noise("fp16")
    (fp32,) = emit_all(run.graph, [(_half_artifact(torch.float32), {})], tmp_path, run.references, registry)
    assert fp32.verified and fp32.vs_graph.max_rel > 1e-2, fp32.problems
