"""Rich tables and progress for the CLI; nothing here changes data."""
from __future__ import annotations

import contextlib
import re
import sys
from typing import Iterator, Sequence

from rich.console import Console
from rich.table import Table

from graphopt.passmanager import PassRecord

_COUNTED = re.compile(r"^(.*?) ?\((\d+)/(\d+)\)$")     # "calibrating 40 tensors (3/16)"


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def err(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def passes_table(model: dict, records: Sequence[PassRecord]) -> Table:
    t = Table(title="passes", title_justify="left")
    for col in ("pass", "time", "changed", "nodes", "params", "MACs", "size", "max abs err", "cosine", "verified"):
        t.add_column(col, justify="left" if col == "pass" else "right")
    t.add_row("(captured)", "", "", str(model["nodes"]), human_count(model["params"]),
              human_count(model["macs"]), human_bytes(model["bytes"]), "", "", "")
    for r in records:
        t.add_row(r.name, f"{r.seconds:.2f}s", "yes" if r.modified else "no", str(r.nodes),
                  human_count(r.params), human_count(r.macs), human_bytes(r.bytes),
                  err(r.max_abs_err), f"{r.cosine:.6f}", "yes" if r.verified else "NO")
    return t


def artifacts_table(rows: Sequence[dict], extra: str | None = None) -> Table:
    """``rows`` are report artifact dicts; ``extra`` names one more column they carry."""
    t = Table(title="artifacts", title_justify="left")
    for col in ("format", "file", "size", "max abs err", "cosine", "verified") + ((extra,) if extra else ()):
        t.add_column(col, justify="left" if col in ("format", "file") else "right")
    for a in rows:
        cells = [a["format"], a["path"] or "(not written)", human_bytes(a["bytes"]) if a.get("bytes") is not None else "-",
                 err(a.get("max_abs_err")), "-" if a.get("cosine") is None else f"{a['cosine']:.6f}",
                 "yes" if a["verified"] else "NO: " + "; ".join(a.get("problems", []))]
        if extra:
            v = a.get(extra)
            cells.append("-" if v is None else (f"{v:.2%}" if isinstance(v, float) else str(v)))
        t.add_row(*cells)
    return t


class Ui:
    """Where the CLI writes: tables to stdout, progress and errors to stderr."""

    def __init__(self, quiet: bool = False, json_mode: bool = False):
        self.quiet, self.json, self._progress = quiet or json_mode, json_mode, None
        self.silent = quiet      # progress goes to stderr: on under --json, off under --quiet
        width = None if sys.stdout.isatty() else 140   # pipes and CI logs get whole tables
        self.out = Console(file=sys.stdout, highlight=False, width=width)
        self.err = Console(file=sys.stderr, highlight=False, soft_wrap=True)

    def print(self, *things) -> None:
        if not self.quiet:
            self.out.print(*things)

    def asked(self, *things, markup: bool = True) -> None:
        """What the user asked for by name (--print-ir-after, --explain): shown under --quiet too,
        on stderr under --json (stdout holds the JSON)."""
        (self.err if self.json else self.out).print(*things, markup=markup)

    @contextlib.contextmanager
    def progress(self, first: str) -> Iterator:
        """What a long step is doing, on stderr: a message ending in ``(i/n)`` is a counted bar, any
        other a spinner, in a terminal; plain lines elsewhere (of a count over 20, the first and last);
        nothing under --quiet. Yields ``say(message)``."""
        if self.silent:
            yield lambda message: None
            return
        if not self.err.is_terminal:
            def line(message: str) -> None:
                count = _COUNTED.match(message)
                if count is None or int(count[3]) <= 20 or count[2] in ("1", count[3]):
                    self.err.print(f"graphopt: {message}", markup=False, highlight=False)
            yield line
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      console=self.err, transient=True) as bar:
            task = [bar.add_task(first, total=None)]

            def update(message: str) -> None:
                count = _COUNTED.match(message)
                if count is None:   # a spinner: a new task, as rich's update cannot take a count away
                    bar.remove_task(task[0])
                    task[0] = bar.add_task(message, total=None)
                else:
                    bar.update(task[0], description=count[1], total=int(count[3]), completed=int(count[2]))
                bar.refresh()     # every step drawn: they are few, and some take seconds
            self._progress = bar
            try:
                yield update
            finally:
                self._progress = None

    def note(self, text: str) -> None:
        """A line of progress that stays (a pass that ended): above the bar in a terminal, a plain line
        on stderr elsewhere, nothing under --quiet."""
        if not self.silent:
            (self._progress.console if self._progress else self.err).print(text, markup=False, highlight=False)


def bench_table(rows) -> Table:
    """``rows`` are BenchRow objects from graphopt.cli.bench."""
    t = Table(title=f"bench ({rows[0].threads} thread(s), {rows[0].runs} runs, round-robin)", title_justify="left")
    for col in ("artifact", "size", "median ms", "p10-p90 ms", "speed-up", "max rel err", "accuracy"):
        t.add_column(col, justify="left" if col == "artifact" else "right")
    for r in rows:
        t.add_row(r.label, human_bytes(r.bytes) if r.bytes else "-", f"{r.median_ms:.2f}",
                  f"{r.p10_ms:.2f}-{r.p90_ms:.2f}",
                  f"{r.speedup:.2f}x vs {r.baseline}" if r.speedup else "-",
                  "-" if r.max_rel_err is None else f"{r.max_rel_err:.1e}",
                  "-" if r.accuracy is None else f"{r.accuracy:.2%}")
    return t


def macs_vs_speed(model_macs: float, optimized_macs: float, rows) -> dict | None:
    """What the pipeline took off the MACs beside what each optimized artifact measured over its
    unoptimized export (``rows``: BenchRow objects): ``{"macs": [before, after], "reduction": x,
    "speedups": {label: x}, "share": {label: speed-up / reduction}}``; None when the MACs are not known."""
    if not model_macs or not optimized_macs:
        return None
    reduction = model_macs / optimized_macs
    speedups = {r.label: r.speedup for r in rows if r.speedup and r.baseline and r.baseline != "eager (unoptimized)"
                and r.baseline.endswith(" (unoptimized)")}
    return {"macs": [model_macs, optimized_macs], "reduction": reduction, "speedups": speedups,
            "share": {k: v / reduction for k, v in speedups.items()}}


def macs_line(summary: dict) -> str:
    """One line: the MAC reduction and each artifact's measured speed-up as a multiple of it."""
    before, after = summary["macs"]
    each = ", ".join(f"{k} {v:.2f}x ({summary['share'][k]:.0%} of it)" for k, v in summary["speedups"].items())
    return (f"MACs {human_count(before)} -> {human_count(after)} ({summary['reduction']:.2f}x fewer); measured "
            f"speed-up over the unoptimized export: {each or 'no artifact timed'}")
