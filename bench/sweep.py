"""Every architecture family through every stage: the zoo's models (tests/zoo) emitted to every
format in fp32, fp16 TFLite, pruned, and int8 to every format, each artifact verified by the
driver; a matrix of what went through (cosine against the optimized graph, file size, seconds)
and, for what did not, the one-line reason.

    .venv/bin/python bench/sweep.py [--size small|full] [--models resnet,vit_tiny,...] [--out bench/SWEEP.md]

Writes the markdown matrix (``--out``), a JSON of every cell beside it and a picture
(``.png``). Small variants take about a minute each here, full-size ones several minutes
(TFLite conversion and int8 calibration dominate). Each cell is its own ``graphopt.optimize``
run, so one failure costs that cell only.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import graphopt  # noqa: E402
from graphopt.errors import first_line  # noqa: E402
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


def cell(registry, build, shape, stage: str, out: Path) -> dict:
    pipeline, fmt = STAGES[stage]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    data = {"calibration": [torch.randn(*shape, generator=gen) for _ in range(CALIBRATION)]}
    start = time.perf_counter()
    try:
        result = graphopt.optimize(build(), (x,), registry, pipeline=pipeline, formats=fmt, out_dir=out, data=data)
    except graphopt.GraphoptError as exc:
        return {"ok": False, "reason": first_line(exc), "seconds": round(time.perf_counter() - start, 1)}
    except Exception as exc:   # a crash is a finding too: report it, go on
        return {"ok": False, "reason": f"crash: {type(exc).__name__}: {first_line(exc)}",
                "seconds": round(time.perf_counter() - start, 1)}
    (check,) = result.artifacts
    return {"ok": result.ok, "reason": "; ".join(check.problems) or None, "cosine": check.vs_graph.cosine,
            "bytes": check.bytes, "route": check.artifact.meta.get("route"),
            "seconds": round(time.perf_counter() - start, 1)}


def markdown(results: dict, size: str) -> str:
    stages = list(STAGES)
    lines = [f"# The sweep: every family through every stage ({size} models)", "",
             f"`.venv/bin/python bench/sweep.py --size {size}` on {platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}. A cell is the artifact's cosine "
             f"against the optimized graph (verified on the example, 3 shuffles of it and 3 of the {CALIBRATION} "
             f"calibration samples), or x with the reason below.", "",
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
                cells.append(f"{c['cosine']:.4f}" + (" (litert)" if fallback else ""))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("small", "full"), default="small")
    parser.add_argument("--models", help="comma-separated family names (default: all)")
    parser.add_argument("--stages", help="comma-separated stages (default: all)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    zoo = models(args.size)
    names = args.models.split(",") if args.models else list(zoo)
    stages = args.stages.split(",") if args.stages else list(STAGES)
    out = args.out or HERE / f"SWEEP{'_SMALL' if args.size == 'small' else ''}.md"
    registry = graphopt.load_plugins()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            build, shape = zoo[name]
            for stage in stages:
                c = cell(registry, build, shape, stage, Path(tmp) / name / stage.replace(" ", "_"))
                results.setdefault(name, {})[stage] = c
                print(f"{name:16s} {stage:12s} {'ok' if c['ok'] else 'x '} {c['seconds']:6.1f}s "
                      f"{'' if c['ok'] else c['reason']}", flush=True)
                out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.write_text(markdown(results, args.size))
    picture(results, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.json').name}, {out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
