"""Conv / ConvTranspose / Linear -> (* / + -) per-channel constant => the layer, the constant
folded into its weight and bias (float64); chains such as conv(x) * scale + shift fold whole."""
from __future__ import annotations

import functools

import torch
import torch.fx as fx

import graphopt
from graphopt import Effect, Pass
from graphopt.fxutil import arithmetic, erase_if_unused
from graphopt.rewrite import Builder, Rewrite, rewrite_pass, shape

from .layers import LAYERS, channel_dim, channels, why_not_absorbed, with_affine


def _is_layer(gm: fx.GraphModule, value) -> bool:
    return isinstance(value, fx.Node) and value.op == "call_module" \
        and isinstance(gm.get_submodule(value.target), LAYERS)


def _is_constant(value) -> bool:
    """A Python number or a stored tensor (get_attr): what may fold into weights."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number or (isinstance(value, fx.Node) and value.op == "get_attr")


def _matches(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A + - * / of a layer's output, directly or through such ops with constants (a chain)."""
    if arithmetic(node) is None:
        return False
    a, b = node.args
    return any(_is_layer(gm, x) or (isinstance(x, fx.Node) and _is_constant(y) and _matches(gm, x))
               for x, y in ((a, b), (b, a)))


def _operands(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, object, bool]:
    """(the layer side, the other operand, whether the layer side comes first)."""
    a, b = node.args
    first = _is_layer(gm, a) or (not _is_layer(gm, b) and isinstance(a, fx.Node))
    return (a, b, True) if first else (b, a, False)


def _reads_input(node: fx.Node) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n.op == "placeholder":
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


def _value(gm: fx.GraphModule, constant) -> torch.Tensor | object:
    if isinstance(constant, fx.Node):
        return functools.reduce(getattr, constant.target.split("."), gm)
    return constant


def _label(constant) -> str:
    return constant.name if isinstance(constant, fx.Node) else f"{constant:g}"


def _check(gm: fx.GraphModule, node: fx.Node) -> str | None:
    layer_node, constant, layer_first = _operands(gm, node)
    reason = why_not_absorbed(gm, layer_node, node)
    if reason:
        return reason
    if isinstance(constant, fx.Node) and constant.op != "get_attr":
        return (f"its other operand {constant.name} depends on the input" if _reads_input(constant) else
                f"its other operand {constant.name} is computed, not stored (simplify folds it into a buffer)")
    value = _value(gm, constant)
    symbol = arithmetic(node)
    if symbol == "/" and not layer_first:
        return f"it divides by {layer_node.name}'s output"
    if not isinstance(value, (torch.Tensor, int, float)):
        return f"{constant.name} is a {type(value).__name__}, not a tensor"
    out, result = shape(layer_node), shape(node)
    if result != out:
        return f"it broadcasts {layer_node.name}'s output from {out} to {result}"
    if node.meta.get("graphopt.dtype") != layer_node.meta.get("graphopt.dtype"):
        return f"the constant makes the output {node.meta.get('graphopt.dtype')}"
    layer = gm.get_submodule(layer_node.target)
    dim = channel_dim(layer) % len(out)
    sizes = tuple(torch.as_tensor(value).shape)
    varying = [len(out) - len(sizes) + i for i, s in enumerate(sizes) if s != 1]
    if any(d != dim for d in varying):
        return (f"{constant.name} of shape {sizes} varies along dims {varying} of {layer_node.name}'s "
                f"output {out}, not only along its channels (dim {dim})")
    vector = torch.as_tensor(value, dtype=torch.float64)
    if not torch.isfinite(vector).all():
        return f"{_label(constant)} holds non-finite values"
    if symbol == "/" and (vector == 0).any():
        return f"{_label(constant)} holds zeros: it would divide by zero"
    return None


def _fold(b: Builder, node: fx.Node) -> str:
    gm = b.gm
    layer_node, constant, layer_first = _operands(gm, node)
    layer = gm.get_submodule(layer_node.target)
    symbol = arithmetic(node)
    vector = torch.as_tensor(_value(gm, constant), dtype=torch.float64).detach().reshape(-1)
    vector = vector.expand(channels(layer)) if vector.numel() == 1 else vector
    one, zero = torch.ones_like(vector), torch.zeros_like(vector)
    scale, shift = {"*": (vector, zero), "/": (1 / vector, zero), "+": (one, vector),
                    "-": (one, -vector) if layer_first else (-one, vector)}[symbol]
    gm.add_submodule(layer_node.target, with_affine(layer, scale, shift))
    b.substitute(node, layer_node)
    name = _label(constant)
    if isinstance(constant, fx.Node):
        erase_if_unused(gm, constant)
    what = f"{layer_node.name} {symbol} {name}" if layer_first else f"{name} {symbol} {layer_node.name}"
    return f"folded {what} into {type(layer).__name__} {layer_node.target}"


REWRITES = [Rewrite("folded", _matches, _check, _fold)]

run = rewrite_pass(REWRITES)


@graphopt.hookimpl
def graphopt_register_passes():
    return [Pass("fold-affine", "Fold a per-channel constant added to, subtracted from, multiplied with "
                                "or dividing a Conv, ConvTranspose or Linear output into its weight and bias",
                 run, Effect.EXACT)]
