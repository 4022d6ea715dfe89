"""One run end to end: capture -> pipeline -> emit -> load -> verify -> install -> report. Artifacts are staged
in a private folder inside the output directory and moved into place only when every requested format verified,
so a failed run changes nothing already there."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from . import __version__
from .capture import capture
from .emit import Artifact, Emitter, install, staging_dir
from .errors import EmitError, PipelineError, UsageError
from .graph import Graph
from .metrics import Metrics, Tolerance, compare, worst
from .passmanager import PassRecord, PipelineRun, run_pipeline
from .pipeline import parse_pipeline, resolve
from .plugins import Registry
from .quant import output_step

REPORT_VERSION = 1
Progress = Callable[[str], None]


@dataclass
class ArtifactCheck:
    """One emitted artifact, judged against the optimized graph and the original model."""

    artifact: Artifact
    verified: bool
    vs_graph: Metrics
    vs_reference: Metrics
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bytes: int = 0
    installed: bool = False
    inputs: int = 1              # how many input sets it ran on (the worst is reported)

    def as_dict(self) -> dict:
        return {"format": self.artifact.format, "path": str(self.artifact.path) if self.installed else None,
                "bytes": self.bytes, "verified": self.verified, "max_abs_err": self.vs_reference.max_abs,
                "cosine": self.vs_reference.cosine, "max_abs_err_vs_graph": self.vs_graph.max_abs,
                "problems": self.problems, "inputs": self.inputs, "seconds": round(self.seconds, 4),
                "meta": self.artifact.meta}


@dataclass
class RunResult:
    graph: Graph                 # optimized
    original: Graph              # as captured, before any pass
    pipeline: PipelineRun
    artifacts: list[ArtifactCheck]
    report: dict
    requests: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.report["ok"])


EmitRequest = tuple[Emitter, dict]


def select_emitters(registry: Registry, formats: str | Sequence[str]) -> list[EmitRequest]:
    """Emitters and typed options for ``formats``: text like ``onnx,tflite(precision=fp16)``
    or a list of such items. Unknown or uninstalled formats are a UsageError."""
    text = formats if isinstance(formats, str) else ",".join(formats)
    if not text.strip():
        return []
    try:
        chosen = resolve(parse_pipeline(text), registry.emitters, kind="format")
    except PipelineError as exc:
        raise UsageError(str(exc)) from None
    for emitter, _ in chosen:
        if emitter.missing():
            raise UsageError(f"format {emitter.format} needs {', '.join(emitter.missing())}; install them "
                             f"with pip install 'graphopt[all]'")
    return chosen


Case = tuple[str, Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[torch.Tensor] | None]
INT8_STEPS = 8    # an int8 artifact may differ from its fake-quant graph by this many steps of the output


def check_inputs(example: Sequence[torch.Tensor], count: int, samples: Sequence = (),
                 seed: int = 0) -> tuple[tuple[str, tuple[torch.Tensor, ...]], ...]:
    """What to verify on besides the example: ``count`` seeded shuffles of it (each tensor's own
    values in new places, so the ranges a model was calibrated on hold and token ids stay valid),
    then up to ``count`` of ``samples`` (calibration batches) that are shaped like the example."""
    gen, example = torch.Generator().manual_seed(seed), tuple(example)
    shuffled = [(f"random {i + 1}", tuple(t.reshape(-1)[torch.randperm(t.numel(), generator=gen)].reshape(t.shape)
                                          for t in example)) for i in range(count)]
    samples = [(s,) if isinstance(s, torch.Tensor) else tuple(s) for s in samples]
    fits = [s for s in samples if len(s) == len(example) and all(
        a.shape == b.shape and a.dtype == b.dtype for a, b in zip(s, example))]
    picked = fits[::max(1, len(fits) // max(count, 1))][:count]
    return (*shuffled, *((f"calibration {i + 1}", s) for i, s in enumerate(picked)))


def int8_tolerance(tolerance: Tolerance, gm: torch.fx.GraphModule, noise: float = 0.0) -> Tolerance:
    """``tolerance`` and, when every output of ``gm`` comes straight from a fake quant, a max abs error of INT8_STEPS of
    the coarsest output's quantization step (what cosine and SQNR cannot see), or 2x ``noise``, the graph's own int8
    rounding (``Graph.rounding_noise``), where a deep graph's is more."""
    step = output_step(gm)
    return tolerance if step is None else replace(tolerance, max_abs=max(INT8_STEPS * step, 2 * noise))


def check_artifact(emitter: Emitter, artifact: Artifact, cases: Sequence[Case], tolerance: Tolerance) -> ArtifactCheck:
    """Run ``artifact`` in its runtime on each case ``(label, inputs, expected, reference)``
    (reference: the original model's outputs, or None) and judge it against ``expected`` under
    ``tolerance``; the worst case is reported."""
    start, vs_graph, vs_ref = time.perf_counter(), [], []
    try:
        run = emitter.load(artifact)
        for _, inputs, expected, reference in cases:
            outputs = run(list(inputs))
            vs_graph.append(compare(expected, outputs))
            vs_ref += [compare(reference, outputs)] if reference is not None else []
    except EmitError:
        raise
    except Exception as exc:
        raise EmitError(f"{emitter.format} artifact {artifact.path.name} failed to run: "
                        f"{type(exc).__name__}: {exc}") from exc
    judged = [tolerance.violations(m) for m in vs_graph]
    bad = next((i for i, p in enumerate(judged) if p), None)
    problems = [] if bad is None else [f"{p} (on the {cases[bad][0]} input)" if len(cases) > 1 else p
                                       for p in judged[bad]]
    return ArtifactCheck(artifact, not problems, worst(vs_graph), worst(vs_ref or vs_graph), problems,
                         time.perf_counter() - start, artifact.bytes, inputs=len(cases))


def emit_one(graph: Graph, emitter: Emitter, options: dict, stage: Path, registry: Registry) -> Artifact:
    """Run the emitter's ``prepare`` pipeline (verified) on ``graph`` unless it ran last, then emit (meta prepared)."""
    prepared, ran = [], graph.meta.get("pipeline")
    wanted = parse_pipeline(emitter.prepare).items if emitter.prepare else ()
    if wanted and not (ran and parse_pipeline(ran).items[-len(wanted):] == wanted):   # a user's partition pass, say
        run = run_pipeline(graph, emitter.prepare, registry)
        graph = run.graph
        graph.meta["pipeline"] = ",".join(filter(None, [graph.meta.get("pipeline", ""), run.pipeline]))
        prepared = [{"pass": r.name, "group": r.group, "modified": r.modified, "stats": r.stats,
                     "explanations": r.explanations} for r in run.records]
    try:
        artifact = emitter.emit(graph, options, stage)
    except EmitError:
        raise
    except Exception as exc:
        raise EmitError(f"{emitter.format} emitter failed: {type(exc).__name__}: {exc}") from exc
    artifact.meta.setdefault("options", options)
    if prepared:
        artifact.meta["prepared"] = prepared
    return artifact


def emit_all(graph: Graph, requests: Sequence[EmitRequest], out_dir: Path,
             reference: Sequence[torch.Tensor] | dict[str, list[torch.Tensor]], registry: Registry, *,
             progress: Progress | None = None) -> list[ArtifactCheck]:
    """Emit and verify every requested format on ``graph.input_sets``; install the files only if
    all of them verified. ``reference``: the original model's outputs on the example, or on each
    input set by label (``PipelineRun.references``)."""
    out_dir, say = Path(out_dir), progress or (lambda text: None)
    created, checks = not out_dir.exists(), []
    references = reference if isinstance(reference, dict) else {"example": reference}
    noise = functools.cache(graph.rounding_noise)   # the graph's own rounding at a precision, once, when first asked
    cases = [(k, x, graph.run(x), references.get(k)) for k, x in graph.input_sets]
    try:
        with staging_dir(out_dir) as stage:
            for i, (emitter, options) in enumerate(requests, 1):
                say(f"emitting {emitter.format} ({i}/{len(requests)})")
                artifact = emit_one(graph, emitter, options, stage, registry)
                say(f"verifying {emitter.format} in its runtime")
                # judged by the precision the emitter wrote (an fp16 graph gives an fp16 file), else asked for
                precision = artifact.meta.get("precision", options.get("precision", "fp32"))
                tolerance = emitter.tolerance_for({**options, "precision": precision})
                tolerance = tolerance.above(noise(precision), 2 if precision == "fp16" else 4)   # int8: no max_rel
                tolerance = int8_tolerance(tolerance, graph.module, noise("int8")) if precision == "int8" else tolerance
                checks.append(check_artifact(emitter, artifact, cases, tolerance))
            names = [c.artifact.path.name for c in checks]
            if len(set(names)) != len(names):
                raise UsageError(f"two requested artifacts share a file name ({', '.join(names)}); "
                                 f"give them different options")
            if all(c.verified for c in checks):
                for c in checks:
                    target = out_dir / c.artifact.path.name
                    install(c.artifact.path, target)
                    c.artifact.path, c.installed = target, True
    finally:
        if created and out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()
    return checks


def build_report(model_spec: str, original: Graph, run: PipelineRun, checks: Sequence[ArtifactCheck],
                 seconds: float, error: str | None = None) -> dict:
    """The report JSON (schema in docs/report.md; ``version`` bumps on breaking change)."""
    records = run.records if run else []
    return {"version": REPORT_VERSION, "graphopt": __version__,
            "model": {"spec": model_spec, "name": original.name, "inputs": original.input_specs(),
                      **original.stats()},
            "pipeline": run.pipeline if run else "", "passes": [r.as_dict() for r in records],
            "artifacts": [c.as_dict() for c in checks],
            "ok": error is None and all(r.verified for r in records) and all(c.verified for c in checks),
            "error": error, "seconds": round(seconds, 3)}


def optimize(model: nn.Module, example_inputs: Sequence[torch.Tensor], registry: Registry, *,
             pipeline: str | None = None, formats: str | Sequence[str] = (), out_dir: Path | None = None,
             model_spec: str = "", name: str | None = None, verify: bool = True, verify_inputs: int = 3,
             leaf_modules: Sequence = (), data: dict | None = None, print_ir_after: Sequence[str] = (),
             on_ir: Callable[[str, str], None] | None = None, on_pass: Callable[[PassRecord], None] | None = None,
             progress: Progress | None = None) -> RunResult:
    """The whole job behind ``graphopt run``; raises GraphoptError on bad input or a failed pass.
    Passes and artifacts are verified on the example and ``check_inputs(verify_inputs)``."""
    start, say = time.perf_counter(), progress or (lambda text: None)
    requests = select_emitters(registry, formats)
    if requests and out_dir is None:
        raise UsageError("give an output directory (--out DIR) for the artifacts")
    say("capturing with torch.fx")
    graph = capture(model, example_inputs, leaf_modules=leaf_modules, name=name)
    graph.check_inputs = check_inputs(graph.example_inputs, verify_inputs, (data or {}).get("calibration", ()))
    text = registry.default_pipeline() if pipeline is None else pipeline
    say(f"running pipeline {text or '(empty)'}")
    if text:
        run = run_pipeline(graph, text, registry, verify=verify, data=data,
                           print_ir_after=print_ir_after, on_ir=on_ir, on_pass=on_pass, progress=progress)
    else:
        run = PipelineRun(graph.clone(), "", graph.run(), [], {k: graph.run(x) for k, x in graph.input_sets})
    run.graph.meta["pipeline"] = run.pipeline
    checks = emit_all(run.graph, requests, out_dir, run.references, registry, progress=progress) if requests else []
    report = build_report(model_spec, graph, run, checks, time.perf_counter() - start)
    return RunResult(run.graph, graph, run, checks, report, requests)
