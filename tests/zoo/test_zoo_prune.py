"""The pruning model zoo: every model traces, the trace is exact, big_graph is big."""
from __future__ import annotations

import pytest
import torch
from torch import fx

from zoo import PRUNE_ZOO, example_input


@pytest.mark.parametrize("name", sorted(PRUNE_ZOO))
def test_prune_zoo_model_traces_exactly(name):
    builder, shape = PRUNE_ZOO[name]
    model = builder()
    assert not model.training
    x = example_input(name)
    assert x.shape == shape
    with torch.no_grad():
        expected = model(x)
        traced = fx.symbolic_trace(model)(x)
    assert expected.shape == ((1, 3, 16, 16) if name == "conv_transpose" else (1, 10))
    assert torch.equal(traced, expected)


def test_example_inputs_are_seeded_and_embedding_takes_token_ids():
    assert torch.equal(example_input("residual"), example_input("residual"))
    assert not torch.equal(example_input("residual"), example_input("residual", seed=1))
    ids = example_input("embedding")
    assert ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < 100


def test_big_graph_has_about_500_nodes():
    assert 400 <= len(fx.symbolic_trace(PRUNE_ZOO["big_graph"][0]()).graph.nodes) <= 700
