"""How ``prune`` ranks channels and picks the ones to remove.

Importance of a unit (a class of coupled channel ids): magnitude L1/L2 of every weight slice
it owns (producer rows and consumer columns alike), BatchNorm/LayerNorm/GroupNorm scale
(network slimming), first-order Taylor ``|w * dL/dw|`` (needs a loss function), or random;
aggregated over the slices of the group by mean, max or sum. Selection is uniform (each
group loses ``ratio`` of its units) or global (units ranked across groups after dividing by
their group's mean), within ``max_ratio``, keeping a multiple of ``round_to`` units.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .deps import Analysis, Group

CRITERIA = ("l1", "l2", "bn", "taylor", "random")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def unit_scores(a: Analysis, groups: list[Group], criterion: str, aggregate: str, seed: int = 0,
                loss: Callable[[nn.Module], torch.Tensor] | None = None) -> dict[int, np.ndarray]:
    """Importance of every unit of every group (index -> array aligned with ``group.units``);
    NaN for a unit no slice scored (e.g. ``bn`` in a group without a norm layer)."""
    classes = a.classes
    n = int(classes.max()) + 1 if a.size else 0
    if criterion == "random":
        per_class = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    else:
        if criterion == "taylor":
            _gradients(a.gm, loss)
        total, count, best = np.zeros(n), np.zeros(n), np.full(n, -np.inf)
        for (owner, attribute), dims in a.slices.items():
            tensor = _scored(a, owner, attribute, criterion)
            if tensor is None:
                continue
            for d, arr in dims.items():
                others = [k for k in range(tensor.dim()) if k != d]
                values = (tensor.abs().sum(others) if criterion != "l2" else tensor.pow(2).sum(others).sqrt()
                          ) if others else tensor.abs()
                values = values.detach().double().numpy()
                has = arr >= 0
                cls = classes[arr[has]]
                per = np.bincount(cls, weights=values[has], minlength=n)
                present = np.bincount(cls, minlength=n) > 0
                total += per
                count += present
                best = np.where(present, np.maximum(best, per), best)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = {"sum": np.where(count > 0, total, np.nan), "max": np.where(count > 0, best, np.nan),
                         "mean": total / count}[aggregate]
    return {g.index: np.array([per_class[classes[u[0]]] for u in g.units]) for g in groups}


def _scored(a: Analysis, owner: str, attribute: str, criterion: str) -> torch.Tensor | None:
    module = a.gm.get_submodule(owner) if owner else a.gm
    tensor = getattr(module, attribute)
    if criterion == "bn":
        return tensor if isinstance(module, _NORMS) and attribute == "weight" else None
    if isinstance(module, _NORMS) or tensor.dim() < 2:
        return None          # magnitudes are of weight matrices, not of biases or norm scales
    if criterion == "taylor":
        return None if tensor.grad is None else (tensor * tensor.grad)
    return tensor


def _gradients(gm: nn.Module, loss: Callable[[nn.Module], torch.Tensor] | None) -> None:
    if loss is None:
        raise ValueError("criterion=taylor needs a loss function: give data={'loss': fn} where "
                         "fn(module) returns a scalar loss on your data")
    gm.zero_grad(set_to_none=True)
    with torch.enable_grad():
        value = loss(gm)
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise ValueError("the loss function must return a scalar tensor")
        value.backward()


@dataclass
class Choice:
    """What selection decided for one group."""

    removed: list[int]          # unit indices
    reason: str = ""            # why nothing (more) was removed


def _matches(names: list[str], patterns: list[str]) -> str | None:
    return next((p for p in patterns for n in names if fnmatch.fnmatchcase(n, p)), None)


def parse_overrides(text: str) -> list[tuple[str, float]]:
    """``"layer1.*:0.3,fc1:0"`` -> [("layer1.*", 0.3), ("fc1", 0.0)]."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        pattern, sep, value = item.rpartition(":")
        try:
            ratio = float(value)
        except ValueError:
            ratio = -1.0
        if not sep or not pattern or not 0 <= ratio < 1:
            raise ValueError(f"override {item!r}: write LAYER_GLOB:RATIO with 0 <= RATIO < 1")
        out.append((pattern, ratio))
    return out


def select(groups: list[Group], scores: dict[int, np.ndarray], *, ratio: float, scope: str,
           max_ratio: float, round_to: int, ignore: list[str],
           overrides: list[tuple[str, float]]) -> dict[int, Choice]:
    """Units to remove in each group."""
    choices: dict[int, Choice] = {}
    budget: dict[int, tuple[int, float]] = {}          # group -> (max units to remove, its ratio)
    for g in groups:
        total = len(g.units)
        prunable = [i for i in g.prunable if not math.isnan(scores[g.index][i])]
        hit = _matches(g.owners, ignore)
        if hit:
            choices[g.index] = Choice([], f"ignored ({hit})")
            continue
        if not prunable:
            choices[g.index] = Choice([], "frozen" if g.frozen else "no importance for its layers")
            continue
        override = next((r for p, r in overrides if _matches(g.owners, [p])), None)
        cap = min(len(prunable), int(max_ratio * total), total - 1)
        cap = _rounded(total, cap, round_to)
        budget[g.index] = (cap, ratio if override is None else override)
        if scope == "uniform" or override is not None:
            want = _rounded(total, min(cap, int(budget[g.index][1] * total)), round_to)
            order = sorted(prunable, key=lambda i: scores[g.index][i])
            choices[g.index] = Choice(sorted(order[:want]), "" if want else "ratio rounds to no channel")
    if scope == "global":
        free = [g for g in groups if g.index in budget and g.index not in choices]
        pool = []
        for g in free:
            s = scores[g.index]
            mean = np.nanmean(s[g.prunable]) or 1.0
            pool += [(s[i] / mean, g.index, i) for i in g.prunable if not math.isnan(s[i])]
        target = int(ratio * sum(len(g.units) for g in free))
        taken: dict[int, list[int]] = {g.index: [] for g in free}
        for _, gi, i in sorted(pool):
            if target <= 0:
                break
            if len(taken[gi]) < budget[gi][0]:
                taken[gi].append(i)
                target -= 1
        for g in free:
            total = len(g.units)
            want = _rounded(total, len(taken[g.index]), round_to)
            kept = sorted(taken[g.index], key=lambda i: scores[g.index][i])[:want]
            choices[g.index] = Choice(sorted(kept), "" if kept else "ranked above the global threshold")
    return choices


def _rounded(total: int, remove: int, round_to: int) -> int:
    """Remove at most ``remove`` units so that the units kept are a multiple of ``round_to``."""
    if round_to <= 1:
        return max(remove, 0)
    keep = -(-(total - remove) // round_to) * round_to
    return max(total - min(keep, total), 0)
