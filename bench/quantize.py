"""Compare graphopt's int8 `quantize` with each runtime's own post-training quantization on the
test ResNet-18-, MobileNetV2- and MobileNetV3-style models (1x3x224x224): per model, every
artifact of every format timed round-robin beside its fp32 artifact in one run.

    .venv/bin/python bench/quantize.py [--models resnet18,mobilenet_v2,mobilenet_v3] [--runs 50]
        [--threads 1] [--out bench/QUANTIZE.md]

Per format: graphopt's fp32 artifact (`cleanup,fold-bn,fuse`), its int8 artifacts
(`cleanup,fold-bn,fuse,quantize(prefer=speed|size)`), and that format's own pipeline:
- onnx: onnxruntime's `quantize_static` on graphopt's fp32 .onnx (QDQ, per-channel, activations
  QUInt8, weights QInt8, MinMax calibration);
- ptl: torch.ao FX quantization of the eager model (`prepare_fx`/`convert_fx`,
  `get_default_qconfig_mapping("x86")`), traced, frozen, saved for the lite interpreter and run
  with torch.backends.quantized.engine="x86";
- tflite: TF's converter integer quantization as onnx2tf does it (its `integer_quant`: the Keras
  model onnx2tf builds for graphopt's fp32 .tflite, `optimizations=[DEFAULT]`,
  `TFLITE_BUILTINS_INT8` + `SELECT_TF_OPS`, a representative dataset, float I/O).
Every variant calibrates on the same 16 seeded random inputs; cosine and top-1 agreement are
against the eager fp32 model on 32 other seeded random inputs. A peer that fails is recorded in
the table. Per model the report also lists what each artifact holds (constants by dtype, its
quantize/dequantize ops, the ops LiteRT's XNNPACK delegate leaves out), the quantize pass's
prefer=speed verdicts, and onnxruntime's per-op-type time of the ONNX files (its profiler).
Also writes quantize.png beside the report (latency vs size, one panel per model).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import graphopt  # noqa: E402
from graphopt.cli.bench import BenchRow, Subject, bench  # noqa: E402
from graphopt.driver import RunResult, optimize  # noqa: E402
from graphopt.emit import Artifact, captured_output  # noqa: E402
from graphopt.graph import flatten_outputs  # noqa: E402
from graphopt.metrics import Metrics, compare  # noqa: E402
from graphopt.cli.modelspec import example_inputs  # noqa: E402
from graphopt.passmanager import run_pipeline  # noqa: E402
from zoo.cnn import mobilenet_v2, mobilenet_v3, resnet18  # noqa: E402

MODELS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2, "mobilenet_v3": mobilenet_v3}
FORMATS = ("onnx", "ptl", "tflite")
FP32 = "cleanup,fold-bn,fuse"
SHAPE = (1, 3, 224, 224)
CALIBRATION, HELD_OUT = 16, 32          # seeded random inputs: seed 1 calibrates, seed 2 judges
SPEED, SIZE, PEER = "graphopt int8 (prefer=speed)", "graphopt int8 (prefer=size)", "peer"
PEERS = {"onnx": "onnxruntime quantize_static", "ptl": "torch.ao FX (x86)",
         "tflite": "TF converter int8 (onnx2tf's integer_quant)"}
TOTAL = "all kernels"
TARGET_SIZE = 0.27                      # int8 (prefer=speed) size vs fp32 the check asks for


@dataclass
class Variant:
    """One artifact of one model: what made it, its runner (None when making it failed)."""

    model: str
    format: str
    variant: str                        # "fp32", SPEED, SIZE or the peer's name
    subject: Subject | None = None
    error: str | None = None
    accuracy: Metrics | None = None     # vs the eager fp32 model on the held-out inputs
    row: BenchRow | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.format} {self.variant}"


def _optimize(model, inputs, registry, pipeline: str, out: Path, name: str, calibration) -> RunResult:
    result = optimize(model, inputs, registry, pipeline=pipeline, formats=",".join(FORMATS), out_dir=out,
                      model_spec=f"tests/zoo/cnn.py:{name}", name=name, data={"calibration": calibration})
    if not result.ok:
        raise SystemExit(f"{name} ({pipeline}): artifacts did not verify: {result.report['artifacts']}")
    return result


def _graphopt(result: RunResult, name: str, variant: str, threads: int) -> list[Variant]:
    out = []
    for (emitter, _), check in zip(result.requests, result.artifacts):
        v = Variant(name, emitter.format, variant)
        v.subject = Subject(v.label, emitter.format, emitter.load(check.artifact, threads=threads),
                            check.artifact.path, check.bytes, baseline=None if variant == "fp32" else
                            f"{emitter.format} fp32")
        out.append(v)
    return out


def _facts(fmt: str, path: Path) -> str:
    """Where an artifact's bytes go (constants by dtype) and its quantize/dequantize boundaries."""
    if fmt == "onnx":
        return _onnx_facts(path)
    if fmt == "tflite":
        return _tflite_facts(path)
    from torch.jit.mobile import _export_operator_list, _load_for_lite_interpreter

    from graphopt_plugins.ptl import _recorded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ops = _export_operator_list(_load_for_lite_interpreter(str(path)))
    int8 = any(op.startswith("quantized::") for op in ops)
    engine = _recorded(path).get("engine", "x86 (set by this bench)") if int8 else None
    return (f"quantized engine {engine}; " if engine else "") + "ops: " + ", ".join(sorted(ops))


def _by_dtype(sizes: dict[str, int], total: int) -> str:
    parts = [f"{dtype} {n / 2**20:.2f} MiB" for dtype, n in sorted(sizes.items(), key=lambda kv: -kv[1]) if n]
    return f"constants: {', '.join(parts)}; the rest {(total - sum(sizes.values())) / 2**20:.2f} MiB"


def _onnx_facts(path: Path) -> str:
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(path))
    sizes: dict[str, int] = defaultdict(int)
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        sizes[array.dtype.name] += array.nbytes
    ops = [n.op_type for n in model.graph.node]
    return (f"{_by_dtype(sizes, path.stat().st_size)}; {ops.count('QuantizeLinear')} QuantizeLinear / "
            f"{ops.count('DequantizeLinear')} DequantizeLinear nodes")


def _tflite_facts(path: Path) -> str:
    from ai_edge_litert import schema_py_generated as schema

    from graphopt_plugins.tflite import operators
    data = path.read_bytes()
    model = schema.Model.GetRootAs(data, 0)
    names = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    sizes: dict[str, int] = defaultdict(int)
    graph = model.Subgraphs(0)
    for i in range(graph.TensorsLength()):
        tensor = graph.Tensors(i)
        sizes[names[tensor.Type()]] += model.Buffers(tensor.Buffer()).DataLength()
    ops, _ = operators(data)
    partitions, left = _xnnpack(path)
    rest = ", ".join(f"{op} x{n}" for op, n in left.most_common()) or "none"
    return (f"{_by_dtype(sizes, len(data))}; {ops.get('QUANTIZE', 0)} QUANTIZE / {ops.get('DEQUANTIZE', 0)} "
            f"DEQUANTIZE ops; XNNPACK runs it in {partitions} partition(s), leaving to LiteRT's own kernels: {rest}")


def _xnnpack(path: Path) -> tuple[int, Counter]:
    """How LiteRT's default XNNPACK delegate splits a .tflite: its partitions, and the ops it
    leaves to the builtin kernels."""
    from graphopt_plugins.tflite.islands import xnnpack_split

    partitions, left = xnnpack_split(path.read_bytes())
    return partitions, Counter(left.values())


def _peer(name: str, fmt: str, make, threads: int, stage: Path) -> Variant:
    """The format's own int8 pipeline, or the error it stopped with."""
    v = Variant(name, fmt, PEERS[fmt])
    stage.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        path, runner = make(stage, threads)
    except Exception as exc:   # a peer that fails is a result, not the end of the run
        v.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:600]}"
        print(f"{v.label} failed: {v.error}", flush=True)
        return v
    v.subject = Subject(v.label, fmt, runner, path, path.stat().st_size, baseline=f"{fmt} fp32")
    v.notes = [f"made in {time.perf_counter() - start:.0f} s"]
    return v


def _onnxruntime_peer(fp32: Artifact, calibration, registry):
    """onnxruntime.quantization.quantize_static on graphopt's fp32 .onnx."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    name = onnx.load(str(fp32.path), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: x.numpy()} for x in calibration])

        def get_next(self):
            return next(self.batches, None)

    def make(stage: Path, threads: int):
        path = stage / f"{fp32.path.stem}_ort_int8.onnx"
        with captured_output():
            quantize_static(str(fp32.path), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return path, registry.emitters["onnx"].load(Artifact("onnx", path), threads=threads)
    return make


def _torch_ao_peer(build, inputs, calibration, registry):
    """torch.ao FX post-training static quantization of the eager model, for the lite interpreter."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from graphopt_plugins.ptl.int8 import quantized_engine

    def make(stage: Path, threads: int):
        path = stage / "torch_ao_int8.ptl"
        with quantized_engine("x86"), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")     # torch.ao and the lite interpreter are deprecated
            prepared = prepare_fx(build().eval(), get_default_qconfig_mapping("x86"), tuple(inputs))
            for x in calibration:
                prepared(x)
            traced = torch.jit.trace(convert_fx(prepared), tuple(inputs))
            torch.jit.freeze(traced.eval())._save_for_lite_interpreter(str(path))
            lite = registry.emitters["ptl"].load(Artifact("ptl", path), threads=threads)

        def run(xs):
            with quantized_engine("x86"):
                return lite(xs)
        return path, run
    return make


def _tf_converter_peer(fp32: RunResult, calibration, registry):
    """TF's converter with integer quantization, as onnx2tf's ``integer_quant`` output, on the
    Keras model onnx2tf builds in graphopt's tflite emitter (same prepare pipeline, same ONNX).
    The Keras model is handed over as a concrete function plus its weights, as the emitter does
    (a SavedModel of the Keras model takes minutes); the converter settings are onnx2tf's."""
    import graphopt_plugins.tflite as te

    def make(stage: Path, threads: int):
        import tensorflow as tf

        emitter = registry.emitters["tflite"]
        graph = run_pipeline(fp32.graph, emitter.prepare, registry).graph if emitter.prepare else fp32.graph
        work = Path(tempfile.mkdtemp(prefix="bench-tflite-"))
        try:
            onnx_artifact = te._onnx_emitter().emit(graph, {"simplify": False}, work)
            model = te._to_keras(onnx_artifact.path, graph, [], work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        output_names = [v["name"] for v in onnx_artifact.meta["outputs"]]

        converter = te.converter_for(model, output_names)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.SELECT_TF_OPS]
        converter.representative_dataset = lambda: ([x.permute(0, 2, 3, 1).numpy()] for x in calibration)
        converter.inference_input_type = converter.inference_output_type = tf.float32
        with captured_output():
            data = converter.convert()
        ops, custom = te.operators(data)
        if custom:
            raise RuntimeError(f"uses Flex/custom ops {', '.join(custom)}, which LiteRT's interpreter cannot run")
        path = stage / f"{graph.name}_tf_int8.tflite"
        path.write_bytes(data)
        try:   # when LiteRT refuses the file, say which scales the converter gave
            specs_in, specs_out = te._specs(data, onnx_artifact.meta, graph, False)
            path.write_bytes(te.with_metadata(data, {"graphopt": "bench peer", "pipeline": "TF converter int8",
                                                      "inputs": specs_in, "outputs": specs_out}))
            return path, registry.emitters["tflite"].load(Artifact("tflite", path), threads=threads)
        except Exception as exc:
            text = " ".join(str(exc).split()).replace(str(path), path.name)
            raise RuntimeError(f"{text}{_absurd_scales(path)}") from exc
    return make


def _absurd_scales(path: Path) -> str:
    """Why LiteRT may refuse a calibrated .tflite: int8 scales no real activation range gives."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    bad = {t["index"]: t["quantization"][0] for t in it.get_tensor_details() if t["quantization"][0] > 1e6}
    if not bad:
        return ""
    ops = [o["op_name"] for o in it._get_ops_details() if set(o["outputs"]) & set(bad)]
    why = (" (onnx2tf pads MaxPool with a -3.4e38 PADV2 fill, which the converter's calibration takes into "
           "the range)") if "PADV2" in ops else ""
    return (f"; the converter calibrated {len(bad)} tensors to an int8 scale up to {max(bad.values()):.2g}, "
            f"outputs of {', '.join(ops)}{why}")


def _judge(variants: list[Variant], held_out, expected: torch.Tensor) -> None:
    """Cosine and top-1 agreement of every runner against the eager fp32 model."""
    for v in variants:
        if v.subject is not None:
            got = torch.cat([v.subject.runner([x])[0] for x in held_out])
            v.accuracy = compare([expected], [got])


def _profile(variants: list[Variant], inputs, threads: int, runs: int = 20, warmup: int = 5) -> str:
    """onnxruntime's profiler on the ONNX variants, run round-robin: per op type, the median over
    runs of its kernels' time in one inference (ms)."""
    import onnxruntime as ort

    onnx = [v for v in variants if v.format == "onnx" and v.subject is not None]
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, v in enumerate(onnx):
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.intra_op_num_threads, so.log_severity_level = threads, 3
            so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / f"profile{i}")
            sessions[v.variant] = ort.InferenceSession(str(v.subject.path), so, providers=["CPUExecutionProvider"])
        feed = {next(iter(sessions.values())).get_inputs()[0].name: inputs[0].numpy()}
        for _ in range(warmup + runs):
            for session in sessions.values():
                session.run(None, feed)
        totals: dict[str, dict[str, float]] = {}
        for variant, session in sessions.items():
            events = json.loads(Path(session.end_profiling()).read_text())
            calls = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[warmup:]
            per_run: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(calls))
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    k = next((k for k, (a, b) in enumerate(calls) if a <= e["ts"] <= b), None)
                    if k is not None:
                        per_run[e["args"]["op_name"]][k] += e["dur"] / 1e3
            totals[variant] = {op: statistics.median(ts) for op, ts in per_run.items()}
            totals[variant][TOTAL] = statistics.median(sum(ts[k] for ts in per_run.values()) for k in range(len(calls)))
    names = list(totals)
    ops = sorted({op for t in totals.values() for op in t} - {TOTAL},
                 key=lambda op: -max(t.get(op, 0) for t in totals.values()))
    lines = [f"| op type | {' | '.join(names)} |", f"| --- |{' ---: |' * len(names)}"]
    for op in [*ops, TOTAL]:
        bold = "**" if op == TOTAL else ""
        lines.append(f"| {bold}{op}{bold} | " + " | ".join(f"{bold}{totals[n][op]:.2f}{bold}" if op in totals[n]
                                                          else "-" for n in names) + " |")
    return "\n".join(lines) + "\n"


def _table(variants: list[Variant]) -> str:
    lines = ["| model | format | variant | size (MiB) | size vs fp32 | p50 ms | p10-p90 ms | speed vs fp32 "
             "| cosine vs fp32 | top-1 agreement |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    fp32 = {v.format: v for v in variants if v.variant == "fp32"}
    for v in variants:
        if v.error:
            lines.append(f"| {v.model} | {v.format} | {v.variant} | failed: {v.error} |||||||")
            continue
        r, base = v.row, fp32[v.format].row
        size = f"{r.bytes / base.bytes:.3f}x" if v.variant != "fp32" else "-"
        speed = f"{r.speedup:.2f}x" if r.speedup else "-"
        lines.append(f"| {v.model} | {v.format} | {v.variant} | {r.bytes / 2**20:.2f} | {size} | {r.median_ms:.2f} "
                     f"| {r.p10_ms:.2f}-{r.p90_ms:.2f} | {speed} | {v.accuracy.cosine:.6f} "
                     f"| {v.accuracy.top1:.0%} |")
    return "\n".join(lines) + "\n"


def _verdicts(variants: list[Variant]) -> str:
    """Per format: does graphopt's prefer=speed artifact reach <= TARGET_SIZE x fp32 size, beat
    fp32, and match the peer?"""
    by = {(v.format, v.variant): v for v in variants}
    lines = []
    for fmt in FORMATS:
        ours, fp32, peer = by[(fmt, SPEED)].row, by[(fmt, "fp32")].row, by[(fmt, PEERS[fmt])]
        size = ours.bytes / fp32.bytes
        parts = [f"size {size:.3f}x fp32 ({'meets' if size <= TARGET_SIZE else 'misses'} <= {TARGET_SIZE}x)",
                 f"{ours.speedup:.2f}x the speed of fp32 ({'faster' if ours.speedup > 1 else 'NOT faster'})"]
        if peer.row is not None:
            ratio = peer.row.median_ms / ours.median_ms
            verdict = "at least as fast" if ratio >= 1 else f"slower by {ours.median_ms / peer.row.median_ms - 1:.0%}"
            parts.append(f"{ratio:.2f}x the speed of the peer ({verdict}; peer {peer.row.median_ms:.2f} ms, "
                         f"size {peer.row.bytes / fp32.bytes:.3f}x)")
        else:
            parts.append("peer failed")
        lines.append(f"- {fmt}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def _speed_explanations(result: RunResult, worst: int = 6) -> str:
    """The quantize pass's prefer=speed verdicts (``--explain quantize``): the layers it kept in
    fp32, the whole-graph timing, and the layers int8 slows down most when timed alone."""
    record = result.pipeline.records[-1]
    stats = record.stats
    lines = [f"`quantize(prefer=speed)` ({record.seconds:.0f} s): {stats['int8_layers']} int8 layers, "
             f"{len(stats['fp32_layers'])} kept fp32 ({', '.join(stats['fp32_layers']) or 'none'}); "
             f"calibration cosine {stats['cosine_calibration']}."]
    lines += [f"- {e}" for e in record.explanations if e.startswith("whole graph")]
    timings = stats.get("timings_ms", {})
    slower = sorted(((q - f, n, f, q) for n, (f, q) in timings.items() if q > f), reverse=True)
    if timings:
        worst_text = ", ".join(f"{n} {q:.3f} vs {f:.3f} ms" for _, n, f, q in slower[:worst])
        lines.append(f"- timed alone in onnxruntime, int8 is slower than fp32 for {len(slower)} of {len(timings)} "
                     f"layers" + (f"; worst (int8 vs fp32): {worst_text}" if slower else ""))
    return "\n".join(lines) + "\n"


def _contents(variants: list[Variant]) -> str:
    return "".join(f"- {v.label}: {'; '.join([*v.notes, _facts(v.format, v.subject.path)])}\n"
                   for v in variants if v.subject is not None)


def _plot(per_model: dict[str, list[Variant]], path: Path, threads: int) -> None:
    """Latency vs size, one panel per model: colour = format, marker = variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours = dict(zip(FORMATS, ("tab:blue", "tab:orange", "tab:green")))
    markers = {"fp32": "o", SPEED: "*", SIZE: "s", PEER: "^"}
    fig, axes = plt.subplots(1, len(per_model), figsize=(5 * len(per_model), 4.8), squeeze=False)
    for ax, (name, variants) in zip(axes[0], per_model.items()):
        timed = [v for v in variants if v.row is not None]
        for v in timed:
            r = v.row
            ax.errorbar(r.bytes / 2**20, r.median_ms, yerr=[[r.median_ms - r.p10_ms], [r.p90_ms - r.median_ms]],
                        fmt=markers.get(v.variant, markers[PEER]), color=colours[v.format], capsize=3,
                        markersize=9 if v.variant == SPEED else 7, mfc="none" if v.variant == "fp32" else None)
        target = next(v.row.bytes for v in timed if v.variant == "fp32") * TARGET_SIZE / 2**20
        ax.axvline(target, color="grey", ls=":", lw=1)
        ax.set_title(name)
        ax.set_xlabel("size on disk (MiB)")
        ax.set_ylabel(f"latency, median ms ({threads} thread(s), p10-p90 bars)")
        ax.set_xlim(left=0, right=max(v.row.bytes for v in timed) / 2**20 * 1.1)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, marker="o", ls="none", label=f) for f, c in colours.items()]
    handles.append(Line2D([], [], color="grey", ls=":", lw=1, label=f"{TARGET_SIZE}x the fp32 size"))
    handles += [Line2D([], [], color="grey", marker=m, ls="none", mfc="none" if v == "fp32" else None,
                       label="each runtime's own int8 pipeline" if v == PEER else v)
                for v, m in markers.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("int8: graphopt quantize vs each runtime's own quantization, and fp32")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def _command() -> str:
    """This run's command line, as ``unshare -n -- ...`` when the network was cut."""
    dev = Path("/proc/net/dev")      # this process's network namespace (/sys may show the host's)
    cut = dev.is_file() and {line.split(":")[0].strip() for line in dev.read_text().splitlines()[2:]} <= {"lo"}
    return f"{'unshare -n -- ' if cut else ''}.venv/bin/python bench/quantize.py {' '.join(sys.argv[1:])}".rstrip()


def _machine(threads: int, runs: int) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("torch", "onnxruntime", "tensorflow", "onnx2tf",
                                                          "litert-torch", "ai-edge-litert"))
    return (f"{cpu} ({platform.machine()}, {os.cpu_count()} logical CPUs, shared), {threads} thread(s), "
            f"{runs} round-robin rounds after 5 warm-up calls; {versions}; {time.strftime('%Y-%m-%d')}")


def bench_model(name: str, registry, args, calibration, held_out) -> tuple[list[Variant], str]:
    build = MODELS[name]
    inputs = example_inputs([SHAPE])
    with torch.no_grad():
        expected = torch.cat([flatten_outputs(build()(x))[0] for x in held_out])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        fp32 = _optimize(build(), inputs, registry, FP32, tmp / "fp32", name, calibration)
        speed = _optimize(build(), inputs, registry, f"{FP32},quantize(prefer=speed)", tmp / "speed", name,
                          calibration)
        size = _optimize(build(), inputs, registry, f"{FP32},quantize(prefer=size)", tmp / "size", name,
                         calibration)
        print(f"{name}: graphopt artifacts in {time.perf_counter() - start:.0f} s", flush=True)
        ours = {v: _graphopt(r, name, v, args.threads) for v, r in (("fp32", fp32), (SPEED, speed), (SIZE, size))}
        fp32_artifacts = {c.artifact.format: c.artifact for c in fp32.artifacts}
        makers = {"onnx": _onnxruntime_peer(fp32_artifacts["onnx"], calibration, registry),
                  "ptl": _torch_ao_peer(build, inputs, calibration, registry),
                  "tflite": _tf_converter_peer(fp32, calibration, registry)}
        variants = []
        for i, fmt in enumerate(FORMATS):
            variants += [ours["fp32"][i], ours[SPEED][i], ours[SIZE][i],
                         _peer(name, fmt, makers[fmt], args.threads, tmp / "peer")]
        _judge(variants, held_out, expected)
        timed = [v for v in variants if v.subject is not None]
        rows = bench([v.subject for v in timed], inputs, reference=None, threads=args.threads, runs=args.runs)
        for v, r in zip(timed, rows):
            v.row = r
        profile = _profile(variants, inputs, args.threads)
        contents = _contents(variants)
    section = (f"## {name}\n\n{_table(variants)}\ngraphopt's int8 (prefer=speed) artifact against the "
               f"fp32 one and the peer, per format:\n\n{_verdicts(variants)}\n"
               f"What the artifacts hold:\n\n{contents}\n{_speed_explanations(speed)}\n"
               f"onnxruntime's profiler, the ONNX files run round-robin ({args.threads} thread(s), 20 runs): "
               f"median ms per inference by op type\n\n"
               f"{profile}")
    return variants, section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--out", type=Path, default=HERE / "QUANTIZE.md")
    args = parser.parse_args()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    registry = graphopt.load_plugins()
    calibration = list(example_inputs([SHAPE] * CALIBRATION, seed=1))
    held_out = list(example_inputs([SHAPE] * HELD_OUT, seed=2))
    sections = [f"# graphopt bench: int8 `quantize` vs each runtime's own quantization\n\n`{_command()}`\n\n"
                f"Machine: {_machine(args.threads, args.runs)}.\n\n"
                f"Per model one process times all its artifacts round-robin; compare rows as ratios. fp32 is "
                f"graphopt's `{FP32}`; the int8 rows add `quantize(prefer=speed)` (the default: layers int8 "
                f"does not speed up in onnxruntime stay fp32) or `quantize(prefer=size)` (every layer int8). "
                f"Peers: onnx = onnxruntime `quantize_static` on graphopt's fp32 .onnx (QDQ, per-channel, "
                f"QUInt8 activations, QInt8 weights, MinMax); ptl = torch.ao FX `prepare_fx`/`convert_fx` "
                f"with `get_default_qconfig_mapping(\"x86\")`, traced, frozen, lite interpreter on the x86 "
                f"engine (graphopt's int8 .ptl runs on the engine its emitter recorded, listed per model); tflite = TF's converter integer quantization as onnx2tf's `integer_quant` "
                f"(`optimizations=[DEFAULT]`, `TFLITE_BUILTINS_INT8`+`SELECT_TF_OPS`, float I/O) of the Keras "
                f"model onnx2tf builds for graphopt's fp32 .tflite. All calibrate on the same {CALIBRATION} "
                f"seeded N(0,1) inputs; cosine and top-1 agreement are against the eager fp32 model on "
                f"{HELD_OUT} other seeded N(0,1) inputs (random weights and inputs: agreement, not accuracy). "
                f"Speed vs fp32 > 1 is faster. Sizes are bytes on disk. `prefer=speed` decides from timings it "
                f"takes on this machine, so which layers it keeps in fp32 can change from run to run.\n"]
    per_model = {}
    for name in names:
        per_model[name], section = bench_model(name, registry, args, calibration, held_out)
        sections.append(section)
        print(section, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _plot(per_model, args.out.parent / "quantize.png", args.threads)
    sections.append("![latency vs size](quantize.png)\n")
    args.out.write_text("\n".join(sections))


if __name__ == "__main__":
    main()
