"""int8 TorchScript-Lite (graphopt's ``quantize`` lowered to quantized kernels) vs fp32 .ptl and
vs torch.ao FX quantization (prepare_fx/convert_fx, x86 qconfig, same calibration data), on the
ResNet-18- and MobileNetV2-style test models (1x3x224x224), in the lite interpreter, one thread,
timed round-robin in one process:

    .venv/bin/python bench/ptl_int8.py [--models resnet18,mobilenet_v2] [--runs 30] [--calibration 16]

Accuracy is on held-out random inputs: cosine and top-1 agreement against the fp32 graph, and
for graphopt's files cosine against the fx fake-quant graph they were made from.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import graphopt  # noqa: E402
from graphopt.cli.bench import Subject, bench  # noqa: E402
from graphopt.metrics import compare  # noqa: E402
import graphopt_plugins.ptl as ptl_emitter
import graphopt_plugins.ptl.int8 as ptl_int8
from zoo.cnn import mobilenet_v2, resnet18  # noqa: E402

MODELS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}
SHAPE = (1, 3, 224, 224)


def _inputs(n: int, seed: int) -> list[torch.Tensor]:
    return [torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


def _torch_ao(model, calibration, backend: str, out: Path) -> tuple[graphopt.Artifact, int]:
    """torch.ao's own post-training static quantization of the eager model, traced, frozen and
    saved for the lite interpreter as torch does it; and its size with each storage written once."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    path = out / f"torch_ao_{backend}.ptl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with ptl_int8.quantized_engine(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(backend), (calibration[0],))
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        module = torch.jit.freeze(torch.jit.trace(convert_fx(prepared), (calibration[0],)).eval())
        module._save_for_lite_interpreter(str(path))
        once = len(ptl_emitter._serialize(module, {}))
    return graphopt.Artifact("ptl", path, {}), once


def _runner(artifact, engine: str | None):
    """The ptl runner, one thread; a file that records no engine (torch.ao's) is loaded, which
    packs its weights, and run under ``engine``."""
    if engine is None or "engine" in artifact.meta:
        return ptl_emitter.load(artifact, threads=1)
    with ptl_int8.quantized_engine(engine):
        run = ptl_emitter.load(artifact, threads=1)

    def on_engine(inputs):
        with ptl_int8.quantized_engine(engine):
            return run(inputs)
    return on_engine


def measure(name: str, args, registry, out: Path) -> str:
    model = MODELS[name]()
    calibration, held_out = _inputs(args.calibration, 100), _inputs(8, 1000)
    start = time.perf_counter()
    fp32 = graphopt.run_pipeline(graphopt.capture(model, calibration[:1], name=name), "cleanup,fold-bn,fuse",
                                 registry).graph
    int8 = graphopt.run_pipeline(fp32, "quantize(prefer=size)", registry,
                                 data={"calibration": [(x,) for x in calibration]}).graph
    print(f"{name}: pipelines {time.perf_counter() - start:.0f} s", file=sys.stderr)
    rows = [("fp32 .ptl (cleanup,fold-bn,fuse)", ptl_emitter.emit(fp32, {}, out / "fp32"), None, False)]
    for engine in args.engines.split(","):
        rows.append((f"graphopt int8 .ptl, engine {engine}", ptl_emitter.emit(int8, {"engine": engine},
                                                                              out / engine), engine, True))
    notes = []
    for backend in args.peer.split(","):
        artifact, once = _torch_ao(model, calibration, backend, out)
        rows.append((f"torch.ao FX int8 .ptl, {backend} qconfig and engine", artifact, backend, False))
        notes.append(f"torch.ao {backend} file with each storage written once (as graphopt writes): "
                     f"{once / 2**20:.2f} MiB")
    subjects = [Subject(label, "ptl", _runner(a, engine), a.path, a.bytes) for label, a, engine, _ in rows]
    timed = {r.label: r for r in bench(subjects, calibration[:1], reference=fp32.run(), threads=1, runs=args.runs)}
    reference = [fp32.run([x])[0] for x in held_out]
    fake_quant = [int8.run([x])[0] for x in held_out]
    lines = [f"### {name}\n",
             "| artifact | size | vs fp32 size | median ms (p10-p90) | vs fp32 speed | cosine vs fp32 | "
             "top-1 vs fp32 | cosine vs fx int8 graph |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = timed[rows[0][0]]
    for (label, artifact, _, ours), subject in zip(rows, subjects):
        outputs = [subject.runner([x])[0] for x in held_out]
        m, row = compare(reference, outputs), timed[label]
        top1 = sum(int(r.argmax() == o.argmax()) for r, o in zip(reference, outputs)) / len(outputs)
        vs_fx = f"{compare(fake_quant, outputs).cosine:.5f}" if ours else "-"
        lines.append(f"| {label} | {artifact.bytes / 2**20:.2f} MiB | {artifact.bytes / base.bytes:.2f}x | "
                     f"{row.median_ms:.2f} ({row.p10_ms:.2f}-{row.p90_ms:.2f}) | "
                     f"{base.median_ms / row.median_ms:.2f}x | {m.cosine:.5f} | {top1:.0%} | {vs_fx} |")
    lines.append(f"\nfx int8 graph (fake-quant) vs fp32: cosine {compare(reference, fake_quant).cosine:.5f}; "
                 + "; ".join(notes) + "\n")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--calibration", type=int, default=16)
    parser.add_argument("--engines", default=",".join(ptl_int8.ENGINES))
    parser.add_argument("--peer", default="x86,qnnpack", help="torch.ao backends to compare with")
    args = parser.parse_args()
    registry = graphopt.load_plugins()
    print(f"`bench/ptl_int8.py {' '.join(sys.argv[1:])}`, torch {torch.__version__}, one thread, "
          f"{args.runs} round-robin runs, {time.strftime('%Y-%m-%d')}\n", flush=True)
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            print(measure(name, args, registry, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
