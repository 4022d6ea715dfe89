"""What ``partition`` tells a backend about each node: op kinds, the dtype it computes in
(int8 when its inputs are on a fake-quant grid and its weights are quantized), shapes, MACs,
and whether its shapes are known before run time."""
from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.fx as fx
from torch.nn.utils import parametrize

from graphopt.graph import annotate
from graphopt.quant import is_fake_quant

from .backend import NodeInfo, op_kinds

COMPUTE = ("call_module", "call_function", "call_method")
# ops whose output stays on their input's int8 grid (pooling picks values, views move them)
_KEEPS_GRID = frozenset({"max_pool1d", "max_pool2d", "adaptive_max_pool2d", "reshape", "flatten",
                         "unflatten", "squeeze", "unsqueeze", "permute", "getitem", "identity",
                         "dropout", "relu", "expand", "pad"})
_DATA_DEPENDENT = frozenset({"nonzero", "masked_select", "unique", "unique_consecutive", "where"})


def _is_tensor(node: fx.Node) -> bool:
    return "graphopt.shape" in node.meta


def _weight_quantized(module) -> bool | None:
    """True/False for a module with a weight (quantized or not), None for one without."""
    if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    return parametrize.is_parametrized(module, "weight")


def _dynamic(node: fx.Node, kinds: tuple[str, ...]) -> str | None:
    if node.op == "call_method" and node.target in ("size", "dim", "numel") or \
            node.op == "call_function" and node.target is getattr:
        return f"{node.name} reads a tensor's size at run time"
    if any(k in _DATA_DEPENDENT for k in kinds) and not (kinds == ("where",) and len(node.args) == 3):
        return f"{node.name}'s output size depends on the data"
    sized = [a.name for a in node.all_input_nodes if not _is_tensor(a) and a.op != "get_attr"
             and not (node.target is operator.getitem and a is node.args[0])]
    return f"shape computed at run time from {', '.join(sized)}" if sized else None


def node_infos(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> dict[fx.Node, NodeInfo]:
    """A NodeInfo for every node that computes, in graph order. Shapes, dtypes and MACs come
    from ``graphopt.graph.annotate``'s node meta (the pass manager fills it after every pass);
    the graph is run only when some node lacks them."""
    if any("graphopt.macs" not in n.meta for n in gm.graph.nodes if n.op in COMPUTE):
        annotate(gm, inputs)
    on_grid: set[fx.Node] = set()     # values that hold int8-representable numbers
    infos: dict[fx.Node, NodeInfo] = {}
    for node in gm.graph.nodes:
        if node.op not in COMPUTE:
            continue
        kinds = op_kinds(node, gm)
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        acts = [a for a in node.all_input_nodes if _is_tensor(a) and a.op != "get_attr"]
        out_dtype = node.meta.get("graphopt.dtype", "none")
        quantized_inputs = bool(acts) and all(a in on_grid for a in acts) and _weight_quantized(module) is not False
        if is_fake_quant(node) or quantized_inputs and all(k in _KEEPS_GRID for k in kinds):
            on_grid.add(node)
        dtype = "int8" if is_fake_quant(node) or quantized_inputs and out_dtype == "float32" else out_dtype
        infos[node] = NodeInfo(
            node=node, kinds=kinds, dtype=dtype, shape=node.meta.get("graphopt.shape"),
            input_shapes=tuple(a.meta["graphopt.shape"] for a in acts), module=module,
            dynamic=_dynamic(node, kinds), macs=int(node.meta.get("graphopt.macs", 0)))
    return infos
