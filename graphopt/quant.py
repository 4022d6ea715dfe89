"""How a quantized graph looks, for ``quantize`` and the emitters that lower it.

- An activation is quantized by a ``torch.fake_quantize_per_tensor_affine(x, scale,
  zero_point, qmin, qmax)`` node (Python scalars; ``node.meta["graphopt.qparams"]`` holds
  the same as a dict). It rounds to the int8/uint8 grid and back, so the fx graph computes
  what an int8 runtime does, and the ONNX exporter writes it as QuantizeLinear ->
  DequantizeLinear.
- A Conv/Linear weight is quantized per output channel, symmetric int8, by a parametrization
  (:class:`WeightFakeQuant`) on ``module.weight``: the float weight stays trainable behind it
  (QAT trains through the straight-through estimator of the fake-quant op).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize


FAKE_QUANT = torch.fake_quantize_per_tensor_affine
META = "graphopt.qparams"


@dataclass(frozen=True)
class QParams:
    """Per-tensor affine quantization: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``."""

    scale: float
    zero_point: int
    dtype: str                  # "uint8" or "int8"

    @property
    def qmin(self) -> int:
        return 0 if self.dtype == "uint8" else -128

    @property
    def qmax(self) -> int:
        return 255 if self.dtype == "uint8" else 127

    def as_dict(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point, "dtype": self.dtype}


class WeightFakeQuant(nn.Module):
    """Symmetric per-channel int8 fake quantization along ``axis`` with a fixed scale."""

    def __init__(self, scale: torch.Tensor, axis: int = 0):
        super().__init__()
        self.axis = axis
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", torch.zeros(len(scale), dtype=torch.int32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_channel_affine(w, self.scale, self.zero_point, self.axis, -128, 127)


def quantize_weight(module: nn.Module) -> torch.Tensor:
    """Give ``module.weight`` per-output-channel int8 fake quantization (scale max|w|/127);
    returns the scales."""
    w = module.weight.detach()
    scale = w.abs().flatten(1).amax(1).clamp_min(1e-12) / 127
    parametrize.register_parametrization(module, "weight", WeightFakeQuant(scale, 0), unsafe=True)
    return scale


def weight_quant(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``(int8 weight, per-channel scale, axis)`` of a weight-quantized layer, else None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    fq = next((p for p in module.parametrizations.weight if isinstance(p, WeightFakeQuant)), None)
    if fq is None:
        return None
    w = module.parametrizations.weight.original.detach()
    shape = [-1] + [1] * (w.dim() - 1)
    q = torch.clamp(torch.round(w / fq.scale.reshape(shape)), -128, 127).to(torch.int8)
    return q, fq.scale.clone(), fq.axis


def insert_fake_quant(gm: fx.GraphModule, value: fx.Node, q: QParams) -> fx.Node:
    """A fake-quant node of ``value`` right after it."""
    with gm.graph.inserting_after(value):
        node = gm.graph.call_function(FAKE_QUANT, (value, q.scale, q.zero_point, q.qmin, q.qmax))
    node.meta[META] = q.as_dict()
    return node


def is_fake_quant(node: fx.Node) -> bool:
    """A per-tensor fake quant: torch's function (graphopt's graphs) or its aten op (exported ones)."""
    return node.op == "call_function" and node.target in (
        FAKE_QUANT, torch.ops.aten.fake_quantize_per_tensor_affine.default)


def activation_qparams(node: fx.Node) -> QParams:
    """The qparams of a fake-quant node, read from its arguments."""
    _, scale, zero_point, qmin, _ = node.args
    return QParams(float(scale), int(zero_point), "uint8" if qmin == 0 else "int8")
