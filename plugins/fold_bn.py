"""Conv -> BatchNorm => Conv; ConvTranspose -> BatchNorm => ConvTranspose; Linear -> BN1d => Linear."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

import graphopt
from graphopt import Effect, Pass, PassContext, PassResult

_Conv = nn.modules.conv._ConvNd
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"


def _match(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, nn.Module, nn.Module] | None:
    """The pattern: a BatchNorm module node and the node it reads. Returns (layer node, layer, bn)."""
    if node.op != "call_module":
        return None
    bn = gm.get_submodule(node.target)
    if not isinstance(bn, _BATCHNORMS) or len(node.args) != 1 or node.kwargs \
            or not isinstance(node.args[0], fx.Node):
        return None
    layer_node = node.args[0]
    layer = gm.get_submodule(layer_node.target) if layer_node.op == "call_module" else None
    return layer_node, layer, bn


def _other_uses(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> list[str]:
    """Nodes other than ``node`` that call ``module`` or read one of its parameters."""
    def owner(n: fx.Node) -> str:
        return n.target if n.op == "call_module" else n.target.rpartition(".")[0]
    return [n.name for n in gm.graph.nodes if n is not node and n.op in ("call_module", "get_attr")
            and gm.get_submodule(owner(n)) is module]


def _reject(gm: fx.GraphModule, layer_node: fx.Node, layer: nn.Module | None,
            bn_node: fx.Node, bn: nn.Module) -> str | None:
    """The check: why folding ``bn_node`` into ``layer_node`` would be wrong (None: fold it)."""
    if not isinstance(layer, (_Conv, nn.Linear)):
        return (f"{layer_node.name} ({_describe(gm, layer_node)}) is not a Conv, ConvTranspose "
                f"or Linear module")
    if bn.training:
        return f"{bn_node.name} is in training mode (it normalizes with batch statistics)"
    if bn.running_mean is None or bn.running_var is None:
        return f"{bn_node.name} has no running stats (track_running_stats=False)"
    others = [u.name for u in layer_node.users if u is not bn_node]
    if others:
        return f"{layer_node.name}'s output is also used by {', '.join(others)}"
    uses = _other_uses(gm, layer_node, layer)
    if uses:
        return f"{layer_node.name}'s module is shared: also used by {', '.join(uses)}"
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if channels != bn.num_features:
        return (f"{layer_node.name} has {channels} output channels, {bn_node.name} normalizes "
                f"{bn.num_features}")
    shape = layer_node.meta.get("graphopt.shape")
    rank = 2 if isinstance(layer, nn.Linear) else len(layer.kernel_size) + 2
    if shape is None or len(shape) != rank:
        return (f"{bn_node.name} normalizes dim 1 of {layer_node.name}'s output of shape {shape}, "
                f"which is not its channel dim (batched rank {rank} expected)")
    return None


def _folded(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` computing ``bn(layer(x))`` in eval mode; the math runs in float64."""
    weight = layer.weight.detach().double()
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale = scale * bn.weight.detach().double()
        shift = shift * bn.weight.detach().double() + bn.bias.detach().double()
    if isinstance(layer, _Conv) and layer.transposed:   # weight (in, out/groups, *k)
        g = layer.groups
        grouped = weight.reshape(g, weight.shape[0] // g, *weight.shape[1:])
        weight = (grouped * scale.reshape(g, 1, -1, *[1] * (weight.dim() - 2))).reshape(weight.shape)
    else:                                                # weight (out, in/groups, *k)
        weight = weight * scale.reshape(-1, *[1] * (weight.dim() - 1))
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    new = copy.deepcopy(layer)
    new.weight = nn.Parameter(weight.to(layer.weight), layer.weight.requires_grad)
    new.bias = nn.Parameter((bias * scale + shift).to(layer.weight), layer.weight.requires_grad)
    return new


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    stats = {"folded": 0, "rejected": 0}
    for bn_node in list(gm.graph.nodes):
        match = _match(gm, bn_node)
        if match is None:
            continue
        layer_node, layer, bn = match
        where = f"{layer_node.name} -> {bn_node.name}"
        reason = _reject(gm, layer_node, layer, bn_node, bn)
        if reason:
            stats["rejected"] += 1
            ctx.explain(f"{where}: not folded, {reason}")
            continue
        gm.add_submodule(layer_node.target, _folded(layer, bn))
        bn_node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(bn_node)
        stats["folded"] += 1
        ctx.explain(f"{where}: folded {type(bn).__name__} into {type(layer).__name__}")
    gm.delete_all_unused_submodules()
    gm.recompile()
    return PassResult(gm, stats["folded"] > 0, stats)


@graphopt.hookimpl
def graphopt_register_passes():
    return [Pass("fold-bn", "Fold eval-mode BatchNorm into the Conv, ConvTranspose or Linear before it",
                 run, Effect.EXACT, default_order=20)]
