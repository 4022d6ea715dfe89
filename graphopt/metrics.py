"""The one place that measures how far outputs are from a reference: every comparison in graphopt (verify-each,
artifact verification, golden checks, bench) goes through :func:`compare` and judges it with a :class:`Tolerance`."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import torch


@dataclass(frozen=True)
class Metrics:
    """Distance of ``actual`` from ``reference`` over all outputs (worst output wins)."""

    max_abs: float
    max_rel: float      # max |a - r| divided by max |r|: error relative to the output's scale
    cosine: float       # of the flattened outputs; 1.0 when they are identical (all-zero too)
    sqnr_db: float      # 10 log10(signal power / noise power); inf when exact
    top1: float | None  # argmax agreement over the batch, for (N, C>1) outputs; else None
    finite: bool = True  # every value of ``actual`` is finite (no NaN, no Inf)

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v)
                for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Tolerance:
    """Bounds a comparison must meet; ``None`` leaves that metric unchecked. No tolerance
    accepts NaN or Inf in the outputs, so even ``Tolerance()`` checks finiteness."""

    max_rel: float | None = None
    max_abs: float | None = None        # e.g. a few quantization steps of an int8 output
    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    min_top1: float | None = None

    def violations(self, m: Metrics) -> list[str]:
        """Human-readable reasons ``m`` fails this tolerance (empty when it passes)."""
        out = [] if m.finite else ["NaN or Inf in the outputs"]
        if self.max_rel is not None and not m.max_rel <= self.max_rel:
            out.append(f"max relative error {m.max_rel:.3g} > {self.max_rel:g}")
        if self.max_abs is not None and not m.max_abs <= self.max_abs:
            out.append(f"max abs error {m.max_abs:.3g} > {self.max_abs:.3g}")
        if self.min_cosine is not None and not m.cosine >= self.min_cosine:
            out.append(f"cosine {m.cosine:.6f} < {self.min_cosine:g}")
        if self.min_sqnr_db is not None and not m.sqnr_db >= self.min_sqnr_db:
            out.append(f"SQNR {m.sqnr_db:.1f} dB < {self.min_sqnr_db:g} dB")
        if self.min_top1 is not None and m.top1 is not None and not m.top1 >= self.min_top1:
            out.append(f"top-1 agreement {m.top1:.3f} < {self.min_top1:g}")
        return out

    def above(self, noise: float, times: float = 4) -> "Tolerance":
        """``max_rel`` raised to ``times`` ``noise``, a model's own rounding error (``Graph.rounding_noise``)."""
        return self if self.max_rel is None or self.max_rel >= times * noise else replace(self, max_rel=times * noise)

    @classmethod
    def from_dict(cls, d: dict) -> "Tolerance":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown tolerance keys {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _one(ref: torch.Tensor, act: torch.Tensor) -> Metrics:
    if tuple(ref.shape) != tuple(act.shape):
        raise ValueError(f"output shape {tuple(act.shape)} differs from the reference {tuple(ref.shape)}")
    r, a = (t.detach().to(torch.float64).reshape(-1) for t in (ref, act))
    if r.numel() == 0:
        return Metrics(0.0, 0.0, 1.0, math.inf, None)
    if not torch.isfinite(a).all():
        return Metrics(math.inf, math.inf, -1.0, -math.inf, 0.0 if ref.dim() == 2 else None, finite=False)
    diff, scale = a - r, r.abs().max().item()
    max_abs = diff.abs().max().item()
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    nr, na = r.norm().item(), a.norm().item()
    cosine = 1.0 if max_abs == 0 else 0.0 if nr == 0 or na == 0 else \
        max(-1.0, min(1.0, torch.dot(r, a).item() / (nr * na)))
    noise, signal = diff.pow(2).sum().item(), r.pow(2).sum().item()
    sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    top1 = (ref.argmax(1) == act.argmax(1)).double().mean().item() if ref.dim() == 2 and ref.shape[1] > 1 else None
    return Metrics(max_abs, max_rel, cosine, sqnr, top1)


def compare(reference: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> Metrics:
    """Compare two lists of output tensors pairwise; the worst value of each metric wins."""
    if len(reference) != len(actual):
        raise ValueError(f"{len(actual)} outputs, the reference has {len(reference)}")
    if not reference:
        raise ValueError("nothing to compare: no outputs")
    return worst([_one(r, a) for r, a in zip(reference, actual)])


def worst(parts: Sequence[Metrics]) -> Metrics:
    """The worst value of each metric over several comparisons (outputs, or inputs)."""
    top1s = [p.top1 for p in parts if p.top1 is not None]
    return Metrics(max(p.max_abs for p in parts), max(p.max_rel for p in parts), min(p.cosine for p in parts),
                   min(p.sqnr_db for p in parts), min(top1s) if top1s else None, all(p.finite for p in parts))
