"""quantize: post-training static int8. Conv/Linear(+activation), add/mul(+ReLU), matmul and
cat get int8 inputs and outputs (fake-quant nodes, ``graphopt.quant``) and per-channel
symmetric int8 weights; pooling and reshapes pass their input's scale on; sigmoid,
hardsigmoid, softmax and tanh get fixed scales. Ranges come from the calibration data
through an observer. ``prefer=speed`` keeps in fp32 the layers a committed cost table finds
slower in int8 (``costs.py``); when the outputs miss ``target_cosine``, every quantized layer's
SQNR against fp32 is ranked and the most sensitive stay fp32 until they reach it."""
from __future__ import annotations

import torch.fx as fx

import graphopt
from graphopt import Effect, Option, Pass, PassContext, PassResult
from graphopt.cli.calibration import graphopt_add_options, graphopt_data_hint, graphopt_run_data  # noqa: F401  --calib
from graphopt.fxutil import describe
from graphopt.graph import annotate

from .calibrate import Calibrated, calibration_batches
from .costs import FORMATS
from .mixed import keep_for_accuracy, slow_by_table, slow_by_timing
from .observers import OBSERVERS
from .plan import unfuse_activations

OPTIONS = (
    Option("observer", str, "minmax", "how activation ranges are calibrated", OBSERVERS),
    Option("activations", str, "uint8", "uint8: asymmetric; int8: symmetric", ("uint8", "int8")),
    Option("exclude", str, "", "comma-separated node names, module names/types or re:REGEX kept in fp32"),
    Option("prefer", str, "speed", "speed: keep in fp32 the layers whose class the committed cost table finds "
                                   "slower in int8 for `formats` (deterministic); measure: time each layer in "
                                   "onnxruntime on this machine; size: quantize every layer",
           ("speed", "measure", "size"), tune=("speed", "size")),
    Option("formats", str, ",".join(FORMATS), "prefer=speed: the formats the cost table's verdicts are for "
                                              "(geometric mean over them)"),
    Option("timings", str, "", "prefer=measure: replay the timings from this JSON file when it exists, "
                               "else measure and write them there"),
    Option("target_cosine", float, 0.995, "keep the most sensitive layers in fp32 until the outputs' cosine "
                                          "vs fp32 on every calibration batch and every input the pass is "
                                          "verified on reaches this (0: off; the default leaves a margin over "
                                          "the 0.99 the pass is verified at)",
           tune=(0.99, 0.993, 0.996, 0.999)),
)


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    from graphopt_plugins.fuse.fold_bn import fold_batchnorms

    o = ctx.options
    batches = calibration_batches(ctx)
    if fold_batchnorms(gm, lambda line: None)["folded"]:
        gm.recompile()
    from graphopt_plugins.tflite_compat.attention import split_multihead_attention

    for name in split_multihead_attention(gm, ctx):   # nn.MultiheadAttention's Linear layers get int8 kernels too
        ctx.explain(f"{name}: nn.MultiheadAttention split into its q/k/v/out Linear layers and matmuls")
    for name in unfuse_activations(gm):
        ctx.explain(f"{name}: activation split from the layer, int8 kernels do not fuse it")
    annotate(gm, ctx.example_inputs)
    held = [tuple(ctx.example_inputs), *(x for _, x in ctx.graph.check_inputs)]   # what it is verified on
    cal = Calibrated(gm, batches, o["observer"], o["activations"], held, progress=ctx.progress)
    patterns = [t.strip() for t in o["exclude"].split(",") if t.strip()]
    formats = [f.strip() for f in o["formats"].split(",") if f.strip()]
    if not formats or set(formats) - set(FORMATS):
        raise ValueError(f"formats={o['formats']!r}: give a comma list of {', '.join(FORMATS)}")
    if o["timings"] and o["prefer"] != "measure":
        raise ValueError(f"timings= replays prefer=measure's timings; prefer={o['prefer']} times nothing")
    excluded = slow_by_table(cal, patterns, formats, ctx) if o["prefer"] == "speed" else \
        slow_by_timing(cal, patterns, ctx, o["timings"]) if o["prefer"] == "measure" else {}
    (work, p, _, db, cosine), ranked = keep_for_accuracy(cal, patterns, excluded, o["target_cosine"], ctx)
    for name, why in p.kept.items():
        node = next(n for n in work.graph.nodes if n.name == name)
        ctx.explain(f"{name} ({describe(work, node)}): fp32, {why}")
    macs = {n.name: int(n.meta.get("graphopt.macs", 0)) for n in work.graph.nodes}
    stats = {"int8_layers": len(p.layers), "fp32_layers": sorted(p.kept), "calibration_batches": len(batches),
             "int8_macs_share": round(sum(macs.get(layer.node.name, 0) for layer in p.layers) /
                                      max(1, sum(macs.values())), 4),
             "sqnr_calibration": round(db, 2), "cosine_calibration": round(cosine, 6),
             "sensitivity": [[n, round(v, 2)] for n, v in ranked], "observer": o["observer"], "prefer": o["prefer"],
             "decided_for": {"speed": formats, "measure": ["onnx"]}.get(o["prefer"], []),
             "whole_graph_ms": ctx.scratch.get("whole_ms"),
             "timings_ms": {n: [round(f, 4), round(q, 4)] for n, (f, q) in ctx.scratch.get("timings", {}).items()}}
    return PassResult(work, bool(p.layers), stats)


@graphopt.hookimpl
def graphopt_pass_done(record, options, ui) -> None:
    """The run's summary says how much of the model is int8: files are named ``*_int8.*`` either way."""
    if record.pass_name == "quantize" and "int8_layers" in record.stats:
        n8, kept = record.stats["int8_layers"], len(record.stats["fp32_layers"])
        ui.print(f"quantize: {n8} of {n8 + kept} layers run int8 ({record.stats['int8_macs_share']:.1%} of MACs)"
                 + (f"; {kept} kept fp32 (--explain quantize says why)" if kept else ""))


@graphopt.hookimpl
def graphopt_register_passes():
    return [Pass("quantize", "Post-training static int8: Q/DQ (fake-quant) on conv/linear/add/mul/matmul/cat "
                             "inputs and outputs, per-channel int8 weights, calibrated ranges, per-layer "
                             "sensitivity and mixed precision", run, Effect.INT8, OPTIONS,
                 needs=("calibration",))]
