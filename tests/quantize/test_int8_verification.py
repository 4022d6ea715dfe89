"""int8 is judged by cosine and SQNR: an output scaled x2 or x0.5, a sign flip or a constant
output is refused, by the quantize pass's verification and by every format's artifact check."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import Effect, Pass, PassResult
from graphopt.driver import INT8_STEPS, check_artifact, emit_one, int8_tolerance
from graphopt.emit import staging_dir
from graphopt.quant import output_step
from zoo.cnn import SmallConvNet

CORRUPTIONS = {
    "x2": lambda y: y * 2,
    "x0.5": lambda y: y * 0.5,
    "sign": lambda y: -y,
    "constant": lambda y: torch.full_like(y, float(y.mean())),
}


def _calibration():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(1, 3, 16, 16, generator=gen) for _ in range(8)]


def _nudge(y: torch.Tensor, by: float) -> torch.Tensor:
    y = y.clone()
    y.view(-1)[0] += by
    return y


@pytest.fixture(scope="module")
def quantized(registry):
    run = graphopt.optimize(SmallConvNet(), (torch.randn(1, 3, 16, 16),), registry, pipeline="quantize(prefer=size)",
                            data={"calibration": _calibration()})
    assert run.graph.precision == "int8"
    return run


def _corrupting(corrupt):
    """A quantize that writes a corrupted output: the real pass, then ``corrupt`` on the output."""
    def run(gm, ctx):
        result = ctx.registry.passes["quantize"].run(gm, ctx)
        gm = result.graph_module
        output = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(output):
            value = output.args[0]
            output.args = (gm.graph.call_function(corrupt, (value,)),)
        gm.recompile()
        return PassResult(gm, True, result.stats)
    return run


@pytest.mark.parametrize("name", [None, *CORRUPTIONS])
def test_the_quantize_pass_refuses_a_corrupted_output(name, registry):
    spec = registry.passes["quantize"]
    run = spec.run if name is None else _corrupting(CORRUPTIONS[name])
    registry.passes["bad-quantize"] = Pass("bad-quantize", "quantize, then a corrupted output", run, Effect.INT8,
                                           spec.options, needs=spec.needs)
    try:
        graph = graphopt.capture(SmallConvNet(), torch.randn(1, 3, 16, 16))
        if name is None:
            graphopt.run_pipeline(graph, "bad-quantize(prefer=size)", registry, data={"calibration": _calibration()})
            return
        with pytest.raises(graphopt.PassError, match="beyond its int8 tolerance .*(SQNR|cosine)"):
            graphopt.run_pipeline(graph, "bad-quantize(prefer=size)", registry, data={"calibration": _calibration()})
    finally:
        del registry.passes["bad-quantize"]


@pytest.mark.parametrize("fmt", ["onnx", "ptl", "tflite", "pte"])
def test_every_format_refuses_a_corrupted_int8_artifact(fmt, quantized, registry, tmp_path):
    emitter = registry.emitters[fmt]
    graph = quantized.graph
    with staging_dir(tmp_path) as stage:
        artifact = emit_one(graph, emitter, {o.name: o.default for o in emitter.options}, stage, registry)
        assert artifact.meta["precision"] == "int8"
        cases = [(label, x, graph.run(x), quantized.pipeline.references[label]) for label, x in graph.input_sets]
        assert len(cases) == 1 + 3 + 3      # the example, 3 shuffles of it, 3 of the 8 calibration samples
        noise = graph.rounding_noise("int8")
        tolerance = int8_tolerance(emitter.tolerance_for({"precision": "int8"}), graph.module, noise)
        assert 2 * noise < tolerance.max_abs == INT8_STEPS * output_step(graph.module)
        honest = check_artifact(emitter, artifact, cases, tolerance)
        assert honest.verified and honest.inputs == len(cases), honest.problems
        load = emitter.load
        for name, corrupt in CORRUPTIONS.items():
            bad = graphopt.Emitter(emitter.format, emitter.description, emitter.suffix, emitter.emit,
                                   lambda a, threads=None: (lambda x: [corrupt(y) for y in load(a)(x)]))
            check = check_artifact(bad, artifact, cases, tolerance)
            assert not check.verified, (fmt, name, check.vs_graph)
            assert any(p.startswith(("SQNR", "cosine")) for p in check.problems), (name, check.problems)
        # one logit off by 10 quantization steps: cosine and SQNR let it through, the step bound does not
        step = output_step(graph.module)
        nudged = graphopt.Emitter(emitter.format, emitter.description, emitter.suffix, emitter.emit,
                                  lambda a, threads=None: (lambda x: [_nudge(y, 10 * step) for y in load(a)(x)]))
        check = check_artifact(nudged, artifact, cases, tolerance)
        assert check.vs_graph.cosine > 0.99 and check.vs_graph.sqnr_db > 14 and not check.verified
        assert check.problems[0].startswith("max abs error") and "(on the example input)" in check.problems[0]


def test_int8_rounding_noise_is_what_rounding_the_other_way_does(quantized):
    """Stochastic rounding moves a quantized output by at most one step; through a network, by a few."""
    graph, step = quantized.graph, output_step(quantized.graph.module)
    assert 0 < graph.rounding_noise("int8") < INT8_STEPS * step / 2
    gm = graphopt.capture(nn.Sequential(nn.Identity()), (torch.randn(1, 64),)).module
    with gm.graph.inserting_before(out := next(n for n in gm.graph.nodes if n.op == "output")):
        out.args = (gm.graph.call_function(torch.fake_quantize_per_tensor_affine, (out.args[0], 0.1, 128, 0, 255)),)
    gm.recompile()
    one = graphopt.Graph(gm, (torch.randn(1, 64),), meta={"precision": "int8"})
    assert 0.05 < one.rounding_noise("int8") <= 0.1 + 1e-6   # half a step to one step
    assert one.rounding_noise("int8") == one.rounding_noise("int8")   # seeded
