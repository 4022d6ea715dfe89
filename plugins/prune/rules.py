"""The channel rule of every op ``prune`` knows: how labels pass through it, which layers
make channels, which positions it couples, and what it freezes.

Producers (conv, conv-transpose, linear, embedding; functional linear on parameters)
open a space. Pass-through ops (norms, activations, pooling, dropout) keep the labels;
element-wise ops couple their operands with broadcasting; concat places them side by side;
split/chunk cut them (equal chunks coupled row by row so they stay equal); reshape, view
and flatten move labels between dims (a channel dim split in two couples the outer part,
so a channel shuffle becomes a permutation); permute/transpose follow the axis; matmul
couples its contraction dims; group conv and GroupNorm couple the same position of every
group. Anything else freezes the channels it touches and says so.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .deps import Analysis, Labels
from .rules_base import shape
from .rules_shape import ShapeRules

_POINTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                      nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh,
                      nn.Softplus, nn.Softsign, nn.Identity, nn.modules.dropout._DropoutNd)
_SPATIAL_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                    nn.Upsample, nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
                    nn.modules.padding._ReplicationPadNd)
_UNARY_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid,
                    torch.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.selu, F.mish, F.softplus,
                    F.hardtanh, torch.exp, torch.neg, operator.neg, torch.abs, torch.sqrt, torch.rsqrt,
                    torch.erf, torch.clamp, torch.clip, torch.square, F.dropout, F.dropout1d, F.dropout2d,
                    torch.nn.functional.dropout3d}
_UNARY_METHODS = {"contiguous", "clone", "detach", "float", "half", "double", "to", "type_as", "relu",
                  "sigmoid", "tanh", "exp", "neg", "abs", "sqrt", "rsqrt", "erf", "square", "clamp",
                  "clip", "reciprocal", "relu_", "sigmoid_", "clamp_", "hardswish", "gelu"}
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
                     operator.pow, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                     torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.maximum, torch.minimum,
                     torch.where, torch.true_divide}
_BINARY_METHODS = {"add", "sub", "mul", "div", "pow", "maximum", "minimum", "add_", "sub_", "mul_",
                   "div_", "masked_fill", "where"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
                    "reshape_as"}
_SPATIAL_FUNCTIONS = {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                      "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "avg_pool1d",
                      "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "_max_pool1d",
                      "_max_pool2d", "_max_pool3d", "interpolate", "pad"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "std", "var"}
_NO_TENSOR_METHODS = {"size", "dim", "numel", "type", "__len__"}
_MATMUL = {operator.matmul, torch.matmul, torch.bmm, torch.mm}
_CAT = {torch.cat, torch.concat, torch.concatenate}


def propagate(gm: fx.GraphModule) -> Analysis:
    """Labels for every node of ``gm`` (annotated with shapes), walking it in order."""
    a = Analysis(gm)
    for node in gm.graph.nodes:
        a.labels[node] = _Rules(a, node).labels()
    return a


class _Rules(ShapeRules):
    """The rule for one node; ``labels()`` returns its output labels (a list for tuples)."""

    def labels(self):
        n = self.node
        if n.op in ("placeholder", "get_attr"):
            return {}
        if n.op == "output":
            for x in self.node.all_input_nodes:
                self.a.freeze_labels(self.of(x), f"model output {x.name}: its shape never changes")
            return {}
        if n.op == "call_module":
            return self.module(self.a.gm.get_submodule(n.target))
        fn, method = (n.target, None) if n.op == "call_function" else (None, n.target)
        name = getattr(fn, "__name__", "") if fn else ""
        if fn is operator.getitem:
            return self.getitem()
        if method in _NO_TENSOR_METHODS or fn is getattr or shape(n) is None and not self.tensors():
            return {}
        if fn in _UNARY_FUNCTIONS or method in _UNARY_METHODS:
            return dict(self.of(n.args[0]))
        if fn in _BINARY_FUNCTIONS or method in _BINARY_METHODS:
            return self.elementwise(self.tensors())
        if fn in _RESHAPE_FUNCTIONS or method in _RESHAPE_METHODS:
            return self.reshape(n.args[0])
        if method == "expand" or method == "expand_as":
            return self.carry(n.args[0], "expands a pruned dim")
        if fn in (torch.permute, torch.transpose) or method in ("permute", "transpose", "t"):
            return self.permute()
        if fn in _CAT:
            return self.cat()
        if fn is torch.stack:
            return self.stack()
        if fn in (torch.split, torch.chunk) or method in ("split", "chunk"):
            return self.split(method or name)
        if fn is torch.unbind or method == "unbind":
            return self.unbind()
        if fn in _MATMUL or method in ("matmul", "bmm"):
            return self.matmul()
        if fn in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax) or method in ("softmax", "log_softmax"):
            return self.along(n.args[0], self.arg(1, "dim"), "normalizes over")
        if name in _SPATIAL_FUNCTIONS:
            return self.carry(n.args[0], "changes the size of a pruned dim")
        if method in _REDUCTIONS or name in _REDUCTIONS:
            return self.reduce(method or name)
        if fn is F.layer_norm:
            return self.layer_norm_function()
        if fn is F.linear:
            return self.linear_function()
        if fn in (torch.roll, torch.flip) or method in ("roll", "flip"):
            dims = self.arg(2, "dims") if fn is torch.roll or method == "roll" else self.arg(1, "dims")
            return self.along(n.args[0], dims, "moves positions along")
        if fn is F.scaled_dot_product_attention:
            return self.attention()
        return self.freeze("no channel rule for this op")

    def module(self, m: nn.Module):
        n, a, t = self.node, self.a, self.node.target
        x = n.args[0] if n.args else next(iter(n.kwargs.values()), None)
        lx = self.of(x)
        if isinstance(m, _POINTWISE_MODULES):
            return dict(lx)
        if isinstance(m, _SPATIAL_MODULES):
            return self.carry(x, "changes the size of a pruned dim")
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return self.reshape(x)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            return self.along(x, m.dim, "normalizes over")
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return self.conv(m, lx)
        if isinstance(m, nn.modules.conv._ConvTransposeNd) and m.groups == 1:
            cin, out = self.channels(lx, 1, m.in_channels), a.space(t, m.out_channels)
            a.slice(t, "weight", {0: cin, 1: out}, self.name)
            self.bias(m, out)
            return {1: out}
        if isinstance(m, nn.Linear):
            rank = len(shape(x))
            out = a.space(t, m.out_features)
            a.slice(t, "weight", {0: out, 1: self.channels(lx, rank - 1, m.in_features)}, self.name)
            self.bias(m, out)
            return {**{d: v for d, v in lx.items() if d < rank - 1}, rank - 1: out}
        if isinstance(m, nn.Embedding):
            out = a.space(t, m.embedding_dim)
            a.slice(t, "weight", {1: out}, self.name)
            return {len(shape(n)) - 1: out}
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if 1 in lx:
                names = [k for k in ("weight", "bias", "running_mean", "running_var") if getattr(m, k) is not None]
                for k in names:
                    a.slice(t, k, {0: lx[1]}, self.name)
            return dict(lx)
        if isinstance(m, nn.LayerNorm):
            return self.layer_norm(x, len(m.normalized_shape), [("weight", t, "weight"), ("bias", t, "bias")]
                                   if m.elementwise_affine else [])
        if isinstance(m, nn.GroupNorm):
            return self.group_norm(m, lx)
        if isinstance(m, nn.PReLU):
            if m.num_parameters > 1 and 1 in lx:
                a.slice(t, "weight", {0: lx[1]}, self.name)
            return dict(lx)
        if isinstance(m, nn.MultiheadAttention):
            return self.freeze("nn.MultiheadAttention could not be split into its projections")
        return self.freeze(f"no channel rule for {type(m).__name__}")

    def conv(self, m: nn.Module, lx: Labels):
        a, t = self.a, self.node.target
        cin = self.channels(lx, 1, m.in_channels)
        if m.groups == 1:
            out = a.space(t, m.out_channels)
            a.slice(t, "weight", {0: out, 1: cin}, self.name)
        elif m.groups == m.in_channels:       # depthwise: output k*m+j follows input k
            out = np.repeat(cin, m.out_channels // m.in_channels)
            a.slice(t, "weight", {0: out}, self.name)
        else:                                 # group conv: the same position of every group goes
            reason = f"{self.name}: group conv input"
            first = a.couple_rows(cin.reshape(m.groups, -1), 0, reason)
            out = a.space(t, m.out_channels)
            a.couple_rows(out.reshape(m.groups, -1), 0, reason)
            a.slice(t, "weight", {0: out, 1: first}, self.name)
        self.bias(m, out)
        return {1: out}

    def bias(self, m: nn.Module, out: np.ndarray) -> None:
        if getattr(m, "bias", None) is not None:
            self.a.slice(self.node.target, "bias", {0: out}, self.name)

    def layer_norm(self, x: fx.Node, normalized: int, params: list[tuple[str, str, str]]):
        lx, rank = self.of(x), len(shape(x))
        inside = [d for d in lx if d >= rank - normalized]
        if not inside:
            return dict(lx)
        if normalized != 1:
            self.a.freeze_labels({d: lx[d] for d in inside}, f"{self.name}: normalizes over several dims")
            return {d: v for d, v in lx.items() if d not in inside}
        for _, owner, attribute in params:
            self.a.slice(owner, attribute, {0: lx[rank - 1]}, self.name)
        self.a.norms[self.node.name] = "layer_norm"
        return dict(lx)

    def group_norm(self, m: nn.GroupNorm, lx: Labels):
        if 1 not in lx:
            return dict(lx)
        if 1 < m.num_groups < m.num_channels:
            self.a.couple_rows(lx[1].reshape(m.num_groups, -1), 0, f"{self.name}: groups")
        if m.affine:
            for k in ("weight", "bias"):
                self.a.slice(self.node.target, k, {0: lx[1]}, self.name)
        self.a.norms[self.node.name] = "group_norm"
        return dict(lx)

    def layer_norm_function(self):
        x, normalized = self.node.args[0], self.arg(1, "normalized_shape")
        params = [self.arg(2, "weight"), self.arg(3, "bias")]
        if any(isinstance(p, fx.Node) and p.op != "get_attr" for p in params):
            return self.freeze("layer_norm with computed weights")
        out = self.layer_norm(x, len(normalized), [])
        rank = len(shape(x))
        if rank - 1 in self.of(x) and len(normalized) == 1:
            for p in params:
                if isinstance(p, fx.Node):
                    self.assign(p, {0: self.of(x)[rank - 1]})
        return out

    def linear_function(self):
        x, w, b = self.node.args[0], self.arg(1, "weight"), self.arg(2, "bias")
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or (isinstance(b, fx.Node) and b.op != "get_attr"):
            return self.freeze("linear with computed weights")
        lx, rank = self.of(x), len(shape(x))
        out = self.a.space(w.target, shape(w)[0])
        self.assign(w, {0: out, 1: self.channels(lx, rank - 1, shape(w)[1])})
        if isinstance(b, fx.Node):
            self.assign(b, {0: out})
        return {**{d: v for d, v in lx.items() if d < rank - 1}, rank - 1: out}

    def attention(self):
        """softmax(q @ k^T * scale) @ v: q and k tied on their last dim; batch and head dims
        broadcast; the output's last dim is v's. (The default scale, 1/sqrt of the head dim,
        is written into the call when the head dim shrinks: ``prune_apply``.)"""
        n = self.node
        q, k, v = self.arg(0, "query"), self.arg(1, "key"), self.arg(2, "value")
        rank = len(shape(n))
        self.merge([(q, len(shape(q)) - 1), (k, len(shape(k)) - 1)])
        out = {}
        for od in range(rank - 2):
            here = [(x, od - (rank - len(shape(x)))) for x in (q, k, v)]
            merged = self.merge([(x, d) for x, d in here if d >= 0 and shape(x)[d] == shape(n)[od]])
            if merged is not None:
                out[od] = merged
        for x, d, what in ((k, len(shape(k)) - 2, "key"), (v, len(shape(v)) - 2, "value")):
            if d in self.of(x):
                self.a.freeze(self.of(x)[d], f"{self.name}: its {what} sequence dim carries channels")
        if len(shape(q)) - 2 in self.of(q):
            out[rank - 2] = self.of(q)[len(shape(q)) - 2]
        if len(shape(v)) - 1 in self.of(v):
            out[rank - 1] = self.of(v)[len(shape(v)) - 1]
        return out
