"""tflite-compat: GELU, erf, attention, unbind, patch tokens, expand and scalar operands
rewritten exactly; ViT-, Swin- and ConvNeXt-style models reach a running .tflite of builtins."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.driver import emit_one
import graphopt_plugins.tflite as tflite_emitter
from zoo import TRANSFORMER_ZOO, ZOO
from zoo.fold import optimize

NONE = {"multihead_attention": 0, "sdpa": 0, "gelu_erf": 0, "gelu_tanh": 0, "erf": 0, "unbind": 0,
        "patch_tokens": 0, "expand": 0, "scalar_operand": 0, "hardsigmoid": 0, "rejected": 0}
REWRITTEN = {"erf", "special_erf", "gelu", "GELU", "MultiheadAttention", "scaled_dot_product_attention",
             "unbind", "expand", "expand_as"}


def _ops(gm: torch.fx.GraphModule) -> set[str]:
    """Names of what the graph calls: module types, function and method names."""
    return {type(gm.get_submodule(n.target)).__name__ if n.op == "call_module" else
            getattr(n.target, "__name__", n.target)
            for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")}


def _compat(model: nn.Module, *inputs: torch.Tensor, registry) -> graphopt.PassRecord:
    """Run tflite-compat (verified) and check the result against the eager model (1e-5 relative)."""
    run = optimize(model.eval(), inputs, "tflite-compat", registry)
    (record,) = run.records
    assert record.verified and not _ops(run.graph.module) & REWRITTEN
    return record


# ------------------------------------------------------------------------ the model zoo

EXPECTED = {
    "vit_tiny": {"multihead_attention": 1, "sdpa": 1, "gelu_erf": 2, "unbind": 1, "patch_tokens": 1,
                 "expand": 1},
    "swin_tiny": {"gelu_erf": 3, "patch_tokens": 1, "scalar_operand": 3},
    "convnext_tiny": {"gelu_erf": 3, "scalar_operand": 1},
}


@pytest.mark.parametrize("name", sorted(TRANSFORMER_ZOO))
def test_zoo_model_is_rewritten_exactly(name, registry):
    build, shape = TRANSFORMER_ZOO[name]
    record = _compat(build(), torch.randn(shape), registry=registry)
    assert record.stats == {**NONE, **EXPECTED[name]} and record.modified
    assert record.max_abs_err < 1e-6


def test_explains_each_rewrite(registry):
    record = _compat(TRANSFORMER_ZOO["vit_tiny"][0](), torch.randn(1, 3, 32, 32), registry=registry)
    assert record.explanations == [
        "blocks_0_self_attention: MultiheadAttention(4 heads) -> Linear q/k/v, matmul, softmax, "
        "matmul, Linear",
        "scaled_dot_product_attention: scaled_dot_product_attention -> matmul, softmax, matmul",
        "blocks_0_mlp_act: GELU(erf) -> erf polynomial",
        "blocks_1_mlp_act: GELU(erf) -> erf polynomial",
        "unbind: unbind(0) -> select per part",
        "flatten: flatten(2), transpose(1, 2) -> permute(0, 2, 3, 1), reshape",
        "expand: expand to its own shape -> removed",
    ]


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_mobilenet", "mlp"])
def test_a_model_without_these_ops_is_unmodified(name, registry):
    build, shape = ZOO[name]
    graph = graphopt.capture(build(), torch.randn(shape))
    run = graphopt.run_pipeline(graph, "tflite-compat", registry)
    assert run.records[0].stats == NONE and not run.records[0].modified
    assert run.graph.module.code == graph.module.code


def test_registered_as_an_exact_pass_outside_the_default_pipeline(registry):
    spec = registry.passes["tflite-compat"]
    assert registry.owner["pass:tflite-compat"] == "tflite-compat"
    assert spec.effect is graphopt.Effect.EXACT and spec.default_order is None and spec.options == ()
    assert "tflite-compat" not in registry.default_pipeline()


# ------------------------------------------------------------------------------- GELU, erf

class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("module, rewrite", [
    (nn.GELU(), "gelu_erf"),
    (Fn(F.gelu), "gelu_erf"),
    (Fn(lambda x: F.gelu(x, approximate="none")), "gelu_erf"),
    (nn.GELU(approximate="tanh"), "gelu_tanh"),
    (Fn(lambda x: F.gelu(x, approximate="tanh")), "gelu_tanh"),
    (Fn(torch.erf), "erf"),
    (Fn(torch.special.erf), "erf"),
    (Fn(lambda x: x.erf()), "erf"),
], ids=["GELU", "F.gelu", "F.gelu-none", "GELU-tanh", "F.gelu-tanh", "torch.erf", "special.erf", "Tensor.erf"])
def test_gelu_and_erf_are_exact_over_a_wide_range(module, rewrite, registry):
    x = torch.linspace(-12, 12, 24001)
    run = optimize(module, (x,), "tflite-compat", registry)
    assert run.records[0].stats == {**NONE, rewrite: 1}
    with torch.no_grad():   # A-S 7.1.26 is within 1.5e-7; float32 rounding adds the rest
        assert (run.graph.run()[0].double() - module(x.double())).abs().max() < 6e-7


def test_hand_written_erf_gelu_loses_erf_and_scalars(registry):
    record = _compat(Fn(lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))),
                     torch.randn(2, 64, 64) * 3, registry=registry)
    assert record.stats == {**NONE, "erf": 1, "scalar_operand": 3}


# -------------------------------------------------------------------------------- attention

def _mha(**kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, **kwargs)
    with torch.no_grad():
        for p in mha.parameters():
            p.uniform_(-0.5, 0.5)
    return mha.eval()


class SelfAttention(nn.Module):
    def __init__(self, mha, need_weights=False, mask=None):
        super().__init__()
        self.mha, self.need_weights = mha, need_weights
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=self.need_weights, attn_mask=self.mask)[0]


class CrossAttention(nn.Module):
    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, q, k, v):
        return self.mha(q, k, v)[0]


@pytest.mark.parametrize("model, inputs", [
    (SelfAttention(_mha(batch_first=True)), [(2, 7, 16)]),
    (SelfAttention(_mha()), [(7, 2, 16)]),
    (SelfAttention(_mha(batch_first=True, bias=False), need_weights=True), [(2, 7, 16)]),
    (SelfAttention(_mha(batch_first=True), mask=torch.randn(7, 7)), [(2, 7, 16)]),
    (SelfAttention(_mha(batch_first=True), mask=torch.randn(8, 7, 7)), [(2, 7, 16)]),
    (CrossAttention(_mha(batch_first=True, kdim=6, vdim=5)), [(2, 7, 16), (2, 9, 6), (2, 9, 5)]),
], ids=["batch-first", "seq-first", "no-bias-weights-unused", "mask-2d", "mask-3d", "cross-kdim-vdim"])
def test_multihead_attention_becomes_explicit(model, inputs, registry):
    torch.manual_seed(1)
    record = _compat(model, *(torch.randn(s) for s in inputs), registry=registry)
    assert record.stats == {**NONE, "multihead_attention": 1}


class SDPA(nn.Module):
    def __init__(self, mask=None, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        self.register_buffer("mask", mask)

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, **self.kwargs)


@pytest.mark.parametrize("model", [SDPA(), SDPA(scale=0.3), SDPA(torch.randn(1, 3, 5, 6))],
                         ids=["default", "scale", "float-mask"])
def test_sdpa_becomes_explicit(model, registry):
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 4)
    assert _compat(model, q, k, v, registry=registry).stats == {**NONE, "sdpa": 1}


class WeightsUsed(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = _mha(batch_first=True)

    def forward(self, x):
        y, w = self.mha(x, x, x)
        return y.sum() + w.sum()


class PaddingMask(WeightsUsed):
    def forward(self, x):
        return self.mha(x, x, x, key_padding_mask=x[..., 0] > 1)[0]


@pytest.mark.parametrize("model, reason", [
    (WeightsUsed(), "mha: kept, its attention weights are used by sum_2"),
    (PaddingMask(), "mha: kept, it is called with a key_padding_mask or is_causal=True"),
    (SDPA(is_causal=True), "scaled_dot_product_attention: kept, it is called with dropout_p, "
                           "is_causal or enable_gqa"),
    (SDPA(torch.rand(5, 6) > 0.5), "scaled_dot_product_attention: kept, its attn_mask is boolean "
                                   "(only additive float masks are rewritten)"),
], ids=["weights-used", "padding-mask", "causal", "bool-mask"])
def test_attention_that_cannot_be_rewritten_is_kept_with_a_reason(model, reason, registry):
    inputs = [torch.randn(2, 5, 16)] if isinstance(model, WeightsUsed) else \
        [torch.randn(2, 3, 5, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)]
    run = graphopt.run_pipeline(graphopt.capture(model, inputs), "tflite-compat", registry)
    (record,) = run.records
    assert record.explanations == [reason] and record.stats == {**NONE, "rejected": 1}


# ------------------------------------------------------------------ layout and constants

class Tokens(nn.Module):
    """Patch embedding with a cls token: conv -> flatten(2) -> transpose(1, 2) -> cat."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.cls = nn.Conv2d(3, 8, 4, 4), nn.Parameter(torch.randn(1, 1, 8))

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)


@pytest.mark.parametrize("batch, what", [(1, "expand to its own shape -> removed"), (3, "expand -> repeat")])
def test_patch_tokens_and_cls_expand(batch, what, registry):
    record = _compat(Tokens(), torch.randn(batch, 3, 16, 16), registry=registry)
    assert record.stats == {**NONE, "patch_tokens": 1, "expand": 1}
    assert record.explanations[-1] == f"expand: {what}"


def test_flatten_without_a_transpose_is_kept(registry):
    run = graphopt.run_pipeline(graphopt.capture(Fn(lambda x: x.flatten(2).mean(-1)), torch.randn(1, 2, 3, 3)),
                                "tflite-compat", registry)
    assert run.records[0].explanations == ["flatten: kept, its result is read by mean, not by one "
                                           "transpose(1, 2)"]


def _qkv(x):
    q, k, v = x.unbind(1)
    return q * k + v


def test_unbind_becomes_select_unless_used_as_a_sequence(registry):
    record = _compat(Fn(_qkv), torch.randn(2, 3, 4), registry=registry)
    assert record.stats == {**NONE, "unbind": 1}
    run = graphopt.run_pipeline(graphopt.capture(Fn(lambda x: torch.stack(x.unbind(1))), torch.randn(2, 3)),
                                "tflite-compat", registry)
    assert run.records[0].explanations == ["unbind: kept, its result is used as a sequence by stack"]


class Scalars(nn.Module):
    def forward(self, x, i):
        return (2.0 - x * 0.5) / 3 + torch.add(x, 1) + x.mul(2) + x + (i * 2).float()


def test_scalar_operands_of_float_tensors_become_constant_tensors(registry):
    record = _compat(Scalars(), torch.randn(2, 4), torch.arange(4), registry=registry)
    assert record.stats == {**NONE, "scalar_operand": 5}   # not the integer i * 2


def test_squeeze_excitation_gates_run_inside_the_xnnpack_delegate(registry, tmp_path):
    """onnx2tf writes HardSigmoid as RELU_0_TO_1, which LiteRT's XNNPACK delegate leaves out: each SE gate of a
    MobileNetV3 split the float model. As relu6(x + 3) / 6 the model is one partition, and exact."""
    from graphopt_plugins.tflite.islands import xnnpack_split

    build, shape = ZOO["tiny_mobilenet_v3"]
    model, x = build(), torch.randn(shape)
    gates = sum(n.target is F.hardsigmoid for n in graphopt.capture(model, x).module.graph.nodes)
    record = _compat(model, x, registry=registry)
    assert gates >= 2 and record.stats == {**NONE, "hardsigmoid": gates} and record.max_abs_err < 1e-6
    emitter = registry.emitters["tflite"]
    artifact = emit_one(graphopt.capture(model, x), emitter, {o.name: o.default for o in emitter.options},
                        tmp_path, registry)
    assert "RELU_0_TO_1" not in artifact.meta["op_types"]
    assert xnnpack_split(artifact.path.read_bytes()) == (1, {})


def test_a_quantized_gate_is_left_to_the_int8_converter(registry):
    calibration = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    graph = graphopt.run_pipeline(graphopt.capture(ZOO["tiny_mobilenet_v3"][0](), torch.randn(1, 3, 32, 32)),
                                  "cleanup,fold-bn,fuse,quantize(prefer=size)", registry,
                                  data={"calibration": calibration}).graph
    record = graphopt.run_pipeline(graph, "tflite-compat", registry).records[0]
    assert record.stats["hardsigmoid"] == 0 and record.stats["rejected"] >= 2


# ------------------------------------------------------------------- end to end: .tflite

class Mix(nn.Module):
    """What the zoo does not cover on the way to TFLite: GELU(tanh) and a hand-written erf GELU
    on an 8x8 channels-last map (where onnx2tf fails on scalar constants), and a cls token
    expanded, concatenated and normalized (where it loses the shape)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.cls = nn.Conv2d(3, 32, 4, 4), nn.Parameter(torch.randn(1, 1, 32))
        self.fc1, self.fc2, self.norm = nn.Linear(32, 64), nn.Linear(64, 32), nn.LayerNorm(32)

    def forward(self, x):
        x = F.gelu(self.fc1(self.embed(x).permute(0, 2, 3, 1)), approximate="tanh")
        x = self.fc2(x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))).reshape(x.shape[0], -1, 32)
        return self.norm(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)).mean(1)


E2E = {**TRANSFORMER_ZOO, "mix": (Mix, (1, 3, 32, 32))}


@pytest.fixture(scope="module", params=sorted(E2E))
def tflite(request, registry, tmp_path_factory):
    """(eager model, input, the .tflite artifact) through the tflite emitter, whose prepare runs
    tflite-compat."""
    build, shape = E2E[request.param]
    model, x = build(), torch.randn(shape)
    emitter = registry.emitters["tflite"]
    assert emitter.prepare == "tflite-compat"
    artifact = emit_one(graphopt.capture(model, x), emitter, {o.name: o.default for o in emitter.options},
                        tmp_path_factory.mktemp(request.param), registry)
    return model, x, artifact


def test_reaches_a_running_tflite_of_builtin_ops(tflite, registry):
    model, x, artifact = tflite
    assert tflite_emitter.operators(artifact.path.read_bytes())[1] == []   # no Flex or custom ops
    assert any(p["pass"] == "tflite-compat" and p["modified"] for p in artifact.meta["prepared"])
    with torch.no_grad():
        expected = model(x)
    metrics = graphopt.compare([expected], registry.emitters["tflite"].load(artifact)([x]))
    assert metrics.max_rel <= 1e-4, metrics
