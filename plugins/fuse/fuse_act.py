"""Conv -> [BatchNorm ->] ReLU / ReLU6 / Hardtanh / Hardswish => FusedConv; Linear -> [BatchNorm ->]
activation => FusedLinear; add -> ReLU => AddReLU. The fused node's meta["graphopt.fused"]
says what it holds, e.g. "conv+relu"."""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt import Effect, Pass
from graphopt.fused import FUSED, AddReLU
from graphopt.fxutil import describe, free_name
from graphopt.rewrite import Builder, Rewrite, argument, calls, rewrite_pass

from .layers import other_uses, plain_base, why_not_absorbed

_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6",
              F.hardtanh: "hardtanh", F.hardswish: "hardswish"}
_ADDS = (operator.add, torch.add)


def fused_layer(layer: nn.Module, act: nn.Module, bn: nn.Module | None = None) -> nn.Module:
    """A fused copy of ``layer`` (a plain Conv1d/2d/3d or Linear) computing ``act(bn(layer(x)))``;
    ``act`` should work in place (``inplace=True``): it only ever sees the layer's output."""
    fused = copy.deepcopy(layer)
    base = next(c for c in type(layer).__mro__ if c in FUSED)
    fused.__class__ = FUSED[base]   # the same attributes and parameters, the fused forward
    fused.bn = copy.deepcopy(bn) if bn is not None else nn.Identity()
    fused.act = act
    return fused


def _activation(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | None:
    """``(name, in-place module)`` of the activation ``node`` applies, None when it is none."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.ReLU6):
            return "relu6", nn.ReLU6(inplace=True)
        if isinstance(module, nn.Hardtanh):
            return "hardtanh", nn.Hardtanh(float(module.min_val), float(module.max_val), inplace=True)
        if isinstance(module, nn.ReLU):
            return "relu", nn.ReLU(inplace=True)
        return ("hardswish", nn.Hardswish(inplace=True)) if isinstance(module, nn.Hardswish) else None
    if calls(node, methods=["relu", "relu_"]):
        return "relu", nn.ReLU(inplace=True)
    name = _FUNCTIONS.get(node.target) if node.op == "call_function" else None
    if name == "hardtanh":
        low, high = argument(node, 1, "min_val", -1.0), argument(node, 2, "max_val", 1.0)
        if not all(isinstance(v, (int, float)) for v in (low, high)):
            return None
        return name, nn.Hardtanh(float(low), float(high), inplace=True)
    return (name, {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish}[name](inplace=True)) \
        if name else None


def _source(node: fx.Node) -> fx.Node | None:
    source = argument(node, 0, "input")
    return source if isinstance(source, fx.Node) else None


def _is_batchnorm(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm)


def _is_add(node: fx.Node) -> bool:
    return calls(node, _ADDS, ["add"]) and not node.kwargs and len(node.args) == 2


# ------------------------------------------------------------------ layer [-> bn] -> activation

def _layer_and_bn(gm: fx.GraphModule, act: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """The node the activation reads, or the node before it when that one is a BatchNorm."""
    source = _source(act)
    if _is_batchnorm(gm, source) and isinstance(source.args[0], fx.Node) and source.args[0].op == "call_module" \
            and isinstance(gm.get_submodule(source.args[0].target), tuple(FUSED)):
        return source.args[0], source
    return source, None


def _is_layer_act(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An activation of a module's output (a fusion candidate)."""
    source = _source(node)
    return source is not None and source.op == "call_module" and _activation(gm, node) is not None


def _check_layer_act(gm: fx.GraphModule, act: fx.Node) -> str | None:
    layer_node, bn_node = _layer_and_bn(gm, act)
    layer = gm.get_submodule(layer_node.target)
    if not isinstance(layer, tuple(FUSED)):
        return f"{layer_node.name} ({describe(gm, layer_node)}) is not a Conv1d/2d/3d or Linear module"
    if len(layer_node.args) != 1 or layer_node.kwargs:
        return f"{layer_node.name} is called with more than one argument"
    reason = why_not_absorbed(gm, layer_node, bn_node or act)
    if reason or bn_node is None:
        return reason
    others = [u.name for u in bn_node.users if u is not act]
    if others:
        return f"{bn_node.name}'s output is also used by {', '.join(others)}"
    uses = other_uses(gm, bn_node, gm.get_submodule(bn_node.target))
    return f"{bn_node.name}'s module is shared: also used by {', '.join(uses)}" if uses else None


def _fuse_layer_act(b: Builder, act: fx.Node) -> str:
    layer_node, bn_node = _layer_and_bn(b.gm, act)
    name, module = _activation(b.gm, act)
    layer = b.gm.get_submodule(layer_node.target)
    bn = b.gm.get_submodule(bn_node.target) if bn_node is not None else None
    kind = "linear" if plain_base(layer) is nn.Linear else "conv"
    what = "+".join([kind] + ["bn"] * (bn is not None) + [name])
    fused = b.module(layer_node.target, fused_layer(layer, module, bn), b(layer_node.args[0]))
    fused.node.meta["graphopt.fused"] = what
    b.substitute(act, fused)
    for node in (bn_node, layer_node):
        if node is not None:
            b.gm.graph.erase_node(node)
    chain = " -> ".join(n.name for n in (layer_node, bn_node, act) if n is not None)
    return f"fused {chain} ({what}) into {type(b.gm.get_submodule(layer_node.target)).__name__} {layer_node.target}"


# ----------------------------------------------------------------------------- add -> relu

def _is_add_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    source, act = _source(node), _activation(gm, node)
    return source is not None and _is_add(source) and act is not None and act[0] == "relu"


def _check_add_relu(gm: fx.GraphModule, relu: fx.Node) -> str | None:
    add = _source(relu)
    if not all(isinstance(a, fx.Node) for a in add.args):
        return f"{add.name} adds a number, not two tensors"
    others = [u.name for u in add.users if u is not relu]
    return f"{add.name}'s output is also used by {', '.join(others)}" if others else None


def _fuse_add_relu(b: Builder, relu: fx.Node) -> str:
    add = _source(relu)
    target = free_name(b.gm, f"{add.name}_relu")
    fused = b.module(target, AddReLU(), *(b(a) for a in add.args))
    fused.node.meta["graphopt.fused"] = "add+relu"
    b.substitute(relu, fused)
    b.gm.graph.erase_node(add)
    return f"fused {add.name} -> {relu.name} (add+relu) into AddReLU {target}"


REWRITES = [Rewrite("layer_act", _is_layer_act, _check_layer_act, _fuse_layer_act),
            Rewrite("add_relu", _is_add_relu, _check_add_relu, _fuse_add_relu)]

run = rewrite_pass(REWRITES)


@graphopt.hookimpl
def graphopt_register_passes():
    return [Pass("fuse-act", "Fuse Conv/Linear (+BatchNorm) with the ReLU, ReLU6, Hardtanh or Hardswish after "
                             "it, and add with ReLU, into modules that apply the activation in place",
                 run, Effect.EXACT)]
