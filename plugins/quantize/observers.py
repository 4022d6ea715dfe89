"""Observers of ``quantize``: from the values a tensor takes on the calibration data, the
range ``(lo, hi)`` its int8 grid covers, then scale and zero point.

- ``minmax``: the extremes seen.
- ``moving-average``: per-batch extremes averaged with momentum 0.01 (torch.ao's
  MovingAverageMinMaxObserver), which ignores rare spikes.
- ``percentile``: the 0.01 % and 99.99 % quantiles (of a 2048-bin histogram).
- ``entropy``: the clipping threshold minimizing the KL divergence between the histogram and
  its 128-level quantization (TensorRT's calibrator).
- ``mse``: the symmetric clipping threshold minimizing the mean squared quantization error.
"""
from __future__ import annotations

import numpy as np
import torch

from graphopt.quant import QParams

OBSERVERS = ("minmax", "moving-average", "percentile", "entropy", "mse")
BINS = 2048


def qparams(lo: float, hi: float, dtype: str) -> QParams:
    """Scale and zero point whose grid covers ``[lo, hi]`` and represents 0 exactly."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if dtype == "int8":                                   # symmetric
        bound = max(-lo, hi)
        scale = bound / 127 if bound > 0 else 1.0
        return QParams(float(np.float32(scale)), 0, "int8")
    scale = (hi - lo) / 255 if hi > lo else 1.0
    scale = float(np.float32(scale))
    zero_point = int(np.clip(round(-lo / scale), 0, 255))
    return QParams(scale, zero_point, "uint8")


class Observer:
    """Collects one tensor's values batch by batch; ``range()`` is the calibrated range."""

    def __init__(self, kind: str):
        if kind not in OBSERVERS:
            raise ValueError(f"unknown observer {kind!r}; choose one of {', '.join(OBSERVERS)}")
        self.kind = kind
        self.lo, self.hi = np.inf, -np.inf
        self.avg: tuple[float, float] | None = None
        self.values: list[np.ndarray] = []

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        lo, hi = float(x.min()), float(x.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        if self.kind == "moving-average":
            self.avg = (lo, hi) if self.avg is None else (self.avg[0] + 0.01 * (lo - self.avg[0]),
                                                          self.avg[1] + 0.01 * (hi - self.avg[1]))
        elif self.kind != "minmax":
            self.values.append(x.flatten().numpy().copy())    # the tensor may be changed in place later

    def range(self) -> tuple[float, float]:
        if self.kind == "minmax":
            return self.lo, self.hi
        if self.kind == "moving-average":
            return self.avg
        values = np.concatenate(self.values)
        if self.kind == "percentile":
            return float(np.percentile(values, 0.01)), float(np.percentile(values, 99.99))
        bound = _entropy_bound(values) if self.kind == "entropy" else _mse_bound(values)
        return (max(self.lo, -bound), min(self.hi, bound))


def _histogram(values: np.ndarray) -> tuple[np.ndarray, float]:
    top = float(np.abs(values).max()) or 1.0
    hist, _ = np.histogram(np.abs(values), bins=BINS, range=(0.0, top))
    return hist.astype(np.float64), top / BINS


def _entropy_bound(values: np.ndarray, levels: int = 128) -> float:
    """|x| threshold whose clipped, ``levels``-level quantized histogram is closest in KL."""
    hist, width = _histogram(values)
    best, best_kl = BINS, np.inf
    for i in range(levels, BINS + 1, 16):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()                         # clip the tail into the last bin
        q = np.zeros(i)                                    # the 128-level version, without the tail
        for chunk in np.array_split(np.arange(i), levels):
            mass, nonzero = hist[chunk].sum(), (hist[chunk] > 0)
            if nonzero.any():
                q[chunk[nonzero]] = mass / nonzero.sum()
        keep = p > 0
        if not (q[keep] > 0).all():
            continue
        pn, qn = p[keep] / p.sum(), q[keep] / q.sum()
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best_kl:
            best, best_kl = i, kl
    return best * width


def _mse_bound(values: np.ndarray) -> float:
    """Symmetric clipping threshold minimizing the mean squared int8 quantization error."""
    top = float(np.abs(values).max()) or 1.0
    sample = values if values.size <= 200_000 else values[:: values.size // 200_000 + 1]
    best, best_err = top, np.inf
    for bound in top * np.linspace(0.3, 1.0, 36):
        scale = bound / 127
        err = float(np.mean((np.clip(np.round(sample / scale), -128, 127) * scale - sample) ** 2))
        if err < best_err:
            best, best_err = bound, err
    return best
