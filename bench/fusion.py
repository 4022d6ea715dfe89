"""What the fuse pass buys in each format: the test ResNet-18- and MobileNetV2-style models
(1x3x224x224) through `cleanup,fold-bn` and through `cleanup,fold-bn,fuse`, every artifact
timed round-robin beside its unfused twin in one run.

    .venv/bin/python bench/fusion.py [--threads 1] [--runs 60] [--formats ptl,onnx,tflite]

Writes bench/FUSION.md (markdown tables; speed-up = unfused median / fused median).
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
from graphopt.bench import Subject, bench, markdown  # noqa: E402
from graphopt.driver import optimize  # noqa: E402
from graphopt.modelspec import example_inputs  # noqa: E402
from models import mobilenet_v2, resnet18  # noqa: E402

MODELS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}
PIPELINES = ("cleanup,fold-bn", "cleanup,fold-bn,fuse")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--formats", default="ptl,onnx,tflite")
    parser.add_argument("--out", type=Path, default=HERE / "FUSION.md")
    args = parser.parse_args()
    registry = graphopt.load_plugins()
    sections = [f"# fuse: fused vs unfused artifacts\n\n`bench/fusion.py --threads {args.threads} --runs "
                f"{args.runs} --formats {args.formats}` on {platform.machine()}, torch {torch.__version__}, "
                f"{time.strftime('%Y-%m-%d')}. Latencies are medians of round-robin runs in one process; "
                f"compare rows as ratios.\n"]
    for name, build in MODELS.items():
        model = build()
        inputs = example_inputs([(1, 3, 224, 224)])
        with tempfile.TemporaryDirectory() as tmp:
            subjects, reference = [], None
            for i, pipeline in enumerate(PIPELINES):
                result = optimize(model, inputs, registry, pipeline=pipeline, formats=args.formats,
                                  out_dir=Path(tmp) / str(i), model_spec=f"tests/models.py:{name}", name=name)
                if not result.ok:
                    raise SystemExit(f"{name} ({pipeline}): did not verify: {result.report['artifacts']}")
                reference = result.pipeline.reference
                for (emitter, _), check in zip(result.requests, result.artifacts):
                    art = check.artifact
                    label = f"{art.path.name} ({pipeline})"
                    baseline = f"{art.path.name} ({PIPELINES[0]})" if i else None
                    subjects.append(Subject(label, emitter.format, emitter.load(art, threads=args.threads),
                                            art.path, check.bytes, baseline=baseline))
            subjects.sort(key=lambda s: s.format)
            rows = bench(subjects, inputs, reference=reference, threads=args.threads, runs=args.runs)
        sections.append(f"## {name}\n\n{markdown(rows)}")
        print(sections[-1], flush=True)
    args.out.write_text("\n".join(sections))


if __name__ == "__main__":
    main()
