"""quantize on attention models: nn.MultiheadAttention's projections get int8 kernels (split into
Linear layers first), a product by a one-element constant (q * scale) stays in float, and a slice
of an int8 tensor keeps its grid (TFLite's strided slice takes no other)."""
from __future__ import annotations

import operator

import pytest
import torch

import graphopt
from graphopt.quant import is_fake_quant
from zoo import TRANSFORMER_ZOO


def _quantized(registry, name: str, formats: str = "", tmp_path=None):
    build, shape = TRANSFORMER_ZOO[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    return graphopt.optimize(build(), (x,), registry, pipeline="quantize(prefer=size)", formats=formats,
                             out_dir=tmp_path, data={"calibration": [torch.randn(*shape, generator=gen)
                                                                     for _ in range(16)]})


def test_multihead_attention_is_split_and_its_projections_are_int8(registry):
    result = _quantized(registry, "vit_tiny")
    record = result.pipeline.records[-1]
    gm = result.graph.module
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in gm.modules())
    assert any("nn.MultiheadAttention split into its q/k/v/out Linear layers" in e for e in record.explanations)
    assert record.stats["int8_macs_share"] >= 0.8 and record.cosine >= 0.99 and record.verified
    # q * scale: the scale is a one-element constant; that product is no int8 layer and reads no fake quant
    scaled = [n for n in gm.graph.nodes if n.target is operator.mul and any(
        a.op == "get_attr" for a in n.args if isinstance(a, torch.fx.Node))]
    assert scaled and not any(is_fake_quant(a) for n in scaled for a in n.args
                              if isinstance(a, torch.fx.Node) and a.op == "get_attr")
    assert all(not any(is_fake_quant(a) and a.args[0].op == "get_attr" for a in n.all_input_nodes) for n in scaled)


def test_swin_patch_merging_slices_keep_their_grid_in_int8_tflite(registry, tmp_path):
    pytest.importorskip("litert_torch")
    result = _quantized(registry, "swin_tiny", "tflite", tmp_path)
    gm = result.graph.module
    merges = [n for n in gm.graph.nodes if n.target is torch.cat and len(n.args[0]) == 4]   # 2x2 neighbours
    for fq in (a for n in merges for a in n.args[0]):    # slice -> fake quant on the grid of what it slices
        piece = fq.args[0]
        assert is_fake_quant(fq) and piece.target is operator.getitem and is_fake_quant(piece.args[0])
        assert fq.args[1:] == piece.args[0].args[1:]
    (check,) = result.artifacts
    assert result.ok and check.artifact.meta["precision"] == "int8" and check.vs_graph.cosine > 0.999
