"""How graphopt's rewrite passes (tflite-compat, the fuse family) rewrite: a Rewrite is pattern + check + replacement;
replacements are written as torch code on fx Proxies (Builder), with constants as 0-d buffers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.proxy import GraphAppendingTracer

from graphopt import PassContext, PassResult
from graphopt.graph import annotate

CONSTANTS = "graphopt_constants"   # submodule holding the constants replacements read


@dataclass(frozen=True)
class Rewrite:
    """One rewrite: ``match`` is the pattern, ``check`` says why a match must be kept (None:
    rewrite it), ``replace`` rewires the match's users to the replacement and says what it did."""

    name: str                                               # its stats counter
    match: Callable[[fx.GraphModule, fx.Node], bool]
    check: Callable[[fx.GraphModule, fx.Node], str | None]
    replace: Callable[["Builder", fx.Node], str]


def never_rejects(gm: fx.GraphModule, node: fx.Node) -> None:
    """The check of a rewrite that is valid wherever its pattern matches."""


def calls(node: fx.Node, functions: Iterable[Any] = (), methods: Iterable[str] = ()) -> bool:
    """``node`` calls one of ``functions`` or one of the Tensor ``methods``."""
    return (node.op == "call_function" and node.target in tuple(functions)) or \
        (node.op == "call_method" and node.target in tuple(methods))


def argument(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """The argument at position ``index`` or keyword ``name`` of a call node."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def shape(node: Any) -> tuple[int, ...] | None:
    """The shape ``annotate`` recorded for a node's value (None: not a tensor node)."""
    return node.meta.get("graphopt.shape") if isinstance(node, fx.Node) else None


def dtype(node: fx.Node) -> torch.dtype:
    return getattr(torch, node.meta.get("graphopt.dtype", "float32"))


class Builder:
    """Writes a replacement at the graph's insertion point: torch code on Proxies becomes nodes."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self._tracer = gm, GraphAppendingTracer(gm.graph)

    def __call__(self, node: fx.Node) -> fx.Proxy:
        return fx.Proxy(node, self._tracer)

    def const(self, value: float, like: fx.Node) -> fx.Proxy:
        """``value`` as a 0-d buffer of ``like``'s dtype (one buffer per value and dtype)."""
        if not hasattr(self.gm, CONSTANTS):
            self.gm.add_submodule(CONSTANTS, nn.Module())
        holder, tensor = self.gm.get_submodule(CONSTANTS), torch.tensor(value, dtype=dtype(like))
        name = next((n for n, b in holder.named_buffers() if b.dtype == tensor.dtype and torch.equal(b, tensor)), None)
        if name is None:
            name = f"c{len(list(holder.buffers()))}"
            holder.register_buffer(name, tensor)
        return self(self.gm.graph.get_attr(f"{CONSTANTS}.{name}"))

    def module(self, target: str, module: nn.Module, *args: fx.Proxy) -> fx.Proxy:
        """Register ``module`` at ``target`` and call it."""
        self.gm.add_submodule(target, module)
        return self(self.gm.graph.call_module(target, tuple(a.node for a in args)))

    def substitute(self, old: fx.Node, new: fx.Proxy | fx.Node) -> None:
        """Every use of ``old`` reads ``new`` instead; ``old`` is erased."""
        old.replace_all_uses_with(new.node if isinstance(new, fx.Proxy) else new)
        self.gm.graph.erase_node(old)


def apply(gm: fx.GraphModule, ctx: PassContext, rewrites: Sequence[Rewrite]) -> dict[str, int]:
    """Run each rewrite in turn (shapes re-annotated in between); counts per rewrite, and of matches kept."""
    stats, changed = {**{r.name: 0 for r in rewrites}, "rejected": 0}, True
    for rewrite in rewrites:
        if changed:
            gm.recompile()
            annotate(gm, ctx.example_inputs)
            changed = False
        for node in [n for n in gm.graph.nodes if rewrite.match(gm, n)]:
            if reason := rewrite.check(gm, node):
                stats["rejected"] += 1
                ctx.explain(f"{node.name}: kept, {reason}")
                continue
            with gm.graph.inserting_before(node):
                ctx.explain(f"{node.name}: {rewrite.replace(Builder(gm), node)}")
            stats[rewrite.name] += 1
            changed = True
    return stats


def rewrite_pass(rewrites: Sequence[Rewrite]) -> Callable[[fx.GraphModule, PassContext], PassResult]:
    """The ``run`` of a pass applying ``rewrites``: modified when one applied; submodules left uncalled are deleted."""
    def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = apply(gm, ctx, rewrites)
        gm.delete_all_unused_submodules()
        gm.recompile()
        return PassResult(gm, any(v for k, v in stats.items() if k != "rejected"), stats)
    return run
