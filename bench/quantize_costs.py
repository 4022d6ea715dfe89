"""Measure the cost table `quantize(prefer=speed)` decides from: per format and per layer class,
how long int8 takes against fp32, on this machine, one thread.

    unshare -n -- .venv/bin/python bench/quantize_costs.py [--formats onnx,ptl,tflite,pte] [--runs 40]
        [--classes dw3x3,conv1x1,...] [--out plugins/quantize/costs.json]

A class is a layer kind, its kernel and a width at the spatial size mobile and server CNNs give that
width (conv1x1 16 channels at 112x112 ... 512 at 7x7; depthwise 3x3, 5x5, 7x7; grouped 3x3 at the
group widths ResNeXt and RegNet use; Linear on one row and on ViT's 197 tokens). Each is measured as a
chain of DEPTH such layers with ReLU between them (the int8 boundary at the chain's ends is shared by
DEPTH layers, as in a network), emitted by graphopt in fp32 (`cleanup,fuse`) and in int8
(`cleanup,fuse,quantize(prefer=size)`) to every format, both timed round-robin in one process. The
figure stored is int8 ms / fp32 ms of the chain. The table is committed, so the default `quantize` decides
the same way on every run and machine (DESIGN rule 9); rerun this on the target device to retune it.
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
import torch.nn as nn

HERE = Path(__file__).resolve().parent

import graphopt  # noqa: E402
from graphopt.cli.bench import Subject, bench  # noqa: E402
from graphopt.emit import captured_output  # noqa: E402

DEPTH = 6
FP32, INT8 = "cleanup,fuse", "cleanup,fuse,quantize(prefer=size)"
FORMATS = ("onnx", "ptl", "tflite", "pte")
# class -> (op, kernel, channels, spatial or tokens, group width)
CLASSES = {
    **{f"conv1x1_c{c}": ("conv", 1, c, hw, 0) for c, hw in ((16, 112), (32, 56), (64, 28), (256, 14), (512, 7))},
    **{f"conv3x3_c{c}": ("conv", 3, c, hw, 0) for c, hw in ((32, 56), (128, 28), (512, 7))},
    **{f"dw3x3_c{c}": ("conv", 3, c, hw, 1) for c, hw in ((16, 112), (96, 56), (240, 28), (960, 7))},
    **{f"dw5x5_c{c}": ("conv", 5, c, hw, 1) for c, hw in ((40, 56), (240, 14))},
    "dw7x7_c96": ("conv", 7, 96, 56, 1),
    "gconv3x3_c128_g4": ("conv", 3, 128, 56, 4),
    **{f"linear_c{c}_t{t}": ("linear", 0, c, t, 0) for c, t in ((1280, 1), (768, 197))},
}


class Chain(nn.Sequential):
    """DEPTH layers of one class, ReLU between them."""

    def __init__(self, op: str, k: int, c: int, group_width: int):
        layers = []
        for _ in range(DEPTH):
            groups = c // group_width if group_width else 1
            layers += [nn.Conv2d(c, c, k, padding=k // 2, groups=groups) if op == "conv" else nn.Linear(c, c),
                       nn.ReLU()]
        super().__init__(*layers)


def _shape(op: str, c: int, size: int) -> tuple[int, ...]:
    return (1, c, size, size) if op == "conv" else (1, size, c) if size > 1 else (1, c)


def _subjects(model, shape, registry, formats, tmp: Path, threads: int) -> dict[str, Subject]:
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(*shape, generator=gen)]
    calibration = [torch.randn(*shape, generator=gen) for _ in range(4)]
    out = {}
    for tag, pipeline in (("fp32", FP32), ("int8", INT8)):
        for fmt in formats:
            line = f"{pipeline},partition(backend=xnnpack)" if fmt == "pte" else pipeline
            with captured_output():
                result = graphopt.optimize(model, inputs, registry, pipeline=line, formats=fmt,
                                           out_dir=tmp / f"{tag}_{fmt}", data={"calibration": calibration})
            if not result.ok:
                raise RuntimeError(f"{tag} {fmt}: {result.report['artifacts']}")
            (emitter, _), check = result.requests[0], result.artifacts[0]
            out[f"{fmt} {tag}"] = Subject(f"{fmt} {tag}", fmt, emitter.load(check.artifact, threads=threads),
                                          check.artifact.path, check.bytes)
    return out


def measure(name: str, registry, formats, runs: int, threads: int) -> dict[str, dict]:
    op, k, c, size, gw = CLASSES[name]
    torch.manual_seed(0)
    model = Chain(op, k, c, gw).eval()
    shape = _shape(op, c, size)
    with tempfile.TemporaryDirectory() as tmp:
        subjects = _subjects(model, shape, registry, formats, Path(tmp), threads)
        x = [torch.randn(*shape, generator=torch.Generator().manual_seed(1))]
        rows = {r.label: r for r in bench(list(subjects.values()), x, reference=None, threads=threads, runs=runs)}
    return {fmt: {"fp32_ms": round(rows[f"{fmt} fp32"].median_ms, 4), "int8_ms": round(rows[f"{fmt} int8"].median_ms, 4),
                  "ratio": round(rows[f"{fmt} int8"].median_ms / rows[f"{fmt} fp32"].median_ms, 3)}
            for fmt in formats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--classes", default=",".join(CLASSES))
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE.parent / "plugins" / "quantize" / "costs.json")
    args = parser.parse_args()
    registry = graphopt.load_plugins()
    formats = args.formats.split(",")
    table = json.loads(args.out.read_text()) if args.out.exists() else {}
    table.update({"command": "bench/quantize_costs.py " + " ".join(sys.argv[1:]), "machine": platform.processor()
                  or platform.machine(), "torch": torch.__version__, "threads": args.threads,
                  "date": time.strftime("%Y-%m-%d"), "depth": DEPTH})
    classes = table.setdefault("classes", {})
    for name in args.classes.split(","):
        start = time.perf_counter()
        op, k, c, size, gw = CLASSES[name]
        entry = {"op": op, "kernel": k, "channels": c, "size": size, "group_width": gw}
        entry |= classes.get(name, {})
        entry |= measure(name, registry, formats, args.runs, args.threads)
        classes[name] = entry
        print(f"{name}: " + ", ".join(f"{f} {entry[f]['ratio']}" for f in formats) +
              f" ({time.perf_counter() - start:.0f} s)", flush=True)
        args.out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
