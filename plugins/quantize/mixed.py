"""quantize's mixed precision: layers kept fp32 where int8 is not faster (prefer=speed) or for target_cosine."""
from __future__ import annotations

import copy

from graphopt import PassContext

from .calibrate import Calibrated
from .plan import insert, plan


def slow_layers(cal: Calibrated, patterns: list[str], ctx: PassContext) -> dict[str, str]:
    """prefer=speed: the layers int8 does not speed up in onnxruntime, with their timings."""
    from . import speed as quant_speed

    emitter = quant_speed.onnx_emitter(ctx.registry)
    if emitter is None:
        ctx.explain("prefer=speed measures layers in onnxruntime through the onnx emitter, and one of them "
                    "is missing: every layer is quantized (prefer=size)")
        return {}
    probe, dry = copy.deepcopy(cal.gm), copy.deepcopy(cal.gm)
    p, p_dry = plan(probe, patterns, {}), plan(dry, patterns, {})
    chosen = insert(dry, p_dry, cal.qparams([n.name for n in p_dry.observed]))
    timings = quant_speed.measure(emitter, probe, p.layers, chosen)
    slow = {}
    for name, (fp32, int8) in timings.items():
        verdict = "int8" if int8 <= quant_speed.MARGIN * fp32 else "fp32"
        ctx.explain(f"{name}: {int8:.3f} ms int8 vs {fp32:.3f} ms fp32 in onnxruntime -> {verdict}")
        if verdict == "fp32":
            slow[name] = f"int8 is not faster in onnxruntime ({int8:.3f} ms vs {fp32:.3f} ms fp32)"
    ctx.scratch["timings"] = timings
    # per-layer timings miss neighbours (an fp32 layer beside int8 ones can cost more): the
    # whole graph decides between that mix, every layer int8 and none
    mixed, every = cal.quantized(patterns, slow, 1)[0], cal.quantized(patterns, {}, 1)[0]
    t_mixed, t_every, t_fp32 = quant_speed.time_graphs(emitter, [mixed, every, cal.gm], cal.batches[0])
    ctx.explain(f"whole graph in onnxruntime: {t_mixed:.3f} ms with the slower layers in fp32, "
                f"{t_every:.3f} ms with every layer int8, {t_fp32:.3f} ms in fp32")
    ctx.scratch["whole_ms"] = {"mixed": round(t_mixed, 3), "all_int8": round(t_every, 3), "fp32": round(t_fp32, 3)}
    if t_fp32 < min(t_mixed, t_every):
        why = f"int8 does not speed this graph up in onnxruntime ({min(t_mixed, t_every):.3f} ms vs {t_fp32:.3f} ms fp32)"
        return {name: why for name in timings}
    if t_every <= t_mixed:
        return {}
    return slow


def keep_for_accuracy(cal: Calibrated, patterns: list[str], excluded: dict[str, str], target_cosine: float,
                      ctx: PassContext) -> tuple[tuple, list[tuple[str, float]]]:
    """The quantized graph (``Calibrated.quantized``) keeping ``excluded`` in fp32 and, until
    the outputs' cosine vs fp32 reaches ``target_cosine`` (0: off), the most sensitive layers
    too (added to ``excluded``); and every layer's sensitivity, most sensitive first."""
    work, p, chosen, db, cosine = cal.quantized(patterns, excluded)
    # sensitivity: the outputs' SQNR with one layer (and the int8 tensors it reads and
    # writes) quantized and the rest in fp32, on up to 4 calibration batches
    everyone = {layer.node.name for layer in p.layers}
    sensitivity = {name: cal.quantized(patterns, {k: "probe" for k in everyone - {name}} | excluded, 4)[3]
                   for name in everyone}
    ranked = sorted(sensitivity.items(), key=lambda kv: (kv[1], kv[0]))
    for name, layer_db in ranked:
        if not target_cosine or cosine >= target_cosine:
            break
        excluded[name] = f"kept for accuracy (target_cosine={target_cosine})"
        ctx.explain(f"cosine {cosine:.6f} < {target_cosine}: {name} ({layer_db:.1f} dB alone) kept in fp32")
        work, p, chosen, db, cosine = cal.quantized(patterns, excluded)
    for name, layer_db in ranked:
        if name not in excluded:
            ctx.explain(f"{name}: int8; quantized alone, the outputs' SQNR is {layer_db:.1f} dB")
    return (work, p, chosen, db, cosine), ranked
