"""graphopt's int8 against each format's own int8 toolchain, per format, on ResNet-18-, MobileNetV2-,
MobileNetV3- and EfficientNet-B0-style models (1x3x224x224, seeded random weights).

    .venv/bin/python bench/toolchains.py [--models resnet18,mobilenet_v2,mobilenet_v3,efficientnet_b0] [--runs 40]
        [--processes 3] [--threads 1] [--quantize OPTS] [--out bench/TOOLCHAINS.md]

Per model, built in its own process and timed round-robin in fresh ones (bench/timing.py): eager fp32; graphopt
fp32 (`cleanup,fold-bn,fuse`) and int8 (plus `quantize` at its defaults, or `quantize(OPTS)`) as onnx, ptl, tflite
and, after `partition(backend=xnnpack)`, pte, one pipeline run per precision for the four formats (the int8 run timed whole, capture to verification); each
format's own int8: onnxruntime `quantize_static` on graphopt's fp32 .onnx, torch.ao FX (x86), litert-torch PT2E
(`PT2EQuantizer`), ExecuTorch PT2E (`XNNPACKQuantizer`) and, fp32, ExecuTorch's own lowering, all calibrated on the
same 16 seeded inputs (seeds 100-115). Writes --out and a JSON beside it (--models X replaces X's entry there).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import graphopt  # noqa: E402
from graphopt.cli.bench import Subject  # noqa: E402
from graphopt.driver import emit_all, select_emitters  # noqa: E402
from graphopt.emit import Artifact, captured_output  # noqa: E402
from graphopt.errors import first_line  # noqa: E402
from graphopt.passmanager import run_pipeline  # noqa: E402
from pte import _executorch, _seeded  # noqa: E402  (bench/pte.py)
from timing import ratio, time_in_processes  # noqa: E402  (bench/timing.py)
from quantize import _onnxruntime_peer, _torch_ao_peer, _xnnpack  # noqa: E402  (bench/quantize.py)
from zoo import FAMILIES, ZOO  # noqa: E402

MODELS = {**{n: ZOO[n] for n in ("resnet18", "mobilenet_v2", "mobilenet_v3")},
          "efficientnet_b0": FAMILIES["efficientnet_b0"]}
FORMATS = ("onnx", "ptl", "tflite", "pte")
FP32 = "cleanup,fold-bn,fuse"
PARTITION = "partition(backend=xnnpack)"
TOOLCHAINS = {"onnx": "onnxruntime quantize_static", "ptl": "torch.ao FX (x86)", "tflite": "litert-torch PT2E",
              "pte": "ExecuTorch PT2E (XNNPACKQuantizer)"}
ORDER = ["eager", *(f"{k} {f}" for f in FORMATS for k in ("graphopt fp32", "toolchain fp32", "graphopt int8",
                                                          "toolchain int8"))]   # the subjects' rows
META = ("precision", "delegates", "partitions", "xnnpack_ops", "cpu_ops", "op_types")   # kept of artifact meta
PACKAGES = ("torch", "torchao", "onnxruntime", "onnx", "tensorflow", "onnx2tf", "litert-torch", "ai-edge-litert",
            "executorch")


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"[:400]


def _litert(build, inputs, calibration, path: Path) -> Path:
    """litert-torch's own int8: PT2E with its PT2EQuantizer (symmetric, per-channel, static), its converter; the
    file gets the metadata entry graphopt's tflite runner reads (torch layout; int8 I/O with the file's scales)."""
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from graphopt_plugins.tflite.runner import with_metadata

    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    with captured_output():
        prepared = prepare_pt2e(torch.export.export(build().eval(), tuple(inputs)).module(), quantizer)
        for x in calibration:
            prepared(x)
        converted = convert_pt2e(prepared, fold_quantize=False)
        litert_torch.convert(converted, tuple(inputs), quant_config=QuantConfig(pt2e_quantizer=quantizer)
                             ).export(str(path))
    signature = Interpreter(model_path=str(path)).get_signature_runner()

    def spec(name, v, shape: bool):
        scale, zero = v["quantization"]
        return {"name": name, "layout": "torch", **({"quantization": [float(scale), int(zero)]} if scale else {}),
                **({"shape": [int(d) for d in v["shape"]], "dtype": v["dtype"].__name__} if shape else {})}
    info = {"inputs": [spec(k, v, True) for k, v in signature.get_input_details().items()],
            "outputs": [spec(k, v, False) for k, v in signature.get_output_details().items()]}
    path.write_bytes(with_metadata(path.read_bytes(), info))
    return path


def _graphopt(entry: dict, subjects: dict, model, x, data, registry, threads: int, tmp: Path) -> None:
    """graphopt fp32 and int8, each one pipeline run emitting onnx, ptl and tflite, continued by the partition pass
    for pte: their subjects, wall times (capture to verification), quantize's stats and the int8 verification."""
    for tag, pipeline in (("fp32", FP32), ("int8", entry["pipeline_int8"])):
        print(f"graphopt {tag} ({pipeline})", flush=True)
        start = time.perf_counter()
        try:
            result = graphopt.optimize(model, (x,), registry, pipeline=pipeline, out_dir=tmp / tag,
                                       formats="onnx,ptl,tflite", data=data)
        except Exception as exc:
            entry[f"{tag}_error"] = _error(exc)
            continue
        checks = {c.artifact.format: c for c in result.artifacts}
        try:
            partitioned = run_pipeline(result.graph, PARTITION, registry, data=data).graph
            (checks["pte"],) = emit_all(partitioned, select_emitters(registry, "pte"), tmp / f"{tag}_pte",
                                        result.pipeline.references, registry)
        except Exception as exc:   # the other formats stand
            checks["pte"] = _error(exc)
        entry[f"{tag}_seconds"] = round(time.perf_counter() - start, 1)
        if stats := next((r.stats for r in result.pipeline.records if r.name.split("(")[0] == "quantize"), None):
            entry["quantize"] = {k: stats[k] for k in ("int8_layers", "int8_macs_share", "cosine_calibration")} | \
                                {"fp32_layers": len(stats["fp32_layers"])}
        for fmt, check in checks.items():
            key = f"graphopt {tag} {fmt}"
            if tag == "int8" and not isinstance(check, str):   # the driver's figures vs the fake-quant graph
                entry["verification"][fmt] = {"verified": check.verified, "inputs": check.inputs, "vs_graph":
                                              check.vs_graph.as_dict(), "vs_model": check.vs_reference.as_dict(),
                                              "meta": {k: v for k, v in check.artifact.meta.items() if k in META}}
            if isinstance(check, str) or not check.installed:
                why = check if isinstance(check, str) else "; ".join(check.problems) or "another format failed"
                entry["subjects"][key] = {"label": key, "format": fmt, "error": why}
                continue
            subjects[key] = Subject(key, fmt, registry.emitters[fmt].load(check.artifact, threads=threads),
                                    check.artifact.path, check.bytes)


def bench_model(name: str, args) -> dict:
    """One model's subjects, timed round-robin: its JSON entry."""
    build, shape = MODELS[name]
    registry, x, calibration = graphopt.load_plugins(), _seeded(shape, [0]), _seeded(shape, range(100, 116))
    model, int8 = build().eval(), f"{FP32},quantize" + (f"({args.quantize})" if args.quantize else "")
    entry = {"shape": list(shape), "pipeline_int8": int8, "runs": args.runs, "processes": args.processes,
             "threads": args.threads,
             "date": time.strftime("%Y-%m-%d %H:%M"), "subjects": {}, "verification": {}}

    def eager(xs):
        with torch.no_grad():
            return [model(*xs)]

    def load(fmt: str, path: Path):
        return path, registry.emitters[fmt].load(Artifact(fmt, path), threads=args.threads)

    subjects = {"eager": Subject("eager fp32", "torch", eager)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _graphopt(entry, subjects, model, x[0], {"calibration": calibration}, registry, args.threads, tmp)
        toolchains = {  # key: (label, format, make() -> (path, runner))
            "toolchain int8 onnx": (TOOLCHAINS["onnx"], "onnx", lambda: _onnxruntime_peer(
                Artifact("onnx", subjects["graphopt fp32 onnx"].path), calibration, registry)(tmp, args.threads)),
            "toolchain int8 ptl": (TOOLCHAINS["ptl"], "ptl",
                                   lambda: _torch_ao_peer(build, x, calibration, registry)(tmp, args.threads)),
            "toolchain int8 tflite": (TOOLCHAINS["tflite"], "tflite", lambda: load("tflite", _litert(
                build, x, calibration, tmp / "litert_torch_int8.tflite"))),
            **{f"toolchain {tag} pte": (label, "pte", lambda tag=tag: load("pte", _executorch(
                build().eval(), x, calibration, tmp / f"executorch_{tag}.pte", tag == "int8")))
               for tag, label in (("int8", TOOLCHAINS["pte"]), ("fp32", "ExecuTorch fp32 (XnnpackPartitioner)"))}}
        for key, (label, fmt, make) in toolchains.items():
            print(label, flush=True)
            start = time.perf_counter()
            try:
                path, runner = make()
                subjects[key] = Subject(label, fmt, runner, path, path.stat().st_size)
                entry["subjects"][key] = {"seconds": round(time.perf_counter() - start, 1)}
            except Exception as exc:   # a toolchain that fails is a result, not the end of the run
                entry["subjects"][key] = {"label": label, "format": fmt, "error": _error(exc)}
        entry["xnnpack_left_out"] = {k: dict(zip(("partitions", "ops"), _xnnpack(s.path)))   # ops: a Counter
                                     for k, s in subjects.items() if s.format == "tflite"}
        print(f"{name}: timing {len(subjects)} subjects x {args.runs} rounds in {args.processes} processes", flush=True)
        rows = time_in_processes(name, subjects, x, runs=args.runs, threads=args.threads, processes=args.processes,
                                 folder=tmp, engines={"toolchain int8 ptl": "x86"})
    for key, r in rows.items():
        entry["subjects"][key] = {**entry["subjects"].get(key, {}), **r, "path": None}   # errors: vs eager
    entry["subjects"] = {k: entry["subjects"][k] for k in ORDER if k in entry["subjects"]}
    return entry


def _ratio(entry: dict, slow: str, fast: str, what: str = "median_ms") -> float | None:
    """``what`` of ``slow`` / of ``fast`` (speed: >1, ``fast`` is faster), None if either failed."""
    a, b = entry.get("subjects", {}).get(slow, {}), entry.get("subjects", {}).get(fast, {})
    if what == "median_ms" and a.get(what) and b.get(what):
        return ratio(a, b)   # per timing process, then the median
    return a[what] / b[what] if a.get(what) and b.get(what) else None


def _x(r: float | None, digits: int = 2) -> str:
    return "-" if r is None else f"{r:.{digits}f}x"


def _check(v: dict | None) -> str:
    if v is None:
        return "no verification figures"
    g, sqnr = v["vs_graph"], v["vs_graph"]["sqnr_db"]
    return (f"{'' if v.get('verified', True) else 'NOT verified: '}cosine {g['cosine']:.6f} vs the fake-quant graph "
            f"(SQNR {'inf' if sqnr is None else f'{sqnr:.1f}'} dB, max abs {g['max_abs']:.3g}, worst of {v['inputs']} "
            f"inputs; {v['vs_model']['cosine']:.5f} vs fp32 model)")


def _section(name: str, e: dict) -> str:
    if "error" in e:
        return f"## {name}\n\nfailed: {e['error']}\n"
    q, ours = e.get("quantize", {}), lambda fmt: f"graphopt int8 {fmt}"
    lines = [f"## {name} ({'x'.join(map(str, e['shape']))})", "",
             f"Measured {e['date']}, {e['runs']} rounds x {e.get('processes', 1)} process(es), {e['threads']} thread(s). graphopt's int8 run (`"
             f"{e['pipeline_int8']}`, `{PARTITION}` on top for pte; capture, calibration, passes, emission and "
             f"verification of the four files): **{e.get('int8_seconds', '-')} s** (fp32: {e.get('fp32_seconds', '-')}"
             f" s). quantize: {q.get('int8_layers', '-')} int8 layers, {q.get('fp32_layers', '-')} kept fp32, "
             f"{q.get('int8_macs_share', 0):.1%} of MACs int8, calibration cosine {q.get('cosine_calibration')}.",
             *(f"graphopt {t} failed: {e[f'{t}_error']}" for t in ("fp32", "int8") if f"{t}_error" in e), "",
             "| subject | format | size MiB | p50 ms | p10-p90 ms | x eager | cosine vs eager (seed 0) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for key, s in e["subjects"].items():
        size = f"{s['bytes'] / 2**20:.2f}" if s.get("bytes") else "-"
        lines.append(f"| {s['label']} | {s['format']} | failed: {s['error']} | | | | |" if "error" in s else
                     f"| {s['label']} | {s['format']} | {size} | {s['median_ms']:.2f} | {s['p10_ms']:.2f}-"
                     f"{s['p90_ms']:.2f} | {_x(_ratio(e, 'eager', key))} | {s['cosine']:.5f} |")
    lines += ["", "Per format, graphopt int8 against (speed: the other's ms / graphopt int8's ms, >1: graphopt "
              "faster; size: graphopt int8 / graphopt fp32), and its verification:", ""]
    for fmt in FORMATS:
        delegates = e["verification"].get(fmt, {}).get("meta", {}).get("delegates")
        pte = (f"; graphopt fp32 vs ExecuTorch's own fp32 {_x(_ratio(e, 'toolchain fp32 pte', 'graphopt fp32 pte'))}"
               f", graphopt int8 vs ExecuTorch's own int8 {_x(_ratio(e, 'toolchain int8 pte', ours(fmt)))}; "
               f"{delegates} XNNPACK delegate(s)" if fmt == "pte" else "")
        lines.append(f"- {fmt}: {TOOLCHAINS[fmt]} {_x(_ratio(e, f'toolchain int8 {fmt}', ours(fmt)))}; graphopt fp32 "
                     f"{_x(_ratio(e, f'graphopt fp32 {fmt}', ours(fmt)))}; size "
                     f"{_x(_ratio(e, ours(fmt), f'graphopt fp32 {fmt}', 'bytes'), 3)}; "
                     f"{_check(e['verification'].get(fmt))}{pte}")
    lines += ["", "LiteRT's XNNPACK delegate per .tflite: its partitions, the ops it leaves to LiteRT's kernels:", "",
              *(f"- {e['subjects'][k]['label']}: {v['partitions']} partition(s), "
                f"{', '.join(f'{op} x{n}' for op, n in v['ops'].items()) or 'none'}"
                for k, v in e.get("xnnpack_left_out", {}).items())]
    return "\n".join(lines) + "\n"


def _summary(results: dict) -> str:
    names = list(results)
    lines = ["## Summary", "", "graphopt int8's speed over each format's own int8 toolchain (toolchain ms / graphopt "
             "ms, >1: graphopt faster):", "", f"| format | {' | '.join(names)} | geometric mean | min |",
             f"| --- |{' ---: |' * (len(names) + 2)}"]
    for fmt in FORMATS:
        ratios = [_ratio(results[n], f"toolchain int8 {fmt}", f"graphopt int8 {fmt}") for n in names]
        known = [r for r in ratios if r is not None]
        lines.append(f"| {fmt} ({TOOLCHAINS[fmt]}) | {' | '.join(map(_x, ratios))} | "
                     f"{_x(statistics.geometric_mean(known) if known else None)} | {_x(min(known, default=None))} |")
    lines += ["", "graphopt int8 over graphopt fp32 (fp32 ms / int8 ms), and graphopt's int8 run (wall seconds):", "",
              f"| model | {' | '.join(FORMATS)} | int8 run |", f"| --- |{' ---: |' * (len(FORMATS) + 1)}",
              *(f"| {n} | {' | '.join(_x(_ratio(e, f'graphopt fp32 {f}', f'graphopt int8 {f}')) for f in FORMATS)} | "
                f"{e.get('int8_seconds', '-')} s |" for n, e in results.items())]
    return "\n".join(lines) + "\n"


def _header(args) -> str:
    dev = Path("/proc/net/dev")      # this process's network namespace: only "lo" when cut
    cut = dev.is_file() and {line.split(":")[0].strip() for line in dev.read_text().splitlines()[2:]} <= {"lo"}
    command = f"{'unshare -n -- ' if cut else ''}.venv/bin/python bench/toolchains.py {' '.join(sys.argv[1:])}"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"# graphopt int8 vs each format's own int8 toolchain\n\n`{command.rstrip()}`\n\n"
            f"Machine: {cpu} ({platform.machine()}, {os.cpu_count()} logical CPUs, shared); "
            f"{', '.join(f'{p} {md.version(p)}' for p in PACKAGES)}; {time.strftime('%Y-%m-%d')}; {args.threads} "
            f"thread(s); {args.runs} round-robin rounds (subjects in a seeded shuffled order each round) after 5 "
            f"warm-up calls, in each of {args.processes} fresh processes (bench/timing.py): a time is the median over "
            f"the processes, a ratio the median of the per-process ratios; compare ratios within a model. Calibration: 16 seeded N(0,1) inputs (seeds 100-115) for "
            f"every toolchain; timing and cosine-vs-eager input: seed 0.\n")


def _store(path: Path, name: str | None = None, entry: dict | None = None) -> dict:
    """The JSON's entries, ``name``'s replaced by ``entry`` (dropped when None) if ``name`` is given."""
    results = json.loads(path.read_text()) if path.exists() else {}
    if name is not None:
        results = {k: v for k, v in results.items() if k != name} | ({name: entry} if entry else {})
        path.write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--runs", type=int, default=40, help="round-robin rounds in each timing process")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes the rounds are repeated in")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quantize", default="", help='quantize options, e.g. "prefer=size" (default: its defaults)')
    parser.add_argument("--out", type=Path, default=HERE / "TOOLCHAINS.md")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)   # a model's own process
    args = parser.parse_args()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := [m for m in names if m not in MODELS]:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    path = args.out.with_suffix(".json")
    if args.one:
        _store(path, names[0], bench_model(names[0], args))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:   # each in its own process (the last --models wins), which writes its entry into the JSON
        _store(path, name, None)
        code = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", "--models", name]).returncode
        if name not in _store(path):   # it died before writing its entry
            _store(path, name, {"error": f"its process exited with {code}" + " (out of memory?)" * (code == -9)})
    results = dict(sorted(_store(path).items(), key=lambda kv: list(MODELS).index(kv[0])))
    text = _header(args) + "\n" + "\n".join(_section(n, e) for n, e in results.items()) + "\n" + _summary(results)
    args.out.write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
