"""A quantized graph in the form torch.export-based converters read, with graphopt's scales:
every fake quant => a quantized_decomposed int8 q/dq pair; every WeightFakeQuant => per-channel
q/dq of the float weight, or (``int8_weights``) an int8 weight and its dequantize_per_channel,
as PT2E's convert leaves it. Used by tflite_int8 (LiteRT) and pte_lower (ExecuTorch)."""
from __future__ import annotations

import copy

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed
from torch import fx, nn
from torch.nn.utils import parametrize

from graphopt.quant import is_fake_quant, weight_quant

QD = torch.ops.quantized_decomposed
QUANTIZE = (QD.quantize_per_tensor.default, QD.quantize_per_channel.default)
DEQUANTIZE = (QD.dequantize_per_tensor.default, QD.dequantize_per_channel.default)


def int8_qparams(scale: float, zero_point: int, qmin: int, qmax: int) -> tuple[float, int]:
    """(scale, zero point) of a uint8 0..255 or int8 -128..127 fake quant, in int8 terms."""
    if (qmin, qmax) == (0, 255):
        return float(scale), int(zero_point) - 128
    if (qmin, qmax) == (-128, 127):
        return float(scale), int(zero_point)
    raise ValueError(f"fake quant range {qmin}..{qmax} is neither uint8 0..255 nor int8 -128..127")


class QDQWeight(nn.Module):
    """Stands in for a WeightFakeQuant parametrization: the same per-channel numbers, as the
    quantize_per_channel/dequantize_per_channel pair a converter folds into int8 weights."""

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
    """In place: each WeightFakeQuant => QDQWeight, or, for ``int8_weights``, the weight
    stored as int8 behind a DQWeight."""
    for module in gm.modules():
        if parametrize.is_parametrized(module, "weight"):
            chain = module.parametrizations.weight
            if len(chain) != 1 or not hasattr(chain[0], "scale"):
                raise ValueError(f"{type(module).__name__}.weight: expected one WeightFakeQuant parametrization")
            if int8_weights:
                chain.original = nn.Parameter(weight_quant(module)[0], requires_grad=False)
                chain[0] = DQWeight(chain[0])
            else:
                chain[0] = QDQWeight(chain[0])


def _replace_fake_quants(g: fx.Graph, dq_per_user: bool) -> int:
    count = 0
    for n in list(g.nodes):
        if not is_fake_quant(n):
            continue
        x, scale, zp, qmin, qmax = n.args
        args = (*int8_qparams(scale, zp, qmin, qmax), -128, 127, torch.int8)
        with g.inserting_before(n):
            q = g.call_function(QD.quantize_per_tensor.default, (x, *args))
        for user in list(n.users) if dq_per_user else [n]:
            with g.inserting_before(user):
                dq = g.call_function(QD.dequantize_per_tensor.default, (q, *args))
            if dq_per_user:
                user.replace_input_with(n, dq)
            else:
                n.replace_all_uses_with(dq)
        g.erase_node(n)
        count += 1
    return count


def to_qdq(gm: fx.GraphModule, int8_weights: bool = False,
           dq_per_user: bool = False) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` with q/dq pairs for the fake quants in it and in every GraphModule inside
    it (partitions), and weights per ``swap_weight_fake_quants``; and how many fake quants it
    replaced. ``dq_per_user``: one dequantize for each user of a value, as PT2E's convert writes
    it (ExecuTorch's partitioners group an op with its own dq nodes)."""
    gm = copy.deepcopy(gm)
    swap_weight_fake_quants(gm, int8_weights)
    count = 0
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            count += _replace_fake_quants(module.graph, dq_per_user)
            module.recompile()
    return gm, count
