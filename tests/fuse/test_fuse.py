"""fuse: the named pipeline of its family (simplify, fold-bn, fold-affine, merge-linear, fuse-act),
each member an exact pass verified on its own, at the end of the default pipeline; fused graphs
emit and verify in every format."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from conftest import TESTS
from graphopt.cli import main
from graphopt.driver import emit_one
from graphopt_plugins.fuse import MEMBERS
from zoo import ZOO
from zoo.fold import Residual, module_types, optimize, randomize_bn


class Everything(nn.Module):
    """One rewrite for each member: a constant expression, conv -> BN, a per-channel scale,
    a Linear bottleneck, activations after a conv, a linear and an add."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.gain = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)) * (self.gain * 2))
        y = torch.relu(y + y.mean(1, keepdim=True))
        return F.relu6(self.fc2(self.fc1(y.mean((2, 3))))) * 1


def test_runs_every_member_in_order(registry):
    torch.manual_seed(0)
    run = optimize(randomize_bn(Everything()), (torch.randn(2, 3, 6, 6),), "fuse", registry)
    gm = run.graph.module
    assert module_types(gm) == ["FusedConv2d", "AddReLU", "FusedLinear"]
    assert [n.meta.get("graphopt.fused") for n in gm.graph.nodes if n.op == "call_module"] == \
        ["conv+relu", "add+relu", "linear+relu6"]
    assert [r.name for r in run.records] == list(MEMBERS) == \
        ["simplify", "fold-bn", "fold-affine", "merge-linear", "fuse-act"]
    assert run.pipeline == ",".join(MEMBERS)                  # the report shows the members
    stats = {r.name: r.stats for r in run.records}
    assert stats["fold-bn"] == {"folded": 1, "rejected": 0}
    assert stats["fold-affine"]["folded"] == 1 and stats["merge-linear"]["merged"] == 1
    assert stats["simplify"]["constant"] == 1 and stats["simplify"]["identity_arithmetic"] == 1
    assert stats["fuse-act"] == {"layer_act": 2, "add_relu": 1, "rejected": 0}
    explained = {r.name: r.explanations for r in run.records}
    assert "conv -> bn: folded BatchNorm2d into Conv2d" in explained["fold-bn"]
    assert all(r.verified and r.modified and r.group == "fuse" for r in run.records)


def test_bn_whose_conv_output_is_used_elsewhere_stays(registry):
    run = optimize(randomize_bn(Residual()), (torch.randn(1, 3, 5, 5),), "fuse", registry)
    assert module_types(run.graph.module) == ["Conv2d", "BatchNorm2d"]
    explained = {r.name: r.explanations for r in run.records}
    assert explained["fold-bn"] == ["conv -> bn: not folded, conv's output is also used by add"]
    assert explained["fold-affine"] == ["add: kept, conv's output is also used by bn"]


def test_registered_as_exact_passes_with_fuse_last_in_the_default_pipeline(registry):
    for name in MEMBERS:
        spec = registry.passes[name]
        assert spec.effect is graphopt.Effect.EXACT and spec.options == ()
        assert spec.default_order == (20 if name == "fold-bn" else None), name
    fuse = registry.pipelines["fuse"]
    assert "fuse" not in registry.passes and fuse.pipeline == ",".join(MEMBERS) and fuse.default_order == 30
    default = registry.default_pipeline().split(",")
    assert default[-1] == "fuse" and default.index("cleanup") < default.index("fold-bn") < default.index("fuse")


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_models_verify_through_fuse(name, registry):
    """Every zoo model; the 224x224 ones at 32x32 here (the same graph in a fraction of the time;
    test_cli takes them through the default pipeline at full size into every format)."""
    build, shape = ZOO[name]
    shape = shape[:2] + (32, 32) if shape[2:] == (224, 224) else shape
    run = optimize(build(), (torch.randn(shape),), "cleanup,fold-bn,fuse", registry)
    gm = run.graph.module
    types = module_types(gm)
    assert all(r.verified for r in run.records) and run.records[-1].modified
    assert not any("BatchNorm" in t for t in types) and not any(t in ("ReLU", "ReLU6") for t in types)
    assert run.records[-1].macs == run.records[0].macs, "fusion keeps every MAC of the layers"


def test_a_fused_model_emits_and_verifies_in_every_format(registry, tmp_path):
    torch.manual_seed(0)
    graph = graphopt.capture(randomize_bn(Everything()), torch.randn(1, 3, 8, 8), name="everything")
    graph = graphopt.run_pipeline(graph, "fuse", registry).graph
    expected = graph.run()
    for fmt in ("onnx", "ptl", "tflite"):
        emitter = registry.emitters[fmt]
        artifact = emit_one(graph, emitter, {o.name: o.default for o in emitter.options}, tmp_path, registry)
        metrics = graphopt.compare(expected, emitter.load(artifact)(list(graph.example_inputs)))
        assert not emitter.tolerance.violations(metrics), (fmt, metrics)
        if fmt == "ptl":   # the activations run in place on the layers' outputs
            assert {"aten::relu_", "aten::hardtanh_"} <= set(artifact.meta["ops"])


def test_explain_lists_each_candidate(capsys):
    code = main(["run", f"{TESTS / 'zoo' / 'cnn.py'}:tiny_resnet", "--input-shape", "1x3x32x32", "--emit", "",
                 "--explain", "fuse"])
    out = capsys.readouterr().out
    assert code == 0
    for member in MEMBERS:                                # one verified step each, in order
        assert f"explain {member} (fuse member)" in out
    assert out.index("explain fold-affine (fuse member)") < out.index("explain fuse-act (fuse member)")
    fold_affine, fuse_act = out.split("explain fuse-act (fuse member)")
    assert "  stem_2: fused stem_0 -> stem_2 (conv+relu) into FusedConv2d stem.0\n" in fuse_act
    assert "  layers_0_0_relu_1: fused add -> layers_0_0_relu_1 (add+relu) into AddReLU add_relu\n" in fuse_act
    assert "  add_1: kept, its other operand layers_0_0_relu_1 depends on the input\n" in fold_affine
