"""Runs a pipeline: each pass on a copy of the graph, verified before it is accepted. verify-each: after every
pass, lint + recompile + run on the example inputs and ``check_inputs``, and compare with the graph before it under
the pass's tolerance, never below the model's own fp32 rounding (structural passes: against their oracle; trained
passes: output count, shapes and finiteness). A failing pass leaves the graph as it was; the error names the pass, the
passes before it and the first diverging node. Each pass that changed the graph decides ``Graph.precision``, once."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .errors import GraphoptError, PassError
from .graph import Graph, annotate, flatten_outputs
from .metrics import Tolerance, compare, worst
from .passes import Effect, Pass, PassContext, PassResult
from .pipeline import Pipeline, parse_pipeline, resolve
from .plugins import Registry


@dataclass
class PassRecord:
    """Instrumentation of one pass: the ``passes`` rows of the report."""

    name: str
    seconds: float
    modified: bool
    nodes: int
    params: int
    macs: int
    bytes: int
    max_abs_err: float
    cosine: float
    verified: bool
    stats: dict = field(default_factory=dict)
    explanations: list[str] = field(default_factory=list)
    effect: str = "exact"
    group: str = ""                  # the named pipeline (e.g. fuse) this pass came from

    @property
    def pass_name(self) -> str:
        return self.name.split("(")[0]

    def as_dict(self) -> dict:
        keys = ("name", "group", "effect", "modified", "nodes", "params", "macs", "bytes", "max_abs_err", "cosine",
                "verified", "stats", "explanations")
        return {**{k: getattr(self, k) for k in keys}, "seconds": round(self.seconds, 4)}


@dataclass
class PipelineRun:
    graph: Graph
    pipeline: str
    reference: list[torch.Tensor]                    # the captured graph's outputs on the example
    records: list[PassRecord]
    references: dict[str, list[torch.Tensor]] = field(default_factory=dict)   # ... on each of graph.input_sets


def _node_values(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    annotate(gm, inputs, record=lambda n, v: values.__setitem__(n.name, v))
    return values


def first_divergence(before: fx.GraphModule, after: fx.GraphModule, inputs: Sequence[torch.Tensor],
                     tolerance: Tolerance) -> str | None:
    """Name the first node (in the new graph's order) whose value diverges from the node of
    the same name in the old graph, plus nodes the pass created that feed it."""
    old, new = _node_values(before, inputs), _node_values(after, inputs)
    created = {n.name for n in after.graph.nodes} - set(old)
    for node in after.graph.nodes:
        a, b = new.get(node.name), old.get(node.name)
        if node.op in ("placeholder", "output") or not isinstance(a, torch.Tensor) \
                or not isinstance(b, torch.Tensor) or a.shape != b.shape:
            continue
        problems = tolerance.violations(compare([b.float()], [a.float()]))
        if not problems:
            continue
        feeders, stack, seen = [], list(node.all_input_nodes), set()
        while stack:
            n = stack.pop()
            if n.name not in seen and n.name in created:
                feeders.append(n.name)
                stack.extend(n.all_input_nodes)
            seen.add(n.name)
        what = f"{node.op} {node.target if node.op != 'call_module' else type(after.get_submodule(node.target)).__name__}"
        fed = f", fed by new node(s) {', '.join(sorted(feeders))}" if feeders else ""
        return f"`{node.name}` ({what}): {problems[0]}{fed}"
    return None


def _tolerance(spec: Pass, graph: Graph, noise: float) -> Tolerance:
    """The pass's own tolerance as given, else its effect's above the model's own rounding (4x its fp32 ``noise``); an
    fp16 pass, or an exact one on an fp16 graph (its sums round to half): fp16's, above 2x its fp16 rounding."""
    if spec.effect is Effect.EXACT and graph.precision == "fp16" or spec.effect is Effect.FP16 and not spec.tolerance:
        return Effect.FP16.tolerance.above(graph.rounding_noise("fp16"), 2)
    return spec.tolerance or spec.effect.tolerance.above(noise)


def _fail(spec: Pass, done: list[str], message: str, node: str | None = None) -> PassError:
    before = f"after {', '.join(done)}" if done else "as the first pass"
    where = f"; first diverging node {node}" if node else ""
    return PassError(f"pass {spec.name} ({before}) {message}{where}; the graph before "
                     f"{spec.name} was kept", pass_name=spec.name, before=tuple(done), node=node)


def check_needs(steps: Sequence[tuple[Pass, dict]], data: dict,
                hint: Callable[[str], str] = lambda key: f"give it as data={{{key!r}: ...}}") -> None:
    """Raise PassError for the first pass in ``steps`` that needs a ``ctx.data`` key missing
    from ``data``; ``hint(key)`` tells the user how to give it (the CLI names its option)."""
    for spec, _ in steps:
        missing = [k for k in spec.needs if k not in data]
        if missing:
            raise PassError(f"pass {spec.name} needs {', '.join(missing)}, which was not given; "
                            f"{'; '.join(hint(k) for k in missing)}", pass_name=spec.name)


def run_pipeline(graph: Graph, pipeline: str | Pipeline, registry: Registry, *, verify: bool = True,
                 data: dict | None = None, print_ir_after: Sequence[str] = (),
                 on_ir: Callable[[str, str], None] | None = None,
                 on_pass: Callable[[PassRecord], None] | None = None, progress: Callable | None = None) -> PipelineRun:
    """Run ``pipeline`` on a copy of ``graph``; returns the final graph and one record per pass. ``print_ir_after``
    names passes (or ``all``) whose resulting graph code goes to ``on_ir(pass_name, code)``. ``data`` is shared with
    every pass as ``ctx.data``, with ``original``: ``graph`` as given (a teacher for distillation)."""
    pipe = registry.expand(parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline)
    steps = resolve(pipe, registry.passes)
    data = {"original": graph, **(data or {})}
    check_needs(steps, data)
    current = graph.clone()
    sets = current.input_sets
    reference = previous = [annotate(current.module, current.example_inputs),
                            *(current.run(x) for _, x in current.check_inputs)]
    records: list[PassRecord] = []
    done: list[str] = []
    noise, say = current.rounding_noise() if verify else 0.0, progress or (lambda text: None)
    for i, ((spec, options), item) in enumerate(zip(steps, pipe.items), 1):
        work = copy.deepcopy(current.module)
        say(f"pass {item} ({i}/{len(steps)})")
        ctx = PassContext(options=options, graph=current.replace(work), data=data, registry=registry, progress=say)
        start = time.perf_counter()
        try:
            result = spec.run(work, ctx)
            if not isinstance(result, PassResult):
                raise TypeError(f"run returned {type(result).__name__}, not PassResult")
            gm = result.graph_module
            gm.graph.lint()
            gm.recompile()
            outputs = [annotate(gm, current.example_inputs)]
            with torch.no_grad():
                outputs += [flatten_outputs(gm(*x)) for _, x in current.check_inputs]
        except Exception as exc:   # a GraphoptError's message is already written for people
            detail = str(exc) if isinstance(exc, GraphoptError) else f"{type(exc).__name__}: {exc}"
            raise _fail(spec, done, f"failed: {detail}") from exc
        seconds, verified = time.perf_counter() - start, False
        tolerance = _tolerance(spec, current, noise) if verify else None
        for (label, inputs), before, after in zip(sets, previous, outputs) if verify else ():
            try:   # the oracle sees the inputs it is judged on as ctx.example_inputs
                on = replace(ctx, graph=replace(ctx.graph, example_inputs=inputs))
                expected = spec.oracle(current.module, gm, on) if spec.oracle else before
                metrics = compare(expected, after)
            except Exception as exc:
                raise _fail(spec, done, f"could not be verified: {exc}") from exc
            problems = tolerance.violations(metrics)
            if problems:
                node = None if spec.effect is Effect.STRUCTURAL else first_divergence(
                    current.module, gm, inputs, tolerance)
                on = "" if len(sets) == 1 else f" on the {label} input"
                raise _fail(spec, done, f"changed the outputs{on} beyond its {spec.effect.value} "
                                        f"tolerance ({'; '.join(problems)})", node)
            verified = True
        current = current.replace(gm)
        if result.modified and spec.effect in (Effect.FP16, Effect.INT8) and current.precision != "int8":
            current.meta["precision"] = spec.effect.value    # decided once, here; emitters read it
        previous, st = outputs, current.stats()
        total = worst([compare(r, o) for r, o in zip(reference, outputs)])
        record = PassRecord(str(item), seconds, bool(result.modified), st["nodes"], st["params"], st["macs"],
                            st["bytes"], total.max_abs, total.cosine, verified, dict(result.stats),
                            list(ctx.explanations), spec.effect.value, item.group)
        records.append(record)
        done.append(spec.name)
        if on_pass:
            on_pass(record)
        if on_ir and {"all", spec.name, item.group} & set(print_ir_after):
            on_ir(spec.name, gm.code)
    return PipelineRun(current, str(pipe), reference[0], records, dict(zip([k for k, _ in sets], reference)))
