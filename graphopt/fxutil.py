"""fx facts and edits the built-in passes share: how a node reads in an explanation, which arithmetic it does,
whether it has side effects, a free attribute name, erasing what nothing reads any more."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

_ARITHMETIC = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
               torch.add: "+", torch.sub: "-", torch.mul: "*", torch.div: "/"}
_ARITHMETIC_METHODS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """``Conv2d`` for a module call, else ``call_function relu`` and the like."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"


def arithmetic(node: fx.Node) -> str | None:
    """``+ - * /`` when ``node`` is that binary op (two arguments, no keywords), else None."""
    if node.kwargs or len(node.args) != 2 or node.op not in ("call_function", "call_method"):
        return None
    return (_ARITHMETIC if node.op == "call_function" else _ARITHMETIC_METHODS).get(node.target)


def has_effect(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when ``node`` must stay even if unused: impure per fx, or it writes in place."""
    return node.is_impure() or writes_in_place(gm, node)


def writes_in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` is an in-place call: ``relu_``, ``inplace=True``, a module with ``inplace=True``."""
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    if node.op not in ("call_function", "call_method"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return True
    args = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True) if node.op == "call_function" else None
    return args is not None and args.kwargs.get("inplace") is True


def free_name(module: nn.Module, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... whichever ``module`` has no attribute of yet."""
    name, i = base, 0
    while hasattr(module, name):
        i += 1
        name = f"{base}_{i}"
    return name


def delete_unread_attributes(gm: fx.GraphModule, targets: list[str]) -> None:
    """Delete the attributes removed get_attr nodes read (parameters, buffers) that no node uses now."""
    used = [n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")]
    for target in dict.fromkeys(targets):
        if not any(u == target or u.startswith(f"{target}.") or target.startswith(f"{u}.") for u in used):
            owner, _, name = target.rpartition(".")
            delattr(gm.get_submodule(owner), name)


def erase_if_unused(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase ``node`` and then its inputs while nothing reads them and they have no effect;
    attributes the erased get_attr nodes read are deleted when no node uses them now."""
    read, stack, erased = [], [node], set()
    while stack:
        n = stack.pop()
        if n in erased or n.users or n.op in ("placeholder", "output") or has_effect(gm, n):
            continue
        if n.op == "get_attr":
            read.append(n.target)
        stack.extend(n.all_input_nodes)
        gm.graph.erase_node(n)
        erased.add(n)
    delete_unread_attributes(gm, read)


def input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes an input reaches; the rest of the graph is constant (freezing folds it)."""
    reached: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in reached for a in n.all_input_nodes):
            reached.add(n)
    return reached
