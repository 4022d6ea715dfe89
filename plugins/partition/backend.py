"""What a backend is: the ops it runs, under which dtypes and shape constraints, at what cost.

A plugin returns :class:`Backend` objects from ``graphopt_register_backends``; the
``partition`` pass asks each node's :class:`NodeInfo` whether a backend takes it. A
description is data (op kinds, dtypes, a cost hint) plus small predicates ``check(info) ->
reason | None`` (None: fine), so descriptions compose: ``xnnpack.extend("my-dsp", drop=...)``.

Ops are named by kind, one vocabulary for modules, functions and methods: ``nn.Conv2d``,
``F.conv2d`` and a fused Conv2d+ReLU are all ``conv2d`` (the fused one also ``relu``);
``torch.relu``, ``F.relu``, ``x.relu_()`` and ``nn.ReLU`` are ``relu``. :func:`op_kinds`
gives a node's kinds; a module class may declare its own with a ``graphopt_kinds()`` method.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping

import torch.fx as fx
import torch.nn as nn

KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
DTYPES = frozenset({"float32", "float16", "int8"})

_MODULE_KINDS = {
    nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d",
    nn.ConvTranspose1d: "conv_transpose1d", nn.ConvTranspose2d: "conv_transpose2d",
    nn.ConvTranspose3d: "conv_transpose3d", nn.Linear: "linear",
    nn.BatchNorm1d: "batch_norm", nn.BatchNorm2d: "batch_norm", nn.BatchNorm3d: "batch_norm",
    nn.LayerNorm: "layer_norm", nn.GroupNorm: "group_norm", nn.InstanceNorm2d: "instance_norm",
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh", nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.GELU: "gelu",
    nn.SiLU: "silu", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.PReLU: "prelu",
    nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax",
    nn.MaxPool1d: "max_pool1d", nn.MaxPool2d: "max_pool2d", nn.AvgPool1d: "avg_pool1d",
    nn.AvgPool2d: "avg_pool2d", nn.AdaptiveAvgPool1d: "adaptive_avg_pool1d",
    nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d", nn.AdaptiveMaxPool2d: "adaptive_max_pool2d",
    nn.Flatten: "flatten", nn.Unflatten: "unflatten", nn.Dropout: "dropout", nn.Identity: "identity",
    nn.Upsample: "upsample", nn.PixelShuffle: "pixel_shuffle", nn.Embedding: "embedding",
    nn.ZeroPad2d: "pad", nn.ConstantPad2d: "pad", nn.MultiheadAttention: "multi_head_attention",
}
# function / method names (trailing "_" of in-place variants dropped) that are another kind's alias
_ALIASES = {
    "iadd": "add", "radd": "add", "isub": "sub", "rsub": "sub", "imul": "mul", "rmul": "mul",
    "truediv": "div", "itruediv": "div", "rtruediv": "div", "divide": "div", "multiply": "mul",
    "subtract": "sub", "floordiv": "floor_div", "negative": "neg",
    "bmm": "matmul", "mm": "matmul", "scaled_dot_product_attention": "sdpa",
    "fake_quantize_per_tensor_affine": "quantize", "interpolate": "upsample",
    "max_pool2d_with_indices": "max_pool2d", 
    "clip": "clamp", "concat": "cat", "concatenate": "cat", "chunk": "split",
    "tensor_split": "split", "split_with_sizes": "split", "contiguous": "identity",
    "transpose": "permute", "swapaxes": "permute", "t": "permute", "view": "reshape",
}
# kinds that only move or relabel data: never worth a partition of their own
TRIVIAL = frozenset({"reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "getitem",
                     "identity", "dropout", "expand", "permute", "size", "getattr", "to", "float",
                     "type_as", "quantize"})


def _name_kind(name: str) -> str:
    name = name.lstrip("_")
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return _ALIASES.get(name, name)


def op_kinds(node: fx.Node, gm: fx.GraphModule) -> tuple[str, ...]:
    """The kinds of op ``node`` computes (empty for placeholders, get_attr and outputs)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return module_kinds(module) or (f"module:{type(module).__name__}",)
    if node.op == "call_method":
        return (_name_kind(node.target),)
    if node.op == "call_function":
        return (_name_kind(getattr(node.target, "__name__", str(node.target))),)
    return ()


def module_kinds(module: nn.Module) -> tuple[str, ...]:
    """The kinds a module computes (its ``graphopt_kinds()`` if it has one: kind names, and
    submodules standing for their own kinds)."""
    declared = getattr(module, "graphopt_kinds", None)
    if callable(declared):
        return tuple(k for part in declared()
                     for k in ((part,) if isinstance(part, str) else module_kinds(part)))
    return tuple(_MODULE_KINDS[c] for c in type(module).__mro__ if c in _MODULE_KINDS)[:1]


@dataclass(frozen=True)
class NodeInfo:
    """What a backend may ask about one fx node, computed for the example inputs."""

    node: fx.Node
    kinds: tuple[str, ...]
    dtype: str                                  # what it computes in: float32, float16, int8, ...
    shape: tuple[int, ...] | None               # output shape (None: not one tensor)
    input_shapes: tuple[tuple[int, ...], ...]   # shapes of its tensor inputs
    module: nn.Module | None = None
    dynamic: str | None = None                  # why its shapes are not static (None: they are)
    macs: int = 0

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def trivial(self) -> bool:
        return bool(self.kinds) and all(k in TRIVIAL for k in self.kinds)


Check = Callable[[NodeInfo], "str | None"]


@dataclass(frozen=True)
class Backend:
    """A registered backend: ``ops`` maps each op kind it runs to an optional check of its own;
    ``checks`` apply to every node; ``cost`` is its time per MAC relative to the CPU's (1.0)."""

    name: str
    description: str
    ops: Mapping[str, Check | None] = field(default_factory=dict)
    dtypes: frozenset[str] = frozenset({"float32"})
    checks: tuple[Check, ...] = ()
    cost: float = 1.0
    fallback: bool = False          # runs every node (the CPU); never partitioned
    reference: str = ""             # the documentation the description follows

    def why_not(self, info: NodeInfo) -> str | None:
        """Why this backend cannot run the node (None: it can)."""
        if self.fallback:
            return None
        missing = [k for k in info.kinds if k not in self.ops]
        if missing:
            return f"op {', '.join(missing)} not supported by {self.name}"
        if info.dtype not in self.dtypes:
            return f"dtype {info.dtype}: {self.name} runs {', '.join(sorted(self.dtypes))} only"
        for check in (*self.checks, *(self.ops[k] for k in info.kinds)):
            reason = check(info) if check is not None else None
            if reason:
                return reason
        return None

    def extend(self, name: str, description: str, *, ops: Mapping[str, Check | None] | Iterable[str] = (),
               drop: Iterable[str] = (), dtypes: Iterable[str] | None = None, checks: Iterable[Check] = (),
               cost: float | None = None, reference: str | None = None) -> "Backend":
        """A new backend: this one's ops plus ``ops`` minus ``drop``, its checks plus ``checks``."""
        added = dict(ops) if isinstance(ops, Mapping) else dict.fromkeys(ops)
        merged = {k: v for k, v in {**self.ops, **added}.items() if k not in set(drop)}
        return replace(self, name=name, description=description, ops=merged,
                       dtypes=frozenset(dtypes) if dtypes is not None else self.dtypes,
                       checks=(*self.checks, *checks), cost=self.cost if cost is None else cost,
                       reference=self.reference if reference is None else reference)

    def problems(self) -> list[str]:
        """Why this definition is invalid (empty when it is fine)."""
        out = []
        if not KEBAB.match(self.name):
            out.append(f"backend name {self.name!r} is not kebab-case")
        if not self.fallback and not self.ops:
            out.append(f"backend {self.name!r} runs no op")
        bad = [k for k, v in self.ops.items() if not isinstance(k, str) or (v is not None and not callable(v))]
        if bad:
            out.append(f"backend {self.name!r}: ops must map kind names to a check or None ({bad[0]!r})")
        if not all(callable(c) for c in self.checks):
            out.append(f"backend {self.name!r}: every check must be callable")
        if self.cost <= 0:
            out.append(f"backend {self.name!r}: cost must be positive")
        return out


# Small predicates to compose descriptions from.

def static_shapes(info: NodeInfo) -> str | None:
    return f"dynamic shape: {info.dynamic}" if info.dynamic else None


def max_rank(n: int) -> Check:
    def check(info: NodeInfo) -> str | None:
        ranks = [len(s) for s in (*info.input_shapes, info.shape or ())]
        return f"rank {max(ranks)} > {n}" if ranks and max(ranks) > n else None
    return check


def max_channels(n: int) -> Check:
    """Conv/Linear layers with at most ``n`` input and output channels."""
    def check(info: NodeInfo) -> str | None:
        m = info.module
        sizes = [getattr(m, a, 0) for a in ("in_channels", "out_channels", "in_features", "out_features")]
        return f"{max(sizes)} channels > {n}" if max(sizes, default=0) > n else None
    return check


def all_of(*checks: Check) -> Check:
    """The first reason any of ``checks`` gives."""
    def check(info: NodeInfo) -> str | None:
        return next((r for r in (c(info) for c in checks) if r), None)
    return check
