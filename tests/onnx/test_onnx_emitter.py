"""The ONNX emitter: structure of the exported file, numbers through onnxruntime, options."""
from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import graphopt
import graphopt_plugins.onnx as onnx_emitter
from zoo.half import HalfCompute, HalfStorage

TOLERANCE = onnx_emitter.graphopt_register_emitters()[0].tolerance


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        nn.init.uniform_(self.bn.weight, 0.5, 1.5)
        nn.init.uniform_(self.bn.bias, -0.2, 0.2)
        self.bn.running_mean.uniform_(-0.2, 0.2)
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return torch.sigmoid(y), y.mean(dim=(2, 3))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, x, y):
        return torch.tanh(self.a(x) + self.b(y))


class Tril(nn.Module):
    def forward(self, x):
        return torch.tril(x) * 2   # Trilu exists from opset 14 on


def _capture(model: type[nn.Module], *shapes: tuple[int, ...], name: str) -> graphopt.Graph:
    torch.manual_seed(0)
    return graphopt.capture(model(), [torch.randn(*s) for s in shapes], name=name)


@pytest.fixture(scope="module")
def cnn() -> graphopt.Graph:
    graph = _capture(ConvBnRelu, (1, 3, 16, 16), name="cnn")
    graph.meta["pipeline"] = "cleanup,fold-bn"
    return graph


def _assert_close(graph: graphopt.Graph, artifact: graphopt.Artifact, inputs=None) -> None:
    inputs = graph.example_inputs if inputs is None else inputs
    metrics = graphopt.compare(graph.run(inputs), onnx_emitter.load(artifact)(inputs))
    assert not TOLERANCE.violations(metrics), metrics


def test_registers_the_onnx_emitter_with_its_options():
    registry = graphopt.load_plugins(["graphopt_plugins.onnx"], entry_points=False)
    emitter = registry.emitters["onnx"]
    assert emitter.suffix == ".onnx" and emitter.missing() == []
    assert {o.name: o.default for o in emitter.options} == {
        "exporter": "torchscript", "opset": 17, "dynamic_batch": False, "simplify": True,
        "integer_hard_activations": True, "space_to_depth_stem": True, "source_map": False}


def test_importing_the_plugin_loads_no_onnx_module():
    code = ("import sys, graphopt_plugins.onnx; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxsim', 'onnxscript') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cnn_structure_metadata_and_numbers(cnn, tmp_path, capfd):
    artifact = onnx_emitter.emit(cnn, {}, tmp_path)
    assert artifact.path == tmp_path / "cnn.onnx" and artifact.path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["cnn.onnx"]   # no temporary file left
    assert capfd.readouterr() == ("", "")                          # the exporter kept quiet
    model = onnx.load(artifact.path)
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "Relu", "Gemm"} <= ops and "BatchNormalization" not in ops
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert [i.name for i in model.graph.input] == cnn.input_names == ["x"]
    assert [o.name for o in model.graph.output] == ["output_0"]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["graphopt.version"] == graphopt.__version__
    assert props["graphopt.pipeline"] == "cleanup,fold-bn"
    assert props["graphopt.precision"] == onnx_emitter.precision(artifact.path) == "fp32"
    assert json.loads(props["graphopt.inputs"]) == [
        {"name": "x", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    meta = artifact.meta
    assert meta["opset"] == 17 and meta["exporter"] == "torchscript" and meta["simplified"] is True
    assert meta["nodes"] == len(model.graph.node) == sum(meta["op_types"].values())
    assert list(meta["op_types"]) == sorted(meta["op_types"])
    assert meta["inputs"] == [{"name": "x", "shape": [1, 3, 16, 16], "dtype": "float32", "layout": "NCHW"}]
    assert meta["outputs"] == [{"name": "output_0", "shape": [1, 5], "dtype": "float32", "layout": "NC"}]
    _assert_close(cnn, artifact)


def test_two_outputs_keep_their_order(tmp_path):
    graph = _capture(TwoOutputs, (2, 3, 8, 8), name="two_out")
    artifact = onnx_emitter.emit(graph, {}, tmp_path)
    model = onnx.load(artifact.path)
    assert [o.name for o in model.graph.output] == ["output_0", "output_1"]
    outputs = onnx_emitter.load(artifact, threads=1)(graph.example_inputs)
    assert [tuple(o.shape) for o in outputs] == [(2, 4, 8, 8), (2, 4)]
    _assert_close(graph, artifact)


class DictOut(nn.Module):
    """A dict of a tensor and a list, as detection and segmentation heads return."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return {"logits": y, "aux": [y * 2, y.sigmoid()]}


Boxes = collections.namedtuple("Boxes", "boxes scores")


class NamedOut(DictOut):
    def forward(self, x):
        y = self.fc(x)
        return Boxes(y, y.softmax(-1))


@pytest.mark.parametrize("model, names", [(DictOut, ["logits", "aux.0", "aux.1"]), (NamedOut, ["boxes", "scores"])])
def test_dict_and_named_tuple_outputs_keep_their_names(tmp_path, model, names):
    graph = graphopt.capture(model(), (torch.randn(1, 4),))
    artifact = onnx_emitter.emit(graph, {}, tmp_path)
    assert [o.name for o in onnx.load(artifact.path).graph.output] == names
    assert [v["name"] for v in artifact.meta["outputs"]] == names
    _assert_close(graph, artifact)


def test_two_inputs_are_named_after_the_placeholders(tmp_path):
    graph = _capture(TwoInputs, (2, 6), (2, 3), name="two_in")
    artifact = onnx_emitter.emit(graph, {}, tmp_path)
    assert [i.name for i in onnx.load(artifact.path).graph.input] == graph.input_names == ["x", "y"]
    _assert_close(graph, artifact)
    _assert_close(graph, artifact, [torch.randn(2, 6), torch.randn(2, 3)])


def test_dynamic_batch_runs_any_batch_size(cnn, tmp_path):
    artifact = onnx_emitter.emit(cnn, {"dynamic_batch": True}, tmp_path)
    model = onnx.load(artifact.path)
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert artifact.meta["inputs"][0]["shape"] == ["batch", 3, 16, 16]
    _assert_close(cnn, artifact, [torch.randn(3, 3, 16, 16)])


def test_a_fixed_batch_model_rejects_another_batch_size(cnn, tmp_path):
    runner = onnx_emitter.load(onnx_emitter.emit(cnn, {}, tmp_path))
    with pytest.raises(graphopt.EmitError, match="onnxruntime failed to run cnn.onnx"):
        runner([torch.randn(3, 3, 16, 16)])


def test_same_graph_gives_the_same_bytes(cnn, tmp_path):
    first = onnx_emitter.emit(cnn, {}, tmp_path / "a").path.read_bytes()
    second = onnx_emitter.emit(cnn, {}, tmp_path / "b").path.read_bytes()
    assert first == second


def test_source_map_names_the_fx_node_and_the_models_line(cnn, tmp_path):
    plain = onnx.load(onnx_emitter.emit(cnn, {"simplify": False}, tmp_path / "plain").path)
    assert all(not node.metadata_props and not node.doc_string for node in plain.graph.node)
    artifact = onnx_emitter.emit(cnn, {"simplify": False, "source_map": True}, tmp_path / "mapped")
    model = onnx.load(artifact.path)
    props = {node.name: {p.key: p.value for p in node.metadata_props} for node in model.graph.node}
    fx_nodes = {n.name: n for n in cnn.module.graph.nodes}
    line = next(i for i, text in enumerate(Path(__file__).read_text().splitlines(), 1)
                if "return self.fc(torch.flatten(self.pool(" in text)
    for onnx_name, fx_name in [("/conv/Conv", "conv"), ("/Relu", "relu"), ("/Flatten", "flatten"), ("/fc/Gemm", "fc")]:
        assert props[onnx_name]["graphopt.fx_node"] == fx_name and fx_name in fx_nodes
        assert props[onnx_name]["graphopt.source"] == f"{__file__}:{line}"
    node = next(n for n in model.graph.node if n.name == "/fc/Gemm")
    assert onnx_emitter.sources.origin(node) == \
        f"fx node `fc` (test_onnx_emitter.py:{line} `{Path(__file__).read_text().splitlines()[line - 1].strip()}`)"
    assert all(not node.doc_string for node in model.graph.node)   # no stack traces with local paths
    _assert_close(cnn, artifact)
    with pytest.raises(graphopt.EmitError, match="source_map needs exporter=torchscript"):
        onnx_emitter.emit(cnn, {"source_map": True, "exporter": "dynamo"}, tmp_path / "dynamo")


def test_without_simplify_the_model_is_still_valid(cnn, tmp_path):
    artifact = onnx_emitter.emit(cnn, {"simplify": False}, tmp_path)
    assert artifact.meta["simplified"] is False and "simplify_error" not in artifact.meta
    _assert_close(cnn, artifact)


def test_a_failing_onnxsim_keeps_the_exported_model(cnn, tmp_path, monkeypatch):
    import onnxsim

    def broken(model, *args, **kwargs):
        raise RuntimeError("no shape inference for you\nsecond line")

    monkeypatch.setattr(onnxsim, "simplify", broken)
    artifact = onnx_emitter.emit(cnn, {}, tmp_path)
    assert artifact.meta["simplified"] is False
    assert artifact.meta["simplify_error"] == "no shape inference for you"
    _assert_close(cnn, artifact)


def test_dynamo_exporter(tmp_path, capfd):
    graph = _capture(TwoInputs, (2, 6), (2, 3), name="two_in")
    artifact = onnx_emitter.emit(graph, {"exporter": "dynamo", "opset": 18}, tmp_path)
    assert capfd.readouterr() == ("", "")
    assert artifact.meta["exporter"] == "dynamo" and artifact.meta["opset"] == 18
    assert [i.name for i in onnx.load(artifact.path).graph.input] == ["x", "y"]
    _assert_close(graph, artifact)


def test_export_failure_is_one_line_emit_error(tmp_path, capfd):
    graph = _capture(Tril, (4, 4), name="tril")
    with pytest.raises(graphopt.EmitError) as info:
        onnx_emitter.emit(graph, {"opset": 13}, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "torchscript exporter (opset 13)" in message and "aten::tril" in message
    assert "try exporter=dynamo" in message
    assert list(tmp_path.iterdir()) == []
    assert capfd.readouterr() == ("", "")   # not even the exporter's C++ dump of the graph
    _assert_close(graph, onnx_emitter.emit(graph, {"opset": 14}, tmp_path))


def test_runner_casts_inputs_to_the_model_dtype(tmp_path):
    graph = _capture(TwoInputs, (2, 6), (2, 3), name="half")
    half = graphopt.Graph(graph.module.half(), tuple(t.half() for t in graph.example_inputs), "half")
    artifact = onnx_emitter.emit(half, {}, tmp_path)
    assert [i["dtype"] for i in artifact.meta["inputs"]] == ["float16", "float16"]
    outputs = onnx_emitter.load(artifact)([torch.randn(2, 6), torch.randn(2, 3)])
    assert outputs[0].dtype == torch.float16


def test_fp16_weights_upcast_at_use_stay_fp16_in_the_file(tmp_path):
    graph = _capture(HalfStorage, (1, 32, 8, 8), name="half_storage")
    artifact = onnx_emitter.emit(graph, {}, tmp_path)
    model = onnx.load(artifact.path)
    # the exporter folds weight.to(float32) into float32 initializers; the emitter stores them fp16 again
    assert {i.data_type for i in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert [n.op_type for n in model.graph.node] == ["Cast", "Cast", "Conv"]
    assert artifact.meta["precision"] == "fp16" and artifact.meta["upcast_initializers"] == 2
    fp32 = onnx_emitter.emit(graphopt.capture(HalfStorage().fp32(), graph.example_inputs), {}, tmp_path / "fp32")
    assert artifact.bytes / fp32.bytes < 0.55
    _assert_close(graph, artifact)   # fp32 compute on the same weights: the fp32 tolerance holds


def test_half_compute_keeps_fp16_initializers_and_declared_fp16_inputs(tmp_path):
    graph = _capture(HalfCompute, (1, 3, 8, 8), name="half_compute")
    artifact = onnx_emitter.emit(graph, {}, tmp_path)
    model = onnx.load(artifact.path)
    assert {i.name: i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer if len(i.dims) > 1} \
        == {"conv.weight": True, "fc.weight": True}
    assert artifact.meta["precision"] == "fp16" and artifact.meta["inputs"][0]["dtype"] == "float32"
    fp16 = graphopt.Effect.FP16.tolerance
    assert not fp16.violations(graphopt.compare(graph.run(), onnx_emitter.load(artifact)(graph.example_inputs)))
    next(iter(graph.module.graph.nodes)).meta["graphopt.precision"] = "fp16"   # as fp16(keep_io_types=false) does
    artifact = onnx_emitter.emit(graph, {}, tmp_path / "io16")
    assert artifact.meta["inputs"][0]["dtype"] == "float16"
    assert not fp16.violations(graphopt.compare(graph.run(), onnx_emitter.load(artifact)(graph.example_inputs)))
