"""nn.MultiheadAttention => q/k/v Linear + softmax(q*scale @ k^T [+ mask]) @ v + out Linear;
F.scaled_dot_product_attention => softmax(q*scale @ k^T [+ mask]) @ v.

onnx2tf fails on both exports (on the scale they compute from the shape, Shape -> Sqrt -> Div
-> Mul, and on MultiheadAttention's sequence-first transposes); the explicit form has static
shapes and its scale as a tensor constant.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.rewrite import Builder, Rewrite, calls, dtype, shape


def attention(b: Builder, q: fx.Proxy, k: fx.Proxy, v: fx.Proxy, scale: float, like: fx.Node,
              mask: fx.Proxy | None = None) -> fx.Proxy:
    """softmax(q*scale @ k^T [+ mask]) @ v."""
    scores = (q * b.const(scale, like)) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1) @ v


def _arguments(gm: fx.GraphModule, node: fx.Node) -> dict:
    return node.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs


def _mask_problem(mask) -> str | None:
    if mask is not None and dtype(mask) == torch.bool:
        return "its attn_mask is boolean (only additive float masks are rewritten)"
    return None


# ------------------------------------------------------------------ MultiheadAttention

def _is_mha(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MultiheadAttention)


def _check_mha(gm: fx.GraphModule, node: fx.Node) -> str | None:
    mha, kw = gm.get_submodule(node.target), _arguments(gm, node)
    if mha.training and mha.dropout > 0:
        return "the module is in training mode with dropout"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "the module has add_bias_kv or add_zero_attn"
    if kw["key_padding_mask"] is not None or kw["is_causal"]:
        return "it is called with a key_padding_mask or is_causal=True"
    if any(len(shape(kw[n]) or ()) != 3 for n in ("query", "key", "value")):
        return "its query, key or value is not batched 3-D"
    for user in node.users:
        if not calls(user, [operator.getitem]) or user.args[1] not in (0, 1):
            return f"its output tuple is used whole by {user.name}"
        if user.args[1] == 1 and user.users:
            return f"its attention weights are used by {', '.join(u.name for u in user.users)}"
    mask = kw["attn_mask"]
    if mask is not None and len(shape(mask) or ()) not in (2, 3):
        return f"its attn_mask has shape {shape(mask)}"
    return _mask_problem(mask)


def _projections(mha: nn.MultiheadAttention) -> list[nn.Linear]:
    """The q, k and v projections of ``mha`` as Linear layers (copies of its weights)."""
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        weights = mha.in_proj_weight.detach().split(e)
    else:
        weights = [w.detach() for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)]
    biases = mha.in_proj_bias.detach().split(e) if mha.in_proj_bias is not None else [None] * 3
    out = []
    for w, bias in zip(weights, biases):
        layer = nn.Linear(w.shape[1], e, bias=bias is not None).to(w)
        with torch.no_grad():
            layer.weight.copy_(w)
            if bias is not None:
                layer.bias.copy_(bias)
        out.append(layer)
    return out


def _replace_mha(b: Builder, node: fx.Node) -> str:
    mha, kw = b.gm.get_submodule(node.target), _arguments(b.gm, node)
    heads, e = mha.num_heads, mha.embed_dim
    seq = 1 if mha.batch_first else 0
    batch = shape(kw["query"])[1 - seq]
    lengths = [shape(kw[n])[seq] for n in ("query", "key", "value")]
    out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None).to(mha.out_proj.weight)
    out_proj.load_state_dict(mha.out_proj.state_dict())
    b.gm.add_submodule(node.target, nn.Module())
    split = []
    for role, layer, length in zip(("query", "key", "value"), _projections(mha), lengths):
        x = b(kw[role]) if mha.batch_first else b(kw[role]).transpose(0, 1)
        x = b.module(f"{node.target}.{role[0]}_proj", layer, x)
        split.append(x.reshape(batch, length, heads, e // heads).transpose(1, 2))
    mask = kw["attn_mask"]
    if mask is not None:
        mask = b(mask) if len(shape(mask)) == 2 else b(mask).reshape(batch, heads, *shape(mask)[1:])
    y = attention(b, *split, (e // heads) ** -0.5, kw["query"], mask)
    y = b.module(f"{node.target}.out_proj", out_proj, y.transpose(1, 2).reshape(batch, lengths[0], e))
    y = y if mha.batch_first else y.transpose(0, 1)
    for user in list(node.users):
        if user.args[1] == 0:
            b.substitute(user, y)
        else:
            b.gm.graph.erase_node(user)
    b.gm.graph.erase_node(node)
    return f"MultiheadAttention({heads} heads) -> Linear q/k/v, matmul, softmax, matmul, Linear"


# -------------------------------------------------------------- scaled_dot_product_attention

def _check_sdpa(gm: fx.GraphModule, node: fx.Node) -> str | None:
    kw = _arguments(gm, node)
    if kw["dropout_p"] or kw["is_causal"] or kw["enable_gqa"]:
        return "it is called with dropout_p, is_causal or enable_gqa"
    return _mask_problem(kw["attn_mask"])


def _replace_sdpa(b: Builder, node: fx.Node) -> str:
    kw = _arguments(b.gm, node)
    scale = kw["scale"] if kw["scale"] is not None else shape(kw["query"])[-1] ** -0.5
    mask = b(kw["attn_mask"]) if kw["attn_mask"] is not None else None
    b.substitute(node, attention(b, b(kw["query"]), b(kw["key"]), b(kw["value"]), scale, node, mask))
    return "scaled_dot_product_attention -> matmul, softmax, matmul"


REWRITES = [
    Rewrite("multihead_attention", _is_mha, _check_mha, _replace_mha),
    Rewrite("sdpa", lambda gm, n: calls(n, [F.scaled_dot_product_attention]), _check_sdpa, _replace_sdpa),
]


def split_multihead_attention(gm: fx.GraphModule, ctx) -> list[str]:
    """In place: every nn.MultiheadAttention => its q/k/v/out Linear layers and the attention
    matmuls (``REWRITES[0]``), for the features that work on Linear layers (prune follows their
    channels, quantize gives them int8 kernels). Returns the modules split."""
    from graphopt.rewrite import apply as rewrite

    names = [n.target for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.MultiheadAttention)]
    if not names:
        return []
    rewrite(gm, ctx, REWRITES[:1])
    gm.delete_all_unused_submodules()
    gm.recompile()
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    return [t for t in names if t not in called]
