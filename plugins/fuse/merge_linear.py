"""Linear -> Linear => Linear (W2 W1, W2 b1 + b2 in float64), when the one layer takes fewer
MACs than the two: in*out1 + out1*out2 > in*out2."""
from __future__ import annotations

import copy
import math

import torch
import torch.fx as fx
import torch.nn as nn

import graphopt
from graphopt import Effect, Pass
from graphopt.rewrite import Builder, Rewrite, rewrite_pass, shape

from .layers import other_uses, plain_base, why_not_absorbed


def _is_linear(gm: fx.GraphModule, value) -> bool:
    """A call of a Linear module on one positional argument."""
    return isinstance(value, fx.Node) and value.op == "call_module" and len(value.args) == 1 \
        and not value.kwargs and isinstance(gm.get_submodule(value.target), nn.Linear)


def _matches(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A Linear module call reading a Linear module call's output."""
    return _is_linear(gm, node) and _is_linear(gm, node.args[0])


def _macs(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int]:
    """MACs of the two layers as they are and of the merged one, for the recorded shapes."""
    first, second = gm.get_submodule(node.args[0].target), gm.get_submodule(node.target)
    rows = math.prod(shape(node)[:-1])
    return (rows * (first.in_features * first.out_features + second.in_features * second.out_features),
            rows * first.in_features * second.out_features)


def _check(gm: fx.GraphModule, node: fx.Node) -> str | None:
    reason = why_not_absorbed(gm, node.args[0], node)
    if reason:
        return reason
    second = gm.get_submodule(node.target)
    if plain_base(second) is None:
        return f"{node.name} ({type(second).__name__}) computes more than a layer: it has its own forward"
    uses = other_uses(gm, node, second)
    if uses:
        return f"{node.name}'s module is shared: also used by {', '.join(uses)}"
    first = gm.get_submodule(node.args[0].target)
    if first.weight.dtype != second.weight.dtype:
        return f"{node.args[0].name} holds {first.weight.dtype}, {node.name} {second.weight.dtype}"
    before, after = _macs(gm, node)
    if after >= before:
        return (f"one Linear({first.in_features}, {second.out_features}) would take {after} MACs, "
                f"the two ({first.in_features}->{first.out_features}->{second.out_features}) take {before}")
    return None


def _merged(first: nn.Linear, second: nn.Linear) -> nn.Linear:
    """One Linear computing ``second(first(x))``; the math runs in float64."""
    w1, w2 = first.weight.detach().double(), second.weight.detach().double()
    b1 = first.bias.detach().double() if first.bias is not None else torch.zeros(w1.shape[0], dtype=torch.float64)
    b2 = second.bias.detach().double() if second.bias is not None else torch.zeros(w2.shape[0], dtype=torch.float64)
    merged = copy.deepcopy(second)
    merged.in_features = first.in_features
    merged.weight = nn.Parameter((w2 @ w1).to(second.weight), second.weight.requires_grad)
    merged.bias = nn.Parameter((w2 @ b1 + b2).to(second.weight), second.weight.requires_grad)
    return merged


def _merge(b: Builder, node: fx.Node) -> str:
    first_node = node.args[0]
    first, second = b.gm.get_submodule(first_node.target), b.gm.get_submodule(node.target)
    before, after = _macs(b.gm, node)
    merged = b.module(node.target, _merged(first, second), b(first_node.args[0]))
    b.substitute(node, merged)
    b.gm.graph.erase_node(first_node)
    return (f"merged {first_node.name} -> {node.name} into one Linear({first.in_features}, "
            f"{second.out_features}): {before} -> {after} MACs")


REWRITES = [Rewrite("merged", _matches, _check, _merge)]

run = rewrite_pass(REWRITES)


@graphopt.hookimpl
def graphopt_register_passes():
    return [Pass("merge-linear", "Merge two consecutive Linear layers into one when that takes fewer MACs",
                 run, Effect.EXACT)]
