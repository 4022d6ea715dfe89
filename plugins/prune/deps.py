"""Coupled-channel analysis for ``prune``: which channels of which layers must go together.

Every layer that makes channels (conv, linear, embedding, ...) opens a *space* of channel ids.
Walking the fx graph in order, each tensor dimension that carries channels gets a label
array: the channel id behind every position of that dimension (-1: no prunable channel
behind it). Each op has an explicit rule (``rules``) saying how labels flow through it
and which ids it couples: an add couples its operands position by position, a concat
places them side by side, a channel shuffle permutes them, a group conv couples the same
position of every group. An op without a rule, the model's inputs and its outputs *freeze*
the ids they touch, with the reason.

Coupled ids form classes (one class = one prunable unit: removing it removes every id in
it); the connected components of a networkx graph over the ids. Spaces linked by a class
form a *group*, what the report lists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import torch.fx as fx

Labels = dict[int, np.ndarray]          # dim -> channel id per position (-1: none)


@dataclass
class Space:
    """The channels one layer makes: ids ``start .. start + size - 1``."""

    owner: str
    size: int
    start: int


@dataclass
class Group:
    """Spaces whose channels are coupled, and its prunable units (id classes)."""

    index: int
    spaces: list[Space]
    units: list[np.ndarray]               # each: the ids removed together
    frozen: dict[int, str]                # unit index -> why it cannot be removed
    members: list[str] = field(default_factory=list)   # layers whose parameters it slices

    @property
    def owners(self) -> list[str]:
        return [s.owner for s in self.spaces]

    @property
    def prunable(self) -> list[int]:
        return [i for i in range(len(self.units)) if i not in self.frozen]


class Analysis:
    """Labels of every node, the couplings and freezes between ids, and what to slice.

    ``slices[(owner, attribute)]`` says which dims of a parameter or buffer follow which
    label array; ``norms`` lists the nodes whose statistics run over a labelled dim (their
    oracle is computed on the kept channels only).
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.labels: dict[fx.Node, Any] = {}
        self.spaces: list[Space] = []
        self.size = 0
        self._edges: list[tuple[np.ndarray, np.ndarray]] = []
        self._frozen: list[tuple[np.ndarray, str]] = []
        self.slices: dict[tuple[str, str], Labels] = {}
        self.norms: dict[str, str] = {}
        self.decomposed: list[str] = []
        self._classes: np.ndarray | None = None

    # ------------------------------------------------------------------ building

    def space(self, owner: str, size: int) -> np.ndarray:
        """Open a space of ``size`` new channel ids made by ``owner``."""
        start = self.size
        self.spaces.append(Space(owner, size, start))
        self.size += size
        return np.arange(start, start + size, dtype=np.int64)

    def unify(self, a: np.ndarray, b: np.ndarray, reason: str) -> np.ndarray:
        """Couple ``a[i]`` with ``b[i]``; a position with an id on one side only freezes it."""
        if a.shape != b.shape:
            raise ValueError(f"cannot couple {a.shape} with {b.shape}")
        both = (a >= 0) & (b >= 0)
        if both.any():
            self._edges.append((a[both], b[both]))
        one = (a >= 0) ^ (b >= 0)
        if one.any():
            self.freeze(np.where(a >= 0, a, b)[one], reason)
        return np.where(a >= 0, a, b)

    def couple_rows(self, arr: np.ndarray, axis: int, reason: str) -> np.ndarray:
        """Couple the same position of every slice along ``axis`` (the groups of a group conv,
        of a GroupNorm or of a split channel dim): pruning then removes one position from
        each and the slices stay equal in size. Returns the first slice."""
        moved = np.moveaxis(arr, axis, 0).reshape(arr.shape[axis], -1)
        for row in moved[1:]:
            self.unify(moved[0], row, reason)
        return np.moveaxis(arr, axis, 0)[0]

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        ids = np.asarray(ids).ravel()
        ids = ids[ids >= 0]
        if ids.size:
            self._frozen.append((ids, reason))

    def freeze_labels(self, labels: Labels, reason: str) -> None:
        for arr in labels.values():
            self.freeze(arr, reason)

    def slice(self, owner: str, attribute: str, dims: Labels, note: str) -> None:
        """``owner.attribute`` follows ``dims``; a second use of the same tensor is coupled."""
        key = (owner, attribute)
        if key in self.slices:
            old = self.slices[key]
            for d, arr in dims.items():
                old[d] = self.unify(old[d], arr, note) if d in old else arr
        else:
            self.slices[key] = dict(dims)

    # ------------------------------------------------------------------ results

    @property
    def classes(self) -> np.ndarray:
        """Class index of every id: connected components of the coupling graph."""
        if self._classes is None:
            g = nx.Graph()
            g.add_nodes_from(range(self.size))
            for a, b in self._edges:
                g.add_edges_from(zip(a.tolist(), b.tolist()))
            classes = np.empty(self.size, dtype=np.int64)
            for index, component in enumerate(sorted(nx.connected_components(g), key=min)):
                classes[list(component)] = index
            self._classes = classes
        return self._classes

    def groups(self) -> list[Group]:
        """Spaces joined by shared classes; units and the first freeze reason of each."""
        classes = self.classes
        n_classes = int(classes.max()) + 1 if self.size else 0
        frozen: dict[int, str] = {}
        for ids, reason in self._frozen:
            for c in np.unique(classes[ids]).tolist():
                frozen.setdefault(c, reason)
        space_of = np.empty(self.size, dtype=np.int64)
        for i, s in enumerate(self.spaces):
            space_of[s.start:s.start + s.size] = i
        joined = nx.Graph()
        joined.add_nodes_from(range(len(self.spaces)))
        members: list[list[int]] = [[] for _ in range(n_classes)]
        for i, c in enumerate(classes.tolist()):
            members[c].append(i)
        for ids in members:
            spaces = np.unique(space_of[ids])
            joined.add_edges_from(zip(spaces[:-1].tolist(), spaces[1:].tolist()))
        owners = self._owners_by_space()
        out = []
        for index, component in enumerate(sorted(nx.connected_components(joined), key=min)):
            spaces = sorted(component)
            cls = np.unique(classes[np.concatenate([np.arange(self.spaces[s].start,
                                                              self.spaces[s].start + self.spaces[s].size)
                                                    for s in spaces])])
            units = [np.asarray(members[c], dtype=np.int64) for c in cls.tolist()]
            group = Group(index, [self.spaces[s] for s in spaces], units,
                          {i: frozen[c] for i, c in enumerate(cls.tolist()) if c in frozen},
                          sorted({o for s in spaces for o in owners.get(s, ())}))
            out.append(group)
        return out

    def _owners_by_space(self) -> dict[int, set[str]]:
        """Layers whose parameters hold channels of each space."""
        space_of = np.empty(self.size, dtype=np.int64)
        for i, s in enumerate(self.spaces):
            space_of[s.start:s.start + s.size] = i
        classes = self.classes
        by_class: dict[int, set[int]] = {}
        for i, c in enumerate(classes.tolist()):
            by_class.setdefault(c, set()).add(int(space_of[i]))
        out: dict[int, set[str]] = {}
        for (owner, _), dims in self.slices.items():
            for arr in dims.values():
                ids = arr[arr >= 0]
                for c in np.unique(classes[ids]).tolist():
                    for s in by_class[c]:
                        out.setdefault(s, set()).add(owner)
        return out

    def kept(self, arr: np.ndarray, removed: np.ndarray) -> np.ndarray:
        """Positions of ``arr`` that survive when the ids marked in ``removed`` go."""
        keep = np.ones(arr.shape, dtype=bool)
        has = arr >= 0
        keep[has] = ~removed[arr[has]]
        return keep
