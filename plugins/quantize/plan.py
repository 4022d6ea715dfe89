"""quantize's plan: which values are int8, and the fake quants and int8 weights inserted for them."""
from __future__ import annotations

import copy
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.fused import AddReLU
from graphopt.fxutil import input_dependent
from graphopt.quant import insert_fake_quant, quantize_weight

from .observers import QParams

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_ACTIVATION_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh}
_BINARY = {operator.add: "add", torch.add: "add", operator.iadd: "add", operator.mul: "mul", torch.mul: "mul",
           operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "matmul"}
_PASS_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                 nn.modules.pooling._AdaptiveMaxPoolNd, nn.Flatten, nn.Identity, nn.ReLU, nn.ReLU6)
_PASS_METHODS = {"flatten", "reshape", "view", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                 "mean", "relu"}
_PASS_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                   F.relu, torch.relu, F.adaptive_avg_pool2d, F.avg_pool2d, torch.mean}
_FIXED = {nn.Sigmoid: (1 / 256, 0), nn.Hardsigmoid: (1 / 256, 0), nn.Softmax: (1 / 256, 0), nn.Tanh: (1 / 128, 128),
          torch.sigmoid: (1 / 256, 0), F.sigmoid: (1 / 256, 0), F.hardsigmoid: (1 / 256, 0),
          F.softmax: (1 / 256, 0), torch.softmax: (1 / 256, 0), torch.tanh: (1 / 128, 128),
          "sigmoid": (1 / 256, 0), "softmax": (1 / 256, 0), "tanh": (1 / 128, 128)}


@dataclass
class Layer:
    """A quantized op: ``node``, the node whose output is quantized (``end``: the op or its
    activation), and the values it reads in int8."""

    node: fx.Node
    kind: str
    end: fx.Node
    inputs: list[fx.Node] = field(default_factory=list)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node) and "graphopt.shape" in a.meta]


def unfuse_activations(gm: fx.GraphModule) -> list[str]:
    """A fused Conv/Linear whose activation int8 kernels cannot fuse (hardswish...) => the
    plain layer, then the activation as its own node, so its output can be quantized before
    the activation. Returns the layers split."""
    from graphopt.fused import FUSED

    split = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        act = getattr(m, "act", None)
        base = next((c for c in type(m).__mro__ if c in FUSED), None)
        if base is None or type(m) is base or act is None or isinstance(act, _ACTIVATIONS) \
                or not isinstance(getattr(m, "bn", None), nn.Identity):
            continue
        plain = copy.copy(m)
        plain.__class__ = base
        del plain.act, plain.bn
        gm.add_submodule(node.target, plain)
        act = copy.deepcopy(act)
        if hasattr(act, "inplace"):
            act.inplace = False                          # its input is now a value of its own
        gm.add_submodule(f"{node.target}_act", act)
        with gm.graph.inserting_after(node):
            after = gm.graph.call_module(f"{node.target}_act", (node,))
        node.replace_all_uses_with(after, delete_user_cb=lambda u: u is not after)
        split.append(node.name)
    gm.recompile()
    return split


def _kind(gm: fx.GraphModule, node: fx.Node, variable: set[fx.Node] | None = None) -> str | None:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, _WEIGHTED):
            return "weighted"
        return "add" if isinstance(m, AddReLU) else None
    if node.op == "call_function" and node.target is torch.cat:
        return "cat"
    kind = _BINARY.get(node.target) if node.op == "call_function" else \
        {"add": "add", "mul": "mul", "matmul": "matmul"}.get(node.target) if node.op == "call_method" else None
    args = _tensor_args(node)
    # by a constant (attention's q * scale, a layer scale, LayerNorm2d's weight[:, None, None]): it runs in
    # float; quantizing a constant operand gains nothing and litert-torch mislays some (ConvNeXt)
    constant = variable is not None and any(a not in variable for a in args)
    return kind if kind and len(args) == 2 and not constant else None


def _why_fp32(gm: fx.GraphModule, node: fx.Node, patterns: list[str]) -> str | None:
    names = [node.name]
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        names += [node.target, type(m).__name__]
        bn = getattr(m, "bn", None)
        if bn is not None and not isinstance(bn, nn.Identity):
            return "its BatchNorm is not folded"
    for p in patterns:
        hit = any(re.fullmatch(p[3:], n) for n in names) if p.startswith("re:") else p in names
        if hit:
            return f"excluded ({p})"
    return None


def _end(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The op's output, or the ReLU/ReLU6/Hardtanh right after it when it is its only user."""
    if len(node.users) != 1:
        return node
    user = next(iter(node.users))
    fused = user.op == "call_module" and isinstance(gm.get_submodule(user.target), _ACTIVATIONS)
    return user if fused or (user.op == "call_function" and user.target in _ACTIVATION_FUNCTIONS) else node


def _fixed(gm: fx.GraphModule, node: fx.Node):
    if node.op == "call_module":
        return _FIXED.get(type(gm.get_submodule(node.target)))
    return _FIXED.get(node.target) if node.op in ("call_function", "call_method") else None


def _passes(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _PASS_MODULES)
    return (node.op == "call_function" and node.target in _PASS_FUNCTIONS) or \
        (node.op == "call_method" and node.target in _PASS_METHODS) or \
        (node.target is operator.getitem and "graphopt.shape" in node.args[0].meta)   # a slice of a tensor


@dataclass
class Plan:
    layers: list[Layer]
    observed: list[fx.Node]                        # values whose range is calibrated
    derived: dict[fx.Node, fx.Node | tuple]        # value -> the value whose qparams it reuses, or fixed
    kept: dict[str, str]                           # fp32 layer -> why


def plan(gm: fx.GraphModule, patterns: list[str], excluded: dict[str, str]) -> Plan:
    """Which values are int8, walking the graph in order."""
    layers, observed, derived, kept, int8 = [], [], {}, {}, set()
    skip: set[fx.Node] = set()
    variable = input_dependent(gm)
    for node in gm.graph.nodes:
        if node in skip:
            continue
        kind = _kind(gm, node, variable)
        if kind:
            why = _why_fp32(gm, node, patterns) or excluded.get(node.name)
            if why:
                kept[node.name] = why
                continue
            end = _end(gm, node)
            skip.add(end)
            inputs = _tensor_args(node) if kind != "cat" else [a for a in node.args[0] if isinstance(a, fx.Node)]
            for x in inputs:
                if x not in int8:
                    observed.append(x)
                    int8.add(x)
            observed.append(end)
            int8.add(end)
            layers.append(Layer(node, kind, end, inputs))
        elif node.op in ("call_module", "call_function", "call_method"):
            source = _tensor_args(node)[:1]
            fixed = _fixed(gm, node)
            if source and source[0] in int8 and fixed:
                derived[node] = fixed
                int8.add(node)
            elif source and source[0] in int8 and _passes(gm, node):
                derived[node] = source[0]
                int8.add(node)
    return Plan(layers, observed, derived, kept)


def insert(gm: fx.GraphModule, p: Plan, ranges: dict[str, QParams]) -> dict[str, QParams]:
    """Fake-quant nodes after every int8 value, weights quantized; the qparams of each value."""
    chosen: dict[str, QParams] = {}
    for node in list(gm.graph.nodes):
        if node.name in ranges:
            q = ranges[node.name]
        elif node in p.derived:
            how = p.derived[node]
            q = QParams(how[0], how[1], "uint8") if isinstance(how, tuple) else chosen.get(how.name)
            if q is None:
                continue
        else:
            continue
        chosen[node.name] = q
        users = list(node.users)
        fq = insert_fake_quant(gm, node, q)
        for user in users:
            user.replace_input_with(node, fq)
    for layer in p.layers:
        if layer.kind == "weighted":
            quantize_weight(gm.get_submodule(layer.node.target))
    gm.recompile()
    return chosen
