"""How a quantized graph looks, for ``quantize`` and the emitters that lower it.

- An activation is quantized by a ``torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)``
  node (Python scalars; ``node.meta["graphopt.qparams"]`` holds the same as a dict). It rounds to the int8/uint8
  grid and back, so the fx graph computes what an int8 runtime does (ONNX export: QuantizeLinear -> DequantizeLinear).
- A Conv/Linear weight is quantized per output channel, symmetric int8, by a parametrization (:class:`WeightFakeQuant`)
  on ``module.weight``: the float weight stays trainable behind it (QAT trains through its straight-through estimator).
- The q/dq form torch.export-based converters (LiteRT, ExecuTorch) read, with graphopt's scales (``to_qdq``): every
  fake quant => a quantized_decomposed int8 q/dq pair; every WeightFakeQuant => per-channel q/dq of the float weight,
  or an int8 weight and its dequantize_per_channel, as PT2E's convert leaves it."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

FAKE_QUANT = torch.fake_quantize_per_tensor_affine
META = "graphopt.qparams"
QD = torch.ops.quantized_decomposed


@dataclass(frozen=True)
class QParams:
    """Per-tensor affine quantization: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``."""

    scale: float
    zero_point: int
    dtype: str                  # "uint8" or "int8"

    qmin = property(lambda self: 0 if self.dtype == "uint8" else -128, doc="the lowest integer of the grid")
    qmax = property(lambda self: 255 if self.dtype == "uint8" else 127, doc="the highest integer of the grid")

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
    """Give ``module.weight`` per-output-channel int8 fake quantization (scale max|w|/127); returns the scales."""
    w = module.weight.detach()
    scale = w.abs().flatten(1).amax(1).clamp_min(1e-12) / 127
    parametrize.register_parametrization(module, "weight", WeightFakeQuant(scale, 0), unsafe=True)
    return scale


def weight_quant(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``(int8 weight, per-channel scale, axis)`` of a weight-quantized layer, else None."""
    chain = module.parametrizations.weight if parametrize.is_parametrized(module, "weight") else ()
    if (fq := next((p for p in chain if isinstance(p, WeightFakeQuant)), None)) is None:
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


_SHAPE_ONLY = {"flatten", "reshape", "view", "permute", "transpose", "squeeze", "unsqueeze", "contiguous"}


def output_step(gm: fx.GraphModule) -> float | None:
    """The coarsest quantization step (scale) among ``gm``'s outputs when every output comes
    from a fake quant (through shape-only ops), else None."""
    steps = []
    for v in torch.utils._pytree.tree_flatten(next(n for n in gm.graph.nodes if n.op == "output").args[0])[0]:
        while isinstance(v, fx.Node) and v.op in ("call_method", "call_function") and \
                getattr(v.target, "__name__", v.target) in _SHAPE_ONLY:
            v = v.args[0]
        if not (isinstance(v, fx.Node) and is_fake_quant(v)):
            return None
        steps.append(float(v.args[1]))
    return max(steps, default=None)


def int8_qparams(scale: float, zero_point: int, qmin: int, qmax: int) -> tuple[float, int]:
    """(scale, zero point) of a uint8 0..255 or int8 -128..127 fake quant, in int8 terms."""
    if (qmin, qmax) not in ((0, 255), (-128, 127)):
        raise ValueError(f"fake quant range {qmin}..{qmax} is neither uint8 0..255 nor int8 -128..127")
    return float(scale), int(zero_point) - (128 if qmin == 0 else 0)


class QDQWeight(nn.Module):
    """A WeightFakeQuant's numbers as the quantize/dequantize_per_channel pair a converter folds into int8 weights."""

    def __init__(self, fq: nn.Module):
        super().__init__()
        self.register_buffer("scale", fq.scale.detach().float())
        self.register_buffer("zero_point", fq.zero_point.detach().to(torch.int64))
        self.axis = int(getattr(fq, "axis", 0))
        self.qmin, self.qmax = int(getattr(fq, "quant_min", -128)), int(getattr(fq, "quant_max", 127))

    def args(self) -> tuple:
        return self.scale, self.zero_point, self.axis, self.qmin, self.qmax, torch.int8

    def forward(self, w):
        return QD.dequantize_per_channel(QD.quantize_per_channel(w, *self.args()), *self.args())


class DQWeight(QDQWeight):
    """A WeightFakeQuant whose weight is stored in int8 already: dequantize_per_channel only."""

    def forward(self, w):
        return QD.dequantize_per_channel(w, *self.args())


def swap_weight_fake_quants(gm: nn.Module, int8_weights: bool = False) -> None:
    """In place: each WeightFakeQuant => QDQWeight, or with ``int8_weights`` an int8 weight behind a DQWeight."""
    for module in [m for m in gm.modules() if parametrize.is_parametrized(m, "weight")]:
        chain = module.parametrizations.weight
        if len(chain) != 1 or not hasattr(chain[0], "scale"):
            raise ValueError(f"{type(module).__name__}.weight: expected one WeightFakeQuant parametrization")
        if int8_weights:
            chain.original = nn.Parameter(weight_quant(module)[0], requires_grad=False)
        chain[0] = (DQWeight if int8_weights else QDQWeight)(chain[0])


def _replace_fake_quants(gm: fx.GraphModule, dq_per_user: bool) -> int:
    g, fake_quants = gm.graph, [n for n in gm.graph.nodes if is_fake_quant(n)]
    for n in fake_quants:
        args = (*int8_qparams(*n.args[1:]), -128, 127, torch.int8)   # n.args: x, scale, zero point, qmin, qmax
        with g.inserting_before(n):
            q = g.call_function(QD.quantize_per_tensor.default, (n.args[0], *args))
        for user in list(n.users) if dq_per_user else [n]:
            with g.inserting_before(user):
                dq = g.call_function(QD.dequantize_per_tensor.default, (q, *args))
            if dq_per_user:
                user.replace_input_with(n, dq)
            else:
                n.replace_all_uses_with(dq)
        g.erase_node(n)
    gm.recompile()
    return len(fake_quants)


def to_qdq(gm: fx.GraphModule, int8_weights: bool = False, dq_per_user: bool = False) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` with q/dq pairs for the fake quants in it and in every GraphModule inside it (partitions),
    weights per ``swap_weight_fake_quants``; and how many fake quants it replaced. ``dq_per_user``: a dequantize
    per user of a value, as PT2E's convert writes it (ExecuTorch's partitioners group an op with its own dq nodes)."""
    gm = copy.deepcopy(gm)
    swap_weight_fake_quants(gm, int8_weights)
    return gm, sum(_replace_fake_quants(m, dq_per_user) for m in gm.modules() if isinstance(m, fx.GraphModule))
