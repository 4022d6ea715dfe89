"""Physically remove channels: a :class:`Surgery` (which indices every parameter keeps, the
new sizes of the layers, the graph constants that change) computed from an analysis and the
removed ids, applied to a module, and replayed from JSON (the mask oracle: ``oracle.py``)."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.graph import annotate

from .deps import Analysis
from .rules_base import shape

Path = list                                   # ["args", 1, 0] or ["kwargs", "shape", 2]


@dataclass
class Surgery:
    """Everything one pruning step changes, JSON-ready so it can be saved and replayed."""

    params: dict[str, dict[int, list[int]]] = field(default_factory=dict)   # "a.b.weight" -> dim -> kept
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)        # target -> attribute -> value
    constants: dict[str, list[tuple[Path, int]]] = field(default_factory=dict)  # node -> (where, value)
    decomposed: list[str] = field(default_factory=list)                     # attention modules split first

    def as_dict(self) -> dict:
        return {"params": {k: {str(d): v for d, v in dims.items()} for k, dims in self.params.items()},
                "modules": self.modules, "constants": self.constants, "decomposed": self.decomposed}

    @classmethod
    def from_dict(cls, d: dict) -> "Surgery":
        return cls({k: {int(dim): v for dim, v in dims.items()} for k, dims in d["params"].items()},
                   d["modules"], {k: [(list(p), v) for p, v in c] for k, c in d["constants"].items()},
                   list(d.get("decomposed", [])))


def plan(a: Analysis, removed: np.ndarray) -> Surgery:
    """The surgery that removes the ids marked in ``removed`` (a bool per id)."""
    s = Surgery()
    for (owner, attribute), dims in a.slices.items():
        kept = {d: np.flatnonzero(a.kept(arr, removed)).tolist() for d, arr in dims.items()}
        kept = {d: k for d, k in kept.items() if len(k) < len(dims[d])}
        if kept:
            s.params[f"{owner}.{attribute}" if owner else attribute] = kept

    def size(node: fx.Node, d: int) -> int:
        labels = a.labels.get(node)
        arr = labels.get(d) if isinstance(labels, dict) else None
        return int(shape(node)[d]) if arr is None else int(a.kept(arr, removed).sum())

    for node in a.gm.graph.nodes:
        if node.op == "call_module":
            attrs = _module_sizes(a.gm.get_submodule(node.target), node, size)
            if attrs:
                s.modules[node.target] = attrs
        elif node.op in ("call_function", "call_method"):
            changes = [(p, new) for p, old, new in _constants(a, node, size, removed) if old != new]
            if changes:
                s.constants[node.name] = changes
    return s


def _module_sizes(m: nn.Module, node: fx.Node, size) -> dict[str, Any]:
    """New size attributes of a layer, from the kept sizes of its input and output."""
    x = node.args[0] if node.args else None
    if isinstance(m, nn.modules.conv._ConvNd):
        cin, cout = size(x, 1), size(node, 1)
        groups = cin if m.groups == m.in_channels and m.groups > 1 else m.groups
        new = {"in_channels": cin, "out_channels": cout, "groups": groups}
    elif isinstance(m, nn.Linear):
        new = {"in_features": size(x, len(shape(x)) - 1), "out_features": size(node, len(shape(node)) - 1)}
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        new = {"num_features": size(node, 1)}
    elif isinstance(m, nn.LayerNorm):
        new = {"normalized_shape": tuple(m.normalized_shape[:-1]) + (size(node, len(shape(node)) - 1),)}
    elif isinstance(m, nn.GroupNorm):
        c = size(node, 1)
        new = {"num_channels": c, "num_groups": c if m.num_groups == m.num_channels else m.num_groups}
    elif isinstance(m, nn.Embedding):
        new = {"embedding_dim": size(node, len(shape(node)) - 1)}
    elif isinstance(m, nn.PReLU) and m.num_parameters > 1:
        new = {"num_parameters": size(node, 1)}
    elif isinstance(m, nn.Unflatten):
        new = {"unflattened_size": tuple(size(node, m.dim + i) if s != -1 else -1
                                         for i, s in enumerate(m.unflattened_size))}
    else:
        return {}
    return {k: v for k, v in new.items() if getattr(m, k) != v and not (
        isinstance(v, tuple) and tuple(getattr(m, k)) == v)}


_SHAPED_METHODS = {"view", "reshape", "expand"}


def _constants(a: Analysis, node: fx.Node, size, removed) -> Iterator[tuple[Path, int, int]]:
    """Integer constants of ``node`` that depend on a pruned size: ``(where, old, new)``."""
    labels = a.labels.get(node)
    if node.op == "call_method" and node.target in _SHAPED_METHODS or node.target is torch.reshape:
        if "shape" in node.kwargs or "size" in node.kwargs:
            key = "shape" if "shape" in node.kwargs else "size"
            where, values = ["kwargs", key], node.kwargs[key]
        elif len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
            where, values = ["args", 1], node.args[1]
        else:
            where, values = ["args"], [None, *node.args[1:]]     # x.view(1, 48, -1): args[1:]
        for j, v in enumerate(values[1:] if where == ["args"] else values):
            # a pruned dim's size, hard-coded or computed from other shapes, becomes the new constant
            if v != -1 and isinstance(labels, dict) and j in labels:
                new = size(node, j)
                yield [*where, j + 1 if where == ["args"] else j], (v if new == shape(node)[j] else None), new
    elif node.target in ("split", torch.split) and isinstance(labels, list):
        sizes = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections")
        if isinstance(sizes, (list, tuple)):
            x = node.args[0]
            d = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            d = d + len(shape(x)) if d < 0 else d
            where = ["args", 1] if len(node.args) > 1 else ["kwargs", "split_size_or_sections"]
            for j, (v, piece) in enumerate(zip(sizes, labels)):
                if d in piece:
                    yield [*where, j], v, int(a.kept(piece[d], removed).sum())
    elif node.target is F.scaled_dot_product_attention and node.kwargs.get("scale") is None:
        q = node.args[0] if node.args else node.kwargs["query"]
        head = len(shape(q)) - 1
        if size(q, head) != shape(q)[head]:
            yield ["kwargs", "scale"], None, shape(q)[head] ** -0.5
    elif node.target is F.layer_norm:
        x = node.args[0]
        normalized = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
        where = ["args", 1] if len(node.args) > 1 else ["kwargs", "normalized_shape"]
        yield [*where, len(normalized) - 1], normalized[-1], size(x, len(shape(x)) - 1)
    elif node.target in ("unflatten", torch.unflatten):
        d = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        d = d + len(shape(node.args[0])) if d < 0 else d
        sizes = node.args[2] if len(node.args) > 2 else node.kwargs["sizes"]
        where = ["args", 2] if len(node.args) > 2 else ["kwargs", "sizes"]
        for j, v in enumerate(sizes):
            if isinstance(v, int) and v != -1:
                yield [*where, j], v, size(node, d + j)


def apply(gm: fx.GraphModule, surgery: Surgery) -> None:
    """Slice the parameters, resize the layers and rewrite the constants, in place."""
    for path, dims in surgery.params.items():
        owner_name, _, attribute = path.rpartition(".")
        owner = gm.get_submodule(owner_name)
        tensor = getattr(owner, attribute)
        new = tensor.detach()
        for d, kept in dims.items():
            new = new.index_select(d, torch.tensor(kept, dtype=torch.long))
        new = new.contiguous()
        if isinstance(tensor, nn.Parameter):
            setattr(owner, attribute, nn.Parameter(new, requires_grad=tensor.requires_grad))
        elif attribute in owner._buffers:
            owner._buffers[attribute] = new
        else:
            setattr(owner, attribute, new)
    for target, attrs in surgery.modules.items():
        m = gm.get_submodule(target)
        for k, v in attrs.items():
            setattr(m, k, tuple(v) if isinstance(v, list) else v)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, changes in surgery.constants.items():
        node = nodes[name]
        args, kwargs = _mutable(node.args), _mutable(node.kwargs)
        for where, value in changes:
            holder = args if where[0] == "args" else kwargs
            *path, last = where[1:]
            for p in path:
                holder = holder[p]
            holder[last] = value
        node.args, node.kwargs = _frozen(args), _frozen(kwargs)
    gm.recompile()


def _mutable(x):
    if isinstance(x, (list, tuple)):
        return [_mutable(v) for v in x]
    if isinstance(x, dict):
        return {k: _mutable(v) for k, v in x.items()}
    return x


def _frozen(x):
    if isinstance(x, list):
        return tuple(_frozen(v) for v in x)
    if isinstance(x, dict):
        return {k: _frozen(v) for k, v in x.items()}
    return x


_ARITHMETIC = {operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.div, torch.add,
               torch.sub, "mul", "div", "add", "sub"}


def scalars(gm: fx.GraphModule, inputs) -> dict[str, float]:
    """Each node's value that is a Python number on ``inputs`` (shape arithmetic, ``C // heads``),
    by node name; annotates ``gm`` as it runs."""
    values: dict[str, float] = {}
    annotate(gm, inputs, record=lambda n, v: values.__setitem__(n.name, v)
             if isinstance(v, (int, float)) and not isinstance(v, bool) else None)
    return values


def pins(pruned: fx.GraphModule, before: dict[str, float], after: dict[str, float]) -> dict[str, list]:
    """Surgery constants: tensor arithmetic whose number operand, computed from shapes, pruning
    changed, keeps the number it had (the mask oracle's): ``scores * (C // heads) ** -0.5`` with C
    pruned scales as before, while the reshape by ``C // heads`` follows the pruned size."""
    out: dict[str, list] = {}
    for node in pruned.graph.nodes:
        if node.target not in _ARITHMETIC or "graphopt.shape" not in node.meta:   # a tensor result only
            continue
        for i, arg in enumerate(node.args):
            if isinstance(arg, fx.Node) and arg.name in before and after.get(arg.name) != before[arg.name]:
                out.setdefault(node.name, []).append((["args", i], before[arg.name]))
    return out
