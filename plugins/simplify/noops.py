"""x * 1, 1 * x, x / 1, x + 0, 0 + x, x - 0 => x (same shape and dtype); x.contiguous() of a
contiguous x, x.clone(), x.detach(), x.to(x's own dtype) => x."""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.fx as fx

from graphopt.fxutil import arithmetic, erase_if_unused, writes_in_place
from graphopt.graph import annotate
from graphopt.rewrite import Builder, Rewrite, calls, shape

_IDENTITY = {"*": (1, "either"), "/": (1, "right"), "+": (0, "either"), "-": (0, "right")}
_CASTS = ["to", "type", "float", "double", "half", "int", "long"]
_COPIES = {"contiguous": ([], ["contiguous"]), "clone": ([torch.clone], ["clone"]),
           "detach": ([torch.detach], ["detach"]), "cast": ([], _CASTS)}
CONTIGUOUS = "graphopt.contiguous"   # node.meta key: the value was contiguous for the example inputs


def note_contiguity(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    """Record in ``node.meta`` which values are contiguous, when some node asks for contiguity."""
    if any(calls(n, methods=["contiguous"]) for n in gm.graph.nodes):
        annotate(gm, inputs, record=lambda n, v: n.meta.__setitem__(CONTIGUOUS, v.is_contiguous())
                 if isinstance(v, torch.Tensor) else None)


def _is_identity(gm: fx.GraphModule, value, neutral: int) -> bool:
    """``value`` is the number ``neutral`` or a stored tensor holding only that number."""
    if isinstance(value, fx.Node):
        if value.op != "get_attr":
            return False
        value = functools.reduce(getattr, value.target.split("."), gm)
        return isinstance(value, torch.Tensor) and bool((value == neutral).all())
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == neutral


def _kept_operand(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, object] | None:
    """(x, the neutral operand) when ``node`` is x op neutral (or neutral op x for * and +)."""
    symbol = arithmetic(node)
    if symbol is None:
        return None
    neutral, side = _IDENTITY[symbol]
    a, b = node.args
    if isinstance(a, fx.Node) and _is_identity(gm, b, neutral):
        return a, b
    if side == "either" and isinstance(b, fx.Node) and _is_identity(gm, a, neutral):
        return b, a
    return None


def _writers(gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> str | None:
    """Why ``node``, a fresh copy of ``x``, must stay a copy: something writes one of them in place."""
    writers = [u.name for u in [*node.users, *x.users] if u is not node and writes_in_place(gm, u)]
    return f"{', '.join(writers)} may write in place, so the copy must stay" if writers else None


def _check_identity(gm: fx.GraphModule, node: fx.Node) -> str | None:
    x, _ = _kept_operand(gm, node)
    if shape(node) != shape(x):
        return f"it broadcasts {x.name} from {shape(x)} to {shape(node)}"
    if node.meta.get("graphopt.dtype") != x.meta.get("graphopt.dtype"):
        return f"it makes {x.name} {node.meta.get('graphopt.dtype')} (from {x.meta.get('graphopt.dtype')})"
    return _writers(gm, node, x)


def _remove_identity(b: Builder, node: fx.Node) -> str:
    x, neutral = _kept_operand(b.gm, node)
    b.substitute(node, x)
    if isinstance(neutral, fx.Node):
        erase_if_unused(b.gm, neutral)
    return f"{arithmetic(node)} {getattr(neutral, 'name', neutral)} removed: the identity"


def _copy_kind(node: fx.Node) -> str | None:
    return next((kind for kind, (functions, methods) in _COPIES.items() if calls(node, functions, methods)), None)


def _is_copy(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A copy or cast of a tensor node that gives a tensor."""
    return _copy_kind(node) is not None and bool(node.args) and isinstance(node.args[0], fx.Node) \
        and shape(node) is not None


def _check_copy(gm: fx.GraphModule, node: fx.Node) -> str | None:
    kind, x = _copy_kind(node), node.args[0]
    extra = sorted(set(node.kwargs) - {"dtype"})
    if extra or len(node.args) > (2 if kind == "cast" else 1):
        return f"it is called with {', '.join(extra) or 'more arguments'}"
    if len(node.args) == 2 and not isinstance(node.args[1], torch.dtype):
        return f"it converts to {node.args[1]}, not to a dtype"
    if kind == "contiguous":
        return None if x.meta.get(CONTIGUOUS) else f"{x.name} is not contiguous (for the example inputs)"
    if kind == "cast":
        before, after = x.meta.get("graphopt.dtype"), node.meta.get("graphopt.dtype")
        return None if after is not None and before == after else f"it converts {before} to {after}"
    return _writers(gm, node, x) if kind == "clone" else None


def _remove_copy(b: Builder, node: fx.Node) -> str:
    kind = _copy_kind(node)
    b.substitute(node, node.args[0])
    return f"{node.target if kind == 'cast' else kind} removed: {'same dtype' if kind == 'cast' else 'redundant'}"


REWRITES = [Rewrite("identity_arithmetic", lambda gm, n: _kept_operand(gm, n) is not None, _check_identity,
                    _remove_identity),
            Rewrite("redundant_copy", _is_copy, _check_copy, _remove_copy)]
