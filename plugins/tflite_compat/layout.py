"""unbind(x, d)[i] => x.select(d, i); flatten(2) -> transpose(1, 2) of NCHW =>
permute(0, 2, 3, 1) -> reshape(N, H*W, C); expand => x (a no-op) or repeat.

What onnx2tf gets wrong otherwise: Split of a 5-D qkv becomes FlexSplitV; tokens made by
Reshape on NCHW come out in the wrong layout (the next MatMul or Add fails); after an Expand
the shape is unknown and a LayerNorm on it fails to build.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from graphopt.rewrite import Builder, Rewrite, argument, calls, never_rejects, shape


def _is_unbind(gm: fx.GraphModule, node: fx.Node) -> bool:
    return calls(node, [torch.unbind], ["unbind"])


def _check_unbind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    others = [u.name for u in node.users if not (calls(u, [operator.getitem]) and isinstance(u.args[1], int))]
    return f"its result is used as a sequence by {', '.join(others)}" if others else None


def _replace_unbind(b: Builder, node: fx.Node) -> str:
    x, dim = b(argument(node, 0, "input")), argument(node, 1, "dim", 0)
    for user in list(node.users):
        b.substitute(user, x.select(dim, user.args[1]))
    b.gm.graph.erase_node(node)
    return f"unbind({dim}) -> select per part"


def _is_flatten_hw(gm: fx.GraphModule, node: fx.Node) -> bool:
    """flatten(start_dim=2) of a 4-D tensor: (N, C, H, W) -> (N, C, H*W)."""
    return calls(node, [torch.flatten], ["flatten"]) and len(shape(argument(node, 0, "input")) or ()) == 4 \
        and argument(node, 1, "start_dim", 0) == 2 and argument(node, 2, "end_dim", -1) in (-1, 3)


def _swaps_last_two(node: fx.Node) -> bool:
    """``node`` is transpose(1, 2) (any spelling) or permute(0, 2, 1) of a 3-D tensor."""
    if calls(node, [torch.transpose], ["transpose"]):
        return {d % 3 for d in node.args[1:3]} == {1, 2}
    if not calls(node, [torch.permute], ["permute"]):
        return False
    dims = node.args[1] if len(node.args) == 2 else node.args[1:]
    return isinstance(dims, (tuple, list)) and [d % 3 for d in dims] == [0, 2, 1]


def _check_tokens(gm: fx.GraphModule, node: fx.Node) -> str | None:
    users = list(node.users)
    if len(users) != 1 or not _swaps_last_two(users[0]):
        return f"its result is read by {', '.join(u.name for u in users)}, not by one transpose(1, 2)"
    return None


def _replace_tokens(b: Builder, node: fx.Node) -> str:
    x = argument(node, 0, "input")
    n, c, h, w = shape(x)
    (transpose,) = node.users
    b.substitute(transpose, b(x).permute(0, 2, 3, 1).reshape(n, h * w, c))
    b.gm.graph.erase_node(node)
    return "flatten(2), transpose(1, 2) -> permute(0, 2, 3, 1), reshape"


def _replace_expand(b: Builder, node: fx.Node) -> str:
    source, target = shape(node.args[0]), shape(node)
    x = b(node.args[0])
    if source == target:
        b.substitute(node, x)
        return "expand to its own shape -> removed"
    padded = (1,) * (len(target) - len(source)) + source
    b.substitute(node, x.repeat(*(t // s for t, s in zip(target, padded))))
    return "expand -> repeat"


REWRITES = [
    Rewrite("unbind", _is_unbind, _check_unbind, _replace_unbind),
    Rewrite("patch_tokens", _is_flatten_hw, _check_tokens, _replace_tokens),
    Rewrite("expand", lambda gm, n: calls(n, methods=["expand", "expand_as"]), never_rejects, _replace_expand),
]
