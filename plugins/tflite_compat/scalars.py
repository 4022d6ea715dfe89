"""x (+ - * /) number => x (+ - * /) 0-d constant tensor, for float tensors x.

onnx2tf's accuracy check of Add, Sub, Mul and Div feeds an exported scalar Constant to a
Keras model as an output and fails ("Output tensors of a Functional model must be the
output of a TensorFlow Layer ... Found: 0.25") whenever the output shape repeats a
dimension (64x64 tokens, 8x8 maps); a buffer is an initializer, which it takes.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from graphopt.rewrite import Builder, Rewrite, calls, never_rejects

_OPS = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
        torch.add: "+", torch.sub: "-", torch.mul: "*", torch.div: "/"}
_METHODS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _is_float_tensor(value) -> bool:
    return isinstance(value, fx.Node) and value.meta.get("graphopt.dtype", "").startswith(("float", "bfloat"))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _matches(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A binary +, -, *, / (no kwargs) of a float tensor node and a Python number."""
    if not calls(node, _OPS, _METHODS) or node.kwargs or len(node.args) != 2:
        return False
    a, b = node.args
    return (_is_float_tensor(a) and _is_number(b)) or (_is_number(a) and _is_float_tensor(b))


def _replace(b: Builder, node: fx.Node) -> str:
    symbol = _OPS[node.target] if node.op == "call_function" else _METHODS[node.target]
    tensor = next(a for a in node.args if isinstance(a, fx.Node))
    number = next(a for a in node.args if not isinstance(a, fx.Node))
    x, y = (b(a) if isinstance(a, fx.Node) else b.const(a, tensor) for a in node.args)
    b.substitute(node, _APPLY[symbol](x, y))
    return f"{symbol} {number:g} -> {symbol} constant tensor"


REWRITES = [Rewrite("scalar_operand", _matches, never_rejects, _replace)]
