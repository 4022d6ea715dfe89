"""Conv -> BatchNorm => Conv; ConvTranspose -> BatchNorm => ConvTranspose; Linear -> BN1d => Linear."""
from __future__ import annotations

from typing import Callable

import torch.fx as fx
import torch.nn as nn

import graphopt
from graphopt import Effect, Pass, PassContext, PassResult

from .layers import channels, why_not_absorbed, with_affine

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _match(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, nn.Module] | None:
    """The pattern: a BatchNorm module node and the node it reads. Returns (layer node, bn)."""
    if node.op != "call_module":
        return None
    bn = gm.get_submodule(node.target)
    if not isinstance(bn, _BATCHNORMS) or len(node.args) != 1 or node.kwargs \
            or not isinstance(node.args[0], fx.Node):
        return None
    return node.args[0], bn


def _reject(gm: fx.GraphModule, layer_node: fx.Node, bn_node: fx.Node, bn: nn.Module) -> str | None:
    """The check: why folding ``bn_node`` into ``layer_node`` would be wrong (None: fold it)."""
    if bn.training:
        return f"{bn_node.name} is in training mode (it normalizes with batch statistics)"
    if bn.running_mean is None or bn.running_var is None:
        return f"{bn_node.name} has no running stats (track_running_stats=False)"
    reason = why_not_absorbed(gm, layer_node, bn_node)
    if reason:
        return reason
    layer = gm.get_submodule(layer_node.target)
    if channels(layer) != bn.num_features:
        return (f"{layer_node.name} has {channels(layer)} output channels, {bn_node.name} normalizes "
                f"{bn.num_features}")
    shape = layer_node.meta.get("graphopt.shape")
    rank = 2 if isinstance(layer, nn.Linear) else len(layer.kernel_size) + 2
    if shape is None or len(shape) != rank:
        return (f"{bn_node.name} normalizes dim 1 of {layer_node.name}'s output of shape {shape}, "
                f"which is not its channel dim (batched rank {rank} expected)")
    return None


def _folded(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` computing ``bn(layer(x))`` in eval mode; the math runs in float64."""
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale = scale * bn.weight.detach().double()
        shift = shift * bn.weight.detach().double() + bn.bias.detach().double()
    return with_affine(layer, scale, shift)


def fold_batchnorms(gm: fx.GraphModule, explain: Callable[[str], None]) -> dict[str, int]:
    """Fold every BatchNorm the checks allow into the layer before it, in place; ``explain``
    hears each candidate. Returns counts; the caller recompiles. Shared with ``quantize``,
    whose int8 layers take Conv+BatchNorm as one."""
    stats = {"folded": 0, "rejected": 0}
    for bn_node in list(gm.graph.nodes):
        match = _match(gm, bn_node)
        if match is None:
            continue
        layer_node, bn = match
        where = f"{layer_node.name} -> {bn_node.name}"
        reason = _reject(gm, layer_node, bn_node, bn)
        if reason:
            stats["rejected"] += 1
            explain(f"{where}: not folded, {reason}")
            continue
        layer = gm.get_submodule(layer_node.target)
        gm.add_submodule(layer_node.target, _folded(layer, bn))
        bn_node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(bn_node)
        stats["folded"] += 1
        explain(f"{where}: folded {type(bn).__name__} into {type(layer).__name__}")
    gm.delete_all_unused_submodules()
    return stats


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    stats = fold_batchnorms(gm, ctx.explain)
    gm.recompile()
    return PassResult(gm, stats["folded"] > 0, stats)


@graphopt.hookimpl
def graphopt_register_passes():
    return [Pass("fold-bn", "Fold eval-mode BatchNorm into the Conv, ConvTranspose or Linear before it",
                 run, Effect.EXACT, default_order=20)]
