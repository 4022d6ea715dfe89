"""GELU(erf) => relu(x) - |x|*erfc_poly(|x|/sqrt2)/2; erf(x) => sign(x)*(1 - erfc_poly(|x|));
GELU(tanh) => 0.5*x*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x^3))) with tensor constants.

erfc_poly is Abramowitz-Stegun 7.1.26 (|error| <= 1.5e-7): abs, mul, add, div, exp, relu,
all TFLite builtins. onnx2tf turns Erf into FlexErf, and fails on the scalar Constants of
an exported GELU (either kind) where the shape repeats a dimension (see tflite_compat_scalars).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.rewrite import Builder, Rewrite, argument, calls, never_rejects

_P = 0.3275911
_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erfc_of_abs(b: Builder, ax: fx.Proxy, scale: float, factor: float, like: fx.Node) -> fx.Proxy:
    """factor * erfc(z) for z = scale * ax >= 0: factor*t*(a1 + t*(a2 + ...))*exp(-z^2), t = 1/(1 + p*z)."""
    one = b.const(1.0, like)
    t = one / (one + b.const(_P * scale, like) * ax)
    poly = b.const(factor * _A[-1], like)
    for a in reversed(_A[:-1]):
        poly = poly * t + b.const(factor * a, like)
    return poly * t * torch.exp(ax * ax * b.const(-scale * scale, like))


def _approximate(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The ``approximate`` of a GELU node ("none" or "tanh"), None when it is no GELU."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return module.approximate if isinstance(module, nn.GELU) else None
    return argument(node, 1, "approximate", "none") if calls(node, [F.gelu]) else None


def _replace_gelu_erf(b: Builder, node: fx.Node) -> str:
    x = b(argument(node, 0, "input"))
    ax = x.abs()
    b.substitute(node, torch.relu(x) - ax * erfc_of_abs(b, ax, math.sqrt(0.5), 0.5, node))
    return "GELU(erf) -> erf polynomial"


def _replace_gelu_tanh(b: Builder, node: fx.Node) -> str:
    x = b(argument(node, 0, "input"))
    inner = b.const(math.sqrt(2 / math.pi), node) * (x + b.const(0.044715, node) * (x * x * x))
    b.substitute(node, b.const(0.5, node) * x * (b.const(1.0, node) + torch.tanh(inner)))
    return "GELU(tanh) -> tanh formula with tensor constants"


def _replace_erf(b: Builder, node: fx.Node) -> str:
    x = b(argument(node, 0, "input"))
    b.substitute(node, torch.sign(x) * (b.const(1.0, node) - erfc_of_abs(b, x.abs(), 1.0, 1.0, node)))
    return "erf -> erf polynomial"


REWRITES = [
    Rewrite("gelu_erf", lambda gm, n: _approximate(gm, n) == "none", never_rejects, _replace_gelu_erf),
    Rewrite("gelu_tanh", lambda gm, n: _approximate(gm, n) == "tanh", never_rejects, _replace_gelu_tanh),
    Rewrite("erf", lambda gm, n: calls(n, [torch.erf, torch.special.erf], ["erf"]), never_rejects,
            _replace_erf),
]
