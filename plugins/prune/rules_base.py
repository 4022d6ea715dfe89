"""What every channel rule of ``prune`` builds on: reading a node's arguments and labels,
coupling operands with broadcasting, carrying labels through, freezing."""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from graphopt.fxutil import describe

from .deps import Analysis, Labels

_CONSTANT_CHAIN = {"expand", "expand_as", "contiguous", "clone", "to", "float"}


def shape(node) -> tuple[int, ...] | None:
    return node.meta.get("graphopt.shape") if isinstance(node, fx.Node) else None


def positive_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


class RuleBase:
    """The rule for one node: ``self.a`` is the analysis, ``self.node`` the node."""

    def __init__(self, a: Analysis, node: fx.Node):
        self.a, self.node = a, node
        self.name = f"{node.name} ({describe(a.gm, node)})" if node.op.startswith("call") else node.name

    def of(self, x) -> Labels:
        labels = self.a.labels.get(x) if isinstance(x, fx.Node) else None
        return labels if isinstance(labels, dict) else {}

    def arg(self, index: int, name: str, default=None):
        n = self.node
        return n.args[index] if len(n.args) > index else n.kwargs.get(name, default)

    def tensors(self) -> list[fx.Node]:
        return [x for x in [*self.node.args, *self.node.kwargs.values()] if shape(x) is not None]

    def freeze(self, why: str) -> dict:
        """No rule: every channel reaching this node is frozen."""
        for x in self.node.all_input_nodes:
            labels = self.a.labels.get(x)
            for labels in (labels if isinstance(labels, list) else [labels or {}]):
                self.a.freeze_labels(labels, f"{self.name}: {why}")
        return {}

    def channels(self, labels: Labels, dim: int, size: int) -> np.ndarray:
        return labels[dim] if dim in labels else np.full(size, -1, dtype=np.int64)

    def assign(self, x: fx.Node, dims: Labels) -> None:
        """A parameter read by get_attr takes the labels of the channels it meets."""
        owner, _, attribute = x.target.rpartition(".")
        current = self.a.labels.get(x) or {}
        for d, arr in dims.items():
            current[d] = self.a.unify(current[d], arr, self.name) if d in current else arr
        self.a.labels[x] = current
        self.a.slice(owner, attribute, dims, self.name)

    def merge(self, operands: list[tuple[fx.Node, int]]) -> np.ndarray | None:
        """Couple dim ``d`` of each operand ``(x, d)`` (same size): labelled ones are unified,
        an unlabelled parameter takes the labels, anything else unlabelled freezes them."""
        labelled = [self.of(x)[d] for x, d in operands if d in self.of(x)]
        if not labelled:
            return None
        merged = labelled[0]
        for arr in labelled[1:]:
            merged = self.a.unify(merged, arr, f"{self.name}: couples its operands")
        for x, d in operands:
            if d in self.of(x):
                continue
            if not self.constant(x, d, merged):
                self.a.freeze(merged, f"{self.name}: meets {x.name}, whose channels are not prunable")
        return merged

    def constant(self, x: fx.Node, d: int, arr: np.ndarray) -> bool:
        """Give dim ``d`` of ``x`` the labels ``arr`` when ``x`` is a parameter, or a parameter
        passed through expand/contiguous/clone/to (``cls_token.expand(B, -1, -1)``)."""
        if x.op == "get_attr":
            self.assign(x, {d: arr})
            return True
        if x.op != "call_method" or x.target not in _CONSTANT_CHAIN or not isinstance(x.args[0], fx.Node):
            return False
        src = x.args[0]
        sd = d - (len(shape(x)) - len(shape(src) or ()))
        if shape(src) is None or sd < 0 or shape(src)[sd] != shape(x)[d] or not self.constant(src, sd, arr):
            return False
        labels = self.a.labels.get(x) or {}
        self.a.labels[x] = {**labels, d: arr}
        return True

    def elementwise(self, operands: list[fx.Node], skip: tuple[int, ...] = ()):
        out_shape = shape(self.node)
        rank, out = len(out_shape), {}
        for od in range(rank):
            if od in skip:
                continue
            here = []
            for x in operands:
                s = shape(x)
                d = od - (rank - len(s))
                if d < 0:
                    continue
                if s[d] == out_shape[od]:
                    here.append((x, d))
                elif d in self.of(x):
                    self.a.freeze(self.of(x)[d], f"{self.name}: broadcasts a pruned dim")
            merged = self.merge(here)
            if merged is not None:
                out[od] = merged
        return out

    def carry(self, x: fx.Node, why: str):
        """Keep the labels of dims whose size is unchanged (pooling, padding of spatial dims)."""
        lx, src, dst = self.of(x), shape(x), shape(self.node)
        out = {}
        for d, arr in lx.items():
            od = d + len(dst) - len(src)
            if od >= 0 and dst[od] == src[d]:
                out[od] = arr
            else:
                self.a.freeze(arr, f"{self.name}: {why}")
        return out

    def along(self, x: fx.Node, dims, why: str):
        """An op working along ``dims`` (int, list, or None: all): labels elsewhere pass,
        labels on those dims are frozen (softmax over channels, roll over channels...)."""
        lx, rank = self.of(x), len(shape(x))
        dims = range(rank) if dims is None else [dims] if isinstance(dims, int) else dims
        along = {positive_dim(d, rank) for d in dims}
        self.a.freeze_labels({k: v for k, v in lx.items() if k in along}, f"{self.name}: {why} the pruned dim")
        return {k: v for k, v in lx.items() if k not in along}
