"""The TorchScript-Lite emitter: trace or script, mobile optimization, extra files, numbers through the lite interpreter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from typing import Callable

import numpy as np
import pytest
import torch
import torch.backends.xnnpack
from torch import nn

import graphopt
from conftest import ROOT, TESTS
from graphopt.cli import main
from graphopt.testing import assert_close
import graphopt_plugins.ptl as ptl_emitter
from zoo import TRANSFORMER_ZOO, ZOO
from zoo.fold import randomize_bn
from zoo.half import HalfCompute, HalfStorage

TOLERANCE = ptl_emitter.graphopt_register_emitters()[0].tolerance


class ImageAndVector(nn.Module):
    """Two inputs of different rank."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4 + 3, 2)

    def forward(self, image, extra):
        return self.head(torch.cat([self.conv(image).mean(dim=(2, 3)), extra], dim=1))


class NestedOutputs(nn.Module):
    """A dict holding a tuple, and a non-tensor leaf that the artifact drops like graph.run does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return {"map": torch.sigmoid(y), "stats": (y.mean(dim=(2, 3)), y.amax()), "batch": x.size(0)}


class Normalize(nn.Module):
    """``.item()`` reads a value from the data: a trace would freeze it as a constant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y / y.abs().max().item()


def numpy_peak(x):
    return x / float(np.abs(x.detach().numpy()).max())


torch.fx.wrap("numpy_peak")


class NumpyPeak(nn.Module):
    """Reads the data through numpy: tracing bakes it in and TorchScript cannot script it."""

    def forward(self, x):
        return numpy_peak(x)


def conv_bn_relu() -> nn.Module:
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)))


def _capture(build: Callable[[], nn.Module], *shapes: tuple[int, ...], name: str) -> graphopt.Graph:
    torch.manual_seed(0)
    return graphopt.capture(build(), [torch.randn(*s) for s in shapes], name=name)


def _assert_close(graph: graphopt.Graph, artifact: graphopt.Artifact, inputs=None) -> None:
    inputs = list(graph.example_inputs if inputs is None else inputs)
    assert_close(graph.run(inputs), ptl_emitter.load(artifact)(inputs), TOLERANCE)


@pytest.fixture(scope="module")
def cnn() -> graphopt.Graph:
    graph = _capture(conv_bn_relu, (1, 3, 16, 16), name="cnn")
    graph.meta["pipeline"] = "cleanup,fold-bn"
    return graph


def test_registered_through_the_entry_point(registry):
    emitter = registry.emitters["ptl"]
    assert emitter.suffix == ".ptl" and emitter.missing() == []
    assert registry.owner["emitter:ptl"] == "ptl"
    assert {o.name: o.default for o in emitter.options} == {"optimize_for_mobile": True, "engine": "onednn"}
    assert emitter.tolerance_for({"optimize_for_mobile": False}) == TOLERANCE


def test_cnn_file_meta_extra_files_and_numbers(cnn, tmp_path, capfd):
    artifact = ptl_emitter.emit(cnn, {}, tmp_path)
    runner = ptl_emitter.load(artifact)
    outputs = runner(list(cnn.example_inputs))
    assert capfd.readouterr() == ("", "")   # no C++ log line (Python warnings: the fresh-process test)
    assert artifact.path == tmp_path / "cnn.ptl" and [p.name for p in tmp_path.iterdir()] == ["cnn.ptl"]
    meta = artifact.meta
    assert meta["torchscript"] == "traced" and "scripted_because" not in meta
    assert meta["ops"] == sorted(meta["ops"]) and "aten::linear" in meta["ops"]
    assert "aten::batch_norm" not in meta["ops"]   # frozen: BN folded into the convolution
    assert meta["inputs"] == [{"name": cnn.input_names[0], "shape": [1, 3, 16, 16], "dtype": "float32"}]
    assert meta["outputs"] == [{"shape": [1, 5], "dtype": "float32"}]
    assert isinstance(meta["bytecode_version"], int)
    expected = {"version": graphopt.__version__, "pipeline": "cleanup,fold-bn", "inputs": meta["inputs"],
                "precision": "fp32"}
    with zipfile.ZipFile(artifact.path) as archive:
        assert json.loads(archive.read("archive/extra/graphopt.json")) == expected
        assert not [n for n in archive.namelist() if n.endswith(".debug_pkl")]
    extra = {"graphopt.json": ""}
    torch.jit.load(artifact.path, _extra_files=extra)   # still a full TorchScript archive too
    assert json.loads(extra["graphopt.json"]) == expected
    assert_close(cnn.run(), outputs, TOLERANCE)


def _optimize_for_mobile_runs() -> bool:
    """Whether torch's optimize_for_mobile works on this build, tried on a module of our own."""
    from torch.utils import mobile_optimizer
    try:
        mobile_optimizer.optimize_for_mobile(torch.jit.script(torch.nn.Conv2d(3, 4, 3).eval()))
    except Exception:
        return False
    return True


def test_optimize_for_mobile_as_this_torch_build_allows(cnn, tmp_path):
    artifact = ptl_emitter.emit(cnn, {}, tmp_path)
    expected = "applied" if _optimize_for_mobile_runs() else ptl_emitter.NO_XNNPACK
    assert artifact.meta["optimize_for_mobile"] == expected
    assert ptl_emitter.emit(cnn, {"optimize_for_mobile": False}, tmp_path).meta["optimize_for_mobile"] == "off"


def test_a_failing_optimize_for_mobile_is_noted_not_fatal(cnn, tmp_path, monkeypatch):
    from torch.utils import mobile_optimizer

    def broken(module, *args, **kwargs):
        raise RuntimeError("no XNNPACK here\nsecond line")

    monkeypatch.setattr(ptl_emitter, "_has_xnnpack", lambda: True)
    monkeypatch.setattr(mobile_optimizer, "optimize_for_mobile", broken)
    artifact = ptl_emitter.emit(cnn, {}, tmp_path)
    assert artifact.meta["optimize_for_mobile"] == "skipped: no XNNPACK here"
    _assert_close(cnn, artifact)


@pytest.mark.parametrize("builder", ["tiny_resnet", "tiny_mobilenet"])
def test_zoo_models_match_the_graph(builder, tmp_path, registry):
    run = graphopt.run_pipeline(_capture(ZOO[builder][0], (1, 3, 32, 32), name=builder),
                                "cleanup,fold-bn", registry)
    artifact = ptl_emitter.emit(run.graph, {}, tmp_path)
    assert artifact.meta["torchscript"] == "traced"
    _assert_close(run.graph, artifact)
    _assert_close(run.graph, artifact, [torch.randn(1, 3, 32, 32) * 3])   # a trace is not tied to its input


@pytest.mark.parametrize("builder", sorted(TRANSFORMER_ZOO))
def test_transformer_models_reach_a_running_ptl(builder, tmp_path, registry):
    """Scripted archives keep their version record elsewhere (.data/version): still saved."""
    build, shape = TRANSFORMER_ZOO[builder]
    run = graphopt.run_pipeline(_capture(build, shape, name=builder), "cleanup,fold-bn,fuse", registry)
    artifact = ptl_emitter.emit(run.graph, {}, tmp_path)
    _assert_close(run.graph, artifact)


def test_two_inputs_in_placeholder_order_cast_to_the_model_dtype(tmp_path):
    graph = _capture(ImageAndVector, (2, 3, 8, 8), (2, 3), name="two_in")
    artifact = ptl_emitter.emit(graph, {}, tmp_path)
    assert [i["name"] for i in artifact.meta["inputs"]] == ["image", "extra"]
    _assert_close(graph, artifact, [torch.randn(2, 3, 8, 8), torch.randn(2, 3)])
    runner = ptl_emitter.load(artifact)
    assert runner([torch.randn(2, 3, 8, 8), torch.randn(2, 3, dtype=torch.float64)])[0].dtype == torch.float32
    with pytest.raises(graphopt.EmitError, match="two_in.ptl takes 2 inputs, got 1"):
        runner([torch.randn(2, 3, 8, 8)])


def test_nested_outputs_come_back_flat_in_graph_order(tmp_path):
    graph = _capture(NestedOutputs, (2, 3, 8, 8), name="nested")
    artifact = ptl_emitter.emit(graph, {}, tmp_path)
    assert [o["shape"] for o in artifact.meta["outputs"]] == [[2, 4, 8, 8], [2, 4], []]
    raw = torch.jit.mobile._load_for_lite_interpreter(str(artifact.path))(*graph.example_inputs)
    assert isinstance(raw, tuple) and len(raw) == 3   # the file itself returns a flat tuple
    _assert_close(graph, artifact)


def test_data_read_by_item_is_scripted_not_frozen_into_a_trace(tmp_path, capfd):
    graph = _capture(Normalize, (1, 3, 8, 8), name="normalize")
    artifact = ptl_emitter.emit(graph, {}, tmp_path)
    assert artifact.meta["torchscript"] == "scripted"
    assert "Converting a tensor to a Python number" in artifact.meta["scripted_because"]
    _assert_close(graph, artifact, [torch.randn(1, 3, 8, 8) * 100])   # a trace would divide by the old peak
    assert capfd.readouterr() == ("", "")


def test_untraceable_and_unscriptable_is_one_line_emit_error(tmp_path, capfd):
    graph = _capture(NumpyPeak, (2, 5), name="peak")
    with pytest.raises(graphopt.EmitError) as info:
        ptl_emitter.emit(graph, {}, tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot make TorchScript of peak: the tracer warned")
    assert "torch.jit.script failed" in message
    assert list(tmp_path.iterdir()) == []
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("build", [conv_bn_relu, Normalize])   # traced, scripted
def test_same_graph_gives_the_same_bytes(build, tmp_path):
    graph = _capture(build, (1, 3, 8, 8), name="twice")
    first = ptl_emitter.emit(graph, {}, tmp_path / "a").path.read_bytes()
    assert ptl_emitter.emit(graph, {}, tmp_path / "b").path.read_bytes() == first


FRESH_PROCESS = """
import sys, test_ptl_emitter as t
import graphopt_plugins.ptl as ptl_emitter
for build, shape, name in [(t.Normalize, (1, 3, 8, 8), "normalize"), (t.conv_bn_relu, (1, 3, 16, 16), "cnn")]:
    graph = t._capture(build, shape, name=name)
    ptl_emitter.load(ptl_emitter.emit(graph, {}, sys.argv[1]))(list(graph.example_inputs))
"""


def test_a_fresh_process_writes_the_same_bytes_and_prints_nothing(tmp_path):
    """Another hash seed (scripting orders class constants by hash) and every warning shown:
    neither tracing, scripting, saving nor the lite interpreter may print."""
    ptl_emitter.emit(_capture(Normalize, (1, 3, 8, 8), name="normalize"), {}, tmp_path / "here")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join([str(TESTS / "ptl"), str(TESTS)])}
    proc = subprocess.run([sys.executable, "-W", "always", "-c", FRESH_PROCESS, str(tmp_path / "there")],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert (tmp_path / "there" / "normalize.ptl").read_bytes() == (tmp_path / "here" / "normalize.ptl").read_bytes()


def test_threads_are_set_for_the_call_and_restored(cnn, tmp_path, monkeypatch):
    artifact = ptl_emitter.emit(cnn, {}, tmp_path)
    before = torch.get_num_threads()
    calls = []
    set_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), set_threads(n)))
    outputs = ptl_emitter.load(artifact, threads=1)(list(cnn.example_inputs))
    assert calls == [1, before] and torch.get_num_threads() == before
    assert_close(cnn.run(), outputs, TOLERANCE)
    ptl_emitter.load(artifact)(list(cnn.example_inputs))
    assert calls == [1, before]   # threads=None leaves torch's setting alone


def test_a_file_that_is_not_ptl_is_one_line_emit_error(tmp_path):
    path = tmp_path / "broken.ptl"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(graphopt.EmitError, match="the lite interpreter cannot load") as info:
        ptl_emitter.load(graphopt.Artifact("ptl", path))
    assert "\n" not in str(info.value)


def test_cli_emits_onnx_and_ptl_verified(tmp_path, capsys):
    out, report = tmp_path / "out", tmp_path / "report.json"
    code = main(["run", f"{TESTS}/zoo/cnn.py:tiny_resnet", "--input-shape", "1x3x32x32", "--emit", "onnx,ptl",
                 "--out", str(out), "--report", str(report), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["tiny_resnet.onnx", "tiny_resnet.ptl"]
    artifacts = {a["format"]: a for a in json.loads(report.read_text())["artifacts"]}
    assert artifacts["onnx"]["verified"] and artifacts["ptl"]["verified"]
    assert artifacts["ptl"]["meta"]["torchscript"] == "traced"
    assert artifacts["ptl"]["path"] == str(out / "tiny_resnet.ptl")


def test_fp16_weights_upcast_at_use_stay_fp16_attributes(tmp_path, monkeypatch):
    model = HalfStorage()
    graph = _capture(lambda: model, (1, 32, 8, 8), name="half_storage")
    artifact = ptl_emitter.emit(graph, {}, tmp_path)
    meta = artifact.meta
    assert meta["precision"] == "fp16" and meta["fp16"] == "weights"
    fp32 = ptl_emitter.emit(graphopt.capture(model.fp32(), graph.example_inputs), {}, tmp_path / "fp32")
    assert artifact.bytes / fp32.bytes < 0.6   # freezing would have folded the upcasts into fp32 constants
    _assert_close(graph, artifact)
    monkeypatch.setattr(ptl_emitter, "_has_xnnpack", lambda: True)   # optimize_for_mobile freezes everything
    assert ptl_emitter.emit(graph, {}, tmp_path / "xnnpack").meta["optimize_for_mobile"] == ptl_emitter.FP16_KEPT


def test_half_compute_runs_half_in_the_lite_interpreter(tmp_path):
    graph = _capture(HalfCompute, (1, 3, 8, 8), name="half_compute")
    artifact = ptl_emitter.emit(graph, {}, tmp_path)
    assert artifact.meta["precision"] == "fp16" and artifact.meta["fp16"] == "weights and activations"
    assert_close(graph.run(), ptl_emitter.load(artifact)(list(graph.example_inputs)), TOLERANCE)
