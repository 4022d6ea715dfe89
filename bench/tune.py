"""`graphopt tune` on the issue's two cases, with the budget it names: half the size of the unpruned int8 file.

    .venv/bin/python bench/tune.py resnet18 [--format onnx] [--trials 16] [--size 112] [--out bench/TUNE_RESNET18.md]
    .venv/bin/python bench/tune.py digits [--format onnx|ptl|tflite|pte|all] [--trials 30] [--timeout 290]
        [--out bench/TUNE_DIGITS.md]

resnet18: tests/zoo's ResNet-18 (seeded random weights, 1x3xSxS), no labels: quality is agreement with the
original model on 64 held-out Gaussian inputs (top-1 and cosine), training inputs 256 Gaussian ones.
digits: the demo's trained CNN, unlabeled training digits (--data) and held-out accuracy (--eval).

First `graphopt run --pipeline cleanup,fuse,quantize(prefer=size)` (every layer int8) gives the unpruned int8
file's size S per format; then
`graphopt tune --budget size=S/2`. The markdown holds, per format: the budget, the time, the front, the chosen
point and its quality against the unoptimized model's.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from graphopt.cli import main  # noqa: E402
from graphopt_plugins.tune.output import markdown  # noqa: E402

CASES = {
    "resnet18": {"model": str(HERE.parent / "tests" / "zoo" / "cnn.py") + ":resnet18", "args": []},
    "digits": {"model": "graphopt.cli.demo_model:load_or_train", "shape": "1x1x8x8",
               "args": ["--data", "graphopt.cli.demo_model:unlabeled_digits",
                        "--eval", "graphopt.cli.demo_model:held_out_accuracy"],
               "choose": ["--max-drop", "0.01"]},   # within one point of the unoptimized file's accuracy
}


def _int8_size(model: str, shape: str, fmt: str, data: list[str], work: Path) -> int:
    """Bytes of the unpruned int8 file: every layer int8, calibrated on tune's own training inputs."""
    out = work / f"int8-{fmt}"
    argv = ["run", model, "--input-shape", shape, "--pipeline", "cleanup,fuse,quantize(prefer=size)", "--emit", fmt,
            "--out", str(out), "--calib", str(data[0]), "--example", str(data[0]), "--quiet", "--json"]
    code = main(argv)
    if code != 0:
        raise SystemExit(f"the int8 run failed ({code})")
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


def _training_inputs(model: str, shape: str, case: dict, work: Path) -> Path:
    """The inputs tune calibrates on (one trial writes them), so the int8 reference is calibrated the same."""
    out = work / "probe"
    main(["tune", model, "--input-shape", shape, "--format", "onnx", "--trials", "1", "--out", str(out),
          "--runs", "3", "--quiet", *case["args"]])
    return out / "train_inputs.npz"


def run(case_name: str, fmt: str, trials: int, timeout: float | None, shape: str, block: list[str]) -> dict:
    case = CASES[case_name]
    model, shape = case["model"], case.get("shape", shape)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = _training_inputs(model, shape, case, work)
        size = _int8_size(model, shape, fmt, [data], work)
        out = work / f"tune-{fmt}"
        argv = ["tune", model, "--input-shape", shape, "--format", fmt, "--trials", str(trials), "--out", str(out),
                "--budget", f"size={size // 2}B", "--quiet", *case["args"], *case.get("choose", [])]
        argv += [arg for name in block for arg in ("-p", f"no:{name}")]
        argv += ["--timeout", str(timeout)] if timeout else []
        start = time.perf_counter()
        code = main(argv)
        seconds = time.perf_counter() - start
        report = json.loads((out / "tune.json").read_text())
        if (out / "front.png").exists():
            tag = "".join(f"_no_{b}" for b in block)
            (HERE / f"tune_{case_name}_{fmt}{tag}.png").write_bytes((out / "front.png").read_bytes())
    return {"format": fmt, "code": code, "seconds": seconds, "int8_bytes": size, "report": report, "block": block}


def section(case_name: str, shape: str, r: dict) -> str:
    report = r["report"]
    done = [t for t in report["trials"] if t["state"] == "complete"]
    front = sorted((t for t in done if t["trial"] in report["front"]), key=lambda t: t["latency_ms"])
    chosen = next((t for t in done if t["trial"] == report["chosen"]), None)
    base = report["baseline"]
    lines = [f"### {case_name} in {r['format']}" + (f" (without {', '.join(r['block'])})" if r["block"] else ""), "",
             f"- budget: size <= {r['int8_bytes'] // 2} B, half the unpruned int8 file ({r['int8_bytes']} B); "
             f"{len(report['trials'])} trials ({len(done)} complete) in {r['seconds']:.0f} s",
             f"- unoptimized {r['format']} file: {base['bytes']} B, quality {base['quality']:.4f}"]
    if chosen:
        lines.append(f"- chosen: trial {chosen['trial']}, `{chosen['pipeline']}`: {chosen['bytes']} B, "
                     f"{chosen['latency_ms']:.3f} ms ({chosen['latency_ratio']:.2f}x the unoptimized file's time), "
                     f"quality {chosen['quality']:.4f} ({(chosen['quality'] - base['quality']) * 100:+.2f} points)")
    else:
        lines.append("- no trial met the budget")
    if front:
        span = max(t["latency_ms"] for t in front) / min(t["latency_ms"] for t in front)
        lines.append(f"- front: {len(front)} points, latency spanning {span:.1f}x")
    tag = "".join(f"_no_{b}" for b in r["block"])
    lines += ["", markdown(front, chosen, base), f"![front](tune_{case_name}_{r['format']}{tag}.png)", ""]
    return "\n".join(lines)


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--format", default="onnx", help="a format, or all")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--timeout", type=float)
    ap.add_argument("--size", type=int, default=112, help="resnet18: input height and width")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--block", action="append", default=[], metavar="PLUGIN",
                    help="leave a plugin out of the search (-p no:PLUGIN), e.g. fp16")
    args = ap.parse_args()
    shape = f"1x3x{args.size}x{args.size}"
    formats = ["onnx", "ptl", "tflite", "pte"] if args.format == "all" else args.format.split(",")
    out = args.out or HERE / f"TUNE_{args.case.upper()}.md"
    parts = [f"# graphopt tune: {args.case}", "", "Made by `.venv/bin/python bench/tune.py "
             f"{' '.join(sys.argv[1:])}` (see its docstring). Latency: 1 thread, median of 30 runs, round-robin "
             "with the unoptimized file. `*`: the chosen point.", ""]
    for fmt in formats:
        r = run(args.case, fmt, args.trials, args.timeout, shape, args.block)
        parts.append(section(args.case, CASES[args.case].get("shape", shape), r))
        out.write_text("\n".join(parts))
        print(f"{args.case} {fmt}: exit {r['code']}, {r['seconds']:.0f} s, chosen {r['report']['chosen']}",
              flush=True)


if __name__ == "__main__":
    cli()
