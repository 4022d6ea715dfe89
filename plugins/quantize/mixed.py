"""quantize's mixed precision: layers kept fp32 where int8 is not faster (prefer=speed: the cost table;
prefer=measure: timed in onnxruntime) or for target_cosine."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from graphopt import PassContext
from graphopt.emit import write_json_atomic

from .calibrate import Calibrated
from .plan import insert, plan


def slow_by_table(cal: Calibrated, patterns: list[str], formats: list[str], ctx: PassContext) -> dict[str, str]:
    """prefer=speed: the layers whose class the cost table finds slower in int8 for ``formats``."""
    from .costs import SLOWER, slower_in_int8

    p = plan(cal.gm, patterns, {})              # plan reads the graph; insert is what writes
    slow = slower_in_int8(cal.gm, p.layers, formats)
    for name, (cls, per_format) in slow.items():
        figures = ", ".join(f"{f} {r:.2f}x" for f, r in per_format.items())
        ctx.explain(f"{name}: fp32; int8 of its class ({cls}) takes {figures} its fp32 time (cost table)")
    ctx.explain(f"cost table for {','.join(formats)}: {len(slow)} of {len(p.layers)} layers at least "
                f"{SLOWER}x slower in int8 stay fp32")
    return {name: f"int8 of its class ({cls}) is slower in {','.join(formats)} (cost table)"
            for name, (cls, _) in slow.items()}


def _timings(cal: Calibrated, patterns: list[str], ctx: PassContext, path: str) -> dict | None:
    """prefer=measure's timings: replayed from ``path`` when it exists, else measured in onnxruntime
    (and written to ``path`` when given). None when onnxruntime cannot run."""
    from . import speed as quant_speed

    if path and Path(path).exists():
        try:
            recorded = json.loads(Path(path).read_text())
            layers = {name: tuple(t) for name, t in recorded["layers_ms"].items()}
            whole = recorded["whole_graph_ms"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"timings={path}: not a timings file written by quantize(prefer=measure) ({exc})")
        expected = {layer.node.name for layer in plan(cal.gm, patterns, {}).layers}
        if set(layers) != expected:
            raise ValueError(f"timings={path} was recorded for other layers ({len(set(layers) ^ expected)} differ): "
                             "delete it to measure this model")
        ctx.explain(f"timings replayed from {path}")
        return {"layers_ms": layers, "whole_graph_ms": whole}
    emitter = quant_speed.onnx_emitter(ctx.registry)
    if emitter is None:
        return None
    probe, dry = copy.deepcopy(cal.gm), copy.deepcopy(cal.gm)
    p, p_dry = plan(probe, patterns, {}), plan(dry, patterns, {})
    chosen = insert(dry, p_dry, cal.qparams([n.name for n in p_dry.observed]))
    layers = quant_speed.measure(emitter, probe, p.layers, chosen)
    slow = {name for name, (fp32, int8) in layers.items() if int8 > quant_speed.MARGIN * fp32}
    # per-layer timings miss neighbours (an fp32 layer beside int8 ones can cost more): the
    # whole graph decides between that mix, every layer int8 and none
    mixed = cal.quantized(patterns, {name: "slow" for name in slow}, 1)[0]
    every = cal.quantized(patterns, {}, 1)[0]
    times = quant_speed.time_graphs(emitter, [mixed, every, cal.gm], cal.batches[0])
    found = {"layers_ms": layers, "whole_graph_ms": dict(zip(("mixed", "all_int8", "fp32"), times))}
    if path:
        write_json_atomic(Path(path), {"layers_ms": {k: list(v) for k, v in layers.items()},
                                       "whole_graph_ms": found["whole_graph_ms"]})
        ctx.explain(f"timings written to {path}")
    return found


def slow_by_timing(cal: Calibrated, patterns: list[str], ctx: PassContext, path: str = "") -> dict[str, str]:
    """prefer=measure: the layers int8 does not speed up in onnxruntime, timed on this machine
    (or replayed from ``path``)."""
    from .speed import MARGIN

    found = _timings(cal, patterns, ctx, path)
    if found is None:
        ctx.explain("prefer=measure times layers in onnxruntime through the onnx emitter, and one of them "
                    "is missing: every layer is quantized (prefer=size)")
        return {}
    ctx.scratch["timings"], whole = found["layers_ms"], found["whole_graph_ms"]
    ctx.scratch["whole_ms"] = {k: round(v, 3) for k, v in whole.items()}
    slow = {}
    for name, (fp32, int8) in found["layers_ms"].items():
        verdict = "int8" if int8 <= MARGIN * fp32 else "fp32"
        ctx.explain(f"{name}: {int8:.3f} ms int8 vs {fp32:.3f} ms fp32 in onnxruntime -> {verdict}")
        if verdict == "fp32":
            slow[name] = f"int8 is not faster in onnxruntime ({int8:.3f} ms vs {fp32:.3f} ms fp32)"
    t_mixed, t_every, t_fp32 = whole["mixed"], whole["all_int8"], whole["fp32"]
    ctx.explain(f"whole graph in onnxruntime: {t_mixed:.3f} ms with the slower layers in fp32, "
                f"{t_every:.3f} ms with every layer int8, {t_fp32:.3f} ms in fp32")
    if t_fp32 < min(t_mixed, t_every):
        why = f"int8 does not speed this graph up in onnxruntime ({min(t_mixed, t_every):.3f} ms vs {t_fp32:.3f} ms fp32)"
        return {name: why for name in found["layers_ms"]}
    if t_every <= t_mixed:
        return {}
    return slow


def keep_for_accuracy(cal: Calibrated, patterns: list[str], excluded: dict[str, str], target_cosine: float,
                      ctx: PassContext) -> tuple[tuple, list[tuple[str, float]]]:
    """The quantized graph (``Calibrated.quantized``) keeping ``excluded`` in fp32 and, until
    the outputs' cosine vs fp32 reaches ``target_cosine`` (0: off), the most sensitive layers
    too (added to ``excluded``); and every layer's sensitivity, most sensitive first (ranked
    only when the graph misses the target)."""
    work, p, chosen, db, cosine = cal.quantized(patterns, excluded)
    if not target_cosine or cosine >= target_cosine:
        return (work, p, chosen, db, cosine), []
    # sensitivity: the outputs' SQNR with one layer (and the int8 tensors it reads and
    # writes) quantized and the rest in fp32, on up to 4 calibration batches
    everyone = {layer.node.name for layer in p.layers}
    sensitivity = {}
    for i, name in enumerate(sorted(everyone), 1):
        ctx.progress(f"ranking layers by sensitivity ({i}/{len(everyone)})")
        sensitivity[name] = cal.quantized(patterns, {k: "probe" for k in everyone - {name}} | excluded, 4)[3]
    ranked = sorted(sensitivity.items(), key=lambda kv: (kv[1], kv[0]))
    # the fewest most-sensitive layers kept fp32 that reach the target, by bisection (a handful of
    # scorings, not one per layer: EfficientNet-B0 keeps ~100): none kept misses it, all kept meets it
    why = f"kept for accuracy (target_cosine={target_cosine})"
    low, high, best = 0, len(ranked), None          # best: the graph scored with ``high`` kept
    while high - low > 1:
        mid = (low + high) // 2
        candidate = cal.quantized(patterns, excluded | {name: why for name, _ in ranked[:mid]})
        ctx.explain(f"the {mid} most sensitive layers in fp32: cosine {candidate[4]:.6f}")
        if candidate[4] >= target_cosine:
            high, best = mid, candidate
        else:
            low = mid
    excluded.update({name: why for name, _ in ranked[:high]})
    work, p, chosen, db, cosine = best or cal.quantized(patterns, excluded)
    for name, layer_db in ranked[:high]:
        ctx.explain(f"{name} ({layer_db:.1f} dB alone) kept in fp32 for target_cosine={target_cosine}")
    for name, layer_db in ranked:
        if name not in excluded:
            ctx.explain(f"{name}: int8; quantized alone, the outputs' SQNR is {layer_db:.1f} dB")
    return (work, p, chosen, db, cosine), ranked
