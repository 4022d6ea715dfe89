"""The full-size transformer zoo: torchvision's vit_b_16, swin_t and convnext_tiny parameter counts and fx-traceable
structure, built on the meta device and never run (a forward pass takes seconds)."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.fx as fx
from torch import nn

from zoo import TRANSFORMER_FULL
from zoo.transformers import convnext_tiny, swin_tiny

# torchvision.models.vit_b_16, swin_t, convnext_tiny: sum(p.numel() for p in model.parameters())
TORCHVISION_PARAMS = {"vit": 86_567_656, "swin": 28_288_354, "convnext": 28_589_128}


def _meta(name: str) -> nn.Module:
    with torch.device("meta"):                  # the real layers without allocating (ViT-B/16 is 87M floats)
        return TRANSFORMER_FULL[name][0]()


def _calls(gm: fx.GraphModule) -> list[str]:
    """Module type of every call_module node, function name of every call_function node."""
    return [type(gm.get_submodule(n.target)).__name__ if n.op == "call_module" else n.target.__name__
            for n in gm.graph.nodes if n.op in ("call_module", "call_function")]


def test_full_dict():
    assert set(TRANSFORMER_FULL) == set(TORCHVISION_PARAMS)
    assert all(shape == (1, 3, 224, 224) for _, shape in TRANSFORMER_FULL.values())
    assert all(inspect.signature(b).parameters["num_classes"].default == 1000 for b, _ in TRANSFORMER_FULL.values())


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_full_model_has_torchvisions_parameter_count(name):
    model = _meta(name)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_full_model_traces(name):
    """fx symbolic tracing (what graphopt.capture does) needs no data: no data-dependent control flow."""
    calls = _calls(fx.symbolic_trace(_meta(name)))
    if name == "vit":
        assert calls.count("MultiheadAttention") == 12 and calls.count("LayerNorm") == 25
    elif name == "swin":    # shifted windows on every second block of stages 1-3 (stage 4's 7x7 map is one window)
        assert calls.count("roll") == 2 * (1 + 1 + 3) and calls.count("Softmax") == 12
        assert calls.count("Linear") == 4 * 12 + 3 + 1         # qkv, proj, MLP x 2 per block; 3 merges; head
    else:
        assert calls.count("Conv2d") == 1 + 18 + 3 and calls.count("GELU") == 18   # stem, depthwise, downsampling


def test_two_stage_models_keep_their_module_names():
    """The generalized Swin/ConvNeXt keep the two-stage names the tiny models' golden files were written with."""
    assert [n for n, _ in swin_tiny().named_children()] == ["patch_embed", "patch_norm", "stage1", "merge", "stage2",
                                                           "norm", "head"]
    assert [n for n, _ in convnext_tiny().named_children()] == ["stem", "stage1", "downsample", "stage2", "norm",
                                                               "head"]
