"""Subgraph that reads no input => its value, computed once: a buffer (tensors) or a literal
(numbers, dtypes, shapes)."""
from __future__ import annotations

import torch
import torch.fx as fx

from graphopt import PassContext
from graphopt.fxutil import describe, erase_if_unused, free_name, has_effect, writes_in_place

HOLDER = "folded_constants"     # submodule holding the folded tensors
MIN_LIMIT = 64 * 1024           # a folded tensor may always take this many bytes
_RANDOM = {"rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "normal",
           "bernoulli", "multinomial", "poisson", "empty", "empty_like", "empty_strided", "new_empty"}


def _random(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Gives a new value each call (random numbers, uninitialized memory, training-mode modules).
    In-place samplers (``uniform_``...) count as writes, see ``writes_in_place``."""
    if node.op == "call_module":
        return gm.get_submodule(node.target).training
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name in _RANDOM or "dropout" in name


def _constants(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value is the same on every call: computed from stored tensors that no node
    writes in place, deterministically and without side effects."""
    written = {n.target for n in gm.graph.nodes if n.op == "get_attr" and any(writes_in_place(gm, u) for u in n.users)}
    found: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "output") and all(n in found for n in node.all_input_nodes) \
                and not _random(gm, node) and not has_effect(gm, node) \
                and not (node.op == "get_attr" and node.target in written):
            found.add(node)
    return found


def _stored_bytes(node: fx.Node, values: dict) -> int:
    """Bytes of the stored tensors (get_attr) ``node`` is computed from."""
    stack, seen, total = [node], set(), 0
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr" and isinstance(values[n], torch.Tensor):
            total += values[n].numel() * values[n].element_size()
        stack.extend(n.all_input_nodes)
    return total


def _literal(value) -> bool:
    if isinstance(value, (bool, int, float, torch.dtype)) or value is None:
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float)) for v in value)


def _check(gm: fx.GraphModule, node: fx.Node, values: dict) -> str | None:
    writers = [u.name for u in node.users if writes_in_place(gm, u)]
    if writers:
        return f"{', '.join(writers)} may write it in place, so it must be fresh each call"
    value = values[node]
    if not isinstance(value, torch.Tensor):
        return None if _literal(value) else f"its value is a {type(value).__name__}, not a tensor or a number"
    size, stored = value.numel() * value.element_size(), _stored_bytes(node, values)
    if size > max(stored, MIN_LIMIT):
        return (f"its value would store {size} bytes, more than the {stored} bytes it is computed from "
                f"(and than {MIN_LIMIT})")
    return None


def _fold(gm: fx.GraphModule, node: fx.Node, value) -> str:
    if isinstance(value, torch.Tensor):
        if not hasattr(gm, HOLDER):
            gm.add_submodule(HOLDER, torch.nn.Module())
        holder = gm.get_submodule(HOLDER)
        name = free_name(holder, node.name)
        holder.register_buffer(name, value.detach().clone().contiguous())
        with gm.graph.inserting_before(node):
            node.replace_all_uses_with(gm.graph.get_attr(f"{HOLDER}.{name}"))
        what = f"buffer {HOLDER}.{name} of shape {tuple(value.shape)}"
    else:
        value = tuple(value) if isinstance(value, tuple) else value   # torch.Size prints as a tuple
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)
        what = f"the literal {value!r}"
    erase_if_unused(gm, node)
    return f"computed once from constants: {what}"


def fold_constants(gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
    """Replace each constant node that a non-constant node (or the output) reads by its value."""
    constants = _constants(gm)
    frontier = [n for n in gm.graph.nodes if n in constants and n.op != "get_attr"
                and any(u not in constants for u in n.users)]
    random = [n for n in gm.graph.nodes if n not in constants and n.op.startswith("call")
              and all(i in constants for i in n.all_input_nodes) and _random(gm, n)]
    stats = {"constant": 0, "rejected": len(random)}
    for node in random:
        ctx.explain(f"{node.name}: kept, {describe(gm, node)} gives a new value each call")
    interpreter = fx.Interpreter(gm)
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node in constants:
                interpreter.env[node] = interpreter.run_node(node)
    for node in frontier:
        name = node.name
        reason = _check(gm, node, interpreter.env)
        if reason:
            stats["rejected"] += 1
            ctx.explain(f"{name}: kept, {reason}")
            continue
        ctx.explain(f"{name}: {_fold(gm, node, interpreter.env[node])}")
        stats["constant"] += 1
    return stats
