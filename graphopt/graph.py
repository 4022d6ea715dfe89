"""The IR: an fx.GraphModule plus the inputs it was captured with. Analyses write their results into
``node.meta["graphopt.<what>"]``; :func:`annotate` fills the ones every pass may rely on: ``graphopt.shape``,
``graphopt.dtype`` and ``graphopt.macs`` (multiply-accumulates of the node for the example inputs, by
torch.utils.flop_counter; attention in its math form, which fused kernels do not report)."""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from .metrics import compare


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """A model's outputs (tensor, tuple, list, dict, nested) as a flat list of tensors."""
    leaves, _ = tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


@dataclass
class Graph:
    """A captured model: ``module`` is the fx.GraphModule every pass rewrites. ``check_inputs``:
    ``(label, inputs)`` pairs verification runs on besides the example (``driver.check_inputs``)."""

    module: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    name: str = "model"
    meta: dict = field(default_factory=dict)
    check_inputs: tuple[tuple[str, tuple[torch.Tensor, ...]], ...] = ()

    @property
    def input_sets(self) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
        """Everything verification runs on: the example first, then ``check_inputs``."""
        return [("example", tuple(self.example_inputs)), *self.check_inputs]

    @property
    def precision(self) -> str:
        """fp32, fp16 or int8: what the passes that ran made of it (recorded by the pass
        manager from each pass's effect; capture records fp16 for a half-precision model)."""
        return self.meta.get("precision", "fp32")

    @property
    def input_names(self) -> list[str]:
        return [n.name for n in self.module.graph.nodes if n.op == "placeholder"]

    def input_specs(self) -> list[dict]:
        """``[{name, shape, dtype}]`` of the example inputs, as artifacts and reports record them."""
        return [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                for n, t in zip(self.input_names, self.example_inputs)]

    def run(self, inputs: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Outputs of the graph for ``inputs`` (default: the example inputs), flattened."""
        with torch.no_grad():
            return flatten_outputs(self.module(*(inputs if inputs is not None else self.example_inputs)))

    def fp32_noise(self) -> float:
        """Its own fp32 rounding error (0 unless fp32): the worst relative distance of its outputs from a float64
        run over ``input_sets``. Exact rewrites and fp32 runtimes are judged above it (ResNeXt-50: 1.8e-5)."""
        try:
            wide = copy.deepcopy(self.module).double() if self.precision == "fp32" else None
            with torch.no_grad():
                return max(compare(flatten_outputs(wide(*(t.double() if t.is_floating_point() else t for t in x))),
                                   self.run(x)).max_rel for _, x in self.input_sets)
        except Exception:   # not fp32 (wide is None), or an op without float64 kernels
            return 0.0

    def replace(self, module: fx.GraphModule) -> "Graph":
        """The same graph identity with another module (the inputs and metadata are kept)."""
        return Graph(module, self.example_inputs, self.name, dict(self.meta), self.check_inputs)

    def clone(self) -> "Graph":
        return Graph(copy.deepcopy(self.module), self.example_inputs, self.name, copy.deepcopy(self.meta),
                     self.check_inputs)

    def stats(self) -> dict:
        """Nodes (ops that compute), parameters, MACs and bytes of weights and buffers."""
        gm = self.module
        return {"nodes": _compute_nodes(gm), "params": sum(p.numel() for p in gm.parameters()),
                "macs": sum(int(n.meta.get("graphopt.macs", 0)) for n in gm.graph.nodes),
                "bytes": sum(t.numel() * t.element_size() for t in gm.state_dict().values())}


def _compute_nodes(gm: fx.GraphModule) -> int:
    """Nodes that compute, those inside nested graphs (partitions) counted one by one."""
    nested = {n: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"
              and isinstance(gm.get_submodule(n.target), fx.GraphModule)}
    return sum(_compute_nodes(nested[n]) if n in nested else
               int(n.op in ("call_module", "call_method") or n.op == "call_function" and not (
                   n.target is operator.getitem and n.args[0] in nested))   # a nested graph's outputs
               for n in gm.graph.nodes)


def _attention(node: fx.Node, module: nn.Module | None) -> bool:
    return isinstance(module, nn.MultiheadAttention) or node.target is F.scaled_dot_product_attention


def _counted(run: Callable[[], Any]) -> tuple[Any, int]:
    """``run()``'s result and its multiply-accumulates (half the FLOPs torch's counter sees)."""
    with FlopCounterMode(display=False) as counter:
        result = run()
    return result, counter.get_total_flops() // 2


class _Annotator(fx.Interpreter):
    """Runs the graph once, recording shape, dtype and MACs of every node."""

    def __init__(self, gm: fx.GraphModule, record: Callable[[fx.Node, Any], None] | None = None):
        super().__init__(gm)
        self._record = record

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(module, fx.GraphModule) and not kwargs:   # a nested graph (a partition): its nodes too
            result = _Annotator(module).run(*args)
            macs = sum(int(m.meta.get("graphopt.macs", 0)) for m in module.graph.nodes)
        else:
            result, macs = _counted(lambda: super(_Annotator, self).run_node(n))
            if not macs and _attention(n, module):    # fused kernels report nothing: count the math form
                fastpath = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
                try:
                    with sdpa_kernel(SDPBackend.MATH):
                        macs = _counted(lambda: super(_Annotator, self).run_node(n))[1]
                finally:
                    torch.backends.mha.set_fastpath_enabled(fastpath)
        if isinstance(result, torch.Tensor):
            n.meta.update({"graphopt.shape": tuple(result.shape), "graphopt.dtype": str(result.dtype)[6:]})
        n.meta["graphopt.macs"] = macs
        if self._record is not None:
            self._record(n, result)
        return result


def annotate(gm: fx.GraphModule, inputs: Sequence[torch.Tensor],
             record: Callable[[fx.Node, Any], None] | None = None) -> list[torch.Tensor]:
    """Fill ``graphopt.shape/dtype/macs`` on every node; returns the flattened outputs.

    ``record(node, value)``, when given, sees every node's value as it is computed.
    """
    with torch.no_grad():
        return flatten_outputs(_Annotator(gm, record).run(*inputs))
