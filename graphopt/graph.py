"""The IR: an fx.GraphModule plus the inputs it was captured with. Analyses write their results into
``node.meta["graphopt.<what>"]``; :func:`annotate` fills the ones every pass may rely on: ``graphopt.shape``,
``graphopt.dtype`` and ``graphopt.macs`` (multiply-accumulates of the node for the example inputs, by
torch.utils.flop_counter; attention in its math form, which fused kernels do not report)."""
from __future__ import annotations

import copy
import dataclasses
import math
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
from .quant import FAKE_QUANT, is_fake_quant


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

    def rounding_noise(self, precision: str = "fp32") -> float:
        """How far its own rounding takes its outputs, over ``input_sets``. fp32: the worst relative distance from a
        float64 run (0 unless fp32; ResNeXt-50: 1.8e-5); fp16: from a float64 run rounding weights and every value to
        half, the fp16 model it stands for (ResNeXt-50: 2.6e-2; torch's fp16: 0.75-1.3x that), kept by the fp16 graph
        made from it; int8: the worst max abs distance from a run where each activation quantizer rounds each value to
        either neighbouring step, the nearer more often, as an int8 runtime may (full ShuffleNetV2: 17 output steps)."""
        if precision == "fp16" and self.precision == "fp16":   # measured on the fp32 graph it was made from
            return self.meta.get("fp16_noise", 0.0)
        try:   # int8: the graph itself; else a float64 copy of an fp32 graph (fp16: its weights rounded to half first)
            wide = copy.deepcopy(self.module) if self.precision == "fp32" and precision != "int8" else None
            model = self.module if precision == "int8" else (wide.half() if precision == "fp16" else wide).double()
            run, cast = model if precision == "fp32" else _Rounded(model, precision).run, precision != "int8"
            with torch.no_grad():
                far = [compare(flatten_outputs(run(*(t.double() if cast and t.is_floating_point() else t for t in x))),
                               self.run(x)) for _, x in self.input_sets]
            noise = max(m.max_rel if cast else m.max_abs for m in far)
            noise = noise if math.isfinite(noise) else 0.0   # an fp16 overflow: its own verification finds it
            self.meta.update({"fp16_noise": noise} if precision == "fp16" else {})
            return noise
        except Exception:   # fp32/fp16 of a graph not in fp32 (wide is None), or an op without float64 kernels
            return 0.0

    def replace(self, module: fx.GraphModule) -> "Graph":
        """The same graph identity with another module (the inputs and metadata are kept)."""
        return Graph(module, self.example_inputs, self.name, dict(self.meta), self.check_inputs)

    def clone(self) -> "Graph":
        return dataclasses.replace(self, module=copy.deepcopy(self.module), meta=copy.deepcopy(self.meta))

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
            if not macs and (isinstance(module, nn.MultiheadAttention) or n.target is F.scaled_dot_product_attention):
                # fused attention kernels report nothing: count the math form
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


class _Rounded(fx.Interpreter):
    """A run redoing its rounding: fp16, every float64 value to half; int8, each activation quantizer stochastically."""

    def __init__(self, gm: fx.GraphModule, precision: str):
        super().__init__(gm)
        self.precision, self.gen = precision, torch.Generator().manual_seed(0)

    def run_node(self, n: fx.Node) -> Any:
        if self.precision == "int8" and is_fake_quant(n):
            (x, scale, *rest), _ = self.fetch_args_kwargs_from_env(n)
            return FAKE_QUANT(x + (torch.rand(x.shape, generator=self.gen) - 0.5) * scale, scale, *rest)
        value = super().run_node(n)
        return value.half().double() if isinstance(value, torch.Tensor) and value.dtype == torch.float64 else value


def annotate(gm: fx.GraphModule, inputs: Sequence[torch.Tensor],
             record: Callable[[fx.Node, Any], None] | None = None) -> list[torch.Tensor]:
    """Fill ``graphopt.shape/dtype/macs`` on every node; returns the flattened outputs. ``record(node, value)``,
    when given, sees every node's value as it is computed."""
    with torch.no_grad():
        return flatten_outputs(_Annotator(gm, record).run(*inputs))
