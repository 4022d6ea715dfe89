"""quantize's calibration: the data as batches, fp32 values observed once, quantized copies scored vs fp32."""
from __future__ import annotations

import copy
import math

import torch
import torch.fx as fx

from graphopt import PassContext
from graphopt.graph import flatten_outputs
from graphopt.metrics import compare

from .observers import Observer, QParams, qparams
from .plan import insert, plan


def calibration_batches(ctx: PassContext) -> list[tuple[torch.Tensor, ...]]:
    """``ctx.data["calibration"]`` as input tuples, checked against the example inputs."""
    batches = []
    for i, item in enumerate(ctx.data["calibration"]):
        batch = (item,) if isinstance(item, torch.Tensor) else tuple(item)
        if len(batch) != len(ctx.example_inputs):
            raise ValueError(f"calibration sample {i} has {len(batch)} inputs, the model takes "
                             f"{len(ctx.example_inputs)}")
        for t, ex in zip(batch, ctx.example_inputs):
            if t.shape[1:] != ex.shape[1:]:
                raise ValueError(f"calibration sample {i} has shape {tuple(t.shape)}, the model takes "
                                 f"{tuple(ex.shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"calibration sample {i} holds NaN or Inf; clean the data before calibrating")
        batches.append(batch)
    if not batches:
        raise ValueError("the calibration data is empty")
    return batches


class _Recorder(fx.Interpreter):
    """Runs the graph, handing the named nodes' values to their observers as they are computed
    (before any later in-place op); no value is kept beyond what the observer needs."""

    def __init__(self, gm: fx.GraphModule, observers: dict[str, Observer]):
        super().__init__(gm)
        self.observers = observers

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.name in self.observers and isinstance(value, torch.Tensor):
            self.observers[n.name].observe(value)
        return value


def _observe(gm: fx.GraphModule, batches, names: set[str], kind: str, progress=lambda text: None
             ) -> dict[str, Observer]:
    """An observer per named node, fed the node's value on every batch (minmax keeps two numbers)."""
    observers = {name: Observer(kind) for name in names}
    recorder = _Recorder(gm, observers)
    with torch.no_grad():
        for i, batch in enumerate(batches, 1):
            progress(f"calibrating {len(names)} tensors ({i}/{len(batches)})")
            recorder.run(*batch)
    return observers


def _sqnr(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Signal to quantization noise of ``got`` against ``ref``, in dB."""
    signal = sum(float(r.double().pow(2).sum()) for r in ref)
    noise = sum(float((r.double() - g.double()).pow(2).sum()) for r, g in zip(ref, got))
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class Calibrated:
    """The fp32 graph's outputs on the calibration data and on ``held`` (inputs scored, not
    calibrated on: minmax ranges fit their own batches, and EfficientNet-B0 met 0.995 on them and
    0.983 on the example), and its values observed once per value: a node's range is calibrated
    the first time a plan asks for it (one pass over the batches for all the nodes first asked for
    together), not stored (every value of ViT-B/16 on 16 batches is 6 GB)."""

    def __init__(self, gm: fx.GraphModule, batches, observer: str, activations: str, held=(),
                 progress=lambda text: None):
        self.gm, self.batches, self.observer, self.activations = gm, batches, observer, activations
        self.progress = progress
        self.scored = [*batches, *(x for x in held if not any(_same(x, b) for b in batches))]
        with torch.no_grad():
            self.outputs = [flatten_outputs(gm(*b)) for b in self.scored]
        self._ranges: dict[str, QParams] = {}

    def qparams(self, names) -> dict[str, QParams]:
        missing = {n for n in names if n not in self._ranges}
        if missing:
            for name, obs in _observe(self.gm, self.batches, missing, self.observer, self.progress).items():
                self._ranges[name] = qparams(*obs.range(), self.activations)
        return {n: self._ranges[n] for n in names}

    def quantized(self, patterns: list[str], excluded: dict[str, str], batches: int | None = None):
        """A quantized copy of the graph keeping ``excluded`` in fp32, its plan, its qparams and
        the SQNR and cosine of its outputs (on the first ``batches`` calibration batches, else on
        every batch and held input)."""
        work = copy.deepcopy(self.gm)
        p = plan(work, patterns, excluded)
        chosen = insert(work, p, self.qparams([n.name for n in p.observed]))
        use = self.scored[:batches] if batches else self.scored
        with torch.no_grad():
            got = [t for b in use for t in flatten_outputs(work(*b))]
        ref = [t for out in self.outputs[:len(use)] for t in out]
        return work, p, chosen, _sqnr(ref, got), compare(ref, got).cosine
