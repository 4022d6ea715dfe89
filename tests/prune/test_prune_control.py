"""prune: importance criteria, ratio controls and targets, iterative steps, save/reload,
every emitter, and the CLI's --explain prune."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from graphopt.capture import capture
from graphopt.driver import optimize
from graphopt.errors import PassError
from graphopt.passmanager import run_pipeline
from graphopt_plugins.prune.save import load_pruned, save_pruned

from conftest import ROOT
from zoo import PRUNE_ZOO, example_input


class ConvNet(nn.Module):
    """conv(3->8)+BN+ReLU -> conv(8->8)+BN+ReLU -> pool -> Linear(8, 4): two plain groups."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        for bn in (self.bn1, self.bn2):
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            bn.running_mean.uniform_(-0.2, 0.2)
        self.eval()

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def run(registry, pipeline: str, model: nn.Module | None = None, x=X, data=None):
    model = model or ConvNet()
    graph = capture(model, (x,))
    result = run_pipeline(graph, pipeline, registry, data=data)
    assert all(r.verified for r in result.records)
    return model, result.graph.module, result.records[-1]


def kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which rows of ``original`` the rows of ``pruned`` are."""
    return [next(i for i in range(len(original)) if torch.equal(original[i], row)) for row in pruned]


def test_bn_criterion_removes_the_smallest_scales(registry):
    model = ConvNet()
    with torch.no_grad():
        model.bn1.weight[[1, 3, 5, 7]] = 0.01
    _, gm, _ = run(registry, "prune(ratio=0.5,criterion=bn)", model)
    assert kept_rows(model.conv1.weight, gm.conv1.weight) == [0, 2, 4, 6]


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_magnitude_criteria_remove_the_smallest_channels(registry, criterion):
    model = ConvNet()
    with torch.no_grad():
        model.conv1.weight[[0, 1, 2, 3]] *= 1e-3
        model.conv2.weight[:, [0, 1, 2, 3]] *= 1e-3
    _, gm, _ = run(registry, f"prune(ratio=0.5,criterion={criterion})", model)
    assert kept_rows(model.conv1.weight, gm.conv1.weight) == [4, 5, 6, 7]


def test_random_criterion_follows_its_seed(registry):
    picks = [kept_rows(ConvNet().conv1.weight, run(registry, f"prune(ratio=0.5,criterion=random,seed={s})")[1]
                       .conv1.weight) for s in (0, 0, 1, 2)]
    assert picks[0] == picks[1] and len({tuple(p) for p in picks}) > 1


def test_taylor_needs_a_loss_and_uses_its_gradients(registry):
    with pytest.raises(PassError, match="criterion=taylor needs a loss function"):
        run(registry, "prune(criterion=taylor)")
    kept = set()
    for target in (torch.zeros(2, 4), torch.tensor([[3.0, -3, 0, 0]] * 2), torch.tensor([[0.0, 0, 4, -4]] * 2)):
        def loss(module):
            return nn.functional.mse_loss(module(X), target)
        model = ConvNet()
        _, gm, record = run(registry, "prune(ratio=0.5,criterion=taylor)", model, data={"loss": loss})
        # the oracle, computed here on the eager model: |weight * gradient| of each conv1 channel's
        # slices (its conv1 row and its conv2 column); the 4 best are kept
        model.zero_grad()
        loss(model).backward()
        score = (model.conv1.weight * model.conv1.weight.grad).abs().sum((1, 2, 3)) + \
            (model.conv2.weight * model.conv2.weight.grad).abs().sum((0, 2, 3))
        expected = sorted(score.argsort(descending=True)[:4].tolist())
        assert kept_rows(model.conv1.weight.detach(), gm.conv1.weight.detach()) == expected and record.verified
        kept.add(tuple(expected))
    assert len(kept) == 3                       # other losses, other gradients, other channels kept


@pytest.mark.parametrize("aggregate", ["mean", "max", "sum"])
def test_aggregations(registry, aggregate):
    _, gm, _ = run(registry, f"prune(ratio=0.5,aggregate={aggregate})")
    assert gm.conv1.out_channels == gm.conv2.in_channels == 4


def test_round_to_keeps_multiples(registry):
    _, gm, _ = run(registry, "prune(ratio=0.3,round_to=8)", PRUNE_ZOO["residual"][0](), example_input("residual"))
    widths = {m.out_channels for m in gm.modules() if isinstance(m, nn.Conv2d)}
    assert widths and all(w % 8 == 0 for w in widths) and widths != {16, 32}


def test_max_ratio_caps_a_group(registry):
    _, gm, _ = run(registry, "prune(ratio=0.75,max_ratio=0.25)")
    assert gm.conv1.out_channels == gm.conv2.out_channels == 6


def test_ignored_layers_and_per_layer_overrides(registry):
    _, gm, _ = run(registry, "prune(ratio=0.5,ignore=conv2,override=\"conv1:0.25\")")
    assert gm.conv2.out_channels == 8 and gm.conv1.out_channels == 6


def test_bad_options_are_refused(registry):
    with pytest.raises(PassError, match="ratio must be in"):
        run(registry, "prune(ratio=1.5)")
    with pytest.raises(PassError, match="override 'conv1=3'"):
        run(registry, "prune(override=\"conv1=3\")")


def test_global_scope_ranks_across_groups(registry):
    model = ConvNet()
    with torch.no_grad():
        model.conv1.weight[[0, 1, 2, 3, 4, 5]] *= 1e-3
        model.conv2.weight[:, [0, 1, 2, 3, 4, 5]] *= 1e-3
    _, gm, _ = run(registry, "prune(ratio=0.5,scope=global)", model)
    assert gm.conv1.out_channels < gm.conv2.out_channels          # the weak group gave more
    assert gm.conv1.out_channels + gm.conv2.out_channels == 8


@pytest.mark.parametrize("target", ["target_macs", "target_params"])
def test_a_target_instead_of_a_ratio(registry, target):
    model = PRUNE_ZOO["residual"][0]()
    graph = capture(model, (example_input("residual"),))
    before = graph.stats()
    result = run_pipeline(graph, f"prune({target}=0.4)", registry)
    after = result.records[-1]
    key = "macs" if target == "target_macs" else "params"
    fraction = getattr(after, key) / before[key]
    assert 0.25 < fraction <= 0.4


def test_iterative_steps(registry):
    _, gm, record = run(registry, "prune(ratio=0.5,steps=2)", PRUNE_ZOO["residual"][0](), example_input("residual"))
    assert any(e.startswith("step 2: group") for e in record.explanations)
    assert gm.get_submodule("stem.0").out_channels < 16


def test_prune_finetune_prune_is_one_pipeline(registry):
    seen = []

    def train(module, *, epochs):
        seen.append(sum(p.numel() for p in module.parameters()))
        opt = torch.optim.SGD(module.parameters(), lr=1e-3)
        for _ in range(epochs):
            opt.zero_grad()
            module(X).pow(2).mean().backward()
            opt.step()

    _, gm, _ = run(registry, "prune(ratio=0.25),finetune,prune(ratio=0.25),finetune", data={"train": train})
    assert len(seen) == 2 and seen[0] > seen[1]
    assert gm.conv1.out_channels == 5                    # 8 - floor(8/4) = 6, then 6 - floor(6/4)


def test_saved_pruned_model_reloads_without_pickle(registry, tmp_path):
    for name in ("residual", "attention", "hardcoded_split"):
        model = PRUNE_ZOO[name][0]()
        x = example_input(name)
        result = run_pipeline(capture(model, (x,)), "prune(ratio=0.5)", registry)
        save_pruned(result.graph.module, tmp_path / name)
        plan = json.loads((tmp_path / name / "plan.json").read_text())
        assert plan["format"] == 1 and len(plan["steps"]) == 1
        torch.load(tmp_path / name / "weights.pt", weights_only=True)
        again = load_pruned(PRUNE_ZOO[name][0](seed=5), (x,), tmp_path / name)
        assert torch.equal(again(x), result.graph.module(x)), name


def test_reload_refuses_weights_of_another_plan(registry, tmp_path):
    x = example_input("residual")
    one = run_pipeline(capture(PRUNE_ZOO["residual"][0](), (x,)), "prune(ratio=0.5)", registry)
    two = run_pipeline(capture(PRUNE_ZOO["residual"][0](), (x,)), "prune(ratio=0.25)", registry)
    save_pruned(one.graph.module, tmp_path / "a")
    save_pruned(two.graph.module, tmp_path / "b")
    (tmp_path / "a" / "weights.pt").write_bytes((tmp_path / "b" / "weights.pt").read_bytes())
    with pytest.raises(ValueError, match="do not fit the replayed plan"):
        load_pruned(PRUNE_ZOO["residual"][0](), (x,), tmp_path / "a")


def test_reloaded_pruned_model_goes_through_every_emitter(registry, tmp_path):
    x = example_input("residual")
    result = run_pipeline(capture(PRUNE_ZOO["residual"][0](), (x,)), "prune(ratio=0.5)", registry)
    save_pruned(result.graph.module, tmp_path / "pruned")
    again = load_pruned(PRUNE_ZOO["residual"][0](), (x,), tmp_path / "pruned")
    formats = ",".join(f for f, e in sorted(registry.emitters.items()) if not e.missing())
    out = optimize(again, (x,), registry, formats=formats, out_dir=tmp_path / "out")
    assert out.ok and {c.artifact.format for c in out.artifacts} >= {"onnx", "ptl", "tflite"}
    assert all(c.vs_graph.max_abs < 1e-4 for c in out.artifacts)


def test_cli_explain_prune(tmp_path):
    cmd = [sys.executable, "-m", "graphopt.cli", "run", f"{ROOT}/tests/zoo/prune.py:residual",
           "--input-shape", "1x3x16x16", "--pipeline", "cleanup,prune(ratio=0.5,round_to=4),fold-bn",
           "--explain", "prune", "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "explain prune" in done.stdout and "removed 8, kept 8" in done.stdout
    assert "model output fc: its shape never changes" in done.stdout
    record = json.loads((tmp_path / "r.json").read_text())["passes"][1]
    assert record["name"].startswith("prune") and record["verified"] and record["stats"]["channels_removed"] == 48
