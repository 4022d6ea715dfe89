"""The emitter helpers of graphopt.emit: every runner takes a tensor or a sequence, arity is
checked once, layouts convert both ways, provenance says where a file came from."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.emit import as_inputs, provenance, to_channels_first, to_channels_last


def test_as_inputs_takes_a_tensor_a_tuple_or_a_list_and_checks_the_count():
    x, y = torch.randn(1, 3), torch.randn(1, 3)
    assert as_inputs(x, 1, "m.onnx")[0] is x
    assert as_inputs((x, y), 2, "m.onnx") == [x, y] and as_inputs([x], None, "m.onnx") == [x]
    with pytest.raises(graphopt.EmitError, match=r"^m.onnx takes 2 inputs, got 1$"):
        as_inputs(x, 2, "m.onnx")


@pytest.mark.parametrize("shape,last", [((2, 3, 5), (2, 5, 3)), ((2, 3, 5, 7), (2, 5, 7, 3)),
                                        ((2, 3, 5, 7, 4), (2, 5, 7, 4, 3))])
def test_layouts_convert_both_ways(shape, last):
    x = torch.arange(torch.Size(shape).numel()).reshape(shape)
    nhwc = to_channels_last(x)
    assert nhwc.shape == last and torch.equal(nhwc[0, ..., 1], x[0, 1])
    assert torch.equal(to_channels_first(nhwc), x)


def test_provenance_records_version_pipeline_inputs_and_precision(registry):
    run = graphopt.optimize(nn.Sequential(nn.Linear(4, 2)), (torch.randn(1, 4),), registry, pipeline="cleanup")
    record = provenance(run.graph, engine="x86")
    assert record == {"version": graphopt.__version__, "pipeline": "cleanup", "precision": "fp32", "engine": "x86",
                      "inputs": [{"name": "input_1", "shape": [1, 4], "dtype": "float32"}]}


@pytest.mark.parametrize("fmt", ["onnx", "ptl"])
def test_runners_take_a_bare_tensor(fmt, registry, tmp_path):
    model, x = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval(), torch.randn(2, 4)
    graph = graphopt.capture(model, x)
    emitter = registry.emitters[fmt]
    runner = emitter.load(emitter.emit(graph, {o.name: o.default for o in emitter.options}, tmp_path))
    (bare,), (listed,) = runner(x), runner([x])
    assert torch.allclose(bare, model(x), atol=1e-5) and torch.equal(bare, listed)
    with pytest.raises(graphopt.EmitError, match="takes 1 inputs, got 2"):
        runner([x, x])
