"""Reproduce the README's comparison: the test ResNet-18- and MobileNetV2-style models
(1x3x224x224) through graphopt's default pipeline into every format, each timed beside the
unoptimized model exported straight to the same format, in one run.

    .venv/bin/python bench/compare.py [--threads 1] [--runs 30] [--formats onnx,ptl,tflite]

Writes bench/RESULTS.md (markdown tables) and bench/<model>.png.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import graphopt  # noqa: E402
from graphopt.bench import bench, markdown, plot, run_subjects  # noqa: E402
from graphopt.driver import optimize  # noqa: E402
from graphopt.modelspec import example_inputs  # noqa: E402
from models import mobilenet_v2, resnet18  # noqa: E402

MODELS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--formats", default="onnx,ptl,tflite")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    registry = graphopt.load_plugins()
    sections = [f"# graphopt bench\n\n`bench/compare.py --threads {args.threads} --runs {args.runs} "
                f"--formats {args.formats}` on {platform.machine()}, torch {torch.__version__}, "
                f"{time.strftime('%Y-%m-%d')}. Latencies are medians of round-robin runs in one "
                f"process; compare rows as ratios.\n"]
    for name, build in MODELS.items():
        model = build()
        inputs = example_inputs([(1, 3, 224, 224)])
        with tempfile.TemporaryDirectory() as tmp:
            result = optimize(model, inputs, registry, formats=args.formats, out_dir=Path(tmp) / "out",
                              model_spec=f"tests/models.py:{name}", name=name)
            if not result.ok:
                raise SystemExit(f"{name}: artifacts did not verify: {result.report['artifacts']}")
            subjects = run_subjects(result, registry, Path(tmp), model, args.threads)
            rows = bench(subjects, inputs, reference=result.pipeline.reference, threads=args.threads,
                         runs=args.runs)
        plot(rows, HERE / f"{name}.png", f"{name}: graphopt artifacts vs unoptimized")
        sections.append(f"## {name}\n\npipeline `{result.pipeline.pipeline}`\n\n{markdown(rows)}")
        print(sections[-1])
    args.out.write_text("\n".join(sections))


if __name__ == "__main__":
    main()
