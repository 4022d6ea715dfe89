"""Reproduce the README's comparisons on the test ResNet-18- and MobileNetV2-style models
(1x3x224x224), every artifact timed round-robin beside its baseline in one run.

    .venv/bin/python bench/compare.py [--threads 1] [--runs 30] [--formats onnx,ptl,tflite]
        graphopt's default pipeline vs the unoptimized model exported straight to each
        format (and eager PyTorch); writes bench/RESULTS.md
    .venv/bin/python bench/compare.py --against cleanup,fold-bn --out bench/FUSION.md
        the default pipeline vs another pipeline, artifact by artifact (what `fuse` buys)

Also writes bench/<model>.png (latency vs size) for the first form.
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
from graphopt.cli.bench import Subject, bench, markdown, plot, run_subjects  # noqa: E402
from graphopt.driver import optimize  # noqa: E402
from graphopt.cli.modelspec import example_inputs  # noqa: E402
from zoo.cnn import mobilenet_v2, resnet18  # noqa: E402

MODELS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}


def _optimize(model, inputs, registry, pipeline, formats, out, name):
    result = optimize(model, inputs, registry, pipeline=pipeline, formats=formats, out_dir=out,
                      model_spec=f"tests/zoo/cnn.py:{name}", name=name)
    if not result.ok:
        raise SystemExit(f"{name} ({result.pipeline.pipeline}): artifacts did not verify: "
                         f"{result.report['artifacts']}")
    return result


def _against(model, inputs, registry, args, tmp: Path, name: str) -> tuple[list[Subject], list]:
    """Artifacts of ``--against`` and of the default pipeline, each the other's twin, and the
    reference outputs."""
    subjects = []
    for i, pipeline in enumerate((args.against, registry.default_pipeline())):
        result = _optimize(model, inputs, registry, pipeline, args.formats, tmp / str(i), name)
        for (emitter, _), check in zip(result.requests, result.artifacts):
            art = check.artifact
            subjects.append(Subject(f"{art.path.name} ({pipeline})", emitter.format,
                                    emitter.load(art, threads=args.threads), art.path, check.bytes,
                                    baseline=f"{art.path.name} ({args.against})" if i else None))
    return sorted(subjects, key=lambda s: s.format), result.pipeline.reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--formats", default="onnx,ptl,tflite")
    parser.add_argument("--against", help="compare the default pipeline with this one instead of "
                                          "with the unoptimized model")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    registry = graphopt.load_plugins()
    what = f"the default pipeline vs `{args.against}`" if args.against else \
        "graphopt's artifacts vs the unoptimized model exported straight to each format"
    sections = [f"# graphopt bench: {what}\n\n`bench/compare.py {' '.join(sys.argv[1:])}` on "
                f"{platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. "
                f"Latencies are medians of round-robin runs in one process; compare rows as ratios.\n"]
    for name, build in MODELS.items():
        model = build()
        inputs = example_inputs([(1, 3, 224, 224)])
        with tempfile.TemporaryDirectory() as tmp:
            if args.against:
                subjects, reference = _against(model, inputs, registry, args, Path(tmp), name)
            else:
                result = _optimize(model, inputs, registry, None, args.formats, Path(tmp) / "out", name)
                subjects, reference = run_subjects(result, registry, Path(tmp), model, args.threads), \
                    result.pipeline.reference
            rows = bench(subjects, inputs, reference=reference, threads=args.threads, runs=args.runs)
        if not args.against:
            plot(rows, HERE / f"{name}.png", f"{name}: graphopt artifacts vs unoptimized")
        sections.append(f"## {name}\n\npipeline `{registry.default_pipeline()}`\n\n{markdown(rows)}")
        print(sections[-1], flush=True)
    args.out.write_text("\n".join(sections))


if __name__ == "__main__":
    main()
