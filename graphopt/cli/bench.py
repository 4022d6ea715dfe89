"""Latency, size and error of artifacts, each in its own runtime, measured side by side.

Runners are timed round-robin (one call of each per round) so that the noise of a shared
machine hits every row alike; compare rows as ratios within one run.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from graphopt.emit import Runner
from graphopt.metrics import compare


@dataclass
class Subject:
    """Something to time: a label, its format, file (if any) and a runner."""

    label: str
    format: str
    runner: Runner
    path: Path | None = None
    bytes: int | None = None
    baseline: str | None = None     # label of the row this one is a speed-up over


@dataclass
class BenchRow:
    label: str
    format: str
    path: str | None
    bytes: int | None
    threads: int
    runs: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    max_abs_err: float | None
    max_rel_err: float | None
    cosine: float | None
    accuracy: float | None = None
    speedup: float | None = None        # baseline median / this median
    baseline: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def accuracy(runner: Runner, x: Sequence[torch.Tensor], y: torch.Tensor, batch: int) -> float:
    """Top-1 accuracy of ``runner`` on labelled data, fed in chunks of its static ``batch``."""
    hits, n = 0, len(y)
    for start in range(0, n, batch):
        chunk = [t[start:start + batch] for t in x]
        size = len(chunk[0])
        if size < batch:  # pad the last chunk to the artifact's static batch
            chunk = [torch.cat([c, c[:1].expand(batch - size, *c.shape[1:])]) for c in chunk]
        logits = runner(chunk)[0][:size]
        hits += int((logits.argmax(1) == y[start:start + size]).sum())
    return hits / n


def bench(subjects: Sequence[Subject], inputs: Sequence[torch.Tensor], *, reference: Sequence[torch.Tensor] | None,
          threads: int, runs: int = 50, warmup: int = 5,
          eval_data: tuple[list[torch.Tensor], torch.Tensor] | None = None,
          progress: Callable[[str], None] | None = None) -> list[BenchRow]:
    """Time every subject round-robin after ``warmup`` calls each, in a seeded shuffled order each round (in a
    fixed order each subject always inherits the caches its predecessor leaves: two identical ExecuTorch files
    timed 0.92x apart among 14 subjects, 1.00x alone); errors against ``reference``."""
    inputs = list(inputs)
    errors = []   # by position: two subjects may share a label
    for s in subjects:
        if progress:
            progress(f"warming up {s.label}")
        for _ in range(warmup):
            out = s.runner(inputs)
        errors.append(compare(reference, out) if reference is not None else None)
    times: list[list[float]] = [[] for _ in subjects]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        shuffle = random.Random(0).shuffle
        for i in range(runs):
            if progress:
                progress(f"timing, round robin ({i + 1}/{runs})")
            order = list(range(len(subjects)))
            shuffle(order)
            for k in order:
                start = time.perf_counter()
                subjects[k].runner(inputs)
                times[k].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    rows = []
    batch = inputs[0].shape[0]
    for s, took, m in zip(subjects, times, errors):
        t = [x * 1e3 for x in took]
        try:
            acc = accuracy(s.runner, *eval_data, batch) if eval_data is not None else None
        except Exception as exc:
            from graphopt.errors import UsageError, first_line
            raise UsageError(f"eval data does not fit {s.label}: {first_line(exc)}") from exc
        rows.append(BenchRow(s.label, s.format, str(s.path) if s.path else None, s.bytes, threads, runs,
                             statistics.median(t), _percentile(t, 0.1), _percentile(t, 0.9),
                             m.max_abs if m else None, m.max_rel if m else None, m.cosine if m else None,
                             acc, baseline=s.baseline))
    medians = {r.label: r.median_ms for r in rows}
    for r in rows:
        if r.baseline in medians:
            r.speedup = medians[r.baseline] / r.median_ms
    return rows


def plot(rows: Sequence[BenchRow], path: Path, title: str) -> None:
    """Latency vs size (and vs accuracy when known) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_acc = any(r.accuracy is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if with_acc else 1, figsize=(11 if with_acc else 6, 4.5), squeeze=False)
    sized = [r for r in rows if r.bytes]
    ax = axes[0][0]
    for r in sized:   # hollow markers: baselines; legend rather than labels (equal sizes overlap)
        ax.errorbar(r.bytes / 2**20, r.median_ms, yerr=[[r.median_ms - r.p10_ms], [r.p90_ms - r.median_ms]],
                    fmt="o" if "unoptimized" not in r.label else "s", capsize=3, label=r.label,
                    mfc="none" if "unoptimized" in r.label else None)
    if sized:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel(f"latency, median ms ({rows[0].threads} thread(s), p10-p90 bars)")
    ax.set_xlim(left=0, right=max((r.bytes for r in sized), default=1) / 2**20 * 1.35)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if with_acc:
        ax = axes[0][1]
        for r in rows:
            if r.accuracy is not None:
                ax.plot(r.median_ms, r.accuracy * 100, "o", label=r.label)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_xlim(left=0)
        ax.set_xlabel("latency, median ms")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def markdown(rows: Sequence[BenchRow]) -> str:
    """The rows as a markdown table (for bench/ and the README)."""
    head = "| artifact | format | size | median ms | p10-p90 ms | speed-up | max rel err | accuracy |\n" \
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    lines = []
    for r in rows:
        size = f"{r.bytes / 2**20:.2f} MiB" if r.bytes else "-"
        speed = f"{r.speedup:.2f}x vs {r.baseline}" if r.speedup else "-"
        err = f"{r.max_rel_err:.1e}" if r.max_rel_err is not None else "-"
        acc = f"{r.accuracy:.2%}" if r.accuracy is not None else "-"
        lines.append(f"| {r.label} | {r.format} | {size} | {r.median_ms:.2f} | {r.p10_ms:.2f}-{r.p90_ms:.2f} "
                     f"| {speed} | {err} | {acc} |")
    return head + "\n".join(lines) + "\n"


def load_eval(path: Path, input_names: Sequence[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Labelled data from an npz: ``y`` (labels) and either ``x`` (one input) or one array
    per input name."""
    import numpy as np

    from graphopt.errors import UsageError
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"eval data {path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        if "y" not in data.files:
            raise UsageError(f"eval data {path} has no 'y' array of labels (it has {', '.join(data.files)})")
        if "x" in data.files and len(input_names) == 1:
            x = [torch.from_numpy(data["x"].copy())]
        else:
            missing = [n for n in input_names if n not in data.files]
            if missing:
                raise UsageError(f"eval data {path} lacks {', '.join(missing)}; give 'x' for a single "
                                 f"input or one array per input name")
            x = [torch.from_numpy(data[n].copy()) for n in input_names]
        y = torch.from_numpy(data["y"].copy()).long()
    if any(len(t) != len(y) for t in x):
        raise UsageError(f"eval data {path}: inputs and labels differ in length")
    return [t.float() if t.is_floating_point() else t for t in x], y


def run_subjects(result, registry, stage: Path, eager: torch.nn.Module, threads: int) -> list[Subject]:
    """What ``graphopt run --bench`` times: the unoptimized model in eager PyTorch, the
    optimized fx graph, and per requested format the unoptimized graph emitted straight to it
    beside graphopt's artifact (each a speed-up over the one before it)."""
    from graphopt.driver import emit_one
    from graphopt.graph import flatten_outputs

    def eager_run(inputs):
        with torch.no_grad():
            return flatten_outputs(eager(*inputs))

    subjects = [Subject("eager (unoptimized)", "torch", eager_run),
                Subject("fx graph (optimized)", "torch", result.graph.run, baseline="eager (unoptimized)")]
    plain = result.original.clone()
    plain.meta["pipeline"] = ""
    sub = stage / "unoptimized"
    sub.mkdir(exist_ok=True)
    for (emitter, options), check in zip(result.requests, result.artifacts):
        name = check.artifact.path.name
        base = emit_one(plain, emitter, options, sub, registry)
        label = f"{name} (unoptimized)"
        subjects.append(Subject(label, emitter.format, emitter.load(base, threads=threads), base.path,
                                base.bytes, baseline="eager (unoptimized)"))
        subjects.append(Subject(name, emitter.format, emitter.load(check.artifact, threads=threads),
                                check.artifact.path, check.bytes, baseline=label))
    return subjects
