"""``quantize(prefer=speed)``: which layers int8 speeds up, looked up in a committed cost table.

``costs.json`` holds, per layer class (kind, kernel, width at its usual spatial size) and per
format, int8 time over fp32 time measured by ``bench/quantize_costs.py`` (one thread, a chain of
such layers, each format's own runtime). A layer takes the figure of the nearest measured class of
its kind; the run times nothing, so the choice is the same on every run and machine.
"""
from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import torch.fx as fx
import torch.nn as nn

FORMATS = ("onnx", "ptl", "tflite", "pte")
# an fp32 layer between int8 ones adds a dequantize before it and a quantize after it, which the
# chains in the table do not pay: only a class clearly slower in int8 stays fp32
SLOWER = 1.15


@cache
def table() -> dict:
    return json.loads(Path(__file__).with_name("costs.json").read_text())


def layer_class(gm: fx.GraphModule, node: fx.Node) -> tuple[str, float, float, float] | None:
    """(family, width, spatial size or tokens, group width) of a Conv2d/Linear layer; None for other ops."""
    if node.op != "call_module":
        return None
    m, shape = gm.get_submodule(node.target), node.meta.get("graphopt.shape")
    if isinstance(m, nn.Conv2d) and shape is not None:
        k, width = max(m.kernel_size), math.sqrt(m.in_channels * m.out_channels)
        size = math.sqrt(shape[-1] * shape[-2])
        if m.groups == 1:
            return ("conv1x1" if k == 1 else "conv3x3", width, size, 0)
        if m.groups == m.in_channels == m.out_channels:
            k = 3 if k <= 3 else 5 if k <= 5 else 7
            return (f"dw{k}x{k}", width, size, 1)
        return ("gconv3x3", width, size, m.in_channels // m.groups)
    if isinstance(m, nn.Linear) and shape is not None:
        tokens = math.prod(shape) // max(1, shape[-1])
        return ("linear", math.sqrt(m.in_features * m.out_features), tokens, 0)
    return None


def _distance(entry: dict, width: float, size: float, group_width: float) -> float:
    d = abs(math.log2(entry["channels"] / width)) + abs(math.log2(max(1, entry["size"]) / max(1, size)))
    return d + (abs(math.log2(entry["group_width"] / group_width)) if group_width > 1 else 0)


def ratios(gm: fx.GraphModule, node: fx.Node, formats=FORMATS) -> tuple[str, dict[str, float]] | None:
    """The nearest measured class to ``node`` and its int8/fp32 time per format (None: not in the table)."""
    key = layer_class(gm, node)
    if key is None:
        return None
    family, width, size, group_width = key
    entries = {name: e for name, e in table()["classes"].items() if name.startswith(family + "_")}
    if not entries:
        return None
    name = min(entries, key=lambda n: (_distance(entries[n], width, size, group_width), n))
    return name, {f: entries[name][f]["ratio"] for f in formats if f in entries[name]}


def slower_in_int8(gm: fx.GraphModule, layers, formats=FORMATS) -> dict[str, tuple[str, dict[str, float]]]:
    """Layers whose class runs int8 at least ``SLOWER`` times its fp32 time, in the geometric mean
    over ``formats``: name -> (class, ratio per format)."""
    slow = {}
    for layer in layers:
        found = ratios(gm, layer.node, formats)
        if found and found[1]:
            mean = math.exp(sum(math.log(r) for r in found[1].values()) / len(found[1]))
            if mean >= SLOWER:
                slow[layer.node.name] = found
    return slow
