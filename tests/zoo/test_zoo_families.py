"""The torchvision-family zoo: every small model captures exactly with the right output shape and a small parameter
count; every full-size model has torchvision's parameter count (built on the meta device, never run)."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import graphopt
from zoo import FAMILIES, SMALL_FAMILIES

# torchvision's parameter counts in millions (googlenet and deeplabv3_mobilenet_v3_large without their aux heads)
TORCHVISION_MPARAMS = {
    "resnext": 25.03, "efficientnet_b0": 5.29, "efficientnet_v2": 21.46, "mnasnet": 4.38, "shufflenet_v2": 2.28,
    "squeezenet": 1.24, "densenet": 7.98, "googlenet": 6.62, "regnet_y": 4.34, "regnet_x": 5.50, "alexnet": 61.10,
    "vgg": 132.86, "deeplabv3": 11.03, "lraspp": 3.22,
}
SEGMENTATION = {"deeplabv3", "lraspp"}
SMALL_PARAMS = (2_000, 100_000)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _expected_shape(name: str, builder, shape: tuple[int, ...]) -> tuple[int, ...]:
    num_classes = inspect.signature(builder).parameters["num_classes"].default
    return (shape[0], num_classes, *shape[2:]) if name in SEGMENTATION else (shape[0], num_classes)


def test_both_dicts_hold_every_family():
    assert set(FAMILIES) == set(SMALL_FAMILIES) == set(TORCHVISION_MPARAMS)
    assert all(shape == (1, 3, 224, 224) for _, shape in FAMILIES.values())
    assert all(shape in {(1, 3, 32, 32), (1, 3, 64, 64)} for _, shape in SMALL_FAMILIES.values())


@pytest.mark.parametrize("name", sorted(SMALL_FAMILIES))
def test_small_model_captures_exactly(name):
    builder, shape = SMALL_FAMILIES[name]
    model = builder()
    assert not model.training
    x = torch.randn(shape)
    graph = graphopt.capture(model, (x,))      # raises unless the traced graph reproduces the eager outputs
    with torch.no_grad():
        expected = model(x)
    (out,) = graph.run()
    assert expected.shape == out.shape == _expected_shape(name, builder, shape)
    assert torch.equal(out, expected)
    assert SMALL_PARAMS[0] <= _params(model) <= SMALL_PARAMS[1]


@pytest.mark.parametrize("name", sorted(SMALL_FAMILIES))
def test_small_model_is_seeded_with_non_trivial_batchnorm(name):
    builder = SMALL_FAMILIES[name][0]
    a, b, c = builder().state_dict(), builder().state_dict(), builder(seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    for bn in (m for m in builder().modules() if isinstance(m, nn.BatchNorm2d)):
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))


def test_num_classes_is_honoured():
    builder, shape = SMALL_FAMILIES["deeplabv3"]
    assert builder(num_classes=3)(torch.randn(shape)).shape == (1, 3, *shape[2:])
    builder, shape = SMALL_FAMILIES["resnext"]
    assert builder(num_classes=3)(torch.randn(shape)).shape == (1, 3)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_full_model_has_torchvisions_parameter_count(name):
    builder, _ = FAMILIES[name]
    with torch.device("meta"):                  # the real layers without allocating (VGG-11 alone is 133M floats)
        model = builder()
    assert _params(model) / 1e6 == pytest.approx(TORCHVISION_MPARAMS[name], rel=0.02)
    assert inspect.signature(builder).parameters["num_classes"].default == (21 if name in SEGMENTATION else 1000)
