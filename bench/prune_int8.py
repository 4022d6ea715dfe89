"""Pruning that pays in int8: `prune(ratio=R)` + int8 against unpruned int8, per format, on ResNet-18- and
MobileNetV2-style models (1x3x224x224, seeded random weights).

    .venv/bin/python bench/prune_int8.py [--models resnet18,mobilenet_v2] [--ratio 0.5] [--round-to 1] [--runs 40] [--processes 3]
        [--threads 1] [--out bench/PRUNE_INT8.md]

Per model: `cleanup,fold-bn,fuse,quantize` and `cleanup,prune(ratio=R),fold-bn,fuse,quantize`, each one pipeline
run emitting onnx, ptl and tflite (and, after `partition(backend=xnnpack)`, pte), every artifact verified by the
driver; then eager fp32 and the eight int8 files timed round-robin in fresh processes (bench/timing.py). The
table sets each format's measured speed-up beside the MAC reduction. Calibration: 16 seeded N(0,1) inputs (seeds
100-115); timing input: seed 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import graphopt  # noqa: E402
from graphopt.cli.bench import Subject  # noqa: E402
from graphopt.driver import emit_all, select_emitters  # noqa: E402
from graphopt.passmanager import run_pipeline  # noqa: E402
from pte import _seeded  # noqa: E402  (bench/pte.py)
from timing import ratio, time_in_processes  # noqa: E402  (bench/timing.py)
from zoo import ZOO  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2")
FORMATS = ("onnx", "ptl", "tflite", "pte")


def _build(tag: str, pipeline: str, model, x, calibration, registry, tmp: Path, entry: dict, subjects: dict) -> None:
    """One pipeline run emitting every format: its subjects, MACs, seconds and verification."""
    start = time.perf_counter()
    data = {"calibration": calibration}
    result = graphopt.optimize(model, (x,), registry, pipeline=pipeline, out_dir=tmp / tag, formats="onnx,ptl,tflite",
                               data=data)
    partitioned = run_pipeline(result.graph, "partition(backend=xnnpack)", registry, data=data).graph
    checks = [*result.artifacts, *emit_all(partitioned, select_emitters(registry, "pte"), tmp / f"{tag}_pte",
                                           result.pipeline.references, registry)]
    entry["runs"][tag] = {"pipeline": pipeline, "seconds": round(time.perf_counter() - start, 1),
                          "macs": result.pipeline.records[-1].macs,
                          "verified": {c.artifact.format: c.verified for c in checks},
                          "cosine_vs_graph": {c.artifact.format: c.vs_graph.cosine for c in checks}}
    for check in checks:
        if not check.verified:
            raise SystemExit(f"{pipeline}: {check.artifact.path.name} did not verify: {check.problems}")
        fmt = check.artifact.format
        subjects[f"{tag} {fmt}"] = Subject(f"{tag} {fmt}", fmt, None, check.artifact.path, check.bytes)


def bench_model(name: str, args) -> dict:
    build, shape = ZOO[name]
    registry, x, calibration = graphopt.load_plugins(), _seeded(shape, [0]), _seeded(shape, range(100, 116))
    model = build().eval()
    entry = {"shape": list(shape), "ratio": args.ratio, "round_to": args.round_to, "date": time.strftime("%Y-%m-%d %H:%M"), "runs": {}}
    subjects = {"eager": Subject("eager fp32", "torch", None)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _build("int8", "cleanup,fold-bn,fuse,quantize", model, x[0], calibration, registry, tmp, entry, subjects)
        _build("pruned int8", f"cleanup,prune(ratio={args.ratio}"
               + (f",round_to={args.round_to}" if args.round_to > 1 else "") + "),fold-bn,fuse,quantize", model, x[0], calibration,
               registry, tmp, entry, subjects)
        print(f"{name}: timing {len(subjects)} subjects x {args.runs} rounds in {args.processes} processes", flush=True)
        entry["subjects"] = time_in_processes(name, subjects, x, runs=args.runs, threads=args.threads,
                                              processes=args.processes, folder=tmp)
    for row in entry["subjects"].values():
        row["path"] = None
    return entry


def _table(name: str, e: dict) -> str:
    s, runs = e["subjects"], e["runs"]
    reduction = runs["int8"]["macs"] / runs["pruned int8"]["macs"]
    lines = [f"## {name} ({'x'.join(map(str, e['shape']))}), `{runs['pruned int8']['pipeline']}`", "",
             f"Measured {e['date']}. MACs {runs['int8']['macs'] / 1e9:.3f} G -> {runs['pruned int8']['macs'] / 1e9:.3f} "
             f"G ({reduction:.2f}x fewer). Pipeline runs (capture to verification of the four files): unpruned "
             f"{runs['int8']['seconds']} s, pruned {runs['pruned int8']['seconds']} s. Eager fp32: "
             f"{s['eager']['median_ms']:.2f} ms.", "",
             "| format | int8 ms | pruned int8 ms | speed-up from pruning | share of the MAC reduction | pruned int8 x "
             "eager | size int8 / pruned (MiB) | cosine vs its fake-quant graph (pruned) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for fmt in FORMATS:
        a, b = s[f"int8 {fmt}"], s[f"pruned int8 {fmt}"]
        gain = ratio(a, b)
        lines.append(f"| {fmt} | {a['median_ms']:.2f} | {b['median_ms']:.2f} | **{gain:.2f}x** | {gain / reduction:.0%} "
                     f"| {ratio(s['eager'], b):.1f}x | {a['bytes'] / 2**20:.2f} / {b['bytes'] / 2**20:.2f} | "
                     f"{runs['pruned int8']['cosine_vs_graph'][fmt]:.5f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--round-to", type=int, default=1, help="prune's round_to")
    parser.add_argument("--runs", type=int, default=40, help="round-robin rounds in each timing process")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes the rounds are repeated in")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "PRUNE_INT8.md")
    args = parser.parse_args()
    results = {name: bench_model(name, args) for name in args.models.split(",")}
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    gains = {fmt: statistics.median(ratio(e["subjects"][f"int8 {fmt}"], e["subjects"][f"pruned int8 {fmt}"])
                                    for e in results.values()) for fmt in FORMATS}
    text = (f"# Pruning + int8 against unpruned int8, per format\n\n`.venv/bin/python bench/prune_int8.py "
            f"{' '.join(sys.argv[1:])}`\n\n{args.threads} thread(s); {args.runs} round-robin rounds in each of "
            f"{args.processes} fresh processes (bench/timing.py): a time is the median over the processes, a ratio "
            f"the median of the per-process ratios. Seeded random weights; every artifact verified by the driver.\n\n"
            + "\n".join(_table(n, e) for n, e in results.items())
            + "\nMedian speed-up from pruning over the models: "
            + ", ".join(f"{fmt} {g:.2f}x" for fmt, g in gains.items()) + ".\n")
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
