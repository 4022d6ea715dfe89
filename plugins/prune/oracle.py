"""The mask-then-prune oracle: the unpruned graph with the removed channels zeroed after every
node, and the first node of a pruned graph that departs from it."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt import Effect
from graphopt.graph import annotate
from graphopt.metrics import compare

from .deps import Analysis


class MaskedRun(fx.Interpreter):
    """The unpruned graph with every removed channel zeroed after each node; norms whose
    statistics run over a pruned dim are computed on the kept channels only."""

    def __init__(self, a: Analysis, removed: np.ndarray):
        super().__init__(a.gm)
        self.a, self.removed = a, removed

    def _keep(self, node: fx.Node, d: int) -> torch.Tensor | None:
        labels = self.a.labels.get(node)
        arr = labels.get(d) if isinstance(labels, dict) else None
        if arr is None:
            return None
        keep = self.a.kept(arr, self.removed)
        return None if keep.all() else torch.from_numpy(keep)

    def run_node(self, n: fx.Node) -> Any:
        kind = self.a.norms.get(n.name)
        result = self._norm(n, kind) if kind else super().run_node(n)
        if isinstance(result, torch.Tensor) and result.is_floating_point():
            for d in (self.a.labels.get(n) or {}) if isinstance(self.a.labels.get(n), dict) else ():
                keep = self._keep(n, d)
                if keep is not None:
                    shape_ = [1] * result.dim()
                    shape_[d] = -1
                    result = result * keep.to(result.dtype).reshape(shape_)
        return result

    def _norm(self, n: fx.Node, kind: str) -> torch.Tensor:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        d = x.dim() - 1 if kind == "layer_norm" else 1
        keep = self._keep(n.args[0], d)
        if keep is None:
            return super().run_node(n)
        idx = torch.nonzero(keep).flatten()
        part = x.index_select(d, idx)
        if n.op == "call_module":
            m = self.module.get_submodule(n.target)
            w = m.weight.index_select(0, idx) if m.weight is not None else None
            b = m.bias.index_select(0, idx) if m.bias is not None else None
            if kind == "layer_norm":
                y = F.layer_norm(part, (len(idx),), w, b, m.eps)
            else:
                groups = len(idx) if m.num_groups == m.num_channels else m.num_groups
                y = F.group_norm(part, groups, w, b, m.eps)
        else:
            w, b = (args[2] if len(args) > 2 else kwargs.get("weight")), (args[3] if len(args) > 3 else kwargs.get("bias"))
            eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
            y = F.layer_norm(part, (len(idx),), None if w is None else w.index_select(0, idx),
                             None if b is None else b.index_select(0, idx), eps)
        out = torch.zeros_like(x)
        return out.index_copy(d, idx, y)


def diverging(a: Analysis, removed: np.ndarray, pruned: fx.GraphModule, inputs) -> str | None:
    """The first node of ``pruned`` whose value differs from the mask oracle's at the same node,
    its removed channels taken out: ``"`name` (op target): the problem"``."""
    oracle: dict[str, Any] = {}

    class Recording(MaskedRun):
        def run_node(self, n: fx.Node) -> Any:
            oracle[n.name] = value = super().run_node(n)
            return value

    with torch.no_grad():
        Recording(a, removed).run(*inputs)
    values: dict[str, Any] = {}
    annotate(pruned, inputs, record=lambda n, v: values.__setitem__(n.name, v))
    original = {n.name: n for n in a.gm.graph.nodes}
    tolerance = Effect.STRUCTURAL.tolerance
    for node in pruned.graph.nodes:
        want, got = oracle.get(node.name), values.get(node.name)
        if node.op in ("placeholder", "output") or not isinstance(want, torch.Tensor) or \
                not isinstance(got, torch.Tensor) or not want.is_floating_point():
            continue
        labels = a.labels.get(original.get(node.name))
        for d, arr in (labels.items() if isinstance(labels, dict) else ()):
            keep = np.flatnonzero(a.kept(arr, removed))
            if len(keep) < want.shape[d]:
                want = want.index_select(d, torch.from_numpy(keep))
        if want.shape == got.shape and (problems := tolerance.violations(compare([want], [got.to(want.dtype)]))):
            return f"`{node.name}` ({node.op} {getattr(node.target, '__name__', node.target)}): {problems[0]}"
    return None
