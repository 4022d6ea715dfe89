"""The ONNX emitter on quantized graphs: int8 QDQ structure, the graph's scales in the file,
int8 kernels in onnxruntime, numbers against the fake-quant fx graph, driver verification."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

import graphopt
from graphopt.cli import main
from graphopt.driver import optimize
from graphopt.emit import Artifact
from graphopt.testing.golden import GoldenCase
from graphopt.metrics import Tolerance, compare
from graphopt.passmanager import run_pipeline
from graphopt.testing import default_tolerance
import graphopt_plugins.onnx as onnx_emitter
import graphopt_plugins.onnx.qdq as onnx_qdq
from graphopt.quant import activation_qparams, is_fake_quant, weight_quant
from zoo.cnn import tiny_mobilenet, tiny_resnet

PIPELINE = "cleanup,fold-bn,fuse,quantize(prefer=size)"   # every layer int8 (prefer=speed picks by timing)
SHAPE = (1, 3, 32, 32)
MODELS = {"tiny_resnet": tiny_resnet, "tiny_mobilenet": tiny_mobilenet}


def _inputs(n: int, seed: int, shape=SHAPE) -> list[torch.Tensor]:
    return [torch.randn(*shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


class Wide(nn.Module):
    """Weights dominate (114k of them, few channels): the file shrinks like the weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                                      nn.ReLU(), nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class Tokens(nn.Module):
    """Linear layers on (batch, tokens, features): exported as Transpose(weight) -> MatMul -> Add."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine does not stall them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _quantized(registry, model: nn.Module, shape=SHAPE, pipeline=PIPELINE) -> graphopt.Graph:
    graph = graphopt.capture(model, _inputs(1, 100, shape))
    return run_pipeline(graph, pipeline, registry, data={"calibration": _inputs(4, 0, shape)}).graph


@pytest.fixture(scope="module", params=list(MODELS))
def emitted(request, registry, tmp_path_factory):
    """(quantized graph, its int8 ONNX artifact, the loaded model)."""
    graph = _quantized(registry, MODELS[request.param]())
    artifact = onnx_emitter.emit(graph, {}, tmp_path_factory.mktemp(request.param))
    return graph, artifact, onnx.load(artifact.path)


def _weighted(gm: torch.fx.GraphModule) -> dict[str, tuple]:
    return {name: q for name, m in gm.named_modules() if (q := weight_quant(m)) is not None}


def _producers(model) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def test_weights_are_int8_and_biases_int32_behind_dequantize_linear(emitted):
    graph, artifact, model = emitted
    inits = {i.name: i for i in model.graph.initializer}
    producers = _producers(model)
    weighted = _weighted(graph.module)
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == len(weighted)
    for node in layers:
        w_dq, b_dq = producers[node.input[1]], producers[node.input[2]]
        assert w_dq.op_type == b_dq.op_type == "DequantizeLinear"
        assert inits[w_dq.input[0]].data_type == TensorProto.INT8
        assert inits[b_dq.input[0]].data_type == TensorProto.INT32
        assert producers[node.input[0]].op_type == "DequantizeLinear"
    assert not [n.name for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]
    # no fp32 weight left; each weight takes one byte
    assert not [i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) > 1]
    int8_values = sum(numpy_helper.to_array(i).size for i in model.graph.initializer if i.data_type == TensorProto.INT8
                      and i.name.endswith(".weight_quantized"))
    assert int8_values == sum(q.numel() for q, _, _ in weighted.values())
    assert artifact.meta["precision"] == "int8"
    assert artifact.meta["int8_weights"] == artifact.meta["int32_biases"] == len(weighted)
    assert artifact.path.name == f"{graph.name}.onnx"


def test_the_file_holds_the_graphs_scales(emitted):
    graph, artifact, model = emitted
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = _producers(model)
    expected = [activation_qparams(n) for n in graph.module.graph.nodes if is_fake_quant(n)]
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert [(float(inits[q.input[1]]), int(inits[q.input[2]]), inits[q.input[2]].dtype.name) for q in quantizers] == \
        [(np.float32(e.scale), e.zero_point, e.dtype) for e in expected]
    for name, (q, scale, _) in _weighted(graph.module).items():
        dq = next(n for n in model.graph.node if n.input[0] == f"{name}.weight_quantized")
        assert np.array_equal(inits[dq.input[0]], q.numpy()) and np.array_equal(inits[dq.input[1]], scale.numpy())
        assert not inits[dq.input[2]].any()
        layer = next(n for n in model.graph.node if dq.output[0] in n.input[1:2])
        x_scale = inits[producers[layer.input[0]].input[1]]
        b_dq = producers[layer.input[2]]
        np.testing.assert_allclose(inits[b_dq.input[1]], x_scale * scale.numpy(), rtol=1e-7)
    biases = sum(n.op_type == "DequantizeLinear" and n.input[0].endswith(".bias_quantized") for n in model.graph.node)
    assert artifact.meta["scales"] == {"activations": len(quantizers), "weights": len(_weighted(graph.module)),
                                       "biases": biases}


def test_same_graph_gives_the_same_bytes(emitted, tmp_path):
    graph, artifact, _ = emitted
    assert onnx_emitter.emit(graph, {}, tmp_path).path.read_bytes() == artifact.path.read_bytes()


def test_a_scale_that_differs_from_the_graph_is_an_error(emitted):
    graph, _, model = emitted
    model = onnx.ModelProto.FromString(model.SerializeToString())
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    init = next(i for i in model.graph.initializer if i.name == q.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.001), init.name))
    with pytest.raises(graphopt.EmitError, match=rf"activation quantizer 1 \({q.input[0]}\) has scale .*; the "
                                                 r"graph's \(fake_quantize_per_tensor_affine\) has scale"):
        onnx_qdq.check_scales(model, graph.module)    # 0.1 % off: a file scale must equal the graph's


class ZeroBiases(nn.Module):
    """Three int8 layers with equal (zero) biases, as torchvision initializes an SE block's convs:
    the exporter and onnxsim merge equal constants, so the three layers read one bias initializer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Linear(8, 8)
        for m in (self.a, self.b, self.fc):
            nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.fc(self.b(self.a(x).relu()).relu().mean((2, 3)))


def test_layers_sharing_one_bias_initializer_get_an_int32_bias_each(registry, tmp_path):
    graph = _quantized(registry, ZeroBiases(), shape=(1, 3, 8, 8), pipeline="quantize(prefer=size)")
    artifact = onnx_emitter.emit(graph, {}, tmp_path)
    model = onnx.load(artifact.path)
    biases = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("bias_quantized")}
    assert sorted(biases) == ["a.bias_quantized", "b.bias_quantized", "fc.bias_quantized"]
    assert all(b.dtype == np.int32 and not b.any() for b in biases.values())
    assert artifact.meta["scales"]["biases"] == 3
    x = _inputs(1, 3, (1, 3, 8, 8))
    assert compare(graph.run(x), onnx_emitter.load(artifact)(x)).cosine > 0.999


def test_onnxruntime_runs_int8_kernels(emitted, tmp_path):
    _, artifact, _ = emitted
    ops = _optimized_ops(artifact.path, tmp_path)
    assert ops.count("QLinearConv") == artifact.meta["op_types"]["Conv"] and "QGemm" in ops
    assert not {"Conv", "FusedConv", "Gemm", "MatMul"} & set(ops)


def _optimized_ops(path, tmp_path) -> list[str]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def test_linear_on_token_inputs_runs_int8_with_int32_biases(registry, tmp_path):
    graph = _quantized(registry, Tokens(), (1, 8, 16))
    artifact = onnx_emitter.emit(graph, {}, tmp_path)
    assert artifact.meta["int8_weights"] == artifact.meta["int32_biases"] == 2
    assert "Transpose" not in artifact.meta["op_types"]     # folded into the int8 weights
    ops = _optimized_ops(artifact.path, tmp_path)
    assert ops.count("QGemm") == 2 and not {"Gemm", "MatMul", "Add"} & set(ops)
    x = _inputs(1, 7, (1, 8, 16))
    assert compare(graph.run(x), onnx_emitter.load(artifact)(x)).cosine >= 0.999


def test_layers_kept_in_fp32_keep_fp32_weights_and_bias(registry, tmp_path):
    kept = "layers.1.0.conv1,fc"
    graph = _quantized(registry, tiny_resnet(), pipeline=f"cleanup,fold-bn,fuse,quantize(prefer=size,exclude=\"{kept}\")")
    artifact = onnx_emitter.emit(graph, {}, tmp_path)
    model = onnx.load(artifact.path)
    inits = {i.name: i for i in model.graph.initializer}
    float_weights = {n for n in (node.input[1] for node in model.graph.node if node.op_type in ("Conv", "Gemm"))
                     if n in inits and inits[n].data_type == TensorProto.FLOAT}
    assert len(float_weights) == 2 and artifact.meta["int8_weights"] == artifact.meta["int32_biases"] == 10
    assert artifact.meta["scales"]["weights"] == artifact.meta["scales"]["biases"] == 10
    # onnxruntime (>= 1.20, WeightBiasQuantization) gives an fp32 Conv reading a DequantizeLinear
    # per-tensor int8 weights of its own; the fp32 fc, whose output is not quantized, stays Gemm
    ops = _optimized_ops(artifact.path, tmp_path)
    assert ops.count("QLinearConv") >= 9 and "Gemm" in ops and "QGemm" not in ops
    x = _inputs(1, 7)
    assert compare(graph.run(x), onnx_emitter.load(artifact)(x)).cosine >= 0.999


def test_outputs_match_the_fake_quant_graph(emitted):
    graph, artifact, _ = emitted
    run = onnx_emitter.load(artifact)
    inputs = _inputs(4, 50)
    with torch.no_grad():
        expected = [graph.module(x) for x in inputs]
    metrics = compare(expected, [run([x])[0] for x in inputs])
    out_scale = activation_qparams(next(n for n in reversed(graph.module.graph.nodes) if is_fake_quant(n))).scale
    # same grid: onnxruntime's integer requantization differs by a step or two of the output scale
    assert metrics.cosine >= 0.999 and metrics.max_abs <= 3 * out_scale + 1e-6, (metrics, out_scale)


def test_int8_file_is_under_a_third_of_fp32(registry, tmp_path):
    graph = graphopt.capture(Wide(), _inputs(1, 100, (1, 3, 16, 16)))
    fp32 = onnx_emitter.emit(run_pipeline(graph, "cleanup,fold-bn,fuse", registry).graph, {}, tmp_path / "fp32")
    int8 = onnx_emitter.emit(run_pipeline(graph, PIPELINE, registry, data={"calibration": _inputs(4, 0, (1, 3, 16, 16))})
                             .graph, {}, tmp_path / "int8")
    assert int8.bytes <= 0.3 * fp32.bytes, (int8.bytes, fp32.bytes)


def test_driver_verifies_the_int8_artifact_and_so_does_the_cli(registry, tmp_path, capsys):
    model = tiny_resnet().eval()
    result = optimize(model, _inputs(1, 100), registry, pipeline=PIPELINE, formats="onnx",
                      out_dir=tmp_path, data={"calibration": _inputs(4, 0)})
    (check,) = result.artifacts
    assert result.ok and check.verified and check.installed
    assert check.artifact.meta["precision"] == "int8" and check.artifact.path == tmp_path / "ResNet.onnx"
    assert check.vs_graph.cosine >= 0.999
    emitter = registry.emitters["onnx"]
    assert emitter.tolerance_for({"precision": "int8"}) == Tolerance(min_cosine=0.99, min_sqnr_db=14.0)
    # against the fp32 model's outputs, judged at the precision the file records, not at fp32's
    x = _inputs(1, 7)[0]
    with torch.no_grad():
        reference = model(x)
    GoldenCase({"x": x}, [reference]).save(tmp_path / "fp32.npz")
    assert emitter.precision(check.artifact.path) == "int8"
    assert default_tolerance(Artifact("onnx", check.artifact.path)) == Tolerance(min_cosine=0.99, min_sqnr_db=14.0)
    assert emitter.tolerance.violations(compare([reference], emitter.load(check.artifact)([x])))
    assert main(["verify", str(check.artifact.path), "--reference", str(tmp_path / "fp32.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]


def test_opset_without_per_channel_quantization_is_refused(registry, tmp_path):
    graph = _quantized(registry, Wide(), (1, 3, 16, 16))
    with pytest.raises(graphopt.EmitError, match="opset 13 or later"):
        onnx_emitter.emit(graph, {"opset": 12}, tmp_path)
    assert not list(tmp_path.iterdir())
