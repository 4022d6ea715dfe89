"""GELU(erf), erf => erf polynomial; GELU(tanh) => tanh formula; MultiheadAttention, SDPA =>
matmul/softmax; unbind => select; flatten(2) -> transpose(1, 2) => permute -> reshape; expand =>
x or repeat; x op number => x op constant tensor; hardsigmoid => relu6(x + 3) / 6 (float graphs). Run by
the tflite emitter's prepare."""
from __future__ import annotations

import graphopt
from graphopt import Effect, Pass
from graphopt.rewrite import rewrite_pass

from . import activations, attention, gelu, layout, scalars

REWRITES = [*activations.REWRITES, *attention.REWRITES, *gelu.REWRITES, *layout.REWRITES, *scalars.REWRITES]

run = rewrite_pass(REWRITES)


@graphopt.hookimpl
def graphopt_register_passes():
    return [Pass("tflite-compat", "Rewrite what onnx2tf cannot take (GELU, erf, attention, qkv unbind, "
                                  "patch tokens, expand, scalar operands) into TFLite-builtin equivalents; hardsigmoid "
                                  "into ops the XNNPACK delegate takes",
                 run, Effect.EXACT)]
