"""The quantization contract every int8 emitter checks its file with, and a test author can assert on
any int8 file: the grids (scale, zero point) the file holds against the fake-quant graph's.
``graph_qtensors`` lists the graph's; a format reads its file's into ``QTensor``s and compares them
with ``check_qtensors`` (position by position) or ``check_grids`` (in order where the file writes
a repeated grid once; as a set where a converter reorders ops)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch.fx as fx

from graphopt.quant import int8_qparams, is_fake_quant, weight_quant


@dataclass(frozen=True)
class QTensor:
    """A quantized tensor's grid in int8 terms (a uint8 zero point less 128): per tensor, or per
    channel for weights; ``name`` says where it is (a node or module of the graph, a file's tensor)."""

    name: str
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]


def graph_qtensors(gm: fx.GraphModule) -> tuple[list[QTensor], list[QTensor]]:
    """The grids a file of ``gm`` must hold, in graph order: each fake quant's, each quantized
    weight's (its module's name), partitions' nodes included."""
    acts, weights = [], []
    for n in gm.graph.nodes:
        inner = gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(inner, fx.GraphModule):
            more = graph_qtensors(inner)
            acts += more[0]
            weights += [QTensor(f"{n.target}.{w.name}", w.scale, w.zero_point) for w in more[1]]
        elif is_fake_quant(n):
            scale, zp = int8_qparams(*n.args[1:])
            acts.append(QTensor(n.name, (scale,), (zp,)))
        elif inner is not None and (quant := weight_quant(inner)) is not None:
            weights.append(QTensor(n.target, tuple(quant[1].tolist()), (0,) * len(quant[1])))
    return acts, weights


def _close(a: QTensor, b: QTensor, rel: float, atol: float) -> bool:
    return a.zero_point == b.zero_point and len(a.scale) == len(b.scale) and \
        all(abs(x - y) <= max(rel * abs(y), atol) for x, y in zip(a.scale, b.scale))


def _show(t: QTensor) -> str:
    return f"scale {t.scale[0]:.6g}, zero point {t.zero_point[0]}" if len(t.scale) == 1 else \
        f"{len(t.scale)} channel scales [{', '.join(f'{x:.4g}' for x in t.scale[:3])}, ...]"


def _raise(message: str) -> None:
    raise ValueError(message)


def check_qtensors(what: str, expected: Sequence[QTensor], found: Sequence[QTensor], *, rel: float = 1e-6,
                   atol: float = 0.0, fail: Callable[[str], None] = _raise) -> int:
    """The quantization contract every emitter checks its file with: ``found`` (the file's grids,
    in its order) against ``expected`` (``graph_qtensors``, in graph order), position by position
    (same count; zero points equal; scales within ``rel``, or ``atol`` where a file prints them
    rounded). A mismatch calls ``fail`` (default: ValueError) with a line naming both tensors;
    returns how many were compared."""
    for i, (e, f) in enumerate(zip(expected, found)):
        if not _close(f, e, rel, atol):
            fail(f"{what} {i + 1} ({f.name}) has {_show(f)}; the graph's ({e.name}) has {_show(e)}")
    if len(expected) != len(found):
        first = found[len(expected)] if len(found) > len(expected) else expected[len(found)]
        fail(f"the file has {len(found)} {what}s, the graph {len(expected)} (the first unmatched: {first.name})")
    return len(found)


def check_grids(what: str, expected: Sequence[QTensor], found: Sequence[QTensor], *, in_order: bool = False,
                optional: Callable[[QTensor], bool] = lambda grid: False, rel: float = 1e-6, atol: float = 0.0,
                fail: Callable[[str], None] = _raise) -> int:
    """For files that write a grid once where the graph repeats it (pooling, reshapes, a fake quant
    of a value already on its grid), so positions cannot pair one to one: every grid the file holds
    is one of the graph's (``in_order``: the file's grids are a subsequence of the graph's, each
    after the one before it), and every grid of the graph but the ``optional`` ones is in the file;
    else ``fail`` names the tensor."""
    at = 0
    for f in found:
        start = at if in_order else 0
        match = next((i for i in range(start, len(expected)) if _close(f, expected[i], rel, atol)), None)
        if match is None:
            after = f" after the graph's {expected[start - 1].name}" if in_order and start else ""
            fail(f"{what} {f.name} has {_show(f)}, which no fake quant of the graph has{after}")
        at = match
    for e in (e for e in expected if not optional(e)):
        if not any(_close(f, e, rel, atol) for f in found):
            fail(f"the graph's fake quant {e.name} ({_show(e)}) is on no {what} of the file")
    return len(found)
