"""fp16: which nodes go half, where the casts sit, the range guard, mode=weights, and every emitter on an fp16 graph."""
from __future__ import annotations

from typing import Callable

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.driver import emit_all, select_emitters
from graphopt.graph import annotate
from graphopt.testing import assert_close
from zoo import ZOO
from zoo.cnn import tiny_resnet

FP16 = graphopt.Effect.FP16.tolerance
CALLS = ("call_module", "call_function", "call_method")


class MidSoftmax(nn.Module):
    """A blocklisted op between two fp16 regions."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return torch.relu(self.fc2(torch.softmax(torch.relu(self.fc1(x)), dim=-1).reshape(x.shape[0], -1)))


class TinyTransformer(nn.Module):
    """Pre-norm attention (softmax(q k^T / sqrt d) v) and GELU MLP blocks with LayerNorms."""

    def __init__(self, dim: int = 32, tokens: int = 8):
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.pos = nn.Parameter(torch.randn(tokens, dim) * 0.5)
        self.ln1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 5)
        self.scale = dim ** -0.5

    def forward(self, x):
        h = self.embed(x) + self.pos
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        h = h + self.proj(attn @ v)
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(self.norm(h).mean(dim=1))


class Overflow(nn.Module):
    """fc2's activations reach ~1e5, beyond fp16's 65504; fc3 brings them back down."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        with torch.no_grad():
            self.fc2.weight.mul_(2e5)
            self.fc3.weight.mul_(1e-5)

    def forward(self, x):
        return self.fc3(self.fc2(torch.relu(self.fc1(x))))


class Underflow(nn.Module):
    """Values scaled to ~1e-9 between two layers: fp16 flushes them to zero."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x) * 1e-9 * 1e9)


class LongSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8192)

    def forward(self, x):
        return self.fc(x).sum(dim=-1, keepdim=True)


class Tied(nn.Module):
    """fc's weight is also read directly, as tied embeddings and heads are."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) + F.linear(x, self.fc.weight)


class Wide(nn.Module):
    """Enough weights (1.1 MB) that the files' fixed overhead does not hide the fp16 halving."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.fc1, self.fc2 = nn.Linear(64 * 8 * 8, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def _graph(build: Callable[[], nn.Module], *shapes: tuple[int, ...], name: str = "model") -> graphopt.Graph:
    torch.manual_seed(0)
    return graphopt.capture(build().eval(), [torch.randn(*s) for s in shapes], name=name)


def _fp16(graph: graphopt.Graph, registry, pipeline: str = "fp16", **kwargs) -> graphopt.PipelineRun:
    run = graphopt.run_pipeline(graph, pipeline, registry, **kwargs)
    assert run.records[-1].verified
    return run


def _casts(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "to"]


def _precision(gm: torch.fx.GraphModule) -> dict[str, str]:
    return {n.name: n.meta["graphopt.precision"] for n in gm.graph.nodes if "graphopt.precision" in n.meta}


def test_a_blocklisted_op_in_the_middle_costs_four_casts_and_no_more(registry):
    run = _fp16(_graph(MidSoftmax, (2, 8)), registry)
    gm = run.graph.module
    casts = _casts(gm)
    # in -> fp16, fp16 -> fp32 before softmax, fp32 -> fp16 after it (reshape follows softmax), fp16 -> out
    assert [(c.args[0].name, c.args[1]) for c in casts] == [
        ("x", torch.float16), ("relu", torch.float32), ("reshape", torch.float16), ("relu_1", torch.float32)]
    assert not [c for c in casts if c.args[0] in casts]          # no cast of a cast: no ping-pong
    precision = _precision(gm)
    assert precision["softmax"] == precision["reshape"] == "fp32"
    assert precision["fc1"] == precision["relu"] == precision["fc2"] == "fp16"
    assert gm.fc1.weight.dtype == gm.fc2.bias.dtype == torch.float16
    (out,) = run.graph.run()
    assert out.dtype == torch.float32 and run.graph.example_inputs[0].dtype == torch.float32
    record = run.records[-1]
    assert record.stats == {"fp16": 4, "fp32": 2, "kept_fp32": 1, "casts": 4}
    assert "softmax: fp32, softmax is on the fp32 blocklist" in record.explanations
    assert "reshape: fp32, follows its fp32 input softmax" in record.explanations
    assert "fc1: fp16" in record.explanations


def test_transformer_blocklist_and_numbers(registry):
    graph = _graph(TinyTransformer, (2, 8, 12))
    run = _fp16(graph, registry)
    gm = run.graph.module
    precision = _precision(gm)
    assert {precision[n] for n in ("ln1", "ln2", "norm", "softmax")} == {"fp32"}
    assert {precision[n] for n in ("qkv", "matmul", "matmul_1", "fc1", "gelu", "fc2", "head")} == {"fp16"}
    assert gm.ln1.weight.dtype == torch.float32 and gm.qkv.weight.dtype == torch.float16
    assert gm.pos.dtype == torch.float16   # read only by an fp16 add: stored in fp16
    assert not [c for c in _casts(gm) if c.args[0] in _casts(gm)]
    assert_close(graph.run(), run.graph.run(), FP16)
    other = [torch.randn(2, 8, 12) * 3]
    assert_close(graph.run(other), run.graph.run(other), FP16)


@pytest.mark.parametrize("builder", ["tiny_resnet", "tiny_mobilenet", "mlp"])
def test_zoo_models_go_all_fp16_within_tolerance(builder, registry):
    build, shape = ZOO[builder]
    graph = _graph(build, shape)
    run = _fp16(graph, registry, "cleanup,fold-bn,fp16")
    gm = run.graph.module
    assert run.records[-1].stats["fp32"] == 0 and len(_casts(gm)) == 2   # only at the input and the output
    assert all(t.dtype == torch.float16 for t in gm.state_dict().values())
    assert run.graph.stats()["bytes"] * 2 == run.records[1].bytes
    assert_close(graph.run(), run.graph.run(), FP16)


def test_overflowing_activation_stays_fp32_and_nothing_is_inf(registry):
    graph = _graph(Overflow, (4, 8))
    run = _fp16(graph, registry)
    gm = run.graph.module
    precision = _precision(gm)
    assert (precision["fc1"], precision["fc2"], precision["fc3"]) == ("fp16", "fp32", "fp32")
    assert gm.fc1.weight.dtype == torch.float16 and gm.fc2.weight.dtype == torch.float32
    record = run.records[-1]
    fc2 = next(e for e in record.explanations if e.startswith("fc2:"))
    assert fc2.startswith("fc2: fp32, max |x| ") and "> max_abs=60000 (fp16 ends at 65504)" in fc2
    fc3 = next(e for e in record.explanations if e.startswith("fc3:"))
    assert fc3.startswith("fc3: fp32, its input fc2: max |x| ")
    values: dict[str, torch.Tensor] = {}
    outputs = annotate(gm, graph.example_inputs, record=lambda n, v: values.__setitem__(n.name, v))
    for name, value in values.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.isfinite(value).all(), name
    assert torch.isfinite(outputs[0]).all()
    with pytest.raises(graphopt.PassError, match="max relative error inf"):   # what the guard prevents
        graphopt.run_pipeline(graph, "fp16(max_abs=1e9)", registry)


def test_calibration_data_decides_the_range(registry):
    def quieter() -> nn.Module:
        model = Overflow()
        with torch.no_grad():
            model.fc2.weight.mul_(0.1)   # ~1e4 on the example inputs: fits fp16
        return model

    graph = _graph(quieter, (4, 8))
    assert _precision(_fp16(graph, registry).graph.module)["fc2"] == "fp16"
    loud = [(torch.randn(4, 8) * 20,), (torch.randn(4, 8),)]
    run = _fp16(graph, registry, data={"calibration": loud})
    assert _precision(run.graph.module)["fc2"] == "fp32"
    assert run.records[-1].stats["kept_fp32"] == 2   # fc2, and fc3 that reads it


def test_underflow_stays_fp32(registry):
    graph = _graph(Underflow, (4, 8))
    run = _fp16(graph, registry)
    precision = _precision(run.graph.module)
    assert precision["mul"] == precision["mul_1"] == "fp32" and precision["fc1"] == precision["fc2"] == "fp16"
    assert "mul: fp32, 100% of its values vanish in fp16 (below 2**-24, not negligible next to its max; " \
           "max_underflow=0.01)" in run.records[-1].explanations
    with pytest.raises(graphopt.PassError, match="cosine"):
        graphopt.run_pipeline(graph, "fp16(max_underflow=1.0)", registry)


def test_large_reductions_and_keep_fp32(registry):
    run = _fp16(_graph(LongSum, (2, 4)), registry)
    assert "sum_1: fp32, sum reduces 8192 elements into each output (> 4096)" in run.records[-1].explanations
    run = _fp16(_graph(MidSoftmax, (2, 8)), registry, 'fp16(keep_fp32="fc2")')
    assert _precision(run.graph.module)["fc2"] == "fp32"
    assert "fc2: fp32, listed in keep_fp32" in run.records[-1].explanations


def test_io_types_fp16_when_asked(registry):
    graph = _graph(MidSoftmax, (2, 8))
    run = _fp16(graph, registry, "fp16(keep_io_types=false)")
    gm = run.graph.module
    assert _precision(gm)["x"] == "fp16"
    (out,) = run.graph.run()
    assert out.dtype == torch.float16
    (half,) = run.graph.run([graph.example_inputs[0].half()])
    assert half.dtype == torch.float16 and torch.equal(half, out)


def test_mode_weights_stores_fp16_and_computes_fp32(registry):
    graph = _graph(tiny_resnet, (1, 3, 32, 32))
    run = _fp16(graph, registry, "cleanup,fold-bn,fp16(mode=weights)")
    gm, fp32 = run.graph.module, run.records[1]
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and
                isinstance(gm.get_submodule(n.target), (nn.Conv2d, nn.Linear))]
    state = gm.state_dict()
    assert "layers.0.0.conv1.weight" in state and all(t.dtype == torch.float16 for t in state.values())
    assert 0.49 < run.graph.stats()["bytes"] / fp32.bytes < 0.51
    computed = [n.meta["graphopt.dtype"] for n in gm.graph.nodes if n.op in CALLS]
    assert set(computed) == {"float32"}   # every op computes in fp32; get_attrs read fp16
    assert {n.meta["graphopt.dtype"] for n in gm.graph.nodes if n.op == "get_attr"} == {"float16"}
    assert run.records[-1].stats == {"fp16_tensors": 24, "fp32_tensors": 0}
    assert "layers_0_0_conv1: Conv2d inlined, its weights stored fp16 and upcast to fp32 at use" \
        in run.records[-1].explanations


@pytest.mark.parametrize("mode", ["full", "weights"])
def test_a_weight_read_twice_is_stored_once_in_fp16(mode, registry):
    run = _fp16(_graph(Tied, (2, 8)), registry, f"fp16(mode={mode})")
    assert {k: t.dtype for k, t in run.graph.module.state_dict().items()} == {
        "fc.weight": torch.float16, "fc.bias": torch.float16}


@pytest.fixture(scope="module")
def wide(registry) -> tuple[graphopt.Graph, graphopt.Graph]:
    graph = _graph(Wide, (1, 3, 16, 16), name="wide")
    return graph, _fp16(graph, registry).graph


@pytest.mark.parametrize("fmt", ["onnx", "ptl", "tflite"])
def test_each_emitter_halves_the_file_within_fp16_tolerance(fmt, wide, registry, tmp_path):
    fp32, half = wide
    emitter = registry.emitters[fmt]
    (fp32_check,) = emit_all(fp32, select_emitters(registry, fmt), tmp_path / "fp32", fp32.run(), registry)
    (check,) = emit_all(half, select_emitters(registry, fmt), tmp_path / "fp16", half.run(), registry)
    assert fp32_check.verified and check.verified, check.problems   # judged by meta["precision"]: fp16
    assert check.artifact.meta["precision"] == "fp16"
    assert emitter.tolerance_for(check.artifact.meta) == FP16
    assert [emitter.precision(c.artifact.path) for c in (fp32_check, check)] == ["fp32", "fp16"]   # read back
    # the lite interpreter runs the same half kernels; onnxruntime and LiteRT compute in fp32 here
    assert (check.vs_graph.max_rel == 0) if fmt == "ptl" else (1e-5 < check.vs_graph.max_rel < 1e-2)
    assert check.bytes / fp32_check.bytes < 0.6
    if fmt == "onnx":
        model = onnx.load(check.artifact.path)
        assert {onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name for i in model.graph.initializer
                if len(i.dims) > 1} == {"float16"}
    elif fmt == "ptl":
        assert check.artifact.meta["fp16"] == "weights and activations"
    else:
        assert check.artifact.path.name == "wide_fp16.tflite" and "weights" in check.artifact.meta["fp16"]


def test_onnx_of_mode_weights_keeps_fp16_weights(registry, tmp_path):
    graph = _graph(Wide, (1, 3, 16, 16), name="wide")
    run = _fp16(graph, registry, "fp16(mode=weights)")
    (fp32,) = emit_all(graph, select_emitters(registry, "onnx"), tmp_path / "a", graph.run(), registry)
    (check,) = emit_all(run.graph, select_emitters(registry, "onnx"), tmp_path / "b", run.graph.run(), registry)
    assert check.verified and check.vs_graph.max_rel < 1e-5   # the same fp32 compute on fp16 weights
    assert check.artifact.meta["upcast_initializers"] == 8 and check.bytes / fp32.bytes < 0.6


def test_onnx_declares_fp16_inputs_when_the_graph_does(registry, tmp_path):
    run = _fp16(_graph(MidSoftmax, (2, 8), name="io16"), registry, "fp16(keep_io_types=false)")
    (check,) = emit_all(run.graph, select_emitters(registry, "onnx"), tmp_path, run.graph.run(), registry)
    assert check.verified
    assert [v["dtype"] for v in check.artifact.meta["inputs"] + check.artifact.meta["outputs"]] == \
        ["float16", "float16"]
