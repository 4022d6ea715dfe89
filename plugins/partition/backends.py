"""Built-in backend descriptions: xnnpack, tflite-gpu, int8-npu and cpu (the fallback).

Each follows its runtime's public operator documentation; ops are graphopt op kinds
(graphopt_plugins.partition.backend), dtypes what a node computes in (int8 when it sits between fake quants).
"""
from __future__ import annotations

import torch.fx as fx

import graphopt

from .backend import Backend, NodeInfo, all_of, max_rank, op_kinds, static_shapes


def _arg(info: NodeInfo, index: int, name: str, default):
    """A call's argument by position (the input tensor is 0, for a function as for a method,
    whose ``self`` it is) or keyword, or the module attribute of that name."""
    if info.module is not None:
        return getattr(info.module, name, default)
    node = info.node
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def float_only(info: NodeInfo) -> str | None:
    return f"{info.kinds[0]} runs in float only (got {info.dtype})" if info.dtype == "int8" else None


def _max_pool(info: NodeInfo) -> str | None:
    kernel = _pair(_arg(info, 1, "kernel_size", 1))
    stride = _pair(_arg(info, 2, "stride", None) or kernel)
    if any(s > k for s, k in zip(stride, kernel)):
        return f"max pool stride {stride} larger than its kernel {kernel}"
    return "max pool with indices" if _arg(info, 5, "return_indices", False) else None


def _avg_pool(info: NodeInfo) -> str | None:
    if _arg(info, 4, "ceil_mode", False):
        return "avg pool with ceil_mode"
    padded = any(_pair(_arg(info, 3, "padding", 0)))
    if padded and _arg(info, 5, "count_include_pad", True):
        return "avg pool counting its zero padding"
    return None


def _global_pool(info: NodeInfo) -> str | None:
    if info.shape is None or len(info.shape) != 4 or tuple(info.shape[2:]) != (1, 1):
        return "adaptive pooling to an output other than 1x1"
    return None


def _spatial_mean(info: NodeInfo) -> str | None:
    dims = _arg(info, 1, "dim", None)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    rank = len(info.input_shapes[0]) if info.input_shapes else 0
    if rank != 4 or sorted(d % 4 for d in dims) != [2, 3] or not _arg(info, 2, "keepdim", False):
        return "mean other than over H and W of a 4-D tensor with keepdim=True"
    return None


def _last_dim(info: NodeInfo) -> str | None:
    dim = _arg(info, 1, "dim", None)
    rank = len(info.input_shapes[0]) if info.input_shapes else 0
    if dim is None or dim not in (-1, rank - 1):
        return f"softmax over dim {dim}, not the last"
    return None


_CLAMPS = frozenset({"relu", "relu6", "hardtanh", "clamp"})


def _one_clamp(info: NodeInfo) -> str | None:
    """ExecuTorch 1.5.1's XNNPACK fuses a clamp into the op before it over that op's own fused
    clamp (conv -> relu -> hardtanh(-1, 1) computes hardtanh alone): one clamp in a row."""
    source = info.node.args[0] if info.node.args else None
    if len(info.kinds) != 1 or not isinstance(source, fx.Node) or source.op not in ("call_module", "call_function", "call_method"):
        return None
    before = op_kinds(source, source.graph.owning_module)
    if any(k in _CLAMPS for k in before):
        return f"a second clamp after {source.name} ({', '.join(before)}): XNNPACK would fuse it over the first"
    return None


def _matmul(info: NodeInfo) -> str | None:
    if any(len(s) > 3 for s in info.input_shapes):
        return "matmul of 4-D tensors (XNNPACK takes batched matmul of rank <= 3)"
    return float_only(info)


def _softmax(info: NodeInfo) -> str | None:
    if _last_dim(info):
        return _last_dim(info)
    if info.shape is not None and len(info.shape) > 3:
        return "softmax of a 4-D tensor (wrong results from ExecuTorch 1.5.1's XNNPACK)"
    return float_only(info)


def _cat(info: NodeInfo) -> str | None:
    n = len(info.input_shapes)
    return f"cat of {n} tensors (2 to 5)" if not 2 <= n <= 5 else None


def _tensor_getitem(info: NodeInfo) -> str | None:
    source = info.node.args[0]
    return None if "graphopt.shape" in source.meta else "getitem of a tuple stays with the op that made it"


def _xnnpack_getitem(info: NodeInfo) -> str | None:
    """ExecuTorch lowers ``x[..., 0]`` to select_copy and ``x[::2]`` to a strided slice, neither of which
    its XNNPACK delegate takes; plain slices, ``None`` and ``...`` it does."""
    index = info.node.args[1] if len(info.node.args) > 1 else None
    for item in index if isinstance(index, tuple) else (index,):
        if isinstance(item, int):
            return "indexing with an integer (select_copy in ExecuTorch, which XNNPACK does not take)"
        if isinstance(item, slice) and item.step not in (None, 1):
            return f"a slice with step {item.step}"
        if not (item is None or item is Ellipsis or isinstance(item, slice)):
            return "indexing with a tensor or list"
    return _tensor_getitem(info)


def _bilinear(info: NodeInfo) -> str | None:
    mode = _arg(info, 3, "mode", "nearest")
    return f"resize mode {mode} (bilinear only)" if mode != "bilinear" else None


def _plain_conv(info: NodeInfo) -> str | None:
    m = info.module
    if m is not None and getattr(m, "padding_mode", "zeros") != "zeros":
        return f"conv padding_mode={m.padding_mode}"
    return None


def _depthwise_or_dense(info: NodeInfo) -> str | None:
    m = info.module
    if m is not None and m.groups not in (1, m.in_channels):
        return f"grouped conv (groups={m.groups}) that is not depthwise"
    if m is not None and m.groups == m.in_channels > 1 and m.out_channels != m.in_channels:
        return "depthwise conv with a channel multiplier"
    return _plain_conv(info)


_VIEWS = dict.fromkeys(("reshape", "flatten", "unsqueeze", "permute", "identity", "dropout"))

# ExecuTorch's XNNPACK delegate (backends/xnnpack "Partitioner configs"): fp32 and static int8;
# ops marked float_only have no int8 kernel there.
XNNPACK = Backend(
    name="xnnpack",
    description="ExecuTorch XNNPACK delegate (CPU, fp32 and static int8)",
    ops={"conv1d": _plain_conv, "conv2d": _plain_conv, "linear": None, "matmul": _matmul,
         "batch_norm": float_only, "relu": _one_clamp, "relu6": _one_clamp, "hardtanh": _one_clamp,
         "clamp": _one_clamp, "leaky_relu": float_only, "gelu": float_only, "tanh": float_only,
         # MobileNetV3's and EfficientNet's activations run in fp32 inside the delegate, between the int8
         # convert ops its dequantize and quantize become (what ExecuTorch's own PT2E lowering does);
         # ExecuTorch decomposes hardsigmoid to (x + 3).clamp(0, 6) / 6 and silu to x * sigmoid(x)
         "hardswish": None, "hardsigmoid": None, "sigmoid": None, "silu": None, "prelu": float_only, "abs": float_only,
         "neg": float_only, "exp": float_only, "sqrt": float_only, "rsqrt": float_only,
         "add": None, "sub": None, "mul": None, "div": float_only, "max_pool2d": _max_pool,
         "avg_pool2d": all_of(_avg_pool, float_only), "adaptive_avg_pool2d": _global_pool,
         "mean": _spatial_mean, "cat": _cat, "softmax": _softmax,
         "upsample": all_of(_bilinear, float_only), "pad": float_only,
         "getitem": _xnnpack_getitem, "quantize": None,
         **{k: v for k, v in _VIEWS.items() if k != "unsqueeze"}},   # ExecuTorch's unsqueeze_copy: not taken
    dtypes=frozenset({"float32", "int8"}),
    checks=(static_shapes, max_rank(6)),
    cost=0.25,
    reference="https://pytorch.org/executorch/stable/backends-xnnpack.html",
)

# TFLite GPU delegate ("GPU delegates for LiteRT", supported ops): float32/float16 tensors of
# rank <= 4; quantized models are run dequantized, so int8 nodes are not taken.
TFLITE_GPU = Backend(
    name="tflite-gpu",
    description="TFLite / LiteRT GPU delegate (OpenCL/OpenGL, fp32 and fp16)",
    ops={"conv2d": _plain_conv, "conv_transpose2d": None, "linear": None, "batch_norm": None,
         "relu": None, "relu6": None, "hardtanh": None, "hardswish": None, "sigmoid": None,
         "tanh": None, "prelu": None, "leaky_relu": None, "elu": None, "add": None, "sub": None,
         "mul": None, "div": None, "abs": None, "exp": None, "sqrt": None, "rsqrt": None,
         "max_pool2d": _max_pool, "avg_pool2d": _avg_pool, "adaptive_avg_pool2d": _global_pool,
         "mean": None, "cat": None, "softmax": _last_dim, "pad": None, "upsample": None,
         "getitem": _tensor_getitem, **_VIEWS},
    dtypes=frozenset({"float32", "float16"}),
    checks=(static_shapes, max_rank(4)),
    cost=0.2,
    reference="https://ai.google.dev/edge/litert/performance/gpu",
)

# An int8-only accelerator with static shapes, after the Edge TPU's supported operations and
# NNAPI's quantized op set: per-tensor int8 activations, depthwise without channel multiplier.
INT8_NPU = Backend(
    name="int8-npu",
    description="int8-only NPU with static shapes (Edge TPU / NNAPI-style op list)",
    ops={"conv2d": _depthwise_or_dense, "linear": None, "relu": None, "relu6": None,
         "hardtanh": None, "hardswish": None, "sigmoid": None, "tanh": None, "add": None,
         "mul": None, "max_pool2d": _max_pool, "avg_pool2d": _avg_pool,
         "adaptive_avg_pool2d": _global_pool, "mean": None, "cat": None, "softmax": _last_dim,
         "pad": None, "upsample": None, "getitem": _tensor_getitem, "quantize": None, **_VIEWS},
    dtypes=frozenset({"int8"}),
    checks=(static_shapes, max_rank(4)),
    cost=0.05,
    reference="https://coral.ai/docs/edgetpu/models-intro/#supported-operations",
)

CPU = Backend(name="cpu", description="the host CPU: runs every node (the fallback)", fallback=True)


@graphopt.hookimpl(optionalhook=True)   # the spec comes with the partition plugin
def graphopt_register_backends():
    return [XNNPACK, TFLITE_GPU, INT8_NPU, CPU]
