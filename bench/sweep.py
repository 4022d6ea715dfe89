"""Every architecture family through every stage: the zoo's models (tests/zoo) emitted to every
format in fp32, fp16 TFLite, pruned, and int8 to every format, each artifact verified by the
driver; a matrix of what went through (cosine against the optimized graph, file size, seconds)
and, for what did not, the one-line reason.

    .venv/bin/python bench/sweep.py [--size small|full] [--models resnet,vit,...] [--stages ...] [--threads N]
        [--out F] [--resume]

Writes the markdown matrix (``--out``), a JSON of every cell beside it and a picture (``.png``).
Small variants take about a minute each here, full-size ones 5-40 minutes (TFLite conversion and
int8 calibration dominate). Each model runs in its own process, so a crash or an out-of-memory kill
costs its cells only; a pipeline is run once per model and shared by the stages it serves (the int8
formats share one quantization; the pte stages continue it with a partition).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import graphopt  # noqa: E402
from graphopt.driver import emit_all, select_emitters  # noqa: E402
from graphopt.errors import first_line  # noqa: E402
from graphopt.passmanager import run_pipeline  # noqa: E402
from zoo import FAMILIES, SMALL_FAMILIES, TRANSFORMER_FULL, TRANSFORMER_ZOO, ZOO  # noqa: E402

# stage -> (pipeline, format); pte stages add the xnnpack partition its emitter needs
STAGES = {
    "fp32 onnx": ("cleanup,fold-bn,fuse", "onnx"),
    "fp32 ptl": ("cleanup,fold-bn,fuse", "ptl"),
    "fp32 tflite": ("cleanup,fold-bn", "tflite"),
    "fp32 pte": ("cleanup,fold-bn,fuse,partition(backend=xnnpack)", "pte"),
    "fp16 tflite": ("cleanup,fold-bn", "tflite(precision=fp16)"),
    "fp16 onnx": ("cleanup,fold-bn,fuse,fp16", "onnx"),
    "prune onnx": ("cleanup,prune(ratio=0.3),fold-bn,fuse", "onnx"),
    "int8 onnx": ("cleanup,fold-bn,fuse,quantize(prefer=size)", "onnx"),
    "int8 ptl": ("cleanup,fold-bn,fuse,quantize(prefer=size)", "ptl"),
    "int8 tflite": ("cleanup,fold-bn,fuse,quantize(prefer=size)", "tflite"),
    "int8 pte": ("cleanup,fold-bn,fuse,quantize(prefer=size),partition(backend=xnnpack)", "pte"),
}
CALIBRATION = 16


def models(size: str) -> dict:
    """Family name -> (builder, input shape): the families zoo plus the ResNet/MobileNet and
    transformer models the other zoos hold, small or full-size."""
    if size == "small":
        transformers = {k.replace("_tiny", ""): v for k, v in TRANSFORMER_ZOO.items()}
        return {**SMALL_FAMILIES, "resnet": ZOO["tiny_resnet"], "mobilenet_v2": ZOO["tiny_mobilenet"],
                "mobilenet_v3": ZOO["tiny_mobilenet_v3"], **transformers}
    return {**FAMILIES, "resnet": ZOO["resnet18"], "mobilenet_v2": ZOO["mobilenet_v2"],
            "mobilenet_v3": ZOO["mobilenet_v3"], **TRANSFORMER_FULL}


def _reason(exc: Exception) -> str:
    """A cell's one-line reason: graphopt's own error as it is, anything else marked as a crash."""
    crash = "" if isinstance(exc, graphopt.GraphoptError) else f"crash: {type(exc).__name__}: "
    return crash + first_line(exc)


class Runs:
    """One model's pipeline runs, shared: a stage whose pipeline extends one already run (the pte
    stages add a partition; the int8 formats share one quantization) continues from that graph."""

    def __init__(self, registry, build, shape):
        gen = torch.Generator().manual_seed(0)
        self.registry, self.build = registry, build
        self.x = torch.randn(*shape, generator=gen)
        self.data = {"calibration": [torch.randn(*shape, generator=gen) for _ in range(CALIBRATION)]}
        self.done: dict[str, tuple] = {}      # pipeline -> (graph, references, seconds, quantize's stats) or an error

    def run(self, pipeline: str):
        if pipeline in self.done:
            return self.done[pipeline]
        start = time.perf_counter()
        base = max((p for p in self.done if pipeline.startswith(p + ",") and not isinstance(self.done[p], str)),
                   key=len, default=None)
        try:
            if base is None:
                result = graphopt.optimize(self.build(), (self.x,), self.registry, pipeline=pipeline, data=self.data)
                graph, references, records, quantized = result.graph, result.pipeline.references, \
                    result.pipeline.records, None
                seconds = time.perf_counter() - start
            else:
                graph, references, before, quantized = self.done[base]
                run = run_pipeline(graph, pipeline[len(base) + 1:], self.registry, data=self.data)
                graph, records, seconds = run.graph, run.records, before + time.perf_counter() - start
            stats = next((r.stats for r in records if r.name.split("(")[0] == "quantize"), None)
            if stats:
                quantized = {k: stats[k] for k in ("int8_macs_share", "cosine_calibration", "sqnr_calibration")}
                quantized["fp32_layers"] = len(stats["fp32_layers"])
            self.done[pipeline] = (graph, references, seconds, quantized)
        except Exception as exc:   # a crash is a finding too: report it, go on
            self.done[pipeline] = _reason(exc)
        return self.done[pipeline]


def cell(runs: Runs, stage: str, out: Path) -> dict:
    """One stage: its pipeline (shared, see Runs), then one format emitted and verified on the example,
    3 shuffles of it and 3 calibration samples. ``seconds``: the passes' plus the artifact's."""
    pipeline, fmt = STAGES[stage]
    done = runs.run(pipeline)
    if isinstance(done, str):
        return {"ok": False, "reason": done, "seconds": None}
    graph, references, pass_seconds, quantized = done
    start = time.perf_counter()
    try:
        (check,) = emit_all(graph, select_emitters(runs.registry, fmt), out, references, runs.registry)
    except Exception as exc:
        return {"ok": False, "reason": _reason(exc), "pass_seconds": round(pass_seconds, 1),
                "seconds": round(pass_seconds + time.perf_counter() - start, 1)}
    return {"ok": check.verified, "reason": "; ".join(check.problems) or None, "cosine": check.vs_graph.cosine,
            "bytes": check.bytes, "route": check.artifact.meta.get("route"), "pass_seconds": round(pass_seconds, 1),
            "seconds": round(pass_seconds + time.perf_counter() - start, 1), **({"quantize": quantized} if quantized else {})}


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def markdown(results: dict, size: str) -> str:
    stages = list(STAGES)
    lines = [f"# The sweep: every family through every stage ({size} models)", "",
             f"`.venv/bin/python bench/sweep.py --size {size}` on {platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}. A cell is the artifact's cosine "
             f"against the optimized graph (verified on the example, 3 shuffles of it and 3 of the {CALIBRATION} "
             f"calibration samples), its size and the seconds of its passes (a pipeline shared by several cells "
             f"counts in each), emission and verification; or x with the reason below.", "",
             "| family | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    failures = []
    for family, row in results.items():
        cells = []
        for stage in stages:
            c = row.get(stage)
            if c is None:
                cells.append("")
            elif c["ok"]:
                fallback = (c.get("route") or "").startswith("litert-torch (")   # where onnx2tf could not
                cells.append(f"{c['cosine']:.4f}" + (" (litert)" if fallback else "") +
                             f"<br>{_size(c['bytes'])}, {c['seconds']:.0f} s")
            else:
                failures.append(f"- {family}, {stage}: {c['reason']}")
                cells.append(f"x{len(failures)}")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    done = sum(c["ok"] for row in results.values() for c in row.values())
    total = sum(len(row) for row in results.values())
    lines += ["", f"{done} of {total} cells verified. (litert): TFLite through litert-torch where onnx2tf failed "
              "(the reasons in the JSON's `route`); int8 TFLite always takes litert-torch.", ""]
    if failures:
        lines += ["Not through:", "", *[f.replace("- ", f"- x{i + 1} ", 1) for i, f in enumerate(failures)], ""]
    quantized = {f: q for f, row in results.items()
                 if (q := next((c["quantize"] for c in row.values() if "quantize" in c), None))}
    if quantized:
        lines += ["The int8 stages' quantization (`quantize(prefer=size)`, its other options at their defaults): the share of the model's "
                  "MACs that run in int8, the fake-quant graph against the fp32 model (the worst of the calibration samples "
                  "and the inputs the pass is verified on), "
                  "and how many layers it kept in fp32 to meet its bound (cosine 0.995).", "",
                  "| family | int8 MACs | cosine vs fp32 | SQNR (dB) | layers kept fp32 |", "|---|---|---|---|---|",
                  *[f"| {f} | {q['int8_macs_share']:.1%} | {q['cosine_calibration']:.4f} | {q['sqnr_calibration']:.1f} "
                    f"| {q['fp32_layers']} |" for f, q in quantized.items()], ""]
    return "\n".join(lines)


def picture(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages, families = list(STAGES), list(results)
    grid = [[1.0 if results[f].get(s, {}).get("ok") else 0.0 if s in results[f] else 0.5 for s in stages]
            for f in families]
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(stages), 1 + 0.35 * len(families)))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(stages)), stages, rotation=45, ha="right")
    ax.set_yticks(range(len(families)), families)
    ax.set_title("verified (green) / not through (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep_model(name: str, build, shape, stages: list[str], out: Path) -> None:
    """One model's cells (those of the JSON beside ``out`` not verified yet), the JSON rewritten after each."""
    path = out.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {}
    runs = Runs(graphopt.load_plugins(), build, shape)
    with tempfile.TemporaryDirectory() as tmp:
        for stage in stages:
            kept = results.get(name, {}).get(stage, {})
            if kept.get("ok") and ("quantize" in kept or not stage.startswith("int8")):
                continue
            c = cell(runs, stage, Path(tmp) / stage.replace(" ", "_"))
            results.setdefault(name, {})[stage] = c
            print(f"{name:16s} {stage:12s} {'ok' if c['ok'] else 'x '} {c['seconds'] or 0:6.1f}s "
                  f"{'' if c['ok'] else c['reason']}", flush=True)
            path.write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("small", "full"), default="small")
    parser.add_argument("--models", help="comma-separated family names (default: all)")
    parser.add_argument("--stages", help="comma-separated stages (default: all)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the verified cells of the --out JSON, run the failed and missing ones")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)   # a model's own process
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    zoo = models(args.size)
    names = args.models.split(",") if args.models else list(zoo)
    stages = args.stages.split(",") if args.stages else list(STAGES)
    out = args.out or HERE / f"SWEEP{'_SMALL' if args.size == 'small' else ''}.md"
    if args.one:
        return sweep_model(names[0], *zoo[names[0]], stages, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    if not args.resume:
        path.write_text("{}")
    # each model in its own process: the memory a conversion leaves behind goes with it, and a
    # model that crashes or is killed (out of memory) costs its own cells only
    for name in names:
        code = subprocess.run([sys.executable, __file__, "--one", "--size", args.size, "--models", name,
                               "--stages", ",".join(stages), "--out", str(out),
                               *(["--threads", str(args.threads)] if args.threads else [])]).returncode
        results = json.loads(path.read_text())
        for stage in stages if code else ():
            if stage not in results.get(name, {}):
                why = " (killed: out of memory?)" if code == -9 else ""
                results.setdefault(name, {})[stage] = {"ok": False, "seconds": None,
                                                       "reason": f"crash: its process exited with {code}{why}"}
        path.write_text(json.dumps(results, indent=1))
    results = json.loads(path.read_text())
    results = {n: {s: results[n][s] for s in STAGES if s in results[n]} for n in zoo if n in results}
    out.write_text(markdown(results, args.size))
    picture(results, out.with_suffix(".png"))
    print(f"wrote {out}, {path.name}, {out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
