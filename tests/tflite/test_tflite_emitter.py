"""The TFLite emitter: layouts, precisions, names, refusals, offline conversion, quiet logs."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import graphopt_plugins.tflite as tflite_emitter
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo.cnn import tiny_resnet
from zoo.half import HalfCompute, HalfStorage

import graphopt
from graphopt.driver import emit_all, select_emitters
from graphopt.emit import captured_output

EMITTER = tflite_emitter.graphopt_register_emitters()[0]


class TwoByTwo(nn.Module):
    """Two inputs, two outputs of different shapes; the second (1x4x4x4) fits NCHW and NHWC."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(5, 6)

    def forward(self, x, y):
        return torch.tanh(self.fc(y)), torch.sigmoid(self.conv(x))


class CrossEntropy(nn.Module):
    """SoftmaxCrossEntropyLoss: an ONNX op onnx2tf 1.28 does not implement."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.register_buffer("target", torch.tensor([1, 3]))

    def forward(self, x):
        return F.cross_entropy(self.fc(x), self.target, reduction="none")


class BicubicGrid(nn.Module):
    """GridSample, which onnx2tf converts for mode=bilinear only."""

    def forward(self, x):
        grid = torch.tanh(x[:, :2].permute(0, 2, 3, 1))
        return F.grid_sample(x, grid, mode="bicubic", align_corners=False)


class Erf(nn.Module):
    """onnx2tf turns Erf into tf.math.erf, which TFLite has as a Flex op only."""

    def forward(self, x):
        return torch.erf(x) * 2


def _capture(model: nn.Module, *shapes: tuple[int, ...], name: str) -> graphopt.Graph:
    torch.manual_seed(0)
    return graphopt.capture(model, [torch.randn(*s) for s in shapes], name=name)


def _assert_close(graph: graphopt.Graph, artifact: graphopt.Artifact, inputs=None) -> graphopt.Metrics:
    inputs = graph.example_inputs if inputs is None else inputs
    metrics = graphopt.compare(graph.run(inputs), tflite_emitter.load(artifact, threads=1)(inputs))
    tolerance = EMITTER.tolerance_for(artifact.meta)
    assert not tolerance.violations(metrics), metrics
    return metrics


@pytest.fixture(scope="module")
def resnet() -> graphopt.Graph:
    graph = _capture(tiny_resnet(), (1, 3, 32, 32), name="tiny_resnet")
    graph.meta["pipeline"] = "cleanup"
    return graph


@pytest.fixture(scope="module")
def fp32(resnet, tmp_path_factory) -> graphopt.Artifact:
    return tflite_emitter.emit(resnet, {}, tmp_path_factory.mktemp("fp32"))


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory) -> tuple[graphopt.Graph, graphopt.Artifact]:
    graph = _capture(TwoByTwo(), (1, 3, 8, 8), (2, 5), name="two_by_two")
    return graph, tflite_emitter.emit(graph, {}, tmp_path_factory.mktemp("two_by_two"))


def test_registers_the_tflite_emitter_with_its_options():
    registry = graphopt.load_plugins(["graphopt_plugins.tflite"], entry_points=False)
    emitter = registry.emitters["tflite"]
    assert emitter.suffix == ".tflite" and emitter.prepare == "tflite-compat" and emitter.missing() == []
    assert {o.name: o.default for o in emitter.options} == {"precision": "fp32", "keep_nchw": False, "int8_io": False,
                                                            "float_islands": True, "route": "auto"}
    assert emitter.option("precision").choices == ("fp32", "fp16")
    assert emitter.tolerance_for({"precision": "fp32"}) == graphopt.Tolerance(max_rel=1e-4, min_cosine=0.9999)
    assert emitter.tolerance_for({"precision": "fp16"}) == graphopt.Effect.FP16.tolerance


def test_importing_the_plugin_loads_no_heavy_module():
    heavy = ("tensorflow", "onnx2tf", "ai_edge_litert", "onnx", "tf_keras")
    code = (f"import sys, graphopt_plugins.tflite; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_conv_model_runs_nhwc_behind_a_torch_layout_runner(resnet, fp32):
    assert fp32.path.name == "tiny_resnet.tflite"
    assert [p.name for p in fp32.path.parent.iterdir()] == ["tiny_resnet.tflite"]   # nothing else left
    meta = fp32.meta
    assert meta["precision"] == "fp32" and meta["onnx_opset"] == 17 and meta["converter"].startswith("onnx2tf ")
    assert meta["inputs"] == [{"name": "x", "shape": [1, 32, 32, 3], "dtype": "float32", "layout": "NHWC"}]
    assert meta["outputs"] == [{"name": "output_0", "shape": [1, 10], "dtype": "float32", "layout": "NC"}]
    assert {"CONV_2D", "ADD", "FULLY_CONNECTED"} <= set(meta["op_types"])
    assert _assert_close(resnet, fp32).max_rel < 1e-5
    _assert_close(resnet, fp32, [torch.randn(1, 3, 32, 32)])
    _assert_close(resnet, EMITTER.artifact_for(fp32.path))   # as `graphopt verify` loads it: the file says it all


def test_keep_nchw_keeps_the_torch_input_layout(resnet, tmp_path):
    artifact = tflite_emitter.emit(resnet, {"keep_nchw": True}, tmp_path)
    assert artifact.meta["inputs"] == [{"name": "x", "shape": [1, 3, 32, 32], "dtype": "float32",
                                        "layout": "NCHW"}]
    assert artifact.meta["op_types"]["TRANSPOSE"] == 1   # to NHWC, inside the model
    _assert_close(resnet, artifact)


def test_fp16_halves_the_file_within_the_fp16_tolerance(resnet, fp32, tmp_path):
    artifact = tflite_emitter.emit(resnet, {"precision": "fp16"}, tmp_path)
    assert artifact.path.name == "tiny_resnet_fp16.tflite" and artifact.meta["precision"] == "fp16"
    assert 0.45 < artifact.bytes / fp32.bytes < 0.65   # weights halve; the graph itself does not
    assert "DEQUANTIZE" in artifact.meta["op_types"]   # fp16 weights, dequantized at load time
    metrics = _assert_close(resnet, artifact)
    assert 1e-6 < metrics.max_rel < 1e-2


def test_two_inputs_and_outputs_map_by_name_in_torch_order(two_by_two):
    graph, artifact = two_by_two
    assert [(v["name"], v["shape"], v["layout"]) for v in artifact.meta["inputs"]] == [
        ("x", [1, 8, 8, 3], "NHWC"), ("y", [2, 5], "NC")]
    assert [(v["name"], v["shape"], v["layout"]) for v in artifact.meta["outputs"]] == [
        ("output_0", [2, 6], "NC"), ("output_1", [1, 4, 4, 4], "NHWC")]   # 1x4x4x4: settled by numbers
    runner = tflite_emitter.load(artifact)
    for inputs in (graph.example_inputs, [torch.randn(1, 3, 8, 8), torch.randn(2, 5)]):
        outputs = runner(list(inputs))
        assert [tuple(o.shape) for o in outputs] == [(2, 6), (1, 4, 4, 4)]
        _assert_close(graph, artifact, list(inputs))


def test_the_runner_rejects_inputs_it_cannot_take(two_by_two):
    graph, artifact = two_by_two
    runner = tflite_emitter.load(artifact)
    with pytest.raises(graphopt.EmitError, match="two_by_two.tflite takes 2 inputs, got 1"):
        runner(graph.example_inputs[:1])
    with pytest.raises(graphopt.EmitError, match=r"takes x of shape \[1, 8, 8, 3\] \(NHWC\), got \[2, 3, 8, 8\]"):
        runner([torch.randn(2, 3, 8, 8), torch.randn(2, 5)])


def test_same_graph_gives_the_same_bytes(two_by_two, tmp_path):
    graph, artifact = two_by_two
    again = tflite_emitter.emit(graph, {}, tmp_path)
    assert again.path.read_bytes() == artifact.path.read_bytes()


@pytest.mark.parametrize("model, shape, node, op, fx_node, code, why", [
    (CrossEntropy, (2, 4), "/SoftmaxCrossEntropyLoss", "SoftmaxCrossEntropyLoss", "cross_entropy",
     'return F.cross_entropy(self.fc(x), self.target, reduction="none")', "OP is not yet implemented"),
    (BicubicGrid, (1, 3, 8, 8), "/GridSample", "GridSample", "grid_sample",
     'return F.grid_sample(x, grid, mode="bicubic", align_corners=False)', "supports only mode=['bilinear']"),
])
def test_an_op_onnx2tf_cannot_convert_is_named_in_one_line(model, shape, node, op, fx_node, code, why, tmp_path,
                                                           monkeypatch, capfd):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    graph = _capture(model(), shape, name="bad")
    with pytest.raises(graphopt.EmitError) as info:
        tflite_emitter.emit(graph, {"route": "onnx2tf"}, tmp_path / "out")
    message = str(info.value)
    line = next(i for i, text in enumerate(Path(__file__).read_text().splitlines(), 1) if text.strip() == code)
    where = f"made by fx node `{fx_node}` ({Path(__file__).name}:{line} `{code}`)"   # the node and the user's line
    assert "\n" not in message
    assert message.startswith(f"onnx2tf cannot convert ONNX node {node} ({op}) of bad, {where}: ")
    assert why in message
    assert not (tmp_path / "out").exists() and list((tmp_path / "tmp").iterdir()) == []
    assert capfd.readouterr() == ("", "")
    # route=auto (the default) takes litert-torch instead, and says why
    artifact = tflite_emitter.emit(graph, {}, tmp_path / "auto")
    assert artifact.meta["route"].startswith(f"litert-torch (onnx2tf: onnx2tf cannot convert ONNX node {node} ({op})")
    assert [p.name for p in (tmp_path / "auto").iterdir()] == ["bad.tflite"]
    _assert_close(graph, artifact, list(graph.example_inputs))


class Grouped(nn.Module):
    """A grouped (not depthwise) convolution, as ResNeXt and RegNet have: onnx2tf's model has no signature."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=4)

    def forward(self, x):
        return self.conv(x)


def test_where_onnx2tf_fails_litert_torch_makes_the_file(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    graph = _capture(Grouped(), (1, 8, 8, 8), name="family")
    artifact = tflite_emitter.emit(graph, {}, tmp_path)
    assert artifact.meta["route"].startswith("litert-torch (onnx2tf: ValueError: SignatureDef signature_key is None")
    assert artifact.meta["precision"] == "fp32" and [p.name for p in tmp_path.iterdir()] == ["family.tflite"]
    _assert_close(graph, artifact, [torch.randn(1, 8, 8, 8)])
    half = tflite_emitter.emit(graph, {"precision": "fp16"}, tmp_path)    # fp16 weights: litert-torch's recipe
    assert half.meta["route"].startswith("litert-torch (onnx2tf: ") and half.meta["precision"] == "fp16"
    assert half.path.name == "family_fp16.tflite"
    assert "float16" in {t["dtype"].__name__ for t in Interpreter(model_path=str(half.path)).get_tensor_details()}
    _assert_close(graph, half)
    with pytest.raises(ValueError, match="SignatureDef"):     # onnx2tf alone: its error, as the driver wraps it
        tflite_emitter.emit(graph, {"route": "onnx2tf"}, tmp_path / "onnx2tf")


def test_weights_stored_after_the_flatbuffer_survive_the_metadata(tmp_path):
    """litert-torch's fp16 recipe stores large weights after the flatbuffer (buffer offset/size);
    writing graphopt's metadata repacks the file, which must carry them (ResNeXt-50's fp16 file did not load)."""
    from ai_edge_litert import schema_py_generated as schema
    from graphopt_plugins.tflite.int8 import convert

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(512, 512, 3, padding=1, groups=4)    # 1.2 MB of fp16 weights

        def forward(self, x):
            return self.conv(x)

    graph = _capture(Wide(), (1, 512, 4, 4), name="wide")
    data, _ = convert(graph.module, graph.example_inputs, fp16=True)
    assert any(b.offset > 1 for b in schema.ModelT.InitFromPackedBuf(data, 0).buffers)   # the case at hand
    half = tflite_emitter.emit(graph, {"precision": "fp16", "route": "litert-torch"}, tmp_path)
    fp32_weights = 512 * (512 // 4) * 3 * 3 * 4
    assert half.meta["precision"] == "fp16" and half.path.stat().st_size < 0.6 * fp32_weights
    _assert_close(graph, half, [torch.randn(1, 512, 4, 4)])


def test_where_onnx2tf_gets_the_numbers_wrong_litert_torch_makes_the_file(tmp_path, monkeypatch):
    """onnx2tf made to convert a perturbed copy of the graph: its file runs, with other numbers."""
    torch.manual_seed(0)
    graph = _capture(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), (1, 3, 8, 8), name="plain")
    wrong = copy.deepcopy(graph)
    with torch.no_grad():
        wrong.module.get_submodule("0").weight.mul_(1.01)
    onnx2tf_route = tflite_emitter._onnx2tf
    monkeypatch.setattr(tflite_emitter, "_onnx2tf", lambda g, opts, out: onnx2tf_route(wrong, opts, out))
    artifact = tflite_emitter.emit(graph, {}, tmp_path)
    assert artifact.meta["route"].startswith("litert-torch (onnx2tf: its file disagrees with the graph on the example")
    assert [p.name for p in tmp_path.iterdir()] == ["plain.tflite"]    # onnx2tf's file is gone
    _assert_close(graph, artifact)
    assert tflite_emitter.emit(graph, {"route": "onnx2tf"}, tmp_path / "kept").meta["route"] == "onnx2tf"


def test_an_op_without_a_tflite_builtin_is_refused(tmp_path):
    graph = _capture(Erf(), (1, 3, 4, 4), name="erf")
    with pytest.raises(graphopt.EmitError, match=r"^erf needs TensorFlow ops that are not TFLite builtins \(Erf\)"):
        tflite_emitter.emit(graph, {"route": "onnx2tf"}, tmp_path)
    assert list(tmp_path.iterdir()) == []
    artifact = tflite_emitter.emit(graph, {}, tmp_path)     # route=auto: litert-torch writes builtins only
    assert artifact.meta["route"].startswith("litert-torch (onnx2tf: erf needs TensorFlow ops")
    assert not any(op.startswith("Flex") for op in artifact.meta["op_types"])


@pytest.fixture(scope="module")
def flex() -> bytes:
    """A real .tflite with a Flex op: what onnx2tf's own converter settings would give for Erf."""
    import tensorflow as tf

    function = tf.function(lambda x: {"y": tf.math.erf(x)},
                           input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()], tf.Module())
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    with captured_output():
        return converter.convert()


def test_operators_tell_builtin_from_flex_ops(fp32, flex):
    ops, custom = tflite_emitter.operators(fp32.path.read_bytes())
    assert custom == [] and dict(sorted(ops.items())) == fp32.meta["op_types"]
    assert tflite_emitter.operators(flex) == ({}, ["FlexErf"])


def test_a_converted_model_with_flex_ops_is_refused(resnet, flex, tmp_path, monkeypatch):
    monkeypatch.setattr(tflite_emitter, "_to_tflite", lambda *args: flex)
    with pytest.raises(graphopt.EmitError, match=r"uses ops outside the TFLite builtins \(FlexErf\)"):
        tflite_emitter.emit(resnet, {"route": "onnx2tf"}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_load_needs_the_layouts_graphopt_writes(flex, tmp_path):
    path = tmp_path / "other.tflite"
    path.write_bytes(flex)
    with pytest.raises(graphopt.EmitError, match="other.tflite has no graphopt metadata"):
        tflite_emitter.load(EMITTER.artifact_for(path))


def test_emit_and_run_keep_the_console_quiet(tmp_path, capfd):
    graph = _capture(TwoByTwo(), (1, 3, 8, 8), (2, 5), name="quiet")
    capfd.readouterr()
    artifact = tflite_emitter.emit(graph, {"precision": "fp16"}, tmp_path)
    tflite_emitter.load(artifact)(graph.example_inputs)
    assert capfd.readouterr() == ("", "")


def test_captured_output_holds_prints_native_writes_and_children(capfd):
    with captured_output() as log:
        print("from print")
        os.write(2, b"from fd 2\n")
        subprocess.run(["echo", "from a child"], check=True)
    assert log.text.splitlines() == ["from print", "from fd 2", "from a child"]
    assert capfd.readouterr() == ("", "")


def test_the_onnx_plugin_is_needed_only_at_emit_time(resnet, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "graphopt_plugins.onnx", None)
    registry = graphopt.load_plugins(["graphopt_plugins.tflite"], entry_points=False)
    assert "tflite" in registry.emitters
    with pytest.raises(graphopt.EmitError, match="the onnx emitter plugin is missing"):
        tflite_emitter.emit(resnet, {"route": "onnx2tf"}, tmp_path)
    route = tflite_emitter.emit(resnet, {}, tmp_path).meta["route"]     # route=auto: litert-torch instead
    assert route.startswith("litert-torch (onnx2tf: the tflite emitter converts through ONNX but the onnx emitter")


def _offline() -> list[str] | None:
    """The command prefix that runs a process without network: ``unshare -n`` as root, ``unshare
    -rn`` (a user namespace) where the kernel lets others do it; None without unshare or either."""
    if shutil.which("unshare") is None:
        return None
    return next((p for p in (["unshare", "-n"], ["unshare", "-rn"])
                 if subprocess.run([*p, "true"], capture_output=True).returncode == 0), None)


OFFLINE = _offline()


@pytest.mark.skipif(OFFLINE is None, reason="no unshare that may create a private network namespace here")
def test_converts_with_the_network_unreachable(tmp_path):
    code = textwrap.dedent("""
        import sys, torch, graphopt
        from pathlib import Path
        import graphopt_plugins.tflite as tflite_emitter
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
        graph = graphopt.capture(model, [torch.randn(1, 3, 16, 16)], name="offline")
        artifact = tflite_emitter.emit(graph, {}, Path(sys.argv[1]))
        runner = tflite_emitter.load(artifact)
        print("max_rel", graphopt.compare(graph.run(), runner(graph.example_inputs)).max_rel)
        tflite_emitter.CALIBRATION = "elsewhere.npy"   # now onnx2tf looks for its sample online
        try:
            tflite_emitter.emit(graph, {"route": "onnx2tf"}, Path(sys.argv[1]) / "again")
        except graphopt.EmitError as exc:
            print("without the sample:", exc)
    """)
    out = subprocess.run([*OFFLINE, sys.executable, "-c", code, str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("max_rel ") and float(lines[0].split()[1]) < 1e-5
    assert lines[1].startswith("without the sample: onnx2tf cannot convert offline: ")
    assert "github.com" in lines[1]   # it did try to download it, and the network was unreachable
    assert [p.name for p in tmp_path.iterdir()] == ["offline.tflite"]


def test_the_driver_prepares_emits_and_verifies_both_precisions(registry, resnet, tmp_path):
    requests = select_emitters(registry, "tflite,tflite(precision=fp16)")
    checks = emit_all(resnet, requests, tmp_path, resnet.run(), registry)
    assert [c.verified for c in checks] == [True, True], [c.problems for c in checks]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_resnet.tflite", "tiny_resnet_fp16.tflite"]
    assert checks[0].artifact.meta["prepared"][0]["pass"] == "tflite-compat"
    assert checks[1].vs_graph.max_rel > checks[0].vs_graph.max_rel


def test_an_fp16_graph_is_converted_from_its_fp32_copy():
    graph = _capture(HalfCompute(), (1, 3, 8, 8), name="half")
    next(iter(graph.module.graph.nodes)).meta["graphopt.precision"] = "fp16"   # as fp16(keep_io_types=false) does
    copy = tflite_emitter._fp32_copy(graph)
    gm = copy.module
    assert {t.dtype for t in gm.state_dict().values()} == {torch.float32}
    assert [(n.target, n.args[1]) for n in gm.graph.nodes if n.op == "call_method" and n.target == "to"] == [
        ("to", torch.float32)]   # the casts to fp16 are gone; the one back is a no-op now
    assert not [n for n in gm.graph.nodes if "graphopt.precision" in n.meta]   # inputs are fp32 again
    assert graph.module.conv.weight.dtype == torch.float16   # a copy: the graph itself is untouched
    assert not graphopt.Effect.FP16.tolerance.violations(graphopt.compare(graph.run(), copy.run()))
    assert tflite_emitter._fp32_copy(copy) is None


def test_an_fp16_graph_gives_fp16_weights(tmp_path):
    graph = _capture(HalfStorage(), (1, 32, 8, 8), name="half")
    artifact = tflite_emitter.emit(graph, {}, tmp_path)
    assert artifact.path.name == "half_fp16.tflite"
    assert artifact.meta["precision"] == "fp16" and artifact.meta["fp16"].startswith("weights: ")
    assert "DEQUANTIZE" in artifact.meta["op_types"]
    _assert_close(graph, artifact)
