"""ExecuTorch .pte beside the other formats, fp32 and int8, on a small CNN (the test
ResNet-style model at 1x3x32x32) and the test ResNet-18- and MobileNetV2-style models
(1x3x224x224): per model every artifact is timed round-robin in one process.

    .venv/bin/python bench/pte.py [--models tiny_resnet,resnet18,mobilenet_v2] [--runs 50]
        [--threads 1] [--out bench/PTE.md]

Rows per model:
- eager PyTorch (the unoptimized model);
- graphopt fp32 (`cleanup,fold-bn,fuse`) as onnx, ptl, tflite and pte (graphopt's xnnpack
  partitions delegated to XNNPACK);
- ExecuTorch's own fp32 flow: torch.export of the eager model, `to_edge_transform_and_lower`
  with its `XnnpackPartitioner`;
- graphopt int8 (`cleanup,fold-bn,fuse,quantize(prefer=size)`) as onnx and pte;
- ExecuTorch's own int8 flow: PT2E with its `XNNPACKQuantizer` (symmetric, per-channel
  weights), the same calibration inputs, then the same lowering.
Errors are against eager fp32 on the timing input; cosine and top-1 agreement with eager on
32 other seeded random inputs.
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
from graphopt.cli.bench import Subject, bench, markdown  # noqa: E402
from graphopt.emit import Artifact, captured_output  # noqa: E402
from graphopt.metrics import compare  # noqa: E402
from zoo.cnn import mobilenet_v2, resnet18, tiny_resnet  # noqa: E402

MODELS = {"tiny_resnet": (tiny_resnet, (1, 3, 32, 32)), "resnet18": (resnet18, (1, 3, 224, 224)),
          "mobilenet_v2": (mobilenet_v2, (1, 3, 224, 224))}
FP32 = "cleanup,fold-bn,fuse"
INT8 = f"{FP32},quantize(prefer=size)"


def _seeded(shape, seeds) -> list[torch.Tensor]:
    return [torch.randn(*shape, generator=torch.Generator().manual_seed(s)) for s in seeds]


def _graphopt(model, inputs, registry, pipeline, formats, out: Path, calibration, threads) -> list[Subject]:
    result = graphopt.optimize(model, inputs, registry, pipeline=pipeline, formats=formats, out_dir=out,
                               data={"calibration": calibration})
    if not result.ok:
        raise SystemExit(f"{pipeline}: artifacts did not verify: {result.report['artifacts']}")
    tag = "int8" if "quantize" in pipeline else "fp32"
    subjects = []
    for (emitter, _), check in zip(result.requests, result.artifacts):
        art = check.artifact
        subjects.append(Subject(f"graphopt {tag} {emitter.format}", emitter.format,
                                emitter.load(art, threads=threads), art.path, check.bytes, baseline="eager fp32"))
        if emitter.format == "pte":
            meta = art.meta
            print(f"  {art.path.name}: {meta.get('delegates')} XNNPACK delegate(s) for "
                  f"{meta.get('partitions')} graphopt partition(s)", flush=True)
    return subjects


def _executorch(model, inputs, calibration, path: Path, quantize: bool) -> Path:
    """ExecuTorch's own flow: export, (PT2E XNNPACKQuantizer), XnnpackPartitioner, .pte."""
    with captured_output():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        module = model
        if quantize:
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer, get_symmetric_quantization_config)
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            prepared = prepare_pt2e(torch.export.export(model, tuple(inputs)).module(), quantizer)
            for x in calibration:
                prepared(x)
            module = convert_pt2e(prepared)
        program = to_edge_transform_and_lower(torch.export.export(module, tuple(inputs)),
                                              partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(program.buffer)
    return path


def _agreement(subjects, eager, held_out) -> dict[str, str]:
    """Cosine and top-1 agreement of each subject with eager fp32 on held-out inputs."""
    with torch.no_grad():
        expected = [eager(x) for x in held_out]
    out = {}
    for s in subjects:
        got = [s.runner([x])[0] for x in held_out]
        cos = min(compare([e], [g]).cosine for e, g in zip(expected, got))
        top1 = sum(int(e.argmax() == g.argmax()) for e, g in zip(expected, got)) / len(held_out)
        out[s.label] = f"{cos:.4f} | {top1:.0%}"
    return out


def bench_model(name: str, registry, args) -> str:
    build, shape = MODELS[name]
    model = build().eval()
    inputs = _seeded(shape, [0])
    calibration = _seeded(shape, range(100, 116))
    held_out = _seeded(shape, range(200, 232))
    pte = registry.emitters["pte"]

    def eager(xs):
        with torch.no_grad():
            return [model(*xs)]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"{name}: graphopt fp32", flush=True)
        subjects = [Subject("eager fp32", "torch", eager)]
        subjects += _graphopt(model, inputs, registry, FP32, "onnx,ptl,tflite,pte", tmp / "fp32", calibration,
                              args.threads)
        print(f"{name}: graphopt int8", flush=True)
        subjects += _graphopt(model, inputs, registry, INT8, "onnx,pte", tmp / "int8", calibration, args.threads)
        for quantize, tag in ((False, "fp32"), (True, "int8")):
            print(f"{name}: ExecuTorch's own {tag} flow", flush=True)
            path = _executorch(build().eval(), inputs, calibration, tmp / f"executorch_{tag}.pte", quantize)
            subjects.append(Subject(f"ExecuTorch {tag} pte (XnnpackPartitioner)", "pte",
                                    pte.load(Artifact("pte", path), threads=args.threads), path,
                                    path.stat().st_size, baseline="eager fp32"))
        print(f"{name}: timing {len(subjects)} subjects x {args.runs} rounds", flush=True)
        rows = bench(subjects, inputs, reference=eager(inputs), threads=args.threads, runs=args.runs)
        agreement = _agreement(subjects, model, held_out)
    table = markdown(rows)
    lines = ["| artifact | cosine vs eager (worst of 32) | top-1 agreement |", "| --- | ---: | ---: |"]
    lines += [f"| {s.label} | {agreement[s.label]} |" for s in subjects]
    return f"## {name} ({'x'.join(map(str, shape))})\n\n{table}\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--out", type=Path, default=HERE / "PTE.md")
    args = parser.parse_args()
    registry = graphopt.load_plugins()
    sections = [f"# graphopt bench: ExecuTorch .pte beside the other formats\n\n"
                f"`bench/pte.py {' '.join(sys.argv[1:])}` on {platform.machine()}, torch {torch.__version__}, "
                f"{args.threads} thread(s), {time.strftime('%Y-%m-%d')}. Latencies are medians of round-robin "
                f"runs in one process; compare rows as ratios. Speed-ups are over eager fp32.\n"]
    for name in args.models.split(","):
        sections.append(bench_model(name, registry, args))
        print(sections[-1], flush=True)
    args.out.write_text("\n".join(sections))


if __name__ == "__main__":
    main()
