"""fuse-act: Conv / Linear (+ BatchNorm) + activation, and add + ReLU, become one module that
applies the activation in place; or stay, with a reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from zoo.fold import module_types, optimize, randomize_bn


class LayerAct(nn.Module):
    def __init__(self, layer: nn.Module, act, bn: nn.Module | None = None):
        super().__init__()
        self.layer, self.act, self.bn = layer, act, bn

    def forward(self, x):
        y = self.layer(x)
        return self.act(self.bn(y) if self.bn is not None else y)


CASES = {  # name: (layer, activation, bn, input shape, fused module, meta)
    "conv2d+relu": (nn.Conv2d(3, 4, 3), nn.ReLU(), None, (2, 3, 6, 6), "FusedConv2d", "conv+relu"),
    "conv1d+F.relu": (nn.Conv1d(3, 4, 3), F.relu, None, (2, 3, 7), "FusedConv1d", "conv+relu"),
    "conv3d+torch.relu": (nn.Conv3d(2, 3, 2), torch.relu, None, (1, 2, 4, 4, 4), "FusedConv3d", "conv+relu"),
    "conv+relu6": (nn.Conv2d(3, 4, 1), nn.ReLU6(), None, (1, 3, 5, 5), "FusedConv2d", "conv+relu6"),
    "conv+F.relu6": (nn.Conv2d(3, 4, 1), F.relu6, None, (1, 3, 5, 5), "FusedConv2d", "conv+relu6"),
    "conv+hardtanh": (nn.Conv2d(3, 4, 1), lambda y: F.hardtanh(y, -0.5, 1), None, (1, 3, 5, 5),
                      "FusedConv2d", "conv+hardtanh"),
    "conv+Hardtanh": (nn.Conv2d(3, 4, 1), nn.Hardtanh(-2, 0.25), None, (1, 3, 5, 5), "FusedConv2d", "conv+hardtanh"),
    "conv+hardswish": (nn.Conv2d(3, 4, 1), nn.Hardswish(), None, (1, 3, 5, 5), "FusedConv2d", "conv+hardswish"),
    "conv+F.hardswish": (nn.Conv2d(3, 4, 1), F.hardswish, None, (1, 3, 5, 5), "FusedConv2d", "conv+hardswish"),
    "conv+bn+relu": (nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(4), (2, 3, 6, 6),
                     "FusedConv2d", "conv+bn+relu"),
    "linear+relu": (nn.Linear(5, 4), lambda y: y.relu(), None, (3, 5), "FusedLinear", "linear+relu"),
    "linear+relu_": (nn.Linear(5, 4), torch.relu_, None, (3, 5), "FusedLinear", "linear+relu"),
}


@pytest.mark.parametrize("case", CASES)
def test_fuses_layer_and_activation(case, registry):
    torch.manual_seed(0)
    layer, act, bn, shape, fused, what = CASES[case]
    model = randomize_bn(LayerAct(layer, act, bn))
    graph = graphopt.capture(model, torch.randn(shape))
    run = optimize(model, graph.example_inputs, "fuse-act", registry)
    gm = run.graph.module
    assert module_types(gm) == [fused]
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert node.meta["graphopt.fused"] == what and node.target == "layer"
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    (record,) = run.records
    assert record.stats == {"layer_act": 1, "add_relu": 0, "rejected": 0} and record.verified
    assert record.macs == graph.stats()["macs"] > 0, "a fused layer counts its MACs like the layer"
    assert record.explanations[0].endswith(f"({what}) into {fused} layer")


class AddRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x) + x), F.relu(x + 1)


def test_fuses_add_and_relu(registry):
    run = optimize(AddRelu().eval(), (torch.randn(1, 3, 5, 5),), "fuse-act", registry)
    gm = run.graph.module
    assert module_types(gm) == ["Conv2d", "AddReLU"]
    (fused,) = [n for n in gm.graph.nodes if n.target == "add_relu"]
    assert fused.meta["graphopt.fused"] == "add+relu" and fused.args[1].op == "placeholder"
    assert run.records[0].explanations == ["relu: fused add -> relu (add+relu) into AddReLU add_relu",
                                           "relu_1: kept, add_1 adds a number, not two tensors"]


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(3, 3, 3, padding=1), nn.MaxPool2d(2)

    def forward(self, x):
        y = self.conv(x)
        a = F.relu(self.conv(y))             # the module is called twice
        s = x + y
        return a + torch.relu(s) + s.mean(), F.relu(self.pool(x)), F.relu(y)   # y, s used twice


def test_rejects_with_reason(registry):
    run = optimize(SharedConv().eval(), (torch.randn(1, 3, 6, 6),), "fuse-act", registry)
    assert run.records[0].explanations == [
        "relu: kept, conv_1's module is shared: also used by conv",
        "relu_2: kept, pool (MaxPool2d) is not a Conv1d/2d/3d or Linear module",
        "relu_3: kept, conv's output is also used by conv_1, add",
        "relu_1: kept, add's output is also used by mean",    # add+relu is looked for after layers
    ]
    assert run.records[0].stats == {"layer_act": 0, "add_relu": 0, "rejected": 4}


def test_fold_bn_leaves_a_fused_conv_alone(registry):
    """conv -> relu -> bn: once conv+relu is fused, the BN after it must not fold into the conv."""
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)))
    run = optimize(model, (torch.randn(1, 3, 6, 6),), "fuse-act,fold-bn", registry)
    assert module_types(run.graph.module) == ["FusedConv2d", "BatchNorm2d"]
    (line,) = run.records[1].explanations
    assert line.endswith("(FusedConv2d) computes more than a layer: it has its own forward")


def test_fused_module_is_the_layer_with_an_in_place_activation():
    from graphopt_plugins.fuse.fuse_act import fused_layer

    conv, bn = nn.Conv2d(3, 4, 3), randomize_bn(nn.BatchNorm2d(4))
    fused = fused_layer(conv, nn.ReLU6(inplace=True), bn).eval()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(fused(x), F.relu6(bn(conv(x))))
    assert isinstance(fused, nn.Conv2d) and fused.weight is not conv.weight
    assert "aten::hardtanh_" in str(torch.jit.trace(fused, x).inlined_graph)
    assert torch.equal(torch.jit.script(fused)(x), fused(x))
