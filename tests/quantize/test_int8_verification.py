"""int8 is judged by cosine and SQNR: an output scaled x2 or x0.5, a sign flip or a constant
output is refused, by the quantize pass's verification and by every format's artifact check."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import Effect, Pass, PassResult
from graphopt.driver import check_artifact, emit_one
from graphopt.emit import staging_dir

CORRUPTIONS = {
    "x2": lambda y: y * 2,
    "x0.5": lambda y: y * 0.5,
    "sign": lambda y: -y,
    "constant": lambda y: torch.full_like(y, float(y.mean())),
}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x))


def _calibration():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(1, 3, 16, 16, generator=gen) for _ in range(8)]


@pytest.fixture(scope="module")
def quantized(registry):
    run = graphopt.optimize(Net(), (torch.randn(1, 3, 16, 16),), registry, pipeline="quantize(prefer=size)",
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
        graph = graphopt.capture(Net(), torch.randn(1, 3, 16, 16))
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
        expected = graph.run()
        tolerance = emitter.tolerance_for({"precision": "int8"})
        honest = check_artifact(emitter, artifact, graph.example_inputs, expected, quantized.pipeline.reference,
                                tolerance)
        assert honest.verified, honest.problems
        load = emitter.load
        for name, corrupt in CORRUPTIONS.items():
            bad = graphopt.Emitter(emitter.format, emitter.description, emitter.suffix, emitter.emit,
                                   lambda a, threads=None: (lambda x: [corrupt(y) for y in load(a)(x)]))
            check = check_artifact(bad, artifact, graph.example_inputs, expected, quantized.pipeline.reference,
                                   tolerance)
            assert not check.verified, (fmt, name, check.vs_graph)
            assert any(p.startswith(("SQNR", "cosine")) for p in check.problems), (name, check.problems)
