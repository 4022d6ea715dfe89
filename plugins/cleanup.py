"""Dropout (eval) => x; Identity => x; unused node, submodule or attribute => removed."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt import Effect, Pass, PassContext, PassResult
from graphopt.fxutil import delete_unread_attributes, describe, has_effect

_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                      F.feature_alpha_dropout, torch.dropout, torch.alpha_dropout,
                      torch.feature_dropout, torch.feature_alpha_dropout}


def _kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """``"dropout"`` or ``"identity"`` when ``node`` is one (in any mode), else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.modules.dropout._DropoutNd):
            return "dropout"
        return "identity" if isinstance(module, nn.Identity) else None
    return "dropout" if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS else None


def _why_kept(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why a dropout node is not the identity (it is random), or None when it is."""
    if node.op == "call_module":
        return "the module is in training mode" if gm.get_submodule(node.target).training else None
    args = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    kwargs = args.kwargs if args else {}
    training = kwargs.get("training", kwargs.get("train"))
    if training is False or kwargs.get("p") == 0:
        return None
    return f"it is called with training={training}"


def _label(gm: fx.GraphModule, node: fx.Node) -> str:
    return f"{node.name} ({describe(gm, node)})"


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    stats = {"dropout": 0, "identity": 0, "dead": 0}
    for node in list(gm.graph.nodes):
        kind = _kind(gm, node)
        if kind is None:
            continue
        reason = _why_kept(gm, node) if kind == "dropout" else None
        if reason:
            ctx.explain(f"{_label(gm, node)}: kept, {reason}: it is random, not the identity")
            continue
        ctx.explain(f"{_label(gm, node)}: removed, the identity in eval mode")
        node.replace_all_uses_with(node.args[0] if node.args else node.kwargs["input"])
        gm.graph.erase_node(node)
        stats[kind] += 1
    read: list[str] = []
    for node in reversed(gm.graph.nodes):
        if not node.users and not has_effect(gm, node):
            ctx.explain(f"{_label(gm, node)}: removed, its result is unused")
            if node.op == "get_attr":
                read.append(node.target)
            gm.graph.erase_node(node)
            stats["dead"] += 1
    delete_unread_attributes(gm, read)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return PassResult(gm, any(stats.values()), stats)


@graphopt.hookimpl
def graphopt_register_passes():
    return [Pass("cleanup", "Remove eval-mode dropout, nn.Identity and unused nodes, submodules and "
                            "attributes", run, Effect.EXACT, default_order=10)]
