"""merge-linear: Linear -> Linear merged into one Linear when that takes fewer MACs, else kept
with the MAC counts."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from zoo.fold import module_types, optimize


@pytest.mark.parametrize("bias1, bias2", [(True, True), (False, True), (True, False), (False, False)])
def test_merges_a_bottleneck_into_one_layer(bias1, bias2, registry):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32, bias=bias1), nn.Linear(32, 4, bias=bias2)).eval()
    run = optimize(model, (torch.randn(2, 16),), "merge-linear", registry)
    gm = run.graph.module
    assert module_types(gm) == ["Linear"]
    assert (gm.get_submodule("1").in_features, gm.get_submodule("1").out_features) == (16, 4)
    (record,) = run.records
    assert record.stats == {"merged": 1, "rejected": 0}
    assert record.explanations == ["_1: merged _0 -> _1 into one Linear(16, 4): 1280 -> 128 MACs"]
    assert record.macs == 128 and record.params == 16 * 4 + 4


def test_merges_a_chain_over_tokens(registry):
    """Three layers on (batch, tokens, features): rows are batch * tokens."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Dropout(), nn.Linear(16, 2)).eval()
    run = optimize(model, (torch.randn(2, 5, 8),), "cleanup,merge-linear", registry)
    assert module_types(run.graph.module) == ["Linear"]
    assert run.records[1].explanations == [
        f"_1: merged _0 -> _1 into one Linear(8, 16): {10 * (8 * 16 + 16 * 16)} -> {10 * 8 * 16} MACs",
        f"_3: merged _1_1 -> _3 into one Linear(8, 2): {10 * (8 * 16 + 16 * 2)} -> {10 * 8 * 2} MACs"]


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h), h.sum()


def test_rejects_with_reason(registry):
    torch.manual_seed(0)
    expand = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 64)).eval()
    run = optimize(expand, (torch.randn(3, 8),), "merge-linear", registry)
    assert module_types(run.graph.module) == ["Linear", "Linear"] and not run.records[0].modified
    assert run.records[0].explanations == [
        "_1: kept, one Linear(8, 64) would take 1536 MACs, the two (8->4->64) take 864"]
    run = optimize(Shared().eval(), (torch.randn(3, 16),), "merge-linear", registry)
    assert run.records[0].explanations == ["fc2: kept, fc1's output is also used by sum_1"]
    assert run.records[0].stats == {"merged": 0, "rejected": 1}


def test_a_linear_relu_pair_is_not_a_candidate(registry):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    run = optimize(model, (torch.randn(3, 16),), "merge-linear", registry)
    assert run.records[0].explanations == [] and module_types(run.graph.module) == ["Linear", "ReLU", "Linear"]
