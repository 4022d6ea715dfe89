"""ExecuTorch .pte: graphopt's xnnpack partitions become XNNPACK delegates, one each (int8
kernels for a quantized graph), the rest runs on portable kernels; verified in ExecuTorch."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import graphopt
from graphopt import EmitError
from conftest import ROOT
from graphopt.driver import optimize
from graphopt.metrics import compare
import graphopt_plugins.pte as pte_emitter
from graphopt_plugins.partition.extract import META, extract
from zoo import PRUNE_ZOO, TRANSFORMER_ZOO, ZOO
from zoo.cnn import tiny_resnet

pytest.importorskip("executorch")

SHAPE = (1, 3, 32, 32)


def _x(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _partitions(check) -> list[str]:
    """The partitions graphopt's partition pass made for this artifact."""
    stats = next(p["stats"] for p in check.artifact.meta["prepared"] if p["pass"].startswith("partition"))
    return [p["name"] for p in stats["partitions"]]


class CumsumBetween(nn.Module):
    """cumsum, which the xnnpack description does not take, between two partitions' worth of ops."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        y = torch.cumsum(torch.relu(self.a(x)), 2)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.b(y)), 1), 1))


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(5, 8)

    def forward(self, x, v):
        y = torch.relu(self.conv(x))
        return {"pooled": torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1) + self.fc(v) + 1, "map": y}


@pytest.fixture(scope="module", params=["tiny_resnet", "tiny_mobilenet"])
def emitted(request, registry, tmp_path_factory):
    """fp32 and int8 .pte of one zoo model, through the driver."""
    build, out = ZOO[request.param][0], tmp_path_factory.mktemp(request.param)
    fp32 = optimize(build(), (_x(0),), registry, pipeline="fold-bn", formats="pte", out_dir=out)
    int8 = optimize(build(), (_x(0),), registry, pipeline="fold-bn,quantize(prefer=size)", formats="pte",
                    out_dir=out, data={"calibration": [_x(i) for i in range(1, 5)]})
    return fp32, int8


def test_one_delegate_per_partition_fp32_and_int8(emitted, tmp_path):
    for result, precision in zip(emitted, ("fp32", "int8")):
        check = result.artifacts[0]
        meta = check.artifact.meta
        assert result.ok and check.verified and meta["precision"] == precision
        assert pte_emitter.precision(check.artifact.path) == precision
        assert meta["delegates"] == meta["partitions"] == len(_partitions(check)) == 1
        assert meta["cpu_ops"] == {}
    assert set(emitted[0].artifacts[0].artifact.meta["xnnpack_values"]) == {"fp32"}
    renamed = tmp_path / "renamed.pte"       # the precision is in the program, not the name
    renamed.write_bytes(emitted[1].artifacts[0].artifact.path.read_bytes())
    assert pte_emitter.precision(renamed) == "int8"
    assert emitted[1].artifacts[0].artifact.path.name.endswith("_int8.pte")


def test_int8_runs_int8_kernels_on_int8_weights(emitted):
    fp32, int8 = (r.artifacts[0] for r in emitted)
    layers = [m for m in emitted[1].graph.module.modules() if parametrize.is_parametrized(m, "weight")]
    meta = int8.artifact.meta
    assert meta["xnnpack_values"]["qcint8"] == len(layers)          # per-channel int8 weights
    assert meta["xnnpack_ops"]["XNNConvert"] == 2                   # float only at the input and output
    assert int8.bytes < 0.6 * fp32.bytes     # tiny models: per-channel scales, int32 biases, alignment


def test_int8_matches_the_fake_quant_graph(emitted):
    result = emitted[1]
    check = result.artifacts[0]
    assert check.vs_graph.cosine > 0.999
    runner = pte_emitter.load(check.artifact)
    x = _x(9) * 2
    assert compare(result.graph.run([x]), runner([x])).cosine > 0.999


def test_an_op_outside_xnnpack_splits_the_delegates(registry, tmp_path):
    result = optimize(CumsumBetween(), (_x(0, (1, 3, 16, 16)),), registry, pipeline="", formats="pte",
                      out_dir=tmp_path)
    check = result.artifacts[0]
    meta = check.artifact.meta
    assert check.verified and _partitions(check) == ["xnnpack_0", "xnnpack_1"]
    assert meta["delegates"] == 2 and meta["cpu_ops"] == {"aten.cumsum.default": 1}
    assert meta["xnnpack_ops"]["XNNConv2d"] == 2 and meta["xnnpack_ops"]["XNNFullyConnected"] == 1


def test_int8_mobilenet_v3_is_one_delegate_with_its_activations_inside(registry, tmp_path):
    """hardswish and the squeeze-excitation gate's hardsigmoid run in fp32 inside the XNNPACK delegate
    between convert ops, as in ExecuTorch's own lowering (each used to split off a delegate: 10 for this model)."""
    result = optimize(ZOO["tiny_mobilenet_v3"][0](), (_x(0),), registry, formats="pte", out_dir=tmp_path,
                      pipeline="cleanup,fold-bn,fuse,quantize(prefer=size),partition(backend=xnnpack)",
                      verify_inputs=1, data={"calibration": [_x(i) for i in range(1, 5)]})
    (check,) = result.artifacts
    meta = check.artifact.meta
    assert result.ok and meta["precision"] == "int8" and meta["delegates"] == meta["partitions"] == 1
    assert meta["xnnpack_ops"]["XNNHardswish"] >= 5 and meta["xnnpack_ops"]["XNNDiv"] >= 2   # hardsigmoid's /6
    assert not any(op in cpu for cpu in meta["cpu_ops"] for op in ("hardswish", "clamp", "div", "mul"))
    assert check.vs_graph.cosine > 0.999


class Detour(nn.Module):
    """conv -> cumsum -> add(conv, cumsum): the first partition feeds the second directly and
    through cumsum on the CPU (one partition of both would be a cycle)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a = torch.relu(self.conv(x))
        return self.head(a + torch.cumsum(a, 1))


@pytest.mark.parametrize("pipeline", ["", "quantize(prefer=size)"])
def test_a_partition_feeding_another_directly(registry, tmp_path, pipeline):
    result = optimize(Detour(), (_x(0, (1, 3, 16, 16)),), registry, pipeline=pipeline, formats="pte",
                      out_dir=tmp_path, data={"calibration": [_x(i, (1, 3, 16, 16)) for i in range(1, 4)]})
    check = result.artifacts[0]
    assert check.verified and _partitions(check) == ["xnnpack_0", "xnnpack_1"]
    assert check.artifact.meta["delegates"] == 2


@pytest.mark.parametrize("name", ["dense_concat", "inception", "channel_shuffle"])
def test_int8_concats_load_and_run_in_xnnpack(name, registry, tmp_path):
    """XNNPACK's int8 concatenate takes inputs on its output's grid only (else the program is written
    and then fails to load): each input is requantized onto it, which changes no number."""
    build, shape = PRUNE_ZOO[name]
    result = optimize(build(), (_x(0, shape),), registry, pipeline="quantize(prefer=size),partition(backend=xnnpack)",
                      formats="pte", out_dir=tmp_path, verify_inputs=1,
                      data={"calibration": [_x(i, shape) for i in range(1, 4)]})
    (check,) = result.artifacts
    meta = check.artifact.meta
    assert result.ok and meta["precision"] == "int8" and meta["concats_requantized"] >= 1
    assert sum(n for op, n in meta["xnnpack_ops"].items() if op.startswith("XNNConcatenate")) == \
        meta["concats_requantized"] and not any("cat" in op for op in meta["cpu_ops"])
    assert check.vs_graph.cosine > 0.9999


def test_int8_vit_partitions_only_what_executorch_delegates(registry, tmp_path):
    """The class token (``x[:, 0]``) lowers to select_copy, which XNNPACK does not take: the partition
    pass leaves it on the CPU instead of handing ExecuTorch a partition it then refuses."""
    build, shape = TRANSFORMER_ZOO["vit_tiny"]
    result = optimize(build(), (_x(0, shape),), registry, pipeline="quantize(prefer=size),partition(backend=xnnpack)",
                      formats="pte", out_dir=tmp_path, verify_inputs=1,
                      data={"calibration": [_x(i, shape) for i in range(1, 9)]})
    (check,) = result.artifacts
    assert result.ok and check.artifact.meta["precision"] == "int8" and check.vs_graph.cosine > 0.999
    assert "aten.select_copy.int" in check.artifact.meta["cpu_ops"]


def test_runner_takes_and_returns_torch_tensors(registry, tmp_path):
    inputs = (_x(0, (1, 3, 8, 8)), _x(1, (1, 5)))
    result = optimize(TwoInTwoOut(), inputs, registry, pipeline="", formats="pte", out_dir=tmp_path)
    meta = result.artifacts[0].artifact.meta
    assert result.ok and meta["delegates"] == meta["partitions"] == 1
    assert meta["cpu_ops"] == {"dim_order_ops._to_dim_order_copy.default": 1}   # the scalar 1 cast to float, on the CPU
    one, two = (pte_emitter.load(result.artifacts[0].artifact, threads=t) for t in (1, 2))
    fresh = [_x(2, (1, 3, 8, 8)), _x(3, (1, 5))]
    expected = result.graph.run(fresh)
    for runner in (one, two, one):     # taking turns resizes ExecuTorch's one thread pool
        outputs = runner(fresh)
        assert [o.shape for o in outputs] == [(1, 8), (1, 8, 8, 8)]
        assert all(isinstance(o, torch.Tensor) for o in outputs)
        assert compare(expected, outputs).max_rel < 1e-5
    with pytest.raises(EmitError, match="takes 2 inputs, got 1"):
        one(fresh[:1])


def test_a_partition_xnnpack_cannot_take_is_an_error(tmp_path):
    graph = graphopt.capture(CumsumBetween(), [_x(0, (1, 3, 16, 16))])
    gm = graph.module
    gm, names = extract(gm, [[n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]], "xnnpack",
                        "XnnpackPartition")
    gm.meta[META] = {"backend": "xnnpack", "partitions": names}
    with pytest.raises(EmitError, match=r"partition xnnpack_0 holds .*cumsum.*XNNPACK delegate does not take"):
        pte_emitter.emit(graph.replace(gm), {}, tmp_path)
    assert not list(tmp_path.iterdir())


def test_fp16_graph_is_refused(registry, tmp_path):
    with pytest.raises(EmitError, match="pte takes fp32 and int8 graphs"):
        optimize(tiny_resnet(), (_x(0),), registry, pipeline="fold-bn,fp16", formats="pte",
                 out_dir=tmp_path)


def test_loading_the_plugins_imports_no_executorch():
    code = ("import sys, graphopt; graphopt.load_plugins(); "
            "print(sorted(m for m in ('executorch', 'torchao') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_graph_partitioned_by_its_pipeline_is_not_partitioned_again(capsys, tmp_path):
    from graphopt.cli import main
    code = main(["run", f"{ROOT / 'tests/zoo/cnn.py'}:tiny_resnet", "--input-shape", "1x3x32x32", "--out",
                 str(tmp_path), "--pipeline", "cleanup,fold-bn,partition(backend=xnnpack)", "--emit", "pte",
                 "--explain", "partition", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    (artifact,) = report["artifacts"]
    assert artifact["verified"] and "prepared" not in artifact["meta"]
    assert [p["name"] for p in report["passes"]].count("partition(backend=xnnpack)") == 1
    assert main(["run", f"{ROOT / 'tests/zoo/cnn.py'}:tiny_resnet", "--input-shape", "1x3x32x32", "--out",
                 str(tmp_path / "again"), "--pipeline", "cleanup,fold-bn,partition(backend=xnnpack)", "--emit", "pte",
                 "--explain", "partition"]) == 0
    assert capsys.readouterr().out.count("explain partition") == 1
