"""A stride-2 int8 stem on few input channels becomes a stride-1 convolution on SpaceToDepth
input: the same integer sums, so the same outputs, as a QLinearConv."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphopt
import graphopt_plugins.onnx as onnx_emitter
from graphopt.passmanager import run_pipeline
from ortrun import run_model
from graphopt_plugins.onnx.stem import space_to_depth_stems
from zoo.cnn import tiny_mobilenet, tiny_resnet


def _stem(channels: int, size: int, k: int, pad: int, stride: int = 2, out: int = 8) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(int8 per-channel weights, int32 bias) -> Q -> DQ -> y, uint8 activations."""
    rng = np.random.default_rng(k * 10 + pad)
    weight_scales = rng.uniform(1e-3, 4e-3, out).astype(np.float32)
    inits = [numpy_helper.from_array(np.array(v, dtype), name) for name, v, dtype in (
        ("s", 0.03, np.float32), ("z", 121, np.uint8), ("so", 0.4, np.float32), ("zo", 128, np.uint8))] + [
        numpy_helper.from_array(rng.integers(-127, 128, (out, channels, k, k)).astype(np.int8), "w_q"),
        numpy_helper.from_array(weight_scales, "ws"), numpy_helper.from_array(np.zeros(out, np.int8), "wz"),
        numpy_helper.from_array(rng.integers(-999, 999, out).astype(np.int32), "b_q"),
        numpy_helper.from_array(np.float32(0.03) * weight_scales, "bs")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w_q", "ws", "wz"], ["w"], axis=0, name="wdq"),
             helper.make_node("DequantizeLinear", ["b_q", "bs"], ["b"], axis=0, name="bdq"),
             helper.make_node("Conv", ["xd", "w", "b"], ["c"], kernel_shape=[k, k], strides=[stride, stride],
                              pads=[pad] * 4, name="stem"),
             helper.make_node("QuantizeLinear", ["c", "so", "zo"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "so", "zo"], ["y"])]
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            [1, channels, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("channels, size, k, pad", [(3, 32, 7, 3), (3, 32, 3, 1), (1, 20, 5, 2), (4, 18, 3, 0),
                                                    (3, 30, 5, 1)])
def test_the_stem_gives_the_same_outputs_from_a_stride_1_int8_convolution(tmp_path, channels, size, k, pad):
    model = _stem(channels, size, k, pad)
    x = np.random.default_rng(size).standard_normal((1, channels, size, size)).astype(np.float32) * 2
    expected, _ = run_model(model, x)
    assert space_to_depth_stems(model) == 1
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert {a.name: list(a.ints) for a in conv.attribute}["strides"] == [1, 1]
    producers = {o: n for n in model.graph.node for o in n.output}
    quantize = producers[producers[conv.input[0]].input[0]]
    assert quantize.op_type == "QuantizeLinear" and producers[quantize.input[0]].op_type == "SpaceToDepth"
    got, ops = run_model(model, x, tmp_path)
    assert "QLinearConv" in ops and "Conv" not in ops
    assert np.array_equal(got, expected), np.abs(got - expected).max()


@pytest.mark.parametrize("what, model", [("odd size", _stem(3, 31, 3, 1)), ("stride 1", _stem(3, 32, 3, 1, 1)),
                                         ("8 channels", _stem(8, 32, 3, 1)), ("even kernel", _stem(3, 32, 4, 1))])
def test_what_the_rewrite_does_not_take_is_left(what, model):
    before = [n.op_type for n in model.graph.node]
    assert space_to_depth_stems(model) == 0, what
    assert [n.op_type for n in model.graph.node] == before


class Stemmed(torch.nn.Module):
    """ResNet's stem (7x7, stride 2, BatchNorm, ReLU, max pool), a stride-2 3x3 conv on 16 channels, a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(16),
                                        torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1))
        self.body = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, 2, 1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean([2, 3]))


@pytest.mark.parametrize("build, stems", [(tiny_resnet, 0), (tiny_mobilenet, 0), (Stemmed, 1)])
def test_emitted_int8_stems_are_rewritten_with_the_same_outputs(registry, tmp_path, build, stems):
    gen = torch.Generator().manual_seed(0)
    shape = (1, 3, 32, 32)
    graph = graphopt.capture(build(), (torch.randn(*shape, generator=gen),))
    graph = run_pipeline(graph, "cleanup,fold-bn,fuse,quantize(prefer=size)", registry,
                         data={"calibration": [torch.randn(*shape, generator=gen) for _ in range(4)]}).graph
    rewritten = onnx_emitter.emit(graph, {}, tmp_path / "s2d")
    plain = onnx_emitter.emit(graph, {"space_to_depth_stem": False}, tmp_path / "plain")
    assert rewritten.meta["space_to_depth_stems"] == stems    # a stride-1 stem, or 16 channels, stays
    assert "space_to_depth_stems" not in plain.meta
    for seed in range(3):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(50 + seed))
        assert torch.equal(onnx_emitter.load(rewritten)(x)[0], onnx_emitter.load(plain)(x)[0])
