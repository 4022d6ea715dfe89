"""Channel rules of ``prune`` for ops that move dims around: reshape/view/flatten (labels
move between dims; a split channel dim ties its outer part, so a channel shuffle becomes a
permutation), permute/transpose, indexing, concat/stack, split/chunk/unbind, reductions and
matmul (contraction dims tied)."""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from .rules_base import RuleBase, positive_dim, shape

_SUM = {"sum"}


class ShapeRules(RuleBase):
    def reduce(self, op: str):
        x = self.node.args[0]
        lx, rank = self.of(x), len(shape(x))
        dims = self.arg(1, "dim")
        keepdim = bool(self.arg(2, "keepdim", False))
        reduced = set(range(rank)) if dims is None else {positive_dim(d, rank) for d in
                                                           (dims if isinstance(dims, (list, tuple)) else [dims])}
        out = {}
        for d, arr in lx.items():
            if d in reduced:
                if op not in _SUM:
                    self.a.freeze(arr, f"{self.name}: takes the {op} over the pruned dim (its statistics change)")
                continue
            out[d if keepdim else d - sum(1 for r in reduced if r < d)] = arr
        return out

    def permute(self):
        n = self.node
        x, rank = n.args[0], len(shape(n.args[0]))
        if n.target == "t":
            perm = [1, 0][:rank]
        elif n.target in ("transpose",) or n.target is torch.transpose:
            d0, d1 = positive_dim(self.arg(1, "dim0"), rank), positive_dim(self.arg(2, "dim1"), rank)
            perm = list(range(rank))
            perm[d0], perm[d1] = d1, d0
        else:
            dims = n.args[1:] if n.op == "call_method" else [self.arg(1, "dims")]
            perm = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else list(dims)
            perm = [positive_dim(p, rank) for p in perm]
        lx = self.of(x)
        return {new: lx[old] for new, old in enumerate(perm) if old in lx}

    def reshape(self, x: fx.Node):
        lx = self.of(x)
        if not lx:
            return {}
        src, dst = shape(x), shape(self.node)
        groups = _dim_groups(src, dst)
        if groups is None:
            return self.freeze("reshape between incompatible shapes")
        out = {}
        for gi, gj in groups:
            labelled = [d for d in gi if d in lx]
            if not labelled:
                continue
            if len(labelled) > 1 or not gj:
                self.a.freeze_labels({d: lx[d] for d in labelled}, f"{self.name}: merges two pruned dims")
                continue
            d = labelled[0]
            where = [1] * len(gi)
            where[gi.index(d)] = src[d]
            flat = np.broadcast_to(lx[d].reshape(where), [src[i] for i in gi]).reshape(-1)
            block = flat.reshape([dst[j] for j in gj])
            varying = [k for k in range(block.ndim) if block.shape[k] > 1 and
                       not np.all(block == np.take(block, [0], axis=k))]
            if not varying:
                continue
            axis = varying[-1]
            rows = np.moveaxis(block, axis, -1).reshape(-1, block.shape[axis])
            for row in rows[1:]:      # a split channel dim: the outer part is coupled
                self.a.unify(rows[0], row, f"{self.name}: splits a pruned dim")
            out[gj[axis]] = rows[0]
        return out

    def getitem(self):
        n = self.node
        x, index = n.args
        labels = self.a.labels.get(x)
        if isinstance(labels, list):
            return labels[index] if isinstance(index, int) else {}
        if shape(x) is None:
            return {}
        lx, rank = self.of(x), len(shape(x))
        items = list(index) if isinstance(index, tuple) else [index]
        if any(isinstance(i, fx.Node) or not isinstance(i, (int, slice, type(None), type(Ellipsis)))
               for i in items):
            return self.freeze("indexes a tensor with a tensor")
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        out, d, od = {}, 0, 0
        for item in items:
            if item is Ellipsis:
                for _ in range(rank - used):
                    if d in lx:
                        out[od] = lx[d]
                    d, od = d + 1, od + 1
            elif item is None:
                od += 1
            elif isinstance(item, int):
                if d in lx:
                    self.a.freeze(lx[d], f"{self.name}: picks one position of a pruned dim")
                d += 1
            else:
                if d in lx:
                    if item == slice(None):
                        out[od] = lx[d]
                    else:
                        self.a.freeze(lx[d], f"{self.name}: slices a pruned dim")
                d, od = d + 1, od + 1
        for rest in range(d, rank):
            if rest in lx:
                out[od + rest - d] = lx[rest]
        return out

    def cat(self):
        xs = list(self.arg(0, "tensors"))
        rank = len(shape(self.node))
        d = positive_dim(self.arg(1, "dim", 0), rank)
        out = self.elementwise(xs, skip=(d,))
        if any(d in self.of(x) for x in xs):
            out[d] = np.concatenate([self.channels(self.of(x), d, shape(x)[d]) for x in xs])
        return out

    def stack(self):
        xs = list(self.arg(0, "tensors"))
        rank = len(shape(xs[0]))
        d = positive_dim(self.arg(1, "dim", 0), rank + 1)
        out = {}
        for k in range(rank):
            merged = self.merge([(x, k) for x in xs])
            if merged is not None:
                out[k if k < d else k + 1] = merged
        return out

    def split(self, op: str):
        x = self.node.args[0]
        lx, rank = self.of(x), len(shape(x))
        d = positive_dim(self.arg(2, "dim", 0), rank)
        size, how = shape(x)[d], self.arg(1, "split_size_or_sections" if op == "split" else "chunks")
        if isinstance(how, (list, tuple)):
            sizes = list(how)
        elif op.endswith("chunk"):
            step = -(-size // how)
            sizes = [min(step, size - i) for i in range(0, size, step)]
        else:
            sizes = [min(how, size - i) for i in range(0, size, how)]
        rest = {k: v for k, v in lx.items() if k != d}
        if d not in lx:
            return [dict(rest) for _ in sizes]
        arr = lx[d]
        if not isinstance(how, (list, tuple)):    # equal pieces stay equal: couple them row-wise
            if len(set(sizes)) > 1:
                self.a.freeze(arr, f"{self.name}: unequal chunks of a pruned dim")
                return [dict(rest) for _ in sizes]
            self.a.couple_rows(arr.reshape(len(sizes), -1), 0, f"{self.name}: equal chunks")
        bounds = np.cumsum([0, *sizes])
        return [{**rest, d: arr[bounds[i]:bounds[i + 1]]} for i in range(len(sizes))]

    def unbind(self):
        x = self.node.args[0]
        lx, rank = self.of(x), len(shape(x))
        d = positive_dim(self.arg(1, "dim", 0), rank)
        if d in lx:
            self.a.freeze(lx[d], f"{self.name}: unbinds a pruned dim")
        rest = {(k if k < d else k - 1): v for k, v in lx.items() if k != d}
        return [dict(rest) for _ in range(shape(x)[d])]

    def matmul(self):
        a, b = self.node.args[:2]
        ra, rb, ro = len(shape(a)), len(shape(b)), len(shape(self.node))
        if ra < 2 or rb < 2:
            return self.freeze("matmul of a vector")
        self.merge([(a, ra - 1), (b, rb - 2)])
        out = {}
        for od in range(ro - 2):
            here = [(x, od - (ro - len(shape(x)))) for x in (a, b)]
            here = [(x, d) for x, d in here if d >= 0 and shape(x)[d] == shape(self.node)[od]]
            merged = self.merge(here)
            if merged is not None:
                out[od] = merged
        la, lb = self.of(a), self.of(b)
        if ra - 2 in la:
            out[ro - 2] = la[ra - 2]
        if rb - 1 in lb:
            out[ro - 1] = lb[rb - 1]
        return out

def _dim_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of dims of ``src`` and ``dst`` with equal products (what a reshape maps)."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        gi, gj, pi, pj = [], [], 1, 1
        if i < len(src):
            gi, pi, i = [i], src[i], i + 1
        if j < len(dst):
            gj, pj, j = [j], dst[j], j + 1
        while pi != pj:
            if pi < pj and i < len(src):
                gi, pi, i = gi + [i], pi * src[i], i + 1
            elif pj < pi and j < len(dst):
                gj, pj, j = gj + [j], pj * dst[j], j + 1
            else:
                return None
        groups.append((gi, gj))
    return groups
