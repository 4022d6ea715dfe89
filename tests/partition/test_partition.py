"""partition: cycle-free maximal partitions, dtype and shape constraints, Q/DQ kept whole,
the why-not report, determinism, third-party backends, exact numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import graphopt
from conftest import ROOT, TESTS
from graphopt.driver import optimize
from graphopt.errors import PassError, PluginError
from graphopt_plugins.partition import group
from graphopt.quant import is_fake_quant
from zoo.cnn import tiny_mobilenet, tiny_mobilenet_v3, tiny_resnet

FIXTURES = TESTS / "fixtures"
X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
CALIB = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i + 1)) for i in range(4)]


class Detour(nn.Module):
    """conv -> cumsum -> add(conv, cumsum): conv and add both run on xnnpack, but one partition
    holding both would send conv's output out to cumsum and take it back in."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a = torch.relu(self.conv(x))
        b = torch.cumsum(a, dim=1)
        return self.head(a + b)


class Mixed(nn.Module):
    """One node for each reason to stay on the CPU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 32 * 32, 10)

    def forward(self, x):
        y = self.conv(x)
        s = torch.softmax(y, dim=1)              # softmax over channels, not the last dim
        c = torch.cumsum(s, dim=2)              # no such op on xnnpack
        f = c.flatten(1)                         # a lone view between CPU nodes
        g = torch.sort(f, dim=1).values          # unsupported again
        return self.fc(g.view(g.size(0), -1))   # shape read at run time


def partitioned(registry, model, pipeline, **kw):
    result = optimize(model, (X,), registry, pipeline=pipeline, **kw)
    record = result.pipeline.records[-1]
    assert record.name.startswith("partition") and record.verified
    return result, record.stats


def submodules(result) -> dict[str, fx.GraphModule]:
    gm = result.graph.module
    return {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(n.target), fx.GraphModule)}


def test_naive_grouping_would_make_a_cycle_and_is_refused(registry):
    result, report = partitioned(registry, Detour(), "partition(backend=xnnpack)")
    placement = {r["name"]: r["placement"] for r in report["nodes"]}
    assert placement["cumsum"] == "cpu"
    assert placement["conv"] == placement["relu"] != placement["add"] == placement["head"] != "cpu"
    assert any("cycle through cumsum" in line for line in report["refused_merges"])
    # the partitioned graph calls the first partition, cumsum, then the second
    calls = [n.target if n.op == "call_module" else n.name for n in result.graph.module.graph.nodes
             if n.op in ("call_module", "call_function")]
    assert calls == ["xnnpack_0", "cumsum", "xnnpack_1"]
    assert torch.equal(result.graph.run()[0], result.original.run()[0])


def test_group_refuses_exactly_the_cyclic_merge():
    gm = fx.symbolic_trace(Detour())
    nodes = {n.name: n for n in gm.graph.nodes}
    supported = [nodes[k] for k in ("conv", "relu", "add", "head")]
    groups, refused = group(gm, supported)
    assert [[n.name for n in g] for g in groups] == [["conv", "relu"], ["add", "head"]]
    assert len(refused) == 1
    # without the detour the same nodes make one partition
    supported.insert(2, nodes["cumsum"])
    groups, refused = group(gm, supported)
    assert [[n.name for n in g] for g in groups] == [["conv", "relu", "cumsum", "add", "head"]] and not refused


@pytest.mark.parametrize("build", [tiny_resnet, tiny_mobilenet, tiny_mobilenet_v3])
def test_partitions_compute_the_same_numbers(registry, build):
    result, report = partitioned(registry, build().eval(), "cleanup,fold-bn,partition(backend=xnnpack)")
    before = optimize(build().eval(), (X,), registry, pipeline="cleanup,fold-bn").graph.run()[0]
    assert torch.equal(result.graph.run()[0], before)
    subs = submodules(result)
    assert sorted(subs) == [p["name"] for p in report["partitions"]]
    assert all(type(s).__name__ == "XnnpackPartition" for s in subs.values())
    # every node that computes sits in exactly one partition or on the CPU, MACs add up
    assert sum(p["macs"] for p in report["partitions"]) == report["summary"]["backends"]["xnnpack"]["macs"]
    assert result.graph.stats()["macs"] == sum(r["macs"] for r in report["nodes"])


@pytest.mark.parametrize("pipeline", ["cleanup,fold-bn", "cleanup,fold-bn,fuse,quantize(prefer=size)"])
def test_mobilenet_v3_is_one_xnnpack_partition(registry, pipeline):
    """hardswish and the squeeze-excitation gate's hardsigmoid run in fp32 inside the delegate (in an
    int8 graph between the convert ops its Q/DQ become), as in ExecuTorch's own lowering: nothing splits it."""
    _, report = partitioned(registry, tiny_mobilenet_v3().eval(), f"{pipeline},partition(backend=xnnpack)",
                            data={"calibration": CALIB})
    placed = {r["name"]: r["placement"] for r in report["nodes"]}
    activations = [r["name"] for r in report["nodes"] if {"hardswish", "hardsigmoid"} & set(r["kinds"])]
    assert len(report["partitions"]) == 1 and set(placed.values()) == {"xnnpack_0"}
    assert len(activations) >= 9 and {placed[a] for a in activations} == {"xnnpack_0"}
    int8 = {r["dtype"] for r in report["nodes"] if r["name"] in activations}
    assert int8 == ({"int8"} if "quantize" in pipeline else {"float32"})


def test_fp32_graph_gets_nothing_on_an_int8_backend(registry):
    result, report = partitioned(registry, tiny_resnet().eval(), "cleanup,fold-bn,partition(backend=int8-npu)")
    assert report["partitions"] == [] and not submodules(result)
    assert {r["reason"] for r in report["nodes"] if "conv2d" in r["kinds"]} == {
        "dtype float32: int8-npu runs int8 only"}
    assert report["summary"]["delegated_share"] == 0.0


@pytest.fixture(scope="module")
def quantized(registry):
    return optimize(Detour().eval(), (X,), registry, pipeline="fold-bn,quantize(prefer=size)",
                    data={"calibration": CALIB}).graph


def _quantized_partition(registry, quantized, backend):
    result = optimize(quantized.module, (X,), registry, pipeline=f"partition(backend={backend})")
    assert result.pipeline.records[-1].verified
    return result, result.pipeline.records[-1].stats


def test_int8_graph_goes_to_the_int8_backend_with_its_qdq_whole(registry, quantized):
    result, report = _quantized_partition(registry, quantized, "int8-npu")
    dtypes = {r["name"]: r["dtype"] for r in report["nodes"]}
    assert dtypes["conv"] == dtypes["head"] == "int8"
    assert report["summary"]["delegated_share"] == 1.0 and len(report["partitions"]) == 2
    assert report["qdq_copies"] >= 1      # the fake quant after cumsum/add feeds a partition
    for sub in submodules(result).values():
        for node in sub.graph.nodes:
            if node.op == "call_module":        # conv/linear: its input quantized inside the partition
                source = node.args[0]
                assert is_fake_quant(source), f"{node.name} reads {source.name} ({source.op})"
    assert torch.equal(result.graph.run()[0], quantized.run()[0])


def test_tflite_gpu_takes_no_int8_nodes(registry, quantized):
    _, report = _quantized_partition(registry, quantized, "tflite-gpu")
    convs = [r for r in report["nodes"] if r["kinds"] == ["conv2d"]]
    assert convs and all(r["placement"] == "cpu" and r["reason"].startswith("dtype int8") for r in convs)


def test_why_not_report_names_each_reason(registry):
    result, report = partitioned(registry, Mixed().eval(), "partition(backend=xnnpack)")
    reasons = {r["name"]: r["reason"] for r in report["nodes"]}
    assert reasons["conv"] is None and reasons["fc"] is None
    assert reasons["softmax"] == "softmax over dim 1, not the last"
    assert reasons["cumsum"] == "op cumsum not supported by xnnpack"
    assert reasons["sort"] == "op sort not supported by xnnpack"
    assert reasons["flatten"] == "not worth a partition: 1 trivial node"
    assert reasons["size"] == "op size not supported by xnnpack"
    assert reasons["view"].startswith("dynamic shape: shape computed at run time from size")
    explained = result.pipeline.records[-1].explanations
    assert "cumsum (cumsum) stays on the CPU: op cumsum not supported by xnnpack" in explained
    share = report["summary"]["delegated_share"]
    assert share == pytest.approx(sum(r["macs"] for r in report["nodes"] if r["placement"] != "cpu")
                                  / sum(r["macs"] for r in report["nodes"]))


def test_min_size_keeps_small_partitions_on_the_cpu(registry):
    _, report = partitioned(registry, Detour(), "partition(backend=xnnpack,min_size=3)")
    assert report["partitions"] == []
    assert {r["reason"] for r in report["nodes"] if r["name"] != "cumsum"} == {
        "not worth a partition: 2 nodes < min_size=3"}


def test_repartitioning_replaces_the_previous_partitions(registry):
    result, report = partitioned(registry, tiny_mobilenet_v3().eval(),
                                 "cleanup,fold-bn,partition(backend=xnnpack),partition(backend=tflite-gpu)")
    assert sorted(submodules(result)) == [p["name"] for p in report["partitions"]]
    assert all(name.startswith("tflite_gpu_") for name in submodules(result))


def test_partitioned_graph_emits_and_verifies(registry, tmp_path):
    result, _ = partitioned(registry, tiny_resnet().eval(), "cleanup,fold-bn,fuse,partition(backend=xnnpack)",
                            formats="onnx,ptl", out_dir=tmp_path)
    assert result.ok and [c.artifact.format for c in result.artifacts] == ["onnx", "ptl"]


class Tokens(nn.Module):
    """What a ViT/Swin head does with its tokens: a class token by integer index, a strided slice,
    a plain slice, an unsqueeze. ExecuTorch lowers the first two and the unsqueeze to ops its XNNPACK
    delegate does not take (select_copy, a strided slice_copy, unsqueeze_copy)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x):                  # 1x3x32x32: three 32x32 token grids
        y = self.fc(x)
        return self.fc(y[:, 0]), self.fc(y[:, ::2]), self.fc(y[:, 1:3]), self.fc(y).unsqueeze(0)


def test_xnnpack_takes_what_executorch_lowers_for_it(registry):
    result, report = partitioned(registry, Tokens().eval(), "partition(backend=xnnpack,min_size=1)")
    reasons = {r["name"]: r["reason"] for r in report["nodes"] if "getitem" in r["kinds"] or "unsqueeze" in r["kinds"]}
    assert reasons == {
        "getitem": "indexing with an integer (select_copy in ExecuTorch, which XNNPACK does not take)",
        "getitem_1": "a slice with step 2", "getitem_2": None, "unsqueeze": "op unsqueeze not supported by xnnpack"}


def test_unknown_backend_is_a_clear_error(registry):
    with pytest.raises(PassError, match="unknown backend 'npu'; registered backends: cpu, int8-npu, tflite-gpu, xnnpack"):
        optimize(Detour(), (X,), registry, pipeline="partition(backend=npu)")


def test_same_graph_same_partitions_whatever_the_hash_seed(tmp_path):
    script = ("import json, sys, torch; sys.path.insert(0, 'tests'); import graphopt; "
              "from zoo.cnn import tiny_mobilenet_v3; "
              "x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)); "
              "r = graphopt.optimize(tiny_mobilenet_v3().eval(), (x,), graphopt.load_plugins(), "
              "pipeline='cleanup,fold-bn,partition(backend=xnnpack)'); "
              "print(json.dumps([r.pipeline.records[-1].stats, r.graph.module.code]))")
    outputs = [subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert outputs[0] == outputs[1] and json.loads(outputs[0])[0]["partitions"]


def test_third_party_backend_from_a_plugin(tmp_path):
    registry = graphopt.load_plugins(extra=[str(FIXTURES / "toy_dsp_backend.py")])
    assert registry.owner["backend:toy-dsp"] == "toy_dsp_backend"
    result, report = partitioned(registry, Detour(), "partition(backend=toy-dsp)")
    reasons = {r["name"]: r["reason"] for r in report["nodes"]}
    assert reasons["conv"] is None and reasons["relu"] is None
    assert reasons["head"] is None                   # 8 -> 4 channels: within the DSP's limit
    assert reasons["add"] == "op add not supported by toy-dsp"
    wide = optimize(nn.Sequential(nn.Conv2d(3, 32, 1), nn.ReLU()), (X,), registry,
                    pipeline="partition(backend=toy-dsp)").pipeline.records[-1].stats
    assert [(r["name"], r["reason"]) for r in wide["nodes"]] == [("_0", "32 channels > 16"), ("_1", None)]
    # composed from a built-in description: xnnpack without convolutions
    result, report = partitioned(registry, Detour(), "partition(backend=xnnpack-no-conv)")
    assert {r["name"] for r in report["nodes"] if r["placement"] != "cpu"} == {"relu", "add"}


@pytest.mark.parametrize("name,error", [
    ("Bad_Name", "backend name 'Bad_Name' is not kebab-case"),
    ("xnnpack", "backend 'xnnpack' is already registered by plugin backends"),
])
def test_bad_backend_definitions_are_plugin_errors(tmp_path, name, error):
    plugin = tmp_path / "bad_backend.py"
    plugin.write_text("import graphopt\nfrom graphopt_plugins.partition.backend import Backend\n"
                      "@graphopt.hookimpl\ndef graphopt_register_backends():\n"
                      f"    return [Backend({name!r}, 'x', ops={{'relu': None}})]\n")
    with pytest.raises(PluginError, match=error):
        graphopt.load_plugins(extra=[str(plugin)])


class Methods(nn.Module):
    """softmax and mean called as tensor methods, positional arguments: both run on xnnpack."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        pooled = self.conv(x).mean([2, 3], True)
        return self.fc(pooled.flatten(1)).softmax(-1)


def test_method_calls_are_read_with_their_positional_arguments(registry):
    result, report = partitioned(registry, Methods().eval(), "partition(backend=xnnpack)")
    reasons = {r["name"]: (r["placement"], r["reason"]) for r in report["nodes"]}
    assert reasons["mean"][1] is None and reasons["softmax"][1] is None, reasons
    assert reasons["mean"][0] != "cpu" and reasons["softmax"][0] != "cpu"
