"""Compare graphopt's `prune` with Torch-Pruning (DepGraph) at the same ratio on the test
ResNet-18- and MobileNetV2-style models (1x3x224x224), every ONNX file timed round-robin
beside the unpruned one in one run.

    .venv/bin/python bench/prune.py [--ratios 0.5] [--runs 50] [--threads 1] [--out bench/PRUNE.md]

graphopt: `prune(ratio=R)` (uniform, l1), emitted to ONNX and verified by the driver.
Torch-Pruning: MetaPruner with GroupMagnitudeImportance(p=1), pruning_ratio=R, the final
classifier ignored; its pruned model goes through graphopt's ONNX emitter exactly as the
unpruned baseline does (captured, no pass), so only the pruning differs. Torch-Pruning comes
with `pip install 'graphopt[bench]'`; without it only graphopt's side runs.

MACs in the table are graphopt's count (fx capture, annotated); Torch-Pruning's
`count_ops_and_params` of the same models is listed under it. Also writes bench/prune.png
(latency vs size).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import graphopt  # noqa: E402
from graphopt.cli.bench import Subject, bench, plot  # noqa: E402
from graphopt.capture import capture  # noqa: E402
from graphopt.driver import ArtifactCheck, check_artifact, emit_one, optimize, select_emitters  # noqa: E402
from graphopt.graph import Graph, flatten_outputs  # noqa: E402
from graphopt.metrics import compare  # noqa: E402
from graphopt.cli.modelspec import example_inputs  # noqa: E402
from zoo.cnn import mobilenet_v2, resnet18  # noqa: E402

MODELS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}
GRAPHOPT, TP, UNPRUNED = "graphopt", "Torch-Pruning", "unpruned"


@dataclass
class Variant:
    """One model as one method left it: counts, its ONNX file to time, and its check."""

    model: str
    method: str               # GRAPHOPT, TP or UNPRUNED
    ratio: float | None
    module: torch.nn.Module   # what both MAC counters see
    outputs: list             # its own outputs in PyTorch
    macs: int                 # graphopt's count
    params: int
    check: str
    subject: Subject | None   # set once the label is known
    tp_macs: float | None = None

    @property
    def name(self) -> str:
        return {GRAPHOPT: f"graphopt `prune(ratio={self.ratio})`",
                TP: f"Torch-Pruning, ratio {self.ratio}"}.get(self.method, UNPRUNED)

    @property
    def label(self) -> str:
        what = "unoptimized" if self.method == UNPRUNED else f"{self.method} {self.ratio}"
        return f"{self.model}.onnx ({what})"


def _registry():
    """The plugins, with `prune` loaded by module name until its entry point is installed."""
    registry = graphopt.load_plugins()
    return registry if "prune" in registry.passes else graphopt.load_plugins(["graphopt_plugins.prune"], [])


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        return None
    return torch_pruning


def _verdict(check: ArtifactCheck, against: str) -> str:
    return f"{'verified' if check.verified else 'FAILED'}, cos {check.vs_graph.cosine:.6f} vs {against}"


def _straight(name: str, method: str, ratio: float | None, model: torch.nn.Module, inputs, registry,
              stage: Path, threads: int, against: str) -> Variant:
    """``model`` captured and emitted to ONNX with no pass (compare.py's straight export),
    checked against the model's own eager outputs under the emitter's tolerance."""
    emitter, options = select_emitters(registry, "onnx")[0]
    graph: Graph = capture(model, inputs, name=name)
    graph.meta["pipeline"] = ""
    with torch.no_grad():
        expected = flatten_outputs(model(*inputs))
    stage.mkdir(parents=True)
    art = emit_one(graph, emitter, options, stage, registry)
    check = check_artifact(emitter, art, [("example", inputs, expected, expected)], emitter.tolerance_for(options))
    stats = graph.stats()
    variant = Variant(name, method, ratio, model, expected, stats["macs"], stats["params"],
                      _verdict(check, against), None)
    variant.subject = Subject(variant.label, emitter.format, emitter.load(art, threads=threads), art.path,
                              art.bytes)
    return variant


def _graphopt(name: str, model, inputs, registry, ratio: float, stage: Path, threads: int) -> Variant:
    pipeline = f"prune(ratio={ratio})"
    result = optimize(model, inputs, registry, pipeline=pipeline, formats="onnx", out_dir=stage,
                      model_spec=f"tests/zoo/cnn.py:{name}", name=name)
    if not result.ok:
        raise SystemExit(f"{name} ({pipeline}): artifacts did not verify: {result.report['artifacts']}")
    (emitter, _), check = result.requests[0], result.artifacts[0]
    stats = result.graph.stats()
    variant = Variant(name, GRAPHOPT, ratio, result.graph.module, result.graph.run(), stats["macs"],
                      stats["params"], _verdict(check, "pruned fx graph (driver)"), None)
    variant.subject = Subject(variant.label, emitter.format, emitter.load(check.artifact, threads=threads),
                              check.artifact.path, check.bytes)
    return variant


def _torch_pruned(tp, name: str, model, inputs, registry, ratio: float, stage: Path, threads: int) -> Variant:
    """``model`` pruned in place by Torch-Pruning, then exported straight."""
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, inputs[0], importance=tp.importance.GroupMagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=[classifier], global_pruning=False)
    pruner.step()
    return _straight(name, TP, ratio, model.eval(), inputs, registry, stage, threads, "its eager model")


def _table(variants: list[Variant], rows) -> str:
    timed = {r.label: r for r in rows}
    base = {v.model: v for v in variants if v.method == UNPRUNED}
    lines = ["| model | method | MACs (G) | MACs reduction | params (M) | ONNX p50 ms | p10-p90 ms "
             "| speed-up vs unpruned ONNX | output check |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for v in variants:
        r = timed[v.subject.label]
        speed = f"{r.speedup:.2f}x" if r.speedup else "-"
        cut = f"{1 - v.macs / base[v.model].macs:.1%}" if v.method != UNPRUNED else "-"
        lines.append(f"| {v.model} | {v.name} | {v.macs / 1e9:.3f} | {cut} "
                     f"| {v.params / 1e6:.3f} | {r.median_ms:.2f} | {r.p10_ms:.2f}-{r.p90_ms:.2f} | {speed} "
                     f"| {v.check} |")
    return "\n".join(lines) + "\n"


def _cross_check(variants: list[Variant], tp, inputs) -> str:
    """Both MAC counters on every variant, and how far graphopt's and Torch-Pruning's pruned
    models are apart at each ratio (cos 1 when both removed the same channels)."""
    for v in variants:
        v.tp_macs, _ = tp.utils.count_ops_and_params(v.module, inputs[0])
    base, lines = variants[0], []

    def count(macs: float, of: float) -> str:
        return f"{macs / 1e9:.3f} G" + (f" (-{1 - macs / of:.1%})" if macs != of else "")

    for v in variants:
        lines.append(f"- {v.name}: graphopt's counter {count(v.macs, base.macs)}, "
                     f"Torch-Pruning's counter {count(v.tp_macs, base.tp_macs)}")
    ours = {v.ratio: v for v in variants if v.method == GRAPHOPT}
    for v in variants:
        if v.method == TP and v.ratio in ours:
            m = compare(ours[v.ratio].outputs, v.outputs)
            lines.append(f"- ratio {v.ratio}, graphopt's pruned model vs Torch-Pruning's: outputs cos "
                         f"{m.cosine:.4f}, max abs diff {m.max_abs:.3g} (1 and 0 when both removed the same channels)")
    return "\n".join(lines) + "\n"


def _command() -> str:
    """This run's command line, as ``unshare -n -- ...`` when the network was cut (only the
    loopback interface visible)."""
    dev = Path("/proc/net/dev")      # this process's network namespace (/sys may show the host's)
    cut = dev.is_file() and {line.split(":")[0].strip() for line in dev.read_text().splitlines()[2:]} <= {"lo"}
    return f"{'unshare -n -- ' if cut else ''}.venv/bin/python bench/prune.py {' '.join(sys.argv[1:])}".rstrip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--ratios", default="0.5", help="comma-separated pruning ratios")
    parser.add_argument("--out", type=Path, default=HERE / "PRUNE.md")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    registry = _registry()
    tp = _torch_pruning()
    if tp is None:
        print("Torch-Pruning is not installed (pip install 'graphopt[bench]'): timing graphopt's side only",
              flush=True)
    versions = f"torch {torch.__version__}" + (f", torch-pruning {md.version('torch-pruning')}" if tp else "")
    sections = [f"# graphopt bench: `prune` vs Torch-Pruning (DepGraph)\n\n`{_command()}` on "
                f"{platform.machine()}, {versions}, {time.strftime('%Y-%m-%d')}. "
                f"graphopt: `prune(ratio=R)` (uniform, l1 criterion). Torch-Pruning: `MetaPruner`, "
                f"`GroupMagnitudeImportance(p=1)`, `pruning_ratio=R`, final classifier ignored, local "
                f"(uniform) pruning, exported to ONNX by graphopt's emitter like the unpruned model. "
                f"Which channels each removes can differ: "
                f"Torch-Pruning's score also averages BatchNorm |gamma| in and skips depthwise "
                f"convolutions, graphopt's l1 scores every conv/linear weight slice and no norm scale. "
                f"No fine-tuning. Latencies are onnxruntime medians of round-robin runs in one process "
                f"({args.threads} thread(s), {args.runs} rounds); compare rows as ratios.\n"]
    if tp is None:
        sections.append("Torch-Pruning was not installed for this run: graphopt's side only.\n")
    all_rows = []
    for name, build in MODELS.items():
        inputs = example_inputs([(1, 3, 224, 224)])
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            base = _straight(name, UNPRUNED, None, build(), inputs, registry, tmp / "unpruned", args.threads,
                             "eager")
            variants = [base]
            for ratio in ratios:
                variants.append(_graphopt(name, build(), inputs, registry, ratio, tmp / f"graphopt-{ratio}",
                                          args.threads))
                if tp is not None:
                    variants.append(_torch_pruned(tp, name, build(), inputs, registry, ratio, tmp / f"tp-{ratio}",
                                                  args.threads))
            for v in variants[1:]:
                v.subject.baseline = base.subject.label
            rows = bench([v.subject for v in variants], inputs, reference=None, threads=args.threads,
                         runs=args.runs)
        all_rows += rows
        sections.append(f"## {name}\n\n{_table(variants, rows)}")
        if tp is not None:
            sections[-1] += (f"\nMACs by both counters (graphopt's counts conv/linear/matmul MACs only; "
                             f"Torch-Pruning's also BatchNorm, activations and pooling):\n\n"
                             f"{_cross_check(variants, tp, inputs)}")
        print(sections[-1], flush=True)
    plot(all_rows, HERE / "prune.png", "ONNX latency vs size: unpruned, graphopt prune, Torch-Pruning")
    args.out.write_text("\n".join(sections))


if __name__ == "__main__":
    main()
