"""TorchScript-Lite of a quantized graph: real quantized kernels with graphopt's int8 weights and
scales, run by the lite interpreter and judged against the fx fake-quant graph."""
from __future__ import annotations

import json
import warnings
import zipfile
from collections import Counter

import pytest
import torch
import torch.fx as fx
from torch import nn

import graphopt
from graphopt import Effect
from graphopt.driver import optimize
from graphopt.testing import assert_close
import graphopt_plugins.ptl as ptl_emitter
import graphopt_plugins.ptl.int8 as ptl_int8
from graphopt_plugins.fuse.fuse_act import fused_layer
from graphopt.quant import quantize_weight, weight_quant
from zoo import ZOO
from zoo.cnn import _init_weights, tiny_resnet

PIPELINE = "cleanup,fold-bn,fuse,quantize(prefer=size)"
INT8 = Effect.INT8.tolerance


def _calibration(shape, n=4):
    return [torch.randn(*shape, generator=torch.Generator().manual_seed(100 + i)) for i in range(n)]


def _quantized(build, shape, registry, pipeline=PIPELINE, name="model") -> graphopt.Graph:
    torch.manual_seed(0)
    graph = graphopt.capture(build(), [torch.randn(*shape)], name=name)
    return graphopt.run_pipeline(graph, pipeline, registry, data={"calibration": _calibration(shape)}).graph


def _close_to_fx(graph: graphopt.Graph, artifact: graphopt.Artifact):
    """Same scales, so only rounding differs: far inside the int8 tolerance (cosine >= 0.99)."""
    runner = ptl_emitter.load(artifact)
    for inputs in ([*graph.example_inputs], [torch.randn(*graph.example_inputs[0].shape) * 2]):
        metrics = assert_close(graph.run(inputs), runner(inputs), INT8)
        assert metrics.cosine > 0.999, metrics


class Clamps(nn.Module):
    """ReLU6 and a Hardtanh that does not reach zero, as fuse leaves them inside the layers."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1)
        self.act1, self.act2 = nn.ReLU6(), nn.Hardtanh(0.25, 2.0)

    def forward(self, x):
        return self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))


class Islands(nn.Module):
    """GELU between two int8 layers, a Hardswish after them: fp32 inside an int8 graph."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
        self.conv3, self.hardswish = nn.Conv2d(8, 8, 1), nn.Hardswish()

    def forward(self, x):
        return self.hardswish(self.conv3(self.conv2(nn.functional.gelu(self.conv1(x)))))


class Kernels(nn.Module):
    """cat, a squeeze-excitation gate (sigmoid, broadcast mul), max pooling, matmul."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.gate, self.fc = nn.Conv2d(16, 16, 1), nn.Linear(256, 5)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], 1)
        y = y * torch.sigmoid(self.gate(nn.functional.adaptive_avg_pool2d(y, 1)))
        tokens = nn.functional.max_pool2d(y, 2).flatten(2)
        return self.fc((tokens @ tokens.transpose(1, 2)).flatten(1))


def wide_net() -> nn.Module:
    """Weights big enough to outweigh each layer's per-channel scales, zero points and bias."""
    torch.manual_seed(0)
    return _init_weights(nn.Sequential(
        nn.Conv2d(3, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(), nn.Conv2d(96, 96, 3, padding=1),
        nn.BatchNorm2d(96), nn.ReLU(), nn.Conv2d(96, 96, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(96, 10)))


def _lower(gm: fx.GraphModule) -> ptl_int8.Lowered:
    with ptl_int8.quantized_engine("x86"), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch: quantized tensors are deprecated
        return ptl_int8.lower(gm)


def _hand_quantized(layer: nn.Module, shape, scales, name: str) -> graphopt.Graph:
    """``layer`` weight-quantized between two uint8 fake-quants of the given (scale, zero
    point, qmax), as quantize would write them."""
    quantize_weight(layer)
    graph = fx.Graph()
    x = graph.placeholder("x")
    (s_in, z_in, top_in), (s_out, z_out, top_out) = scales
    xq = graph.call_function(torch.fake_quantize_per_tensor_affine, (x, s_in, z_in, 0, top_in))
    y = graph.call_module("layer", (xq,))
    graph.output(graph.call_function(torch.fake_quantize_per_tensor_affine, (y, s_out, z_out, 0, top_out)))
    torch.manual_seed(0)
    return graphopt.Graph(fx.GraphModule({"layer": layer}, graph), (torch.randn(*shape),), name)


@pytest.fixture(scope="module")
def zoo(registry):
    """Quantized tiny_resnet and tiny_mobilenet, made once."""
    made = {}

    def get(builder: str) -> graphopt.Graph:
        if builder not in made:
            made[builder] = _quantized(ZOO[builder][0], (1, 3, 32, 32), registry, name=builder)
        return made[builder]
    return get


@pytest.fixture
def resnet(zoo) -> graphopt.Graph:
    return zoo("tiny_resnet")


def test_quantized_kernels_in_the_saved_graph(resnet, tmp_path):
    artifact = ptl_emitter.emit(resnet, {}, tmp_path)
    meta = artifact.meta
    assert (meta["precision"], meta["engine"]) == ("int8", "onednn")
    assert meta["int8"] == {"int8_ops": 16, "kept_fp32": {}, "quantize": 1, "requantize": 0, "dequantize": 1}
    assert {"quantized::conv2d.new", "quantized::conv2d_relu.new", "quantized::add_relu", "quantized::linear",
            "aten::quantize_per_tensor", "aten::dequantize.self"} <= set(meta["ops"])
    assert not {"aten::_convolution", "aten::linear"} & set(meta["ops"])
    assert not [op for op in meta["ops"] if "fake_quantize" in op]
    code = torch.jit.load(artifact.path).code   # the same archive as full TorchScript
    assert code.count("ops.quantized.conv2d") == 11 and "fake_quantize" not in code
    with zipfile.ZipFile(artifact.path) as archive:
        recorded = json.loads(archive.read("archive/extra/graphopt.json"))
    assert (recorded["precision"], recorded["engine"]) == ("int8", "onednn")
    assert ptl_emitter.precision(artifact.path) == "int8"
    _close_to_fx(resnet, artifact)


def test_weights_are_graphopt_int8_weights_and_scales(resnet, tmp_path):
    module = torch.jit.load(ptl_emitter.emit(resnet, {}, tmp_path).path)
    packed = [n.output().toIValue() for n in module.graph.nodes()
              if n.kind() == "prim::Constant" and "PackedParams" in str(n.output().type())]
    saved = [p.unpack()[0] for p in packed]
    layers = [weight_quant(m) for m in resnet.module.modules() if weight_quant(m) is not None]
    assert len(saved) == len(layers) == 12
    for q, scale, axis in layers:
        match = [w for w in saved if w.shape == q.shape and torch.equal(w.int_repr(), q)]
        assert len(match) == 1
        w = match[0]
        assert w.dtype == torch.qint8 and w.qscheme() == torch.per_channel_affine and w.q_per_channel_axis() == axis
        assert torch.equal(w.q_per_channel_scales(), scale.double())
        assert not w.q_per_channel_zero_points().any()


@pytest.mark.parametrize("engine", ptl_int8.ENGINES)
@pytest.mark.parametrize("builder", ["tiny_resnet", "tiny_mobilenet"])
def test_lite_output_matches_the_fake_quant_graph(builder, engine, zoo, tmp_path):
    graph = zoo(builder)
    before = torch.backends.quantized.engine
    artifact = ptl_emitter.emit(graph, {"engine": engine}, tmp_path)
    assert artifact.meta["engine"] == engine
    _close_to_fx(graph, artifact)
    assert torch.backends.quantized.engine == before   # set for saving, loading and each call only


def test_optimize_verifies_the_ptl_at_int8_precision(registry, tmp_path):
    shape = (1, 3, 32, 32)
    result = optimize(tiny_resnet(), [torch.randn(*shape)], registry, pipeline=PIPELINE, formats="ptl",
                      out_dir=tmp_path, data={"calibration": _calibration(shape)})
    (check,) = result.artifacts
    assert result.ok and check.verified and check.artifact.meta["precision"] == "int8"
    assert check.vs_graph.cosine > 0.999
    assert registry.emitters["ptl"].tolerance_for({"precision": "int8"}) == INT8


def test_cat_mul_matmul_and_ops_on_quantized_tensors(registry, tmp_path):
    graph = _quantized(Kernels, (1, 3, 8, 8), registry)
    artifact = ptl_emitter.emit(graph, {}, tmp_path)
    assert {"quantized::cat", "quantized::mul", "quantized::matmul", "quantized::conv2d_relu.new",
            "quantized::linear", "aten::sigmoid", "aten::max_pool2d"} <= set(artifact.meta["ops"])
    summary = artifact.meta["int8"]
    assert (summary["int8_ops"], summary["kept_fp32"], summary["quantize"], summary["dequantize"]) == (7, {}, 1, 1)
    _close_to_fx(graph, artifact)


def test_int8_file_is_under_a_third_of_fp32_each_storage_once(registry, tmp_path):
    fp32 = graphopt.run_pipeline(graphopt.capture(wide_net(), [torch.randn(1, 3, 16, 16)]), "cleanup,fold-bn,fuse",
                                 registry).graph
    int8 = graphopt.run_pipeline(fp32, "quantize(prefer=size)", registry,
                                 data={"calibration": _calibration((1, 3, 16, 16))}).graph
    small = ptl_emitter.emit(int8, {}, tmp_path / "int8")
    big = ptl_emitter.emit(fp32, {}, tmp_path / "fp32")
    assert small.bytes <= 0.35 * big.bytes, (small.bytes, big.bytes)
    with zipfile.ZipFile(small.path) as archive:   # x86 weights unpack anew for the bytecode: kept once
        storages = Counter(archive.read(n) for n in archive.namelist() if n.endswith(".storage"))
    assert max(storages.values()) == 1
    _close_to_fx(int8, small)


def test_relu6_on_a_symmetric_grid_and_a_clamp_off_zero(registry, tmp_path):
    graph = _quantized(Clamps, (1, 3, 12, 12), registry, "cleanup,fold-bn,fuse,quantize(activations=int8,prefer=size)")
    lowered = _lower(graph.module)
    # int8 zero point 0 is quint8 128: ReLU6's floor is the ReLU kernel's, its ceiling the grid's end
    assert list(lowered.int8.values()) == ["ConvReLU2d", "Conv2d", "Conv2d"]
    code = lowered.module.code
    assert code.count("torch.clamp(") == 1 and "0.25" in code   # Hardtanh(0.25, 2): 0.25 is not on the grid's end
    _close_to_fx(graph, ptl_emitter.emit(graph, {}, tmp_path))


def test_fp32_between_int8_regions_is_dequantized_and_requantized(registry, tmp_path):
    graph = _quantized(Islands, (1, 3, 12, 12), registry)
    artifact = ptl_emitter.emit(graph, {}, tmp_path)
    summary = artifact.meta["int8"]
    assert summary["int8_ops"] == 3 and summary["quantize"] >= 2 and summary["dequantize"] >= 2
    assert {"aten::gelu", "quantized::conv2d.new"} <= set(artifact.meta["ops"])
    assert [op for op in artifact.meta["ops"] if op.startswith("aten::hardswish")]
    _close_to_fx(graph, artifact)


def test_hardswish_between_int8_layers_is_the_quantized_kernel(registry, tmp_path):
    """MobileNetV3's hardswish sits between the conv's fake quant and the next one's: quantized::hardswish onto
    the second grid, no dequantize/quantize around it (torch.ao's x86 lowering does the same)."""
    graph = _quantized(ZOO["tiny_mobilenet_v3"][0], (1, 3, 32, 32), registry)
    from graphopt.quant import is_fake_quant

    hardswish = [n for n in graph.module.graph.nodes if n.op == "call_module"
                 and isinstance(graph.module.get_submodule(n.target), nn.Hardswish)]
    between = [n for n in hardswish if len(n.users) == 1 and is_fake_quant(next(iter(n.users)))]
    lowered = _lower(graph.module)
    assert len(between) >= 4 and sorted(n for n, op in lowered.int8.items() if op == "quantized::hardswish") == \
        sorted(n.name for n in between)
    artifact = ptl_emitter.emit(graph, {}, tmp_path)
    assert "quantized::hardswish" in artifact.meta["ops"], artifact.meta["ops"]
    # one dequantize before each hardswish left fp32 (its output is pooled, not quantized), one before the output
    assert artifact.meta["int8"]["dequantize"] <= len(hardswish) - len(between) + 1
    _close_to_fx(graph, artifact)


def test_a_fused_activation_without_a_kernel_keeps_the_layer_fp32(tmp_path):
    layer = fused_layer(nn.Conv2d(3, 8, 3), nn.Hardswish(inplace=True))
    graph = _hand_quantized(layer, (1, 3, 8, 8), [(0.03, 128, 255), (0.02, 20, 255)], "hardswish")
    lowered = _lower(graph.module)
    assert lowered.fp32 == {"layer": "Hardswish inside it: no quantized Conv2d applies it, and quantize "
                                     "calibrated only its output"}
    assert "fake_quantize" not in lowered.module.code and lowered.summary()["quantize"] == 2
    _close_to_fx(graph, ptl_emitter.emit(graph, {}, tmp_path))


def test_a_fake_quant_with_fewer_levels_is_clamped_to_them(tmp_path):
    """A 7-bit grid (codes 0..127, as torch's x86 qconfig uses): the kernels write up to 255."""
    torch.manual_seed(0)
    seven = _hand_quantized(nn.Conv2d(3, 8, 3), (1, 3, 8, 8), [(0.05, 64, 127), (0.01, 64, 127)], "seven_bit")
    assert seven.run()[0].max() == pytest.approx(0.01 * 63)   # the conv reaches beyond the grid
    assert _lower(seven.module).module.code.count("torch.clamp(") == 2   # after the entry and the conv
    _close_to_fx(seven, ptl_emitter.emit(seven, {}, tmp_path))


def test_same_graph_same_bytes_and_nothing_printed(resnet, tmp_path, capfd):
    first = ptl_emitter.emit(resnet, {}, tmp_path / "a")
    ptl_emitter.load(first)(list(resnet.example_inputs))
    assert ptl_emitter.emit(resnet, {}, tmp_path / "b").path.read_bytes() == first.path.read_bytes()
    assert capfd.readouterr() == ("", "")


def test_an_engine_this_torch_lacks_is_one_line_emit_error(resnet, tmp_path):
    with pytest.raises(graphopt.EmitError, match="this torch build has no quantized engine 'tpu'") as info:
        ptl_emitter.emit(resnet, {"engine": "tpu"}, tmp_path)
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []
