"""The tiny model zoo: traceable, right output shapes, deterministic, non-trivial BN."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import fx, nn

from zoo import ZOO
from zoo.cnn import UntraceableNet


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_traces_and_gives_logits(name):
    builder, shape = ZOO[name]
    model = builder()
    assert not model.training
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)
        traced = fx.symbolic_trace(model)(x)
    num_classes = inspect.signature(builder).parameters["num_classes"].default
    assert expected.shape == (1, num_classes)
    assert torch.equal(traced, expected)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_batchnorm_stats_are_non_trivial(name):
    bns = [m for m in ZOO[name][0]().modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns
    for bn in bns:
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
        assert not torch.allclose(bn.bias, torch.zeros_like(bn.bias))


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_mobilenet", "mlp"])
def test_builders_are_deterministic_per_seed(name):
    builder = ZOO[name][0]
    a, b, c = builder().state_dict(), builder().state_dict(), builder(seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_num_classes_is_honoured():
    builder, shape = ZOO["tiny_resnet"]
    assert builder(num_classes=3)(torch.randn(shape)).shape == (1, 3)


def test_untraceable_net_runs_eagerly_but_fails_symbolic_trace():
    model = UntraceableNet()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(fx.proxy.TraceError, match="control flow"):
        fx.symbolic_trace(model)
