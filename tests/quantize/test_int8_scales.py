"""One contract for the grids (scale, zero point) an int8 file holds: each format reads its file's
back and compares them with the fake-quant graph's (graphopt.testing.quantization). One tensor on a
wrong scale, injected into each format's lowering (or its finished file), is refused by name."""
from __future__ import annotations

import onnx
import pytest
import torch
from onnx import numpy_helper

import graphopt
from graphopt import EmitError
from graphopt.quant import QD
from graphopt.testing.quantization import QTensor, check_grids, check_qtensors, graph_qtensors
from zoo.cnn import SmallConvNet


def _quantized(registry, pipeline: str):
    gen = torch.Generator().manual_seed(1)
    calibration = [torch.randn(1, 3, 16, 16, generator=gen) for _ in range(8)]
    return graphopt.optimize(SmallConvNet(), (torch.randn(1, 3, 16, 16),), registry, pipeline=pipeline,
                             data={"calibration": calibration}).graph


@pytest.fixture(scope="module")
def quantized(registry):
    return _quantized(registry, "quantize(prefer=size)")


@pytest.fixture(scope="module")
def partitioned(registry):
    return _quantized(registry, "quantize(prefer=size),partition(backend=xnnpack)")


def test_the_graph_lists_its_grids_in_graph_order(partitioned):
    acts, weights = graph_qtensors(partitioned.module)
    fake_quants = [n for sub in partitioned.module.modules() if isinstance(sub, torch.fx.GraphModule)
                   for n in sub.graph.nodes if n.target is torch.fake_quantize_per_tensor_affine]
    assert len(acts) == len(fake_quants) >= 4
    assert [w.name.rsplit(".", 1)[-1] for w in weights] == ["0", "2", "head"]   # body.0, body.2, head
    assert [len(w.scale) for w in weights] == [8, 16, 10] and all(set(w.zero_point) == {0} for w in weights)


def test_the_contract_names_the_tensor_that_differs():
    graph = [QTensor("fq", (0.5,), (3,)), QTensor("fq_1", (0.25,), (-128,))]
    assert check_qtensors("activation", graph, [QTensor("a", (0.5,), (3,)), QTensor("b", (0.25,), (-128,))]) == 2
    with pytest.raises(ValueError, match=r"activation 2 \(b\) has scale 0.5, zero point -128; "
                                         r"the graph's \(fq_1\) has scale 0.25, zero point -128"):
        check_qtensors("activation", graph, [QTensor("a", (0.5,), (3,)), QTensor("b", (0.5,), (-128,))])
    with pytest.raises(ValueError, match=r"the file has 1 activations, the graph 2 \(the first unmatched: fq_1\)"):
        check_qtensors("activation", graph, graph[:1])
    with pytest.raises(ValueError, match="tensor c has scale 0.125, zero point 3, which no fake quant"):
        check_grids("tensor", graph, [*graph, QTensor("c", (0.125,), (3,))])
    with pytest.raises(ValueError, match=r"the graph's fake quant fq_1 \(scale 0.25, zero point -128\) is on no"):
        check_grids("tensor", graph, graph[:1])
    assert check_grids("tensor", graph, graph[:1], optional=lambda g: g.name == "fq_1") == 1
    assert check_grids("tensor", graph, [QTensor("printed", (0.2500004,), (-128,))], atol=5e-7,
                       optional=lambda g: True) == 1


def _wrong_scale(gm: torch.fx.GraphModule, targets) -> str:
    """In place: the second quantize node of ``gm`` (partitions included) and its dequantize nodes on
    twice the scale; returns the node's name."""
    nodes = [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
             if n.op == "call_function" and n.target in targets]
    node = nodes[1]
    for n in [node, *(u for u in node.users if u.target in (QD.dequantize_per_tensor.default,))]:
        n.args = (n.args[0], n.args[1] * 2, *n.args[2:])
    for m in gm.modules():
        if isinstance(m, torch.fx.GraphModule):
            m.recompile()
    return node.name


def _emit(registry, fmt: str, graph, tmp_path):
    emitter = registry.emitters[fmt]
    return emitter.emit(graph, {o.name: o.default for o in emitter.options}, tmp_path)


def test_onnx_refuses_a_file_with_one_wrong_scale(registry, quantized, tmp_path):
    from graphopt_plugins.onnx.qdq import check_scales

    artifact = _emit(registry, "onnx", quantized, tmp_path)
    assert artifact.meta["scales"]["activations"] >= 4 and artifact.meta["scales"]["weights"] == 3
    model = onnx.load(artifact.path)
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"][1]
    init = next(i for i in model.graph.initializer if i.name == q.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2, init.name))
    with pytest.raises(EmitError, match=rf"activation quantizer 2 \({q.input[0]}\) has scale .*; the graph's "
                                        rf"\(fake_quantize_per_tensor_affine_1\) has scale"):
        check_scales(model, quantized.module)


def test_ptl_refuses_a_lowering_with_one_wrong_scale(registry, quantized, tmp_path, monkeypatch):
    import graphopt_plugins.ptl.int8 as ptl_int8

    assert _emit(registry, "ptl", quantized, tmp_path / "ok").meta["scales"]["weights"] == 3
    lower = ptl_int8.lower

    def wrong(gm):   # the first quantized conv writes its output on twice the graph's scale
        lowered = lower(gm)
        conv = next(m for m in lowered.module.modules() if type(m).__name__ == "ConvReLU2d" and hasattr(m, "scale"))
        conv.scale *= 2
        return lowered

    monkeypatch.setattr(ptl_int8, "lower", wrong)
    with pytest.raises(EmitError, match=r"the int8 .ptl does not hold the graph's quantization: quantized tensor .*"
                                        r"\(quantized::conv2d_relu\) has scale .* which no fake quant of the graph"):
        _emit(registry, "ptl", quantized, tmp_path / "bad")


def test_ptl_of_a_partitioned_graph_holds_its_fake_quants_in_float(registry, partitioned, tmp_path):
    scales = _emit(registry, "ptl", partitioned, tmp_path).meta["scales"]   # the lowering does not enter partitions
    assert scales["weights"] == "computed in float"
    assert scales["activations"] == len(graph_qtensors(partitioned.module)[0])


def test_pte_refuses_a_weight_on_other_scales(registry, partitioned, tmp_path, monkeypatch):
    pytest.importorskip("executorch")
    import graphopt_plugins.pte.lower as pte_lower

    assert _emit(registry, "pte", partitioned, tmp_path / "ok").meta["scales"]["weights"] == 3
    original = pte_lower.to_qdq

    def to_qdq(gm, *args, **kwargs):   # the second layer's int8 weight read on twice its scales
        gm, count = original(gm, *args, **kwargs)
        [m for m in gm.modules() if type(m).__name__ == "DQWeight"][1].scale *= 2
        return gm, count

    monkeypatch.setattr(pte_lower, "to_qdq", to_qdq)
    with pytest.raises(EmitError, match=r"int8 weight \(value \d+ of delegate .*\) has per-channel scales no layer "
                                        r"of the graph's partitions has"):
        _emit(registry, "pte", partitioned, tmp_path / "bad")


@pytest.mark.parametrize("fmt, module", [("tflite", "graphopt_plugins.tflite.int8"),
                                         ("pte", "graphopt_plugins.pte.lower")])
def test_a_file_with_one_wrong_scale_is_refused(fmt, module, registry, quantized, partitioned, tmp_path,
                                                monkeypatch):
    pytest.importorskip("litert_torch" if fmt == "tflite" else "executorch")
    import importlib

    lowering = importlib.import_module(module)
    name = "qdq_form" if fmt == "tflite" else "to_qdq"
    graph = quantized if fmt == "tflite" else partitioned
    assert _emit(registry, fmt, graph, tmp_path / "ok").meta is not None
    original, wrong = getattr(lowering, name), []

    def to_qdq(gm, *args, **kwargs):
        gm, count = original(gm, *args, **kwargs)
        wrong.append(_wrong_scale(gm, (QD.quantize_per_tensor.default,)))
        return gm, count

    monkeypatch.setattr(lowering, name, to_qdq)
    with pytest.raises(EmitError, match=r"not hold the graph's quantization: int8 (tensor|value) .* has scale "
                                        r".*, which no fake quant of the graph has"):
        _emit(registry, fmt, graph, tmp_path / "bad")
    assert wrong
