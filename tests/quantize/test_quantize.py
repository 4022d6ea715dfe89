"""quantize: Q/DQ insertion patterns, observers, exclusion, calibration errors, sensitivity
ranking, mixed precision and QAT through finetune."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from conftest import ROOT
from graphopt.capture import capture
from graphopt.errors import PassError
from graphopt.metrics import compare
from graphopt.passmanager import run_pipeline
from graphopt.quant import activation_qparams, is_fake_quant, weight_quant
from graphopt_plugins.quantize.observers import OBSERVERS, Observer, qparams
from zoo import PRUNE_ZOO, example_input
from zoo.cnn import tiny_resnet


def calibration(shape, n=6, seed=0):
    return [torch.randn(*shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


def quantize(registry, model, x, pipeline="cleanup,fold-bn,fuse,quantize(prefer=size)", calib=None):
    graph = capture(model, (x,))
    run = run_pipeline(graph, pipeline, registry, data={"calibration": calib or calibration(x.shape)})
    assert all(r.verified for r in run.records)
    return graph, run.graph.module, run.records[-1]


def fake_quants(gm):
    return [n for n in gm.graph.nodes if is_fake_quant(n)]


def test_conv_add_relu_patterns_get_int8_inputs_outputs_and_weights(registry):
    x = torch.randn(1, 3, 32, 32)
    graph, gm, record = quantize(registry, tiny_resnet(), x)
    assert record.cosine > 0.99 and record.stats["int8_layers"] >= 10
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Conv2d, nn.Linear)):
            assert is_fake_quant(node.args[0]), node.name
            assert [is_fake_quant(u) for u in node.users] == [True], node.name
            assert weight_quant(gm.get_submodule(node.target)) is not None
        if node.op == "call_module" and type(gm.get_submodule(node.target)).__name__ == "AddReLU":
            assert all(is_fake_quant(a) for a in node.args)


def test_relu_after_an_unfused_conv_is_inside_the_pattern(registry):
    x = torch.randn(1, 3, 32, 32)
    _, gm, _ = quantize(registry, tiny_resnet(), x, pipeline="cleanup,fold-bn,quantize(prefer=size)")
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Conv2d):
            user = next(iter(node.users))
            if user.op == "call_module" and isinstance(gm.get_submodule(user.target), nn.ReLU):
                assert not is_fake_quant(user.args[0]) and is_fake_quant(next(iter(user.users)))


def test_weights_are_per_channel_symmetric_int8():
    conv = nn.Conv2d(3, 4, 3)
    from graphopt.quant import quantize_weight
    original = conv.weight.detach().clone()
    quantize_weight(conv)
    q, scale, axis = weight_quant(conv)
    assert q.dtype == torch.int8 and axis == 0 and q.abs().amax().item() == 127
    assert torch.allclose(scale, original.abs().flatten(1).amax(1) / 127)
    assert torch.allclose(conv.weight, q.float() * scale.reshape(-1, 1, 1, 1))


def test_pass_through_ops_reuse_their_input_scale_and_sigmoid_gets_a_fixed_one(registry):
    x = example_input("squeeze_excitation")
    _, gm, _ = quantize(registry, PRUNE_ZOO["squeeze_excitation"][0](), x, calib=calibration(x.shape))
    checked = fixed = 0
    for node in fake_quants(gm):
        src = node.args[0]
        if src.op == "call_module" and isinstance(gm.get_submodule(src.target), nn.AdaptiveAvgPool2d):
            assert is_fake_quant(src.args[0]) and activation_qparams(node) == activation_qparams(src.args[0])
            checked += 1
        if src.op == "call_module" and isinstance(gm.get_submodule(src.target), (nn.Sigmoid, nn.Hardsigmoid)):
            q = activation_qparams(node)
            assert (q.scale, q.zero_point) == (1 / 256, 0)
            fixed += 1
    assert checked >= 2 and fixed == 2
    muls = [n for n in gm.graph.nodes if n.target in (torch.mul, __import__("operator").mul)]
    assert muls and all(is_fake_quant(a) for n in muls for a in n.args)


def test_cat_inputs_and_output_are_int8(registry):
    x = example_input("inception")
    _, gm, _ = quantize(registry, PRUNE_ZOO["inception"][0](), x, calib=calibration(x.shape))
    cats = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert cats
    for cat in cats:
        assert all(is_fake_quant(a) for a in cat.args[0]) and all(is_fake_quant(u) for u in cat.users)


def test_observers_calibrate_different_ranges():
    values = torch.cat([torch.randn(20000, generator=torch.Generator().manual_seed(0)), torch.tensor([40.0])])
    ranges = {}
    for kind in OBSERVERS:
        obs = Observer(kind)
        for chunk in values.split(4001):
            obs.observe(chunk)
        ranges[kind] = obs.range()
    assert ranges["minmax"][1] == 40.0
    for kind in ("percentile", "entropy"):
        assert ranges[kind][1] < 20, kind                   # the outlier is clipped
    assert ranges["mse"][1] < 40                             # one outlier in 20001 costs less than coarse steps
    assert ranges["moving-average"][1] < 40                  # averaged over batches
    assert len({r for r in ranges.values()}) == len(OBSERVERS)


@pytest.mark.parametrize("observer", OBSERVERS)
def test_every_observer_quantizes_a_model(registry, observer):
    x = torch.randn(1, 3, 32, 32)
    pipeline = f"cleanup,fold-bn,fuse,quantize(observer={observer},prefer=size)"
    if observer == "entropy":
        # KL thresholds clip this random-weight net's activations so hard that its outputs
        # shrink: cosine stays above 0.99, SQNR falls near 8 dB. Verification refuses that scale error.
        with pytest.raises(PassError, match=r"beyond its int8 tolerance \(SQNR [0-9.]+ dB < 14 dB\)"):
            quantize(registry, tiny_resnet(), x, pipeline=pipeline)
        return
    _, gm, record = quantize(registry, tiny_resnet(), x, pipeline=pipeline)
    assert record.stats["observer"] == observer and record.cosine > 0.99 and record.stats["sqnr_calibration"] > 14


def test_qparams_represent_zero_exactly():
    q = qparams(-0.3, 2.0, "uint8")
    assert q.qmin == 0 and q.qmax == 255 and abs(-q.zero_point * q.scale + 0.3) < q.scale
    s = qparams(-0.3, 2.0, "int8")
    assert s.zero_point == 0 and abs(s.scale - 2.0 / 127) < 1e-7


def test_exclusion_by_name_type_and_regex(registry):
    x = torch.randn(1, 3, 32, 32)
    pipeline = 'cleanup,fold-bn,fuse,quantize(prefer=size,exclude="stem.0,Linear,re:layers_1_.*")'
    _, gm, record = quantize(registry, tiny_resnet(), x, pipeline=pipeline)
    kept = record.stats["fp32_layers"]
    assert "stem_0" in " ".join(kept) or any(k.startswith("stem") for k in kept)
    assert "fc" in kept and any(k.startswith("layers_1_") for k in kept)
    assert weight_quant(gm.get_submodule("fc")) is None
    assert any("fp32, excluded (Linear)" in e for e in record.explanations)


def test_missing_calibration_says_how_to_give_it(registry):
    graph = capture(tiny_resnet(), (torch.randn(1, 3, 32, 32),))
    with pytest.raises(PassError, match=r"needs calibration, which was not given; .*data=\{'calibration'"):
        run_pipeline(graph, "quantize", registry)


def test_nan_in_calibration_data_is_refused(registry):
    bad = calibration((1, 3, 32, 32))
    bad[2][0, 0, 0, 0] = float("nan")
    graph = capture(tiny_resnet(), (torch.randn(1, 3, 32, 32),))
    with pytest.raises(PassError, match="calibration sample 2 holds NaN or Inf"):
        run_pipeline(graph, "quantize", registry, data={"calibration": bad})


class Outlier(nn.Module):
    """conv -> relu -> conv -> relu -> pool -> linear, where ``conv2`` has one channel whose
    bias of 20 stretches its output range (and which ``fc`` ignores): the int8 steps of that
    tensor are coarse for the channels that matter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.conv2.bias[0] = 20.0
            self.fc.weight[:, 0] = 0.0
        self.eval()

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_sensitivity_ranks_the_stretched_layer_first(registry):
    x = torch.randn(1, 3, 8, 8)
    _, _, record = quantize(registry, Outlier(), x, pipeline="quantize(prefer=size,target_cosine=0.9999)")
    ranked = record.stats["sensitivity"]
    assert [name for name, _ in ranked] == ["conv2", "fc", "conv1"]     # the two touching the tensor
    assert ranked[0][1] < ranked[-1][1] - 20
    assert [db for _, db in ranked] == sorted(db for _, db in ranked)


def test_mixed_precision_reaches_its_target(registry):
    x = torch.randn(1, 3, 8, 8)
    _, _, plain = quantize(registry, Outlier(), x, pipeline="quantize(prefer=size)")
    _, gm, mixed = quantize(registry, Outlier(), x, pipeline="quantize(prefer=size,target_cosine=0.9999)")
    assert plain.stats["cosine_calibration"] < 0.9999 <= mixed.stats["cosine_calibration"]
    assert "conv2" in mixed.stats["fp32_layers"] and weight_quant(gm.conv2) is None
    assert mixed.stats["int8_layers"] >= 1


def test_qat_through_finetune_improves_on_ptq(registry):
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(256, 3, 8, 8, generator=gen)
    target = (data.mean((1, 2, 3)) > 0).long() + 2 * (data[:, 0].mean((1, 2)) > 0).long()
    model = Outlier()

    def loss(module):
        return nn.functional.cross_entropy(module(data), target)

    def train(module, *, epochs):
        opt = torch.optim.Adam(module.parameters(), lr=3e-3)
        for _ in range(epochs * 20):
            opt.zero_grad()
            loss(module).backward()
            opt.step()

    graph = capture(model, (data[:1],))
    calib = [data[i:i + 32] for i in range(0, 128, 32)]
    ptq = run_pipeline(graph, "quantize(prefer=size)", registry, data={"calibration": calib}).graph.module
    qat = run_pipeline(graph, "quantize(prefer=size),finetune(epochs=3)", registry,
                       data={"calibration": calib, "train": train}).graph.module
    with torch.no_grad():
        assert loss(qat) < 0.95 * loss(ptq)
    assert parametrize.is_parametrized(qat.conv1, "weight") and fake_quants(qat)


def test_cli_calib_npz(tmp_path):
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype("float32"))
    base = [sys.executable, "-m", "graphopt.cli", "run", f"{ROOT}/tests/zoo/cnn.py:tiny_resnet", "--input-shape",
            "1x3x32x32", "--pipeline", "cleanup,fold-bn,fuse,quantize", "--emit", ""]
    done = subprocess.run(base + ["--calib", str(tmp_path / "calib.npz")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    missing = subprocess.run(base, capture_output=True, text=True)
    assert missing.returncode == 2 and "pass --calib DATA.npz" in missing.stderr
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3, 16, 16), dtype="float32"))
    bad = subprocess.run(base + ["--calib", str(tmp_path / "bad.npz")], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "(3, 16, 16)" in bad.stderr


def test_target_cosine_holds_on_the_inputs_the_pass_is_verified_on(registry):
    """minmax ranges fit the calibration batches; an example 3x wider is clipped by them. Scored on the
    calibration batches alone, every layer int8 meets 0.995 and the example sits below it; scored on
    the example too (not calibrated on), quantize keeps layers in fp32 until the example meets it."""
    from graphopt_plugins.quantize.calibrate import Calibrated

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 8, 8, generator=gen) * 3
    calib = [torch.randn(1, 3, 8, 8, generator=gen) for _ in range(6)]
    graph = capture(model, (x,))
    every = Calibrated(graph.module, [(c,) for c in calib], "minmax", "uint8").quantized([], {})
    assert every[4] > 0.9999 and compare(graph.run(), [every[0](x)]).cosine < 0.995
    run = run_pipeline(graph, "quantize(prefer=size)", registry, data={"calibration": calib})
    stats = run.records[-1].stats
    assert stats["fp32_layers"] and stats["int8_layers"] >= 1
    assert compare(graph.run(), run.graph.run()).cosine >= 0.995 <= stats["cosine_calibration"]


def test_the_run_says_how_much_is_int8(capsys, tmp_path):
    """Files are named *_int8.* however few layers are: the summary says how many and what share of MACs."""
    import numpy as np

    from conftest import ROOT
    from graphopt.cli import main
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    argv = ["run", f"{ROOT / 'tests/zoo/cnn.py'}:tiny_resnet", "--input-shape", "1x3x32x32", "--emit", "onnx",
            "--calib", str(calib)]
    assert main([*argv, "--out", str(tmp_path / "a"), "--pipeline",
                 'cleanup,fold-bn,fuse,quantize(prefer=size,exclude="layers.1.0.conv1,fc")']) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("quantize: "))
    assert line.startswith("quantize: 14 of 16 layers run int8 (") and "2 kept fp32" in line
    share = float(line.split("(")[1].split("%")[0])
    assert 80 < share < 100
    assert main([*argv, "--out", str(tmp_path / "b"), "--pipeline", "cleanup,fold-bn,fuse,quantize(prefer=size)"]) == 0
    assert "quantize: 16 of 16 layers run int8 (100.0% of MACs)\n" in capsys.readouterr().out
