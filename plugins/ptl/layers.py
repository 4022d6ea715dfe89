"""int8 TorchScript-Lite's quint8 grids and clamps, and the torch.ao quantized modules int8 layers become."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.fused import FusedConv1d, FusedConv2d, FusedLinear
from graphopt.quant import weight_quant
from graphopt.rewrite import argument, calls

QUANTIZED_LAYERS = {nn.Conv1d: (nnq.Conv1d, nniq.ConvReLU1d), nn.Conv2d: (nnq.Conv2d, nniq.ConvReLU2d),
                    nn.Linear: (nnq.Linear, nniq.LinearReLU)}
NO_CLAMP = (-math.inf, math.inf)


@dataclass(frozen=True)
class Grid:
    """A quint8 grid: ``value = scale * (code - zero_point)``, codes 0..top (255 unless the
    fake-quant uses fewer levels)."""

    scale: float
    zero_point: int
    top: int = 255

    def code(self, value: float) -> int:
        """The quint8 code a quantized op writes for ``value`` (before the grid's top)."""
        if math.isinf(value):
            return 0 if value < 0 else 255
        return min(max(round(value / self.scale) + self.zero_point, 0), 255)


def fake_quant_grid(node: fx.Node) -> Grid:
    """The quint8 grid of a fake-quant node's int8 one."""
    _, scale, zero_point, qmin, qmax = node.args
    return Grid(float(scale), int(zero_point) - qmin, qmax - qmin)


def clamping(grid: Grid, bounds: tuple[float, float], relu_kernel: bool) -> tuple[bool, tuple | None]:
    """How an op writing to ``grid`` applies the clamp ``bounds`` and the grid's own ends:
    (use its ReLU kernel, the bounds of a quantized clamp after it, None: none needed). Codes
    0 and 255 clamp by themselves, and rounding is monotone, so clamping codes is clamping values."""
    lo, hi = bounds
    relu = relu_kernel and lo > -math.inf and grid.code(lo) == grid.zero_point
    low = None if relu or grid.code(lo) == 0 else lo
    high = None if grid.code(hi) == 255 and grid.top == 255 else \
        hi if grid.code(hi) <= grid.top else grid.scale * (grid.top - grid.zero_point)
    return relu, None if low is None and high is None else (low, high)


def module_bounds(m: nn.Module) -> tuple[float, float] | None:
    """The clamp an activation module computes (None: not a clamp)."""
    if isinstance(m, nn.Identity):
        return NO_CLAMP
    if isinstance(m, nn.ReLU):
        return 0.0, math.inf
    return (float(m.min_val), float(m.max_val)) if isinstance(m, nn.Hardtanh) else None


def activation_bounds(gm: fx.GraphModule, node: fx.Node) -> tuple[float, float] | None:
    """The clamp an activation node computes (None: not a ReLU, ReLU6 or Hardtanh)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return None if isinstance(m, nn.Identity) else module_bounds(m)
    if calls(node, (F.relu, torch.relu), ("relu",)):
        return 0.0, math.inf
    if calls(node, (F.relu6,)):
        return 0.0, 6.0
    if calls(node, (F.hardtanh,)):
        return float(argument(node, 1, "min_val", -1.0)), float(argument(node, 2, "max_val", 1.0))
    return None


def quantized_layer(module: nn.Module, base: type, relu: bool, grid: Grid) -> nn.Module:
    """The torch.ao quantized module computing ``module`` (weight-quantized by ``quantize``)
    from its int8 weight and per-channel scales, writing to ``grid``."""
    q, scale, axis = weight_quant(module)
    shape = [-1 if d == axis else 1 for d in range(q.dim())]
    weight = torch.quantize_per_channel(q.float() * scale.reshape(shape), scale.double(),
                                        torch.zeros(len(scale), dtype=torch.long), axis, torch.qint8)
    cls, bias = QUANTIZED_LAYERS[base][relu], module.bias is not None
    if base is nn.Linear:
        out = cls(module.in_features, module.out_features, bias)
    else:
        out = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, bias)
    out.set_weight_bias(weight, module.bias.detach().float() if bias else None)
    out.scale, out.zero_point = grid.scale, grid.zero_point
    return out


def why_not_quantized(module: nn.Module, base: type | None) -> str | None:
    """Why ``module`` (of quantized-layer class ``base``) stays fp32 (None: it can be quantized)."""
    if base is None:
        return f"{type(module).__name__}: no quantized module in torch.ao.nn.quantized"
    if isinstance(module, (FusedConv1d, FusedConv2d, FusedLinear)):
        if not isinstance(module.bn, nn.Identity):
            return "its BatchNorm is not folded"
        if module_bounds(module.act) is None:
            return (f"{type(module.act).__name__} inside it: no quantized {base.__name__} applies it, and "
                    f"quantize calibrated only its output")
    elif type(module).forward is not base.forward:
        return f"{type(module).__name__} has its own forward"
    if base is not nn.Linear and (isinstance(module.padding, str) or module.padding_mode != "zeros"):
        return f"padding {module.padding!r} ({module.padding_mode}): quantized convolutions pad with zeros only"
    return None
