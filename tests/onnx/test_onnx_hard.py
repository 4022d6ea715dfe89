"""Quantized HardSigmoid gates and HardSwish in int8 ONNX: rewritten into node units onnxruntime
runs in int8 (QLinearAdd, QLinearMul), the gates to the same integers, HardSwish within a step."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphopt
import graphopt_plugins.onnx as onnx_emitter
from graphopt.metrics import compare
from graphopt.passmanager import run_pipeline
from ortrun import run_model
from graphopt_plugins.onnx.hard import integer_hard_activations
from zoo.cnn import tiny_mobilenet_v3

SHAPE = (1, 3, 32, 32)


def _unit(op: str, out_scale: float, out_zero: int, **attributes) -> onnx.ModelProto:
    """x -> Q -> DQ -> ``op`` -> Q(out_scale, out_zero) -> DQ -> y, uint8 activations."""
    inits = [numpy_helper.from_array(np.array(v, dtype), name) for name, v, dtype in (
        ("s", 0.05, np.float32), ("z", 120, np.uint8), ("so", out_scale, np.float32), ("zo", out_zero, np.uint8))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node(op, ["xd"], ["a"], name="act", **attributes),
             helper.make_node("QuantizeLinear", ["a", "so", "zo"], ["aq"]),
             helper.make_node("DequantizeLinear", ["aq", "so", "zo"], ["y"])]
    graph = helper.make_graph(nodes, "unit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4096])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4096])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


X = np.linspace(-7, 7, 4096, dtype=np.float32)   # every step of the input grid, both clips


def test_a_gate_becomes_a_quantized_add_with_the_same_integers(tmp_path):
    model = _unit("HardSigmoid", 1 / 256, 0, alpha=1 / 6, beta=0.5)
    expected, _ = run_model(model, X)
    assert integer_hard_activations(model) == 1
    got, ops = run_model(model, X, tmp_path)
    assert "QLinearAdd" in ops and "HardSigmoid" not in ops
    assert np.array_equal(got, expected), np.abs(got - expected).max()


@pytest.mark.parametrize("zero, scale", [(10, 1 / 240), (0, 1.5 / 255)])
def test_a_gate_whose_grid_does_not_clip_where_the_gate_does_is_left(zero, scale):
    model = _unit("HardSigmoid", scale, zero, alpha=1 / 6, beta=0.5)   # below 0, or past 1
    assert integer_hard_activations(model) == 0
    assert [n.op_type for n in model.graph.node].count("HardSigmoid") == 1


def test_hardswish_becomes_quantized_add_and_mul_within_a_step(tmp_path):
    out_scale = 7 / 255
    model = _unit("HardSwish", out_scale, 13)
    expected, _ = run_model(model, X)
    assert integer_hard_activations(model) == 1
    got, ops = run_model(model, X, tmp_path)
    assert {"QLinearAdd", "QLinearMul"} <= set(ops) and not {"HardSwish", "HardSigmoid", "Mul"} & set(ops)
    steps = np.abs(got - expected) / out_scale
    assert steps.max() <= 1 + 1e-4 and (steps > 0.5).mean() < 0.05, (steps.max(), (steps > 0.5).mean())


def test_a_float_consumer_keeps_the_float_kernel():
    model = _unit("HardSwish", 7 / 255, 13)
    model.graph.output[0].name = "a"     # the activation's float output is the model's output
    del model.graph.node[3:]
    assert integer_hard_activations(model) == 0


@pytest.fixture(scope="module")
def mobilenet_v3(registry, tmp_path_factory):
    """A quantized MobileNetV3-style graph (hardswish, SE gates) emitted with and without the rewrite."""
    gen = torch.Generator().manual_seed(0)
    graph = graphopt.capture(tiny_mobilenet_v3(), (torch.randn(*SHAPE, generator=gen),))
    calibration = [torch.randn(*SHAPE, generator=gen) for _ in range(4)]
    graph = run_pipeline(graph, "cleanup,fold-bn,fuse,quantize(prefer=size)", registry,
                         data={"calibration": calibration}).graph
    out = tmp_path_factory.mktemp("mobilenet_v3")
    return graph, onnx_emitter.emit(graph, {}, out / "int"), \
        onnx_emitter.emit(graph, {"integer_hard_activations": False}, out / "float")


def test_mobilenet_v3_runs_its_hard_activations_in_int8(mobilenet_v3, tmp_path):
    graph, rewritten, kept = mobilenet_v3
    before, after = kept.meta["op_types"], rewritten.meta["op_types"]
    assert "integer_hard_activations" not in kept.meta and before.get("HardSwish", 0) >= 3
    rewrites = rewritten.meta["integer_hard_activations"]
    assert rewrites >= 4 and rewrites == before["HardSwish"] + before.get("HardSigmoid", 0) \
        - after.get("HardSwish", 0) - after.get("HardSigmoid", 0)
    float_ops, int_ops = _ort_ops(kept.path, tmp_path / "float"), _ort_ops(rewritten.path, tmp_path / "int")
    assert int_ops.count("HardSigmoid") == after.get("HardSwish", 0) + after.get("HardSigmoid", 0)
    assert int_ops.count("QLinearAdd") - float_ops.count("QLinearAdd") == rewrites
    assert int_ops.count("QuantizeLinear") + rewrites <= float_ops.count("QuantizeLinear")
    for seed in range(7, 11):
        x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed))
        assert compare(graph.run((x,)), onnx_emitter.load(rewritten)(x)).cosine >= 0.999
        assert compare(onnx_emitter.load(kept)(x), onnx_emitter.load(rewritten)(x)).cosine >= 0.999


def _ort_ops(path, folder) -> list[str]:
    folder.mkdir()
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
