"""fold-bn: BatchNorm folded into the Conv / ConvTranspose / Linear before it, or kept with a reason."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from zoo import ZOO
from zoo.fold import Residual, module_types, optimize, randomize_bn


def _batchnorms(gm: nn.Module) -> list[nn.Module]:
    return [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class LayerBN(nn.Module):
    def __init__(self, layer: nn.Module, bn: nn.Module):
        super().__init__()
        self.layer, self.bn = layer, bn

    def forward(self, x):
        return torch.relu(self.bn(self.layer(x)))


CASES = {  # name: (makes the layer and the bn, input shape)
    "conv1d": (lambda: (nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5)), (2, 3, 8)),
    "conv2d": (lambda: (nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)), (2, 3, 6, 6)),
    "conv2d-no-bias": (lambda: (nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6)), (2, 3, 6, 6)),
    "conv2d-grouped": (lambda: (nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)), (2, 4, 6, 6)),
    "conv2d-depthwise": (lambda: (nn.Conv2d(4, 8, 3, groups=4, bias=False), nn.BatchNorm2d(8)),
                         (2, 4, 6, 6)),
    "conv3d": (lambda: (nn.Conv3d(2, 4, 3, stride=2), nn.BatchNorm3d(4)), (1, 2, 5, 5, 5)),
    "convt1d": (lambda: (nn.ConvTranspose1d(3, 4, 3, bias=False), nn.BatchNorm1d(4)), (2, 3, 7)),
    "convt2d-grouped-stride": (lambda: (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
                                        nn.BatchNorm2d(6)), (2, 4, 4, 4)),
    "convt2d-depthwise": (lambda: (nn.ConvTranspose2d(3, 6, 2, groups=3, bias=False),
                                   nn.BatchNorm2d(6)), (2, 3, 4, 4)),
    "convt3d": (lambda: (nn.ConvTranspose3d(2, 3, 2, stride=2), nn.BatchNorm3d(3)), (1, 2, 3, 3, 3)),
    "linear": (lambda: (nn.Linear(6, 4), nn.BatchNorm1d(4)), (5, 6)),
    "linear-no-bias": (lambda: (nn.Linear(6, 4, bias=False), nn.BatchNorm1d(4)), (5, 6)),
    "conv2d-bn-not-affine": (lambda: (nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)),
                             (2, 3, 5, 5)),
    "linear-bn-not-affine": (lambda: (nn.Linear(6, 4), nn.BatchNorm1d(4, affine=False)), (5, 6)),
}


@pytest.mark.parametrize("case", CASES)
def test_folds_into_each_layer_kind(case, registry):
    torch.manual_seed(0)
    make, shape = CASES[case]
    layer, bn = make()
    model = randomize_bn(LayerBN(layer, bn))
    x = torch.randn(shape)
    with torch.no_grad():   # the BN must matter, or the numbers prove nothing
        y = model.layer(x)
        assert (model.bn(y) - y).abs().max() > 0.1
    run = optimize(model, (x,), "fold-bn", registry)
    gm = run.graph.module
    assert module_types(gm) == [type(layer).__name__]
    assert not _batchnorms(gm)
    assert gm.layer.bias is not None and gm.layer.weight.dtype == torch.float32
    (record,) = run.records
    assert record.stats == {"folded": 1, "rejected": 0} and record.modified and record.verified
    assert record.explanations == [f"layer -> bn: folded {type(bn).__name__} into "
                                   f"{type(layer).__name__}"]


def test_nested_chains_and_counts(registry):
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Conv2d(4, 4, 1), nn.ReLU(), nn.BatchNorm2d(4),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3), nn.BatchNorm1d(3)))
    run = optimize(model, (torch.randn(2, 3, 6, 6),), "fold-bn", registry)
    gm = run.graph.module
    assert module_types(gm) == ["Conv2d", "ReLU", "Conv2d", "ReLU", "BatchNorm2d", "Flatten", "Linear"]
    assert {name for name, _ in gm.named_modules()} == {"", "0", "0.0", "0.3", "1", "2", "3", "4", "5"}
    assert run.records[0].stats == {"folded": 3, "rejected": 1}
    assert "_2 -> _3: not folded, _2 (ReLU) is not a Conv, ConvTranspose or Linear module" \
        in run.records[0].explanations


class SharedConv(Residual):
    """The same conv module called twice: folding BN into it would change the other call."""

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class ReluBN(Residual):
    def forward(self, x):
        return self.bn(F.relu(self.conv(x)))


class NoRunningStats(Residual):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3, track_running_stats=False)


class TiedWeight(nn.Module):
    """``fc.weight`` is also read directly: folding would change that read too."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 3), nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.fc(x)) + F.linear(x, self.fc.weight)


class LinearOverLength(nn.Module):
    """Linear on (N, C, L) features L; BatchNorm1d normalizes dim 1, the C axis."""

    def __init__(self, out_features: int):
        super().__init__()
        self.fc, self.bn = nn.Linear(4, out_features), nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.fc(x))


@pytest.mark.parametrize("make, shape, reason", [
    (Residual, (2, 3, 5, 5), "conv -> bn: not folded, conv's output is also used by add"),
    (SharedConv, (2, 3, 5, 5), "conv -> bn: not folded, conv's module is shared: also used by conv_1"),
    (TiedWeight, (2, 4), "fc -> bn: not folded, fc's module is shared: also used by fc_weight"),
    (ReluBN, (2, 3, 5, 5), "relu -> bn: not folded, relu (call_function relu) is not a Conv, "
                           "ConvTranspose or Linear module"),
    (NoRunningStats, (2, 3, 5, 5), "conv -> bn: not folded, bn has no running stats "
                                   "(track_running_stats=False)"),
    (partial(LinearOverLength, 5), (2, 3, 4),
     "fc -> bn: not folded, fc has 5 output channels, bn normalizes 3"),
    (partial(LinearOverLength, 3), (2, 3, 4),
     "fc -> bn: not folded, bn normalizes dim 1 of fc's output of shape (2, 3, 3), "
     "which is not its channel dim (batched rank 2 expected)"),
], ids=["residual", "shared", "tied-weight", "after-relu", "no-running-stats", "channels", "wrong-dim"])
def test_rejects_with_reason(make, shape, reason, registry):
    torch.manual_seed(0)
    run = optimize(randomize_bn(make()), (torch.randn(shape),), "fold-bn", registry)
    gm = run.graph.module
    (record,) = run.records
    assert record.explanations == [reason]
    assert record.stats == {"folded": 0, "rejected": 1} and not record.modified
    assert len(_batchnorms(gm)) == 1 and [n.target for n in gm.graph.nodes].count("bn") == 1


def test_training_mode_bn_is_kept(registry):
    model = randomize_bn(LayerBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    graph = graphopt.capture(model, torch.randn(2, 3, 5, 5))
    graph.module.bn.train()
    ctx = graphopt.PassContext(options={}, graph=graph)
    result = registry.passes["fold-bn"].run(graph.module, ctx)
    assert not result.modified and "BatchNorm2d" in module_types(result.graph_module)
    assert ctx.explanations == ["layer -> bn: not folded, bn is in training mode "
                                "(it normalizes with batch statistics)"]


def test_does_not_mutate_the_layer_module(registry):
    model = randomize_bn(LayerBN(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    graph = graphopt.capture(model, torch.randn(2, 3, 5, 5))
    conv, weight = graph.module.layer, graph.module.layer.weight.detach().clone()
    ctx = graphopt.PassContext(options={}, graph=graph)
    result = registry.passes["fold-bn"].run(graph.module, ctx)
    assert result.graph_module.layer is not conv
    assert torch.equal(conv.weight, weight) and conv.bias is None
    assert not torch.equal(result.graph_module.layer.weight, weight)


def test_verify_each_records_stats_and_explanations(registry):
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(),
                                       nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)))
    records = []
    run = optimize(model, (torch.randn(1, 3, 7, 7),), "cleanup,fold-bn", registry,
                   verify=True, on_pass=records.append)
    assert [r.name for r in records] == ["cleanup", "fold-bn"] and records == run.records
    assert all(r.verified for r in records)
    assert records[0].stats == {"dropout": 1, "identity": 0, "dead": 0}
    assert records[1].stats == {"folded": 2, "rejected": 0}
    assert records[1].explanations == ["_0 -> _1: folded BatchNorm2d into Conv2d",
                                       "_3 -> _4: folded BatchNorm2d into Conv2d"]
    assert records[1].nodes == 2 and module_types(run.graph.module) == ["Conv2d", "Conv2d"]


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_mobilenet", "mlp"])
def test_zoo_models_lose_every_batchnorm(name, registry):
    build, shape = ZOO[name]
    model = randomize_bn(build())
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    run = optimize(model, (torch.randn(shape),), "cleanup,fold-bn", registry)
    assert run.records[1].stats == {"folded": bns, "rejected": 0} and bns > 0
    assert not _batchnorms(run.graph.module) and "Dropout" not in module_types(run.graph.module)


def test_registered_as_an_exact_default_pass(registry):
    spec = registry.passes["fold-bn"]
    assert registry.owner["pass:fold-bn"] == "fold-bn"
    assert spec.effect is graphopt.Effect.EXACT and spec.default_order == 20 and spec.options == ()
