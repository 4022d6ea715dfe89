"""``--budget latency=5ms,size=2MB,macs=300M``: limits a chosen pipeline must meet, in base units (ms, bytes,
multiply-accumulates); a bad one is a one-line UsageError."""
from __future__ import annotations

import re

from graphopt import UsageError

UNITS = {   # units as written in messages; matched without regard to case
    "latency": {"ms": 1.0, "s": 1e3, "us": 1e-3},
    "size": {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30},
    "macs": {"": 1, "k": 1e3, "M": 1e6, "G": 1e9},
}
KEYS = {"latency": "latency_ms", "size": "bytes", "macs": "macs"}
_ITEM = re.compile(r"^\s*([a-z]+)\s*(<=|=)\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.I)


def parse_budget(text: str | None) -> dict[str, float]:
    """``{"latency": ms, "size": bytes, "macs": count}`` for the items given (empty text: no budget)."""
    budget: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        match = _ITEM.match(item)
        if not match:
            raise UsageError(f"--budget takes NAME=VALUE items (latency=5ms, size=2MB, macs=300M), "
                             f"got {item.strip()!r}")
        name, _, value, written = match.groups()
        name = name.lower()
        if name not in UNITS:
            raise UsageError(f"--budget {name}: no such budget; give latency, size or macs")
        unit = next((u for u in UNITS[name] if u.lower() == written.lower()), None)
        if unit is None or (name == "latency" and not unit):
            units = ", ".join(u for u in UNITS[name] if u)
            raise UsageError(f"--budget {name}={value}{written}: unit {written or '(none)'!r} is not one of {units}")
        if name in budget:
            raise UsageError(f"--budget gives {name} twice")
        budget[name] = float(value) * UNITS[name][unit]
    return budget


def meets(point: dict, budget: dict[str, float]) -> bool:
    """Whether a trial's figures (``latency_ms``, ``bytes``, ``macs``) are within every limit."""
    return all(point[KEYS[name]] <= limit for name, limit in budget.items())


def describe(budget: dict[str, float]) -> str:
    shown = {"latency": lambda v: f"{v:g} ms", "size": lambda v: f"{v / 1e6:g} MB", "macs": lambda v: f"{v:.3g}"}
    return ", ".join(f"{name} <= {shown[name](v)}" for name, v in budget.items()) or "none"
