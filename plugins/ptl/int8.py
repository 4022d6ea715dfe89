"""A fake-quant graph (``quantize``) => quantized kernels, for TorchScript-Lite: fake-quant of
an fp32 value => ``quantize_per_tensor``; Conv1d/2d, Linear [-> ReLU/ReLU6/Hardtanh] => torch.ao
quantized modules (ConvReLU/LinearReLU) with graphopt's int8 weights and per-channel scales;
add, mul [-> ReLU], AddReLU, matmul => ``quantized::add(_relu)``, ``mul(_relu)``, ``matmul``;
hardswish => ``quantized::hardswish``; cat => ``quantized::cat``; pooling, reshapes, ReLU, sigmoid,
tanh => the same op on the quantized tensor; anything else => dequantize -> fp32 op -> quantize at the next fake-quant.

Activations are quint8, the only kind the x86 and qnnpack kernels take: an int8 fake-quant
grid (codes -128..127, zero point z) is the quint8 grid with zero point z + 128.
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.fused import AddReLU
from graphopt.fxutil import writes_in_place
from graphopt.quant import is_fake_quant, weight_quant
from graphopt.rewrite import argument, calls

from .layers import (NO_CLAMP, QUANTIZED_LAYERS, Grid, activation_bounds, clamping, fake_quant_grid, module_bounds,
                     quantized_layer, why_not_quantized)

ENGINES = ("x86", "onednn", "qnnpack")
_Q = torch.ops.quantized
_BINARY = {operator.add: "add", operator.iadd: "add", torch.add: "add", "add": "add", operator.mul: "mul",
           operator.imul: "mul", torch.mul: "mul", "mul": "mul", operator.matmul: "matmul",
           torch.matmul: "matmul", "matmul": "matmul"}
_KERNELS = {"add": (_Q.add, _Q.add_relu), "mul": (_Q.mul, _Q.mul_relu), "matmul": (_Q.matmul, None)}
# ops that take a quint8 tensor as it is and keep its grid
_SAME_GRID_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                      nn.modules.pooling._AdaptiveAvgPoolNd, nn.Flatten, nn.Identity, nn.ReLU, nn.Hardtanh)
_SAME_GRID_FUNCTIONS = (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                        torch.unsqueeze, torch.mean, F.relu, torch.relu, F.relu6, F.hardtanh, F.max_pool1d,
                        F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)
_SAME_GRID_METHODS = ("flatten", "reshape", "view", "permute", "transpose", "contiguous", "squeeze",
                      "unsqueeze", "mean", "relu", "size", "dim")   # size, dim: not a tensor
# ops whose quint8 output has a grid of torch's choosing (quantize picks the same)
_FIXED = {nn.Sigmoid: (1 / 256, 0), nn.Hardsigmoid: (1 / 256, 0), nn.Tanh: (2 / 256, 128),
          torch.sigmoid: (1 / 256, 0), F.sigmoid: (1 / 256, 0), F.hardsigmoid: (1 / 256, 0),
          torch.tanh: (2 / 256, 128), "sigmoid": (1 / 256, 0), "tanh": (2 / 256, 128)}


@dataclass(frozen=True)
class Value:
    """A value of the lowered graph: ``grid`` set when it is a quint8 tensor on that grid."""

    node: Any
    grid: Grid | None = None


@dataclass
class Lowered:
    module: fx.GraphModule | None = None
    int8: dict[str, str] = field(default_factory=dict)      # op -> the kernel it became
    fp32: dict[str, str] = field(default_factory=dict)      # op quantize made int8, kept fp32 -> why

    def summary(self) -> dict:
        """Its int8 ops, the ops kept fp32 and why, and how often values cross: fp32 -> int8
        (quantize), int8 -> int8 on another grid (requantize), int8 -> fp32 (dequantize)."""
        nodes = self.module.graph.nodes
        quantize = [n for n in nodes if n.target is torch.quantize_per_tensor]
        requantize = sum(1 for n in quantize if n.args[0].target == "dequantize")
        dequantize = sum(1 for n in nodes if n.target == "dequantize" and
                         any(u.target is not torch.quantize_per_tensor for u in n.users))
        return {"int8_ops": len(self.int8), "kept_fp32": self.fp32, "quantize": len(quantize) - requantize,
                "requantize": requantize, "dequantize": dequantize}


def missing_engine(engine: str) -> str | None:
    """Why this torch build cannot run ``engine`` (None: it can)."""
    supported = torch.backends.quantized.supported_engines
    return None if engine in supported else \
        f"this torch build has no quantized engine {engine!r} (it has {', '.join(supported)})"


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """``torch.backends.quantized.engine`` set to ``engine`` inside: modules pack their weights,
    and kernels run, for the engine set when they are built, loaded and called."""
    if missing_engine(engine):
        raise ValueError(missing_engine(engine))
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


class _Lowering:
    def __init__(self, gm: fx.GraphModule):
        self.gm, self.graph = gm, fx.Graph()
        self.env: dict[fx.Node, Value] = {}
        self.owned: dict[str, Any] = {}               # the new module's submodules and attributes
        self.dequantized: dict[fx.Node, fx.Node] = {}
        self.absorbed: set[fx.Node] = set()
        self.result = Lowered()

    def run(self) -> Lowered:
        for node in self.gm.graph.nodes:
            if node in self.absorbed:
                continue
            if node.op == "output":
                self.graph.output(fx.node.map_arg(node.args[0], self._float))
            elif node.op in ("placeholder", "get_attr"):
                if node.op == "get_attr":
                    owner, _, name = node.target.rpartition(".")
                    self.owned[node.target] = getattr(self.gm.get_submodule(owner), name)
                self.env[node] = Value(self.graph.node_copy(node, lambda n: self.env[n].node))
            elif is_fake_quant(node):
                self.env[node] = self._quantize(self.env[node.args[0]], fake_quant_grid(node))
            elif not self._lower(node):
                self.env[node] = self._on_grid(node) or self._fp32(node)
        self.graph.lint()
        self.result.module = fx.GraphModule(self.owned, self.graph, type(self.gm).__name__)
        return self.result

    def _float(self, node: fx.Node) -> fx.Node:
        """``node``'s value in the lowered graph as fp32."""
        return self._dequantized(self.env[node])

    def _dequantized(self, value: Value) -> fx.Node:
        """``value`` as fp32 (a quint8 value dequantized, once)."""
        if value.grid is None:
            return value.node
        if value.node not in self.dequantized:
            self.dequantized[value.node] = self.graph.call_method("dequantize", (value.node,))
        return self.dequantized[value.node]

    def _quantize(self, value: Value, grid: Grid) -> Value:
        """A fake-quant of ``value``: nothing when it is on that grid already."""
        if value.grid == grid:
            return value
        out = self.graph.call_function(torch.quantize_per_tensor, (self._dequantized(value), grid.scale,
                                                                   grid.zero_point, torch.quint8))
        return Value(self._clamped(out, clamping(grid, NO_CLAMP, False)[1]), grid)

    def _clamped(self, out: fx.Node, bounds: tuple | None) -> fx.Node:
        return out if bounds is None else self.graph.call_function(torch.clamp, (out, *bounds))

    def _add_module(self, name: str, module: nn.Module) -> str:
        key, i = name, 0
        while key in self.owned and self.owned[key] is not module:
            i += 1
            key = f"{name}_{i}"
        self.owned[key] = module
        return key

    def _copy(self, node: fx.Node, arg: Callable[[fx.Node], fx.Node]) -> fx.Node:
        new = self.graph.node_copy(node, arg)
        if node.op == "call_module":
            new.target = self._add_module(node.target, self.gm.get_submodule(node.target))
        return new

    def _fp32(self, node: fx.Node) -> Value:
        """``node`` as it is, on fp32 values (a weight-quantized layer with its fake-quantized weight)."""
        return Value(self._copy(node, self._float))

    def _on_grid(self, node: fx.Node) -> Value | None:
        """``node`` run on its quint8 input as it is, when it takes one (None: it does not, or it
        writes in place, which could reach a value an identity fake-quant shares with it)."""
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node) or self.env[first].grid is None or writes_in_place(self.gm, node) or \
                any(self.env[n].grid is not None for n in node.all_input_nodes if n is not first):
            return None
        grid = self.env[first].grid
        key = type(self.gm.get_submodule(node.target)) if node.op == "call_module" else node.target
        if key in _FIXED:
            grid = Grid(*_FIXED[key])
        elif not (calls(node, _SAME_GRID_FUNCTIONS, _SAME_GRID_METHODS) or node.op == "call_module" and
                  isinstance(self.gm.get_submodule(node.target), _SAME_GRID_MODULES)):
            return None
        tensor = not calls(node, methods=("size", "dim"))
        return Value(self._copy(node, lambda n: self.env[n].node), grid if tensor else None)

    def _chain(self, node: fx.Node) -> tuple[fx.Node | None, fx.Node] | None:
        """(activation or None, fake-quant) after ``node``, each the only reader of what it follows."""
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        if is_fake_quant(user):
            return None, user
        if activation_bounds(self.gm, user) is None or len(user.users) != 1:
            return None
        fq = next(iter(user.users))
        return (user, fq) if is_fake_quant(fq) else None

    def _kind(self, node: fx.Node) -> str | None:
        if node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            return "layer" if weight_quant(m) is not None else "add" if isinstance(m, AddReLU) else \
                "hardswish" if isinstance(m, nn.Hardswish) and not writes_in_place(self.gm, node) else None
        if node.op == "call_function" and node.target is torch.cat:
            return "cat"
        if calls(node, (F.hardswish,), ("hardswish",)) and not writes_in_place(self.gm, node):
            return "hardswish"
        binary = node.op in ("call_function", "call_method") and not node.kwargs and len(node.args) == 2
        return _BINARY.get(node.target) if binary and all(isinstance(a, fx.Node) for a in node.args) else None

    def _lower(self, node: fx.Node) -> bool:
        """Replace ``node`` and the activation and fake-quant after it by a quantized kernel."""
        kind = self._kind(node)
        chain = self._chain(node) if kind else None
        if chain is None:
            return False
        act, fq = chain
        grid, bounds = fake_quant_grid(fq), activation_bounds(self.gm, act) if act is not None else NO_CLAMP
        inputs = list(node.args[0]) if kind == "cat" else node.args[:1] if kind == "hardswish" else list(node.args)
        if not all(isinstance(x, fx.Node) and self.env[x].grid is not None for x in inputs):
            made = "an input is not int8 here"
        else:
            made = self._layer(node, grid, bounds) if kind == "layer" else \
                self._kernel(node, kind, inputs, grid, bounds)
        if isinstance(made, str):
            self.result.fp32[node.name] = made
            return False
        out, clamp, self.result.int8[node.name] = made
        self.env[fq] = Value(self._clamped(out, clamp), grid)
        self.absorbed.update(n for n in (act, fq) if n is not None)
        return True

    def _layer(self, node: fx.Node, grid: Grid, bounds: tuple[float, float]) -> tuple | str:
        """(quantized module call, clamp after it, its name), or why the layer stays fp32."""
        module = self.gm.get_submodule(node.target)
        base = next((c for c in type(module).__mro__ if c in QUANTIZED_LAYERS), None)
        why = why_not_quantized(module, base)
        if why:
            return why
        inner = module_bounds(getattr(module, "act", nn.Identity()))
        relu, clamp = clamping(grid, (max(bounds[0], inner[0]), min(bounds[1], inner[1])), True)
        qmodule = quantized_layer(module, base, relu, grid)
        out = self.graph.call_module(self._add_module(node.target, qmodule), (self.env[node.args[0]].node,))
        return out, clamp, type(qmodule).__name__

    def _kernel(self, node: fx.Node, kind: str, inputs: list[fx.Node], grid: Grid, bounds) -> tuple:
        """(``quantized::`` op call, clamp after it, the op's name) for add, mul, matmul, cat, hardswish."""
        values = [self.env[x].node for x in inputs]
        if kind == "hardswish":
            kernel, args, (_, clamp) = _Q.hardswish, tuple(values), clamping(grid, bounds, False)
        elif kind == "cat":
            kernel, args, (_, clamp) = _Q.cat, (values, argument(node, 1, "dim", 0)), clamping(grid, bounds, False)
        else:
            if node.op == "call_module":                  # AddReLU
                bounds = (max(bounds[0], 0.0), bounds[1])
            plain, with_relu = _KERNELS[kind]
            relu, clamp = clamping(grid, bounds, with_relu is not None)
            kernel, args = (with_relu if relu else plain), tuple(values)
        out = self.graph.call_function(kernel, (*args, grid.scale, grid.zero_point))
        return out, clamp, kernel._qualified_op_name


def lower(gm: fx.GraphModule) -> Lowered:
    """A new module computing ``gm`` with quantized kernels (``gm`` is left as it is); build
    it inside :func:`quantized_engine`, which packs the weights for that engine."""
    return _Lowering(gm).run()
