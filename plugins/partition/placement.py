"""A placement report (the ``partition`` pass's stats) as rich tables, Graphviz DOT and a picture.

The report lists every computing node in graph order with its placement (a partition name
or ``cpu``) and, on the cpu, the reason (schema in docs/partition.md). Pictures are drawn with
matplotlib (the ``plot`` extra); Graphviz is not needed.
"""
from __future__ import annotations

import io
import math
import zlib
from pathlib import Path

from rich.table import Table
from rich.text import Text

from graphopt.cli.console import human_count
from graphopt.emit import write_atomic
from graphopt.errors import UsageError

CPU = "cpu"
SUFFIXES = (".dot", ".svg", ".png")
_CPU_COLOURS = ("#7f7f7f", "#d9d9d9")           # (line, fill)
_PALETTE = (("#1f77b4", "#aec7e8"), ("#ff7f0e", "#ffbb78"), ("#2ca02c", "#98df8a"),
            ("#d62728", "#ff9896"), ("#9467bd", "#c5b0d5"), ("#17becf", "#9edae5"))
# picture: partition i's fill is the backend's fill moved this far towards its line colour
# (negative: towards white), so neighbouring partitions differ
_SHADES = (0.0, 0.5, -0.6)
_LEGEND_PARTITIONS = 12
# picture geometry: inches per node slot and per layer, the caps, and the pixel budget of a PNG
_SLOT_IN, _LAYER_IN, _MAX_W_IN, _MAX_H_IN, _LEGEND_IN, _MAX_PIXELS = 1.7, 0.62, 40.0, 120.0, 2.6, 2.5e7


def backend_colours(name: str) -> tuple[str, str]:
    """(line, fill) colours of a backend: grey for the cpu, else fixed by the name."""
    return _CPU_COLOURS if name == CPU else _PALETTE[zlib.crc32(name.encode()) % len(_PALETTE)]


def _shape(shape) -> str:
    return "-" if shape is None else "x".join(map(str, shape)) or "scalar"


def _estimate(report: dict) -> str:
    t = report["summary"]["estimated_time"]
    return "-" if t is None else f"{t:.2f}"


def _title(report: dict) -> str:
    s = report["summary"]
    return (f"{report['backend']}: {s['delegated_share']:.1%} of MACs in {len(report['partitions'])} partition(s), "
            f"estimated time {_estimate(report)} of cpu alone")


def compatibility_table(report: dict) -> Table:
    """One row per computing node: what it computes, where it runs and, on the cpu, why."""
    t = Table(title=f"placement on {report['backend']} (min_size={report['min_size']})",
              title_justify="left")
    for col in ("node", "op kinds", "dtype", "shape", "MACs", "placement", "reason"):
        t.add_column(col, justify="right" if col == "MACs" else "left")
    for n in report["nodes"]:
        t.add_row(Text(n["name"]), Text(", ".join(n["kinds"])), Text(n["dtype"]), _shape(n["shape"]),
                  human_count(n["macs"]), Text(n["placement"]), Text(n["reason"] or "-"))
    return t


def summary_table(report: dict) -> Table:
    """Per backend: partitions, nodes, MACs and share of MACs; the estimated time as caption."""
    s = report["summary"]
    total = sum(b["macs"] for b in s["backends"].values())
    t = Table(title="placement summary", title_justify="left", caption_justify="left",
              caption=f"estimated time {_estimate(report)} (all on the cpu: 1.00)")
    for col in ("backend", "partitions", "nodes", "MACs", "share of MACs"):
        t.add_column(col, justify="left" if col == "backend" else "right")
    for name, b in s["backends"].items():
        t.add_row(Text(name), str(len(report["partitions"])) if name == report["backend"] else "-",
                  str(b["nodes"]), human_count(b["macs"]), f"{b['macs'] / total:.2%}" if total else "-")
    return t


def _inputs(report: dict) -> list[str]:
    """Names read by some node that are no node of the report: the placeholders."""
    known = {n["name"] for n in report["nodes"]}
    return list(dict.fromkeys(i for n in report["nodes"] for i in n["inputs"] if i not in known))


def _members(report: dict) -> dict[str, list[dict]]:
    """Each placement's nodes in graph order, partitions in report order, the cpu last."""
    groups: dict[str, list[dict]] = {p["name"]: [] for p in report["partitions"]}
    for n in report["nodes"]:
        groups.setdefault(n["placement"], []).append(n)
    groups[CPU] = groups.pop(CPU, [])
    return groups


def _label(node: dict) -> str:
    """The node's name and, when the name does not already say it, its op kinds."""
    kinds = ", ".join(node["kinds"])
    return node["name"] if node["name"].rstrip("_0123456789") == kinds else f"{node['name']}\n{kinds}"


def _q(text: str) -> str:
    """A DOT quoted string (newlines become centred line breaks)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(report: dict) -> str:
    """Graphviz DOT: inputs as ellipses, a cluster per partition, a fill colour per backend,
    the cpu nodes grey with their reason as tooltip, an edge per input a node reads."""
    line, fill = backend_colours(report["backend"])
    cpu_line, cpu_fill = backend_colours(CPU)
    macs = {p["name"]: p["macs"] for p in report["partitions"]}
    out = ["digraph placement {",
           f"  graph [label={_q(_title(report))}, labelloc=t, fontname=Helvetica];",
           '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=10];',
           '  edge [color="#555555", arrowsize=0.6];']
    out += [f"  {_q(name)} [shape=ellipse, fillcolor=white];" for name in _inputs(report)]
    for placement, nodes in _members(report).items():
        if placement == CPU:
            out += [f"  {_q(n['name'])} [label={_q(_label(n))}, fillcolor={_q(cpu_fill)}, color={_q(cpu_line)}, "
                    f"tooltip={_q(n['reason'] or '')}];" for n in nodes]
            continue
        out += [f"  subgraph {_q('cluster_' + placement)} {{",
                f"    label={_q(placement + chr(10) + human_count(macs.get(placement, 0)) + ' MACs')}; "
                f"style=rounded; color={_q(line)};"]
        out += [f"    {_q(n['name'])} [label={_q(_label(n))}, fillcolor={_q(fill)}];" for n in nodes]
        out.append("  }")
    out += [f"  {_q(i)} -> {_q(n['name'])};" for n in report["nodes"] for i in n["inputs"]]
    return "\n".join(out + ["}"]) + "\n"


def render(report: dict, path: Path) -> None:
    """Write the placement picture ``path``: ``.dot`` (to_dot's text), ``.svg`` or ``.png``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"cannot draw a placement as {path.name}: give a {', '.join(SUFFIXES)} file")
    write_atomic(path, to_dot(report).encode() if suffix == ".dot" else _draw(report, suffix[1:]))


def _layout(report: dict) -> dict[str, tuple[float, int]]:
    """(x, layer) of every input and node: layer = the longest path from an input; in a layer,
    nodes ordered and placed by the mean x of what they read, at least one slot apart."""
    layer = dict.fromkeys(_inputs(report), 0)
    for n in report["nodes"]:
        layer[n["name"]] = 1 + max((layer[i] for i in n["inputs"]), default=-1)
    layers: list[list[str]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for name, k in layer.items():
        layers[k].append(name)
    reads = {n["name"]: n["inputs"] for n in report["nodes"]}
    x: dict[str, float] = {}
    for names in layers:
        want = {m: sum(x[i] for i in reads.get(m, ())) / max(len(reads.get(m, ())), 1) for m in names}
        names.sort(key=want.__getitem__)
        placed = [want[names[0]]]
        for m in names[1:]:
            placed.append(max(want[m], placed[-1] + 1))
        shift = sum(want.values()) / len(names) - sum(placed) / len(names)
        x.update((m, p + shift) for m, p in zip(names, placed))
    return {m: (x[m], layer[m]) for m in layer}


def _fills(report: dict) -> dict[str, str]:
    """Picture fill per placement: the cpu grey, partitions shades of their backend's colour."""
    from matplotlib.colors import to_hex, to_rgb
    line, fill = (to_rgb(c) for c in backend_colours(report["backend"]))
    fills = {CPU: backend_colours(CPU)[1]}
    for i, p in enumerate(report["partitions"]):
        t = _SHADES[i % len(_SHADES)]
        fills[p["name"]] = to_hex(tuple(f + ((c if t > 0 else 1.0) - f) * abs(t) for f, c in zip(fill, line)))
    return fills


def _nodes(count: int) -> str:
    return f"{count} node{'s' * (count != 1)}"


def _legend(report: dict, fills: dict[str, str]):
    from matplotlib.patches import Patch
    line = backend_colours(report["backend"])[0]
    members = _members(report)
    parts = report["partitions"]
    handles = [Patch(facecolor=fills[p["name"]], edgecolor=line,
                     label=f"{p['name']}: {_nodes(len(members[p['name']]))}, {human_count(p['macs'])} MACs")
               for p in parts[:_LEGEND_PARTITIONS]]
    if len(parts) > _LEGEND_PARTITIONS:
        handles.append(Patch(facecolor=fills[parts[0]["name"]], edgecolor=line,
                             label=f"... {len(parts) - _LEGEND_PARTITIONS} more {report['backend']} partitions"))
    cpu = report["summary"]["backends"].get(CPU, {"nodes": 0, "macs": 0})
    handles.append(Patch(facecolor=fills[CPU], edgecolor=backend_colours(CPU)[0],
                         label=f"cpu: {_nodes(cpu['nodes'])}, {human_count(cpu['macs'])} MACs"))
    handles.append(Patch(facecolor="white", edgecolor="#555555", label="input"))
    return handles


def _draw(report: dict, fmt: str) -> bytes:
    """The layered picture as ``fmt`` (svg or png) bytes; same report, same bytes."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(f"drawing .{fmt} needs matplotlib; pip install 'graphopt[plot]' "
                         f"(or write a .dot file)") from None
    at = _layout(report)
    left, right = min((x for x, _ in at.values()), default=0), max((x for x, _ in at.values()), default=0)
    depth = max((k for _, k in at.values()), default=0) + 1
    want_w, want_h = (right - left + 1) * _SLOT_IN + 0.5, depth * _LAYER_IN + 0.8
    scale = min(1.0, _MAX_W_IN / want_w, _MAX_H_IN / want_h)
    graph_w, graph_h = max(want_w * scale, 4.0), max(want_h * scale, 2.0)
    width, height = graph_w + _LEGEND_IN, graph_h + 0.6
    dpi = min(100.0, math.sqrt(_MAX_PIXELS / (width * height)))
    fontsize = 7 * scale

    fig = Figure(figsize=(width, height), dpi=dpi)
    ax = fig.add_axes((0.1 / width, 0.1 / height, graph_w / width, graph_h / height))
    ax.set_axis_off()
    ax.set_xlim(left - 0.5, right + 0.5)
    ax.set_ylim(-depth + 0.5, 0.5)
    fills = _fills(report)
    line, cpu_line = backend_colours(report["backend"])[0], backend_colours(CPU)[0]
    by_name = {n["name"]: n for n in report["nodes"]}
    texts = {}
    for name, (x, k) in at.items():
        n = by_name.get(name)
        fc, ec = ("white", "#555555") if n is None else \
            (fills[n["placement"]], cpu_line if n["placement"] == CPU else line)
        texts[name] = ax.text(x, -k, name if n is None else _label(n), ha="center", va="center", zorder=3,
                              fontsize=fontsize, bbox=dict(boxstyle="round,pad=0.3", fc=fc, ec=ec, lw=0.8 * scale))
    for n in report["nodes"]:
        for i in n["inputs"]:
            span = at[n["name"]][1] - at[i][1]    # layers crossed: longer edges bow (less)
            bow = 0.0 if span == 1 else -min(0.3, 1.2 / span)
            ax.annotate("", xy=(0.5, 1.0), xycoords=texts[n["name"]], xytext=(0.5, 0.0), textcoords=texts[i],
                        zorder=2, arrowprops=dict(arrowstyle="-|>", color="#555555", lw=0.7 * scale,
                                                  mutation_scale=8 * scale, shrinkA=2.5 * scale,
                                                  shrinkB=2.5 * scale, connectionstyle=f"arc3,rad={bow}"))
    fig.suptitle(_title(report), fontsize=10, x=0.1 / width, y=1 - 0.1 / height, ha="left", va="top")
    fig.legend(handles=_legend(report, fills), loc="upper right", fontsize=7, frameon=False,
               title="placement", title_fontsize=8, bbox_to_anchor=(1.0, 1 - 0.5 / height))
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "graphopt-placement"}):
        fig.savefig(buf, format=fmt, dpi=dpi, metadata={"Date": None} if fmt == "svg" else {"Software": None})
    return buf.getvalue()
