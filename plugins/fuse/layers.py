"""Conv, ConvTranspose and Linear layers for the passes that rewrite them: which are plain, who else
uses one, why a layer node cannot absorb what follows it, and a copy with a per-channel affine folded in."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.fxutil import describe

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
          nn.Linear)


def other_uses(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> list[str]:
    """Nodes other than ``node`` that call ``module`` or read one of its parameters."""
    owners = {n: n.target if n.op == "call_module" else n.target.rpartition(".")[0]   # the module called or read
              for n in gm.graph.nodes if n is not node and n.op in ("call_module", "get_attr")}
    return [n.name for n, owner in owners.items() if gm.get_submodule(owner) is module]


def plain_base(module: nn.Module) -> type | None:
    """The torch layer class ``module`` computes exactly (None: not a layer, or a subclass
    with its own forward, such as a fused module)."""
    base = next((c for c in type(module).__mro__ if c in LAYERS), None)
    return base if base is not None and type(module).forward is base.forward else None


def channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def channel_dim(layer: nn.Module) -> int:
    """The output dim holding the layer's channels: the last for Linear, 1 for convolutions."""
    return -1 if isinstance(layer, nn.Linear) else 1


def why_not_absorbed(gm: fx.GraphModule, layer_node: fx.Node, user: fx.Node) -> str | None:
    """Why ``layer_node``'s layer cannot absorb ``user``, the node reading its output
    (None: it can): not a plain layer, its output read elsewhere, or its module shared."""
    layer = gm.get_submodule(layer_node.target) if layer_node.op == "call_module" else None
    if not isinstance(layer, LAYERS):
        return (f"{layer_node.name} ({describe(gm, layer_node)}) is not a Conv, ConvTranspose "
                f"or Linear module")
    if plain_base(layer) is None:
        return f"{layer_node.name} ({type(layer).__name__}) computes more than a layer: it has its own forward"
    others = [u.name for u in layer_node.users if u is not user]
    if others:
        return f"{layer_node.name}'s output is also used by {', '.join(others)}"
    uses = other_uses(gm, layer_node, layer)
    if uses:
        return f"{layer_node.name}'s module is shared: also used by {', '.join(uses)}"
    return None


def with_affine(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    """A copy of ``layer`` computing ``layer(x) * scale + shift`` per output channel; the
    math runs in float64 (give ``scale`` and ``shift`` as float64 vectors)."""
    weight = layer.weight.detach().double()
    if isinstance(layer, nn.modules.conv._ConvNd) and layer.transposed:   # weight (in, out/groups, *k)
        g = layer.groups
        grouped = weight.reshape(g, weight.shape[0] // g, *weight.shape[1:])
        weight = (grouped * scale.reshape(g, 1, -1, *[1] * (weight.dim() - 2))).reshape(weight.shape)
    else:                                                                   # weight (out, in/groups, *k)
        weight = weight * scale.reshape(-1, *[1] * (weight.dim() - 1))
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    new = copy.deepcopy(layer)
    new.weight = nn.Parameter(weight.to(layer.weight), layer.weight.requires_grad)
    new.bias = nn.Parameter((bias * scale + shift).to(layer.weight), layer.weight.requires_grad)
    return new
