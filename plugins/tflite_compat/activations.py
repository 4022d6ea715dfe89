"""hardsigmoid(x) => relu6(x + 3) / 6 in float graphs: onnx2tf writes ONNX HardSigmoid as TFLite's
RELU_0_TO_1, which LiteRT's XNNPACK delegate does not take, so each squeeze-excitation gate of a
MobileNetV3 split the model (10 partitions); ADD, RELU6 and DIV it takes. In a quantized graph the
gate is left as it is: litert-torch makes it one int8 op on the fake quant's fixed grid."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.quant import is_fake_quant
from graphopt.rewrite import Builder, Rewrite, argument, calls


def _is_hardsigmoid(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Hardsigmoid)
    return calls(node, [F.hardsigmoid], ["hardsigmoid"])


def _quantized(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if any(is_fake_quant(u) for u in node.users):
        return "its output is quantized: the int8 converter takes it as one op"
    return None


def _replace(b: Builder, node: fx.Node) -> str:
    x = b(argument(node, 0, "input"))
    b.substitute(node, F.relu6(x + b.const(3.0, node)) / b.const(6.0, node))
    return "hardsigmoid -> relu6(x + 3) / 6"


REWRITES = [Rewrite("hardsigmoid", _is_hardsigmoid, _quantized, _replace)]
