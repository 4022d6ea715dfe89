"""prune: one test per channel rule on tests/zoo/prune.py, each verified by the pass
manager against the mask-then-prune oracle, plus the structure the rule must produce."""
from __future__ import annotations

import operator


import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.capture import capture
from graphopt.errors import PassError
from graphopt.graph import annotate
from graphopt.metrics import compare
from graphopt.passmanager import run_pipeline
import graphopt_plugins.prune.rules as prune_rules
from graphopt_plugins.prune.oracle import MaskedRun
from graphopt_plugins.prune.rules import propagate
from zoo import PRUNE_ZOO, example_input


def prune(registry, name: str, pipeline: str = "prune(ratio=0.5)"):
    """(captured graph, pipeline run) for zoo model ``name``; every pass verified."""
    graph = capture(PRUNE_ZOO[name][0](), (example_input(name),))
    run = run_pipeline(graph, pipeline, registry)
    assert all(r.verified for r in run.records)
    return graph, run


def modules(run, kind=nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in run.graph.module.named_modules() if isinstance(m, kind)}


def nodes(run, target) -> list[fx.Node]:
    return [n for n in run.graph.module.graph.nodes if n.target == target]


SMALL = [n for n in PRUNE_ZOO if n != "big_graph"]


@pytest.mark.parametrize("name", SMALL)
def test_every_pattern_prunes_verified_and_keeps_output_shapes(registry, name):
    graph, run = prune(registry, name)
    record = run.records[-1]
    before = graph.stats()
    assert record.verified and record.modified
    assert record.macs < before["macs"] and record.params < before["params"]
    assert [t.shape for t in run.graph.run()] == [t.shape for t in graph.run()]
    # the pruned model really computes something else than the unpruned one: the oracle,
    # not the reference, is what it matched
    assert compare(graph.run(), run.graph.run()).max_abs > 1e-4


def test_residual_stream_is_one_group(registry):
    _, run = prune(registry, "residual")
    convs = modules(run, nn.Conv2d)
    stream = {convs["stem.0"].out_channels, convs["layers.0.0.conv2"].out_channels,
              convs["layers.1.0.conv1"].in_channels, convs["layers.1.0.downsample.0"].in_channels}
    assert stream == {8}
    assert convs["layers.1.0.conv2"].out_channels == convs["layers.1.0.downsample.0"].out_channels == 16
    assert modules(run, nn.Linear)["fc"].in_features == 16


def test_depthwise_conv_follows_its_input_and_keeps_groups_valid(registry):
    _, run = prune(registry, "depthwise_separable")
    for name, conv in modules(run, nn.Conv2d).items():
        if conv.groups > 1:
            assert conv.groups == conv.in_channels, name
            assert conv.out_channels % conv.in_channels == 0, name
    multiplier = modules(run, nn.Conv2d)["5"]
    assert multiplier.out_channels == 2 * multiplier.in_channels < 48


def test_squeeze_excitation_expand_matches_the_trunk(registry):
    _, run = prune(registry, "squeeze_excitation")
    convs = modules(run, nn.Conv2d)
    for trunk, se in (("0.0", "1"), ("2.0", "3")):
        assert convs[f"{se}.fc2"].out_channels == convs[trunk].out_channels == convs[f"{se}.fc1"].in_channels < 32
        assert convs[f"{se}.fc1"].out_channels == convs[f"{se}.fc2"].in_channels < 8


def test_channel_shuffle_is_followed_as_a_permutation(registry):
    graph, run = prune(registry, "channel_shuffle")
    views = nodes(run, "view")
    hard_coded = [v for v in views if all(isinstance(a, int) for a in v.args[1:])]
    assert hard_coded, "the hard-coded shuffle views are kept"
    before = {n.name: n.args for n in graph.module.graph.nodes if n.target == "view"}
    changed = [v for v in hard_coded if v.args != before[v.name]]
    assert changed, "their channel sizes were rewritten"
    for v in changed:                    # view(N, g, C/g, H, W): the group count stays
        if len(v.args) == 6:
            assert v.args[2] == before[v.name][2]


def test_a_channel_permutation_treated_element_wise_is_caught_by_the_oracle(registry, monkeypatch):
    """What a pruner that treats unknown ops as element-wise does with torch.roll/cumsum over
    channels: a model of the right shapes that computes the wrong thing. The oracle rejects it."""
    monkeypatch.setattr(prune_rules, "_UNARY_FUNCTIONS", prune_rules._UNARY_FUNCTIONS | {torch.roll, torch.cumsum})
    graph = capture(PRUNE_ZOO["unknown_op"][0](), (example_input("unknown_op"),))
    with pytest.raises(PassError, match=r"pass prune \(as the first pass\) failed: .*does not match its mask "
                                        r"oracle: .*; first diverging node `(roll|cumsum)` "):
        run_pipeline(graph, "prune(ratio=0.5)", registry)


def test_dense_concat_consumers_take_the_kept_parts(registry):
    graph, run = prune(registry, "dense_concat")
    for node in run.graph.module.graph.nodes:
        if node.op == "call_module" and isinstance(run.graph.module.get_submodule(node.target), nn.Conv2d):
            conv = run.graph.module.get_submodule(node.target)
            src = node.args[0]
            annotate(run.graph.module, run.graph.example_inputs)
            assert src.meta["graphopt.shape"][1] == conv.in_channels


def test_inception_branches_are_separate_groups(registry):
    _, run = prune(registry, "inception")
    text = "\n".join(run.records[-1].explanations)
    assert text.count("removed") >= 4


def test_group_conv_keeps_group_count_and_equal_groups(registry):
    _, run = prune(registry, "group_conv")
    grouped = [c for c in modules(run, nn.Conv2d).values() if 1 < c.groups < c.in_channels]
    assert grouped and all(c.groups == 4 and c.in_channels % 4 == 0 and c.out_channels % 4 == 0 for c in grouped)
    assert grouped[0].out_channels < 32
    norm = next(iter(modules(run, nn.GroupNorm).values()))
    assert norm.num_groups == 4 and norm.num_channels % 4 == 0 and norm.num_channels < 32


def test_layernorm_after_permute_is_resized(registry):
    _, run = prune(registry, "layernorm_permute")
    norms = modules(run, nn.LayerNorm)
    assert norms and all(n.normalized_shape[0] < 32 for n in norms.values())
    fc1 = [m for n, m in modules(run, nn.Linear).items() if n.endswith("fc1")][0]
    assert fc1.in_features == next(iter(norms.values())).normalized_shape[0]


def test_masked_layernorm_runs_its_statistics_over_kept_channels_only():
    """The norm check of the oracle: LayerNorm of the kept channels, not of a zero-padded row."""
    graph = capture(PRUNE_ZOO["layernorm_permute"][0](), (example_input("layernorm_permute"),))
    gm = graph.module
    annotate(gm, graph.example_inputs)
    a = propagate(gm)
    assert a.norms
    removed = np.zeros(a.size, dtype=bool)
    removed[a.spaces[0].start] = True                       # one stem channel
    masked = MaskedRun(a, removed)
    values = {}
    masked.run_node = (lambda run_node: lambda n: values.setdefault(n.name, run_node(n)))(masked.run_node)
    masked.run(*graph.example_inputs)
    name = next(iter(a.norms))
    node = next(n for n in gm.graph.nodes if n.name == name)
    norm, x = gm.get_submodule(node.target), values[node.args[0].name]
    out = values[name]
    kept = out[..., 1:]
    assert torch.allclose(out[..., 0], torch.zeros_like(out[..., 0]))
    # the independent oracle: LayerNorm of the 31 kept channels with their weights
    expected = F.layer_norm(x[..., 1:], (31,), norm.weight[1:], norm.bias[1:], norm.eps)
    assert torch.allclose(kept, expected, atol=1e-5)
    # what a plain LayerNorm over the zero-padded row gives (the bug this check exists for) is not it
    padded = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)[..., 1:]
    assert not torch.allclose(kept, padded, atol=1e-3)


def test_attention_prunes_head_dims_and_rewrites_reshapes(registry):
    graph, run = prune(registry, "attention")
    linears = modules(run, nn.Linear)
    qkv = linears["blocks.0.attn.qkv"]
    assert qkv.out_features < 96 and qkv.out_features % 12 == 0          # 3 x 4 heads x head dim
    reshape = [n for n in nodes(run, "reshape") if n.args[0].target == "blocks.0.attn.qkv"][0]
    assert reshape.args[3:5] == (3, 4) and reshape.args[5] == qkv.out_features // 12
    assert not modules(run, nn.MultiheadAttention), "MultiheadAttention is split into its projections"
    assert linears["blocks.1.self_attention.q_proj"].out_features == linears["blocks.1.self_attention.k_proj"].out_features
    assert linears["blocks.1.self_attention.v_proj"].out_features == linears["blocks.1.self_attention.out_proj"].in_features


def test_a_scale_computed_from_the_pruned_width_keeps_its_value(registry):
    """``(C // heads) ** -0.5`` with C pruned: the reshape follows the pruned width, the scale does
    not (the mask oracle's, which the pass is verified against)."""
    graph, run = prune(registry, "shape_scaled_attention")
    qkv = modules(run, nn.Linear)["attn.qkv"]
    assert qkv.in_features < 32 and qkv.out_features == 3 * qkv.in_features
    (scaled,) = [n for n in run.graph.module.graph.nodes if n.target is operator.mul]
    assert scaled.args[1] == pytest.approx(8 ** -0.5)             # pinned: 32 // 4 = 8 before pruning
    plan = run.graph.module.meta["graphopt.prune.plan"][-1]["constants"]
    assert [(["args", 1], pytest.approx(8 ** -0.5))] == plan[scaled.name]


def test_flatten_into_linear_removes_whole_spatial_blocks(registry):
    _, run = prune(registry, "flatten_linear")
    conv = next(iter(modules(run, nn.Conv2d).values()))
    first = next(iter(modules(run, nn.Linear).values()))
    spatial = first.in_features // conv.out_channels
    assert first.in_features == conv.out_channels * spatial and conv.out_channels < 16


def test_hard_coded_split_sizes_are_rewritten(registry):
    graph, run = prune(registry, "hardcoded_split")
    split = nodes(run, torch.split)[0]
    assert list(split.args[1]) != [16, 32]
    stem = modules(run, nn.Conv2d)["stem.0"]
    assert sum(split.args[1]) == stem.out_channels < 48
    view = nodes(run, "view")[0]
    assert view.args[2] == sum(split.args[1])


def test_embedding_dim_is_pruned(registry):
    _, run = prune(registry, "embedding")
    emb = next(iter(modules(run, nn.Embedding).values()))
    assert emb.embedding_dim < 32 and emb.weight.shape == (100, emb.embedding_dim)


def test_conv_transpose_channels_are_pruned(registry):
    _, run = prune(registry, "conv_transpose")
    up = next(iter(modules(run, nn.ConvTranspose2d).values()))
    assert up.out_channels < 16 and up.weight.shape[1] == up.out_channels


def test_an_op_without_a_rule_freezes_its_channels_and_says_why(registry):
    graph, run = prune(registry, "unknown_op")
    convs = list(modules(run, nn.Conv2d).values())
    original = [m for m in graph.module.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs[:2]] == [c.out_channels for c in original[:2]]
    text = "\n".join(run.records[-1].explanations)
    assert "roll (call_function roll): moves positions along the pruned dim" in text
    assert "cumsum (call_function cumsum): no channel rule for this op" in text


def test_model_outputs_and_inputs_freeze_their_channels(registry):
    graph, run = prune(registry, "residual")
    assert modules(run, nn.Linear)["fc"].out_features == 10
    assert modules(run, nn.Conv2d)["stem.0"].in_channels == 3
    assert "model output fc: its shape never changes" in "\n".join(run.records[-1].explanations)


def test_big_graph_analysis(registry):
    graph = capture(PRUNE_ZOO["big_graph"][0](), (example_input("big_graph"),))
    assert len(graph.module.graph.nodes) > 450
    run = run_pipeline(graph, "prune(ratio=0.5)", registry)
    stats = run.records[-1].stats
    assert run.records[-1].verified and stats["groups"] > 50 and stats["pruned_groups"] >= stats["groups"] - 1
    assert 0 < stats["analysis_seconds"] < run.records[-1].seconds       # the analysis is timed, within the pass


@pytest.mark.parametrize("name", ["vit_tiny", "swin_tiny"])
def test_vision_transformers_prune_through_tokens_windows_and_attention(registry, name):
    """Class token and position embedding (parameters through expand/cat), SDPA (its default
    scale written in when the head dim shrinks), Swin's rolls over spatial dims and window
    reshapes: everything prunes but the classifier's outputs."""
    from zoo import TRANSFORMER_ZOO
    builder, input_shape = TRANSFORMER_ZOO[name]
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    graph = capture(builder(), (x,))
    run = run_pipeline(graph, "prune(ratio=0.5)", registry)
    record = run.records[-1]
    assert record.verified and record.stats["frozen_groups"] == 1
    assert record.macs < 0.4 * graph.stats()["macs"]
    sdpa = [n for n in run.graph.module.graph.nodes if n.target is nn.functional.scaled_dot_product_attention]
    assert all(n.kwargs.get("scale") for n in sdpa)


def test_a_prune_that_departs_from_its_oracle_names_the_first_diverging_node(registry, monkeypatch):
    """Without the pinned scale the pruned attention departs from the mask oracle at the scaled scores."""
    import graphopt_plugins.prune as prune_plugin
    monkeypatch.setattr(prune_plugin, "pins", lambda *args: {})
    graph = capture(PRUNE_ZOO["shape_scaled_attention"][0](), (example_input("shape_scaled_attention"),))
    with pytest.raises(PassError) as info:
        run_pipeline(graph, "prune(ratio=0.5)", registry)
    message = str(info.value)
    assert "does not match its mask oracle" in message and "first diverging node `mul` (call_function mul)" in message
