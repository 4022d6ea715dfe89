"""Hard activations of an int8 QDQ model as node units onnxruntime runs in integers.

onnxruntime has no int8 HardSigmoid or HardSwish: ``DQ -> HardSwish -> Q`` runs as four float
kernels (dequantize, HardSigmoid, Mul, quantize), about a third of a MobileNetV3's int8 time.
Both are affine maps clipped to a range, and a QuantizeLinear clips to its range for free:

- a gate ``DQ(v) -> HardSigmoid(alpha, beta) -> Q(s, z)`` whose grid starts at 0 and ends at or
  below 1 is ``DQ(v) + beta/alpha -> Q(s/alpha, z)``, the same integers (QLinearAdd);
- ``DQ(x) -> HardSwish -> Q`` is ``x * h`` with ``h = DQ(x) + 3 -> Q`` on the grid of [0, 6]
  read as [0, 1] (QLinearAdd, then QLinearMul): one more rounding, of h, by at most 1/510.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .rewrite import attribute, index, replace


def _unit(node: Any, producers: dict, consumers: dict, inits: dict, outputs: set) -> tuple[Any, Any] | None:
    """``(DQ, Q)`` around ``node`` when it reads one per-tensor DQ and feeds one Q only."""
    dq, users = producers.get(node.input[0]), consumers.get(node.output[0], [])
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or dq.input[2] not in inits or \
            len(users) != 1 or users[0].op_type != "QuantizeLinear" or node.output[0] in outputs:
        return None
    q = users[0]
    if len(q.input) < 3 or any(inits.get(name) is None or inits[name].size != 1 for name in (*q.input[1:3],
                                                                                              *dq.input[1:3])):
        return None
    return dq, q


def integer_hard_activations(model: Any) -> int:
    """Rewrite ``model``'s quantized HardSigmoid gates and HardSwish units in place (module
    docstring); returns how many."""
    from onnx import helper, numpy_helper

    graph = model.graph
    producers, consumers, inits = index(graph)
    outputs = {o.name for o in graph.output}
    added, dropped, rewritten = [], [], 0

    def constant(name: str, value: Any, dtype: Any) -> str:
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype), name))
        return name

    def dequantize(inputs: list[str], name: str) -> str:   # a DQ per consumer: the node units onnxruntime fuses
        added.append(helper.make_node("DequantizeLinear", list(inputs), [name], name=name))
        return name

    for node in list(graph.node):
        unit = _unit(node, producers, consumers, inits, outputs) if node.op_type in ("HardSigmoid",
                                                                                      "HardSwish") else None
        if unit is None:
            continue
        dq, q = unit
        scale, zero = float(inits[q.input[1]]), inits[q.input[2]]
        qmin, qmax = np.iinfo(zero.dtype).min, np.iinfo(zero.dtype).max
        alpha, beta = (attribute(node, "alpha", 0.2), attribute(node, "beta", 0.5)) \
            if node.op_type == "HardSigmoid" else (1 / 6, 0.5)
        if node.op_type == "HardSigmoid" and (int(zero) != qmin or (qmax - int(zero)) * scale > 1 + 1e-6):
            continue   # the grid does not clip where the gate does
        name = f"{node.name or node.output[0]}_int"
        offset = beta / alpha
        offset_q = [constant(f"{name}/offset_quantized", qmax, zero.dtype),
                    constant(f"{name}/offset_scale", offset / (qmax - qmin), np.float32),
                    constant(f"{name}/offset_zero_point", qmin, zero.dtype)]
        shifted = helper.make_node("Add", [dequantize(dq.input, f"{name}/x"), dequantize(offset_q, f"{name}/offset")],
                                   [f"{name}/shifted"], name=f"{name}/Add")
        if node.op_type == "HardSigmoid":   # the gate's own integers, on a grid alpha times coarser
            added += [shifted, helper.make_node("QuantizeLinear", [
                f"{name}/shifted", constant(f"{name}/scale", scale / alpha, np.float32), q.input[2]],
                list(q.output), name=q.name)]
        else:
            wide = constant(f"{name}/h_scale", 1 / alpha / (qmax - qmin), np.float32)   # x + 3 on [0, 6]
            unit_scale = constant(f"{name}/h_unit_scale", 1 / (qmax - qmin), np.float32)   # read as [0, 1]
            h_zero = constant(f"{name}/h_zero_point", qmin, zero.dtype)
            added += [shifted,
                      helper.make_node("QuantizeLinear", [f"{name}/shifted", wide, h_zero], [f"{name}/h_q"],
                                       name=f"{name}/h_Quantize"),
                      helper.make_node("DequantizeLinear", [f"{name}/h_q", unit_scale, h_zero], [f"{name}/h"],
                                       name=f"{name}/h_Dequantize"),
                      helper.make_node("Mul", [dequantize(dq.input, f"{name}/x2"), f"{name}/h"], [f"{name}/y"],
                                       name=f"{name}/Mul"),
                      helper.make_node("QuantizeLinear", [f"{name}/y", *q.input[1:]], list(q.output), name=q.name)]
        dropped += [node, q] + ([dq] if len(consumers[dq.output[0]]) == 1 else [])
        rewritten += 1
    if rewritten:
        replace(graph, dropped, added)
    return rewritten
