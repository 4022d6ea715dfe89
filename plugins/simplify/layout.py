"""permute / transpose -> its inverse => x; reshape-like -> reshape back to x's shape => x;
reshape-like -> reshape => one reshape. (reshape-like: reshape, view, flatten, squeeze, unsqueeze.)"""
from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.fxutil import erase_if_unused
from graphopt.rewrite import Builder, Rewrite, argument, calls, shape

_RESHAPES = ([torch.reshape], ["reshape", "view"])
_RESHAPE_LIKE = ([torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze],
                 ["reshape", "view", "flatten", "squeeze", "unsqueeze"])


def _ints(values) -> list[int] | None:
    return list(values) if all(isinstance(v, int) and not isinstance(v, bool) for v in values) else None


def _permutation(node) -> list[int] | None:
    """The dims ``node`` (permute, transpose, t) puts in each place, None when it is none of these."""
    rank = len(shape(node.args[0]) or ()) if isinstance(node, fx.Node) and node.args else 0
    if not rank or node.kwargs:
        return None
    if calls(node, [torch.permute], ["permute"]):
        dims = _ints(node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
                     else node.args[1:])
        return [d % rank for d in dims] if dims is not None and len(dims) == rank else None
    if calls(node, [torch.transpose], ["transpose"]) and _ints(node.args[1:]) and len(node.args) == 3:
        a, b = (d % rank for d in node.args[1:])
        order = list(range(rank))
        order[a], order[b] = b, a
        return order
    if calls(node, [torch.t], ["t"]) and len(node.args) == 1:
        return list(reversed(range(rank)))
    return None


def _is_permute_pair(gm: fx.GraphModule, node: fx.Node) -> bool:
    return _permutation(node) is not None and _permutation(node.args[0]) is not None


def _check_permute_pair(gm: fx.GraphModule, node: fx.Node) -> str | None:
    inner, outer = _permutation(node.args[0]), _permutation(node)
    composed = [inner[d] for d in outer]
    if composed != sorted(composed):
        return f"it does not undo {node.args[0].name}: together they order the dims {composed}"
    return None


def _remove_permute_pair(b: Builder, node: fx.Node) -> str:
    inner = node.args[0]
    b.substitute(node, inner.args[0])
    erase_if_unused(b.gm, inner)
    return f"undoes {inner.name}: both removed"


def _target(node: fx.Node) -> list | None:
    """The shape a reshape or view node asks for (ints and size nodes), None for view(dtype)."""
    if not calls(node, *_RESHAPES) or node.kwargs or len(node.args) < 2:
        return None
    target = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
    return list(target) if all(isinstance(v, (int, fx.Node)) for v in target) else None


def _is_reshape_chain(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A reshape (or view) of a reshape-like node's output."""
    inner = argument(node, 0, "input")
    return _target(node) is not None and isinstance(inner, fx.Node) and calls(inner, *_RESHAPE_LIKE) \
        and (not calls(inner, *_RESHAPES) or _target(inner) is not None)


def _cancels(node: fx.Node) -> bool:
    """``node`` gives back the shape of the input of the reshape before it, whatever the batch
    (its target has no -1: it is literally that shape)."""
    source = argument(node.args[0], 0, "input")
    return shape(node) == shape(source) and -1 not in _target(node)


def _check_reshape_chain(gm: fx.GraphModule, node: fx.Node) -> str | None:
    inner = node.args[0]
    others = [u.name for u in inner.users if u is not node]
    if others and not _cancels(node):
        return f"{inner.name} is also used by {', '.join(others)}: one reshape would save nothing"
    return None


def _collapse_reshape_chain(b: Builder, node: fx.Node) -> str:
    inner = node.args[0]
    source = argument(inner, 0, "input")
    if _cancels(node):
        what = f"reshapes {inner.name}'s input back to its shape {shape(source)}: both removed"
        b.substitute(node, source)
    else:
        what = f"{inner.name} and it => one reshape to {shape(node)}"
        b.substitute(node, b(source).reshape(*(b(v) if isinstance(v, fx.Node) else v for v in _target(node))))
    erase_if_unused(b.gm, inner)
    return what


REWRITES = [Rewrite("inverse_permute", _is_permute_pair, _check_permute_pair, _remove_permute_pair),
            Rewrite("reshape_chain", _is_reshape_chain, _check_reshape_chain, _collapse_reshape_chain)]
