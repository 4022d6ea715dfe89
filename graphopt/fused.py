"""The modules fuse-act builds: Conv1d/2d/3d or Linear, then an optional BatchNorm, then an activation applied in
place to the layer's own fresh output; and AddReLU.

A fused layer subclasses its layer (same parameters, same MACs in graphopt's count, found by passes that look for
convolutions) but has its own forward, so passes that fold into the layer's weights (fold-bn, fold-affine) leave it
alone. Traced: the layer's op, then ``relu_``, ``hardtanh_`` or ``hardswish_``; in ONNX: the layer, the activation."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _kinds(layer: str, module: nn.Module) -> tuple:
    """What a fused layer computes: its op kind, then its BatchNorm and activation modules (for their own kinds)."""
    return (layer, *(m for m in (module.bn, module.act) if not isinstance(m, nn.Identity)))


class _FusedConv:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self._conv_forward(x, self.weight, self.bias)))

    def graphopt_kinds(self) -> tuple[str, ...]:
        return _kinds(f"conv{len(self.kernel_size)}d", self)


class FusedConv1d(_FusedConv, nn.Conv1d):
    """Conv1d -> BatchNorm1d (or Identity) -> activation."""


class FusedConv2d(_FusedConv, nn.Conv2d):
    """Conv2d -> BatchNorm2d (or Identity) -> activation."""


class FusedConv3d(_FusedConv, nn.Conv3d):
    """Conv3d -> BatchNorm3d (or Identity) -> activation."""


class FusedLinear(nn.Linear):
    """Linear -> BatchNorm1d (or Identity) -> activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(F.linear(x, self.weight, self.bias)))

    def graphopt_kinds(self) -> tuple[str, ...]:
        return _kinds("linear", self)


class AddReLU(nn.Module):
    """``relu(a + b)``, the ReLU in place on the sum."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.relu_(a + b)

    def graphopt_kinds(self) -> tuple[str, ...]:
        return ("add", "relu")


FUSED = {nn.Conv1d: FusedConv1d, nn.Conv2d: FusedConv2d, nn.Conv3d: FusedConv3d, nn.Linear: FusedLinear}
