"""Verification runs on several inputs: the example, seeded shuffles of it and calibration samples.
A pass or an artifact that is right on the example alone (one that memorized it) is refused, and
the input it failed on is named."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import Effect, Pass, PassResult
from graphopt.cli import main
from graphopt.driver import check_artifact, check_inputs, emit_one
from graphopt.emit import staging_dir
from conftest import TESTS

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def test_shuffles_keep_the_example_values_in_new_places():
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(3))
    sets = check_inputs((X, ids), 3)
    assert [label for label, _ in sets] == ["random 1", "random 2", "random 3"]
    for _, (x, i) in sets:
        assert torch.equal(x.flatten().sort().values, X.flatten().sort().values) and not torch.equal(x, X)
        assert i.dtype == torch.int64 and torch.equal(i.flatten().sort().values, ids.flatten().sort().values)
    again = check_inputs((X, ids), 3)
    assert all(torch.equal(a, b) for (_, s), (_, t) in zip(sets, again) for a, b in zip(s, t))   # seeded
    assert not torch.equal(sets[0][1][0], sets[1][1][0])
    assert check_inputs((X,), 0) == ()


def test_calibration_samples_shaped_like_the_example_are_spread_over():
    samples = [torch.full((2, 3, 8, 8), float(i)) for i in range(9)] + [torch.zeros(1, 3, 8, 8)]  # a short last batch
    sets = dict(check_inputs((X,), 3, samples))
    assert [k for k in sets if k.startswith("calibration")] == ["calibration 1", "calibration 2", "calibration 3"]
    assert [float(sets[f"calibration {i}"][0][0, 0, 0, 0]) for i in (1, 2, 3)] == [0.0, 3.0, 6.0]
    assert len(check_inputs((X,), 2, [(s,) for s in samples])) == 4     # tuples, as --calib gives them


def _memorizing(gm, ctx):
    """A wrong pass that is right on the example: the graph returns the example's outputs."""
    expected = gm(*ctx.example_inputs).detach()
    g = gm.graph
    out = next(n for n in g.nodes if n.op == "output")
    gm.register_buffer("memorized", expected)
    with g.inserting_before(out):
        out.args = (g.get_attr("memorized"),)
    g.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, True)


@pytest.fixture
def memorizing(registry):
    registry.passes["memorize"] = Pass("memorize", "returns the example's outputs", _memorizing, Effect.EXACT)
    yield registry
    del registry.passes["memorize"]


def test_a_pass_right_on_the_example_alone_is_refused(memorizing):
    graph = graphopt.capture(Small(), (X,))
    assert graphopt.run_pipeline(graph, "memorize", memorizing).records[0].verified     # the example only
    graph.check_inputs = check_inputs(graph.example_inputs, 2)
    with pytest.raises(graphopt.PassError, match="changed the outputs on the random 1 input beyond its exact"):
        graphopt.run_pipeline(graph, "memorize", memorizing)


def test_an_artifact_right_on_the_example_alone_is_refused(registry, tmp_path):
    run = graphopt.optimize(Small(), (X,), registry, pipeline="cleanup", verify_inputs=2)
    graph, onnx = run.graph, registry.emitters["onnx"]
    cases = [(label, x, graph.run(x), run.pipeline.references[label]) for label, x in graph.input_sets]
    with staging_dir(tmp_path) as stage:
        artifact = emit_one(graph, onnx, {}, stage, registry)
        honest = check_artifact(onnx, artifact, cases, onnx.tolerance)
        assert honest.verified and honest.inputs == 3 and honest.as_dict()["inputs"] == 3
        example = onnx.load(artifact)(list(X.unsqueeze(0)))
        stuck = graphopt.Emitter("onnx", "", ".onnx", onnx.emit, lambda a, threads=None: (lambda x: example))
        check = check_artifact(stuck, artifact, cases, onnx.tolerance)
    assert not check.verified and check.problems[0].endswith("(on the random 1 input)")


def test_the_report_says_how_many_inputs_each_artifact_ran_on(capsys, tmp_path):
    model = f"{TESTS / 'zoo' / 'cnn.py'}:tiny_resnet"
    for count, expected in (("0", 1), (None, 4)):
        report = tmp_path / f"report{count}.json"
        argv = ["run", model, "--input-shape", "1x3x32x32", "--pipeline", "cleanup", "--out", str(tmp_path / "o"),
                "--report", str(report), "--quiet", *(["--verify-inputs", count] if count else [])]
        assert main(argv) == 0
        assert [a["inputs"] for a in json.loads(report.read_text())["artifacts"]] == [expected]
    capsys.readouterr()
    assert main(["run", model, "--input-shape", "1x3x32x32", "--verify-inputs", "-1"]) == 2
    assert "--verify-inputs: takes a whole number >= 0, got '-1'" in capsys.readouterr().err
