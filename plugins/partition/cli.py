"""What partition brings to the command line: ``run --target BACKEND`` (the pipeline gets a
``partition`` item, the compatibility and summary tables print as soon as it ran, the
placement pictures land in --out) and ``graphopt backends``."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

import graphopt
from graphopt.errors import UsageError
from graphopt.pipeline import Pipeline, PipelineItem, did_you_mean, parse_pipeline


def _backends(registry) -> dict:
    from . import registered_backends
    return registered_backends(registry)


@graphopt.hookimpl
def graphopt_add_options(command: str, parser) -> None:
    if command == "run":
        parser.add_argument("--target", metavar="BACKEND",
                            help="partition for this backend (see graphopt backends): appends partition(backend="
                                 "BACKEND) to the pipeline unless it has a partition item, prints where each node "
                                 "runs and why, and writes partition.dot/.svg/.png into --out")


def with_target(pipeline: str, target: str, backends: dict) -> str:
    """``pipeline`` partitioning for ``target``: its ``partition`` items (given the backend
    when they name none), else ``partition(backend=TARGET)`` appended."""
    if target not in backends:
        raise UsageError(f"unknown backend {target!r} for --target; {did_you_mean(target, sorted(backends))}"
                         f"known: {', '.join(sorted(backends)) or 'none'} (see graphopt backends)")
    items = list(parse_pipeline(pipeline).items) if pipeline.strip() else []
    found = False
    for i, item in enumerate(items):
        if item.name != "partition":
            continue
        found = True
        named = dict(item.options).get("backend")
        if named not in (None, target):
            raise UsageError(f"--target {target} disagrees with {item} in the pipeline; give the backend once")
        items[i] = PipelineItem(item.name, item.options + ((("backend", target),) if named is None else ()))
    if not found:
        items.append(PipelineItem("partition", (("backend", target),)))
    return str(Pipeline(tuple(items)))


@graphopt.hookimpl
def graphopt_configure_run(options, pipeline: str, registry) -> str | None:
    target = getattr(options, "target", None)
    return with_target(pipeline, target, _backends(registry)) if target else None


@graphopt.hookimpl
def graphopt_pass_done(record, options, ui) -> None:
    if getattr(options, "target", None) and record.pass_name == "partition":
        from .placement import compatibility_table, summary_table
        ui.print(compatibility_table(record.stats))
        ui.print(summary_table(record.stats))


@graphopt.hookimpl
def graphopt_run_done(result, options, out_dir, ui) -> list | None:
    placements = [r.stats for r in result.pipeline.records if r.pass_name == "partition"]
    if not getattr(options, "target", None) or not placements:
        return None
    from .placement import render
    drawn = ["partition.svg", "partition.png"] if importlib.util.find_spec("matplotlib") else []
    files = ["partition.dot", *drawn]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name in files:
        render(placements[-1], Path(out_dir) / name)
    if not drawn and not ui.quiet:
        ui.err.print("graphopt: no partition.svg/.png without matplotlib; pip install 'graphopt[plot]'",
                     markup=False)
    return files


def cmd_backends(args, registry) -> int:
    backends = _backends(registry)
    rows = [{"name": b.name, "description": b.description, "dtypes": sorted(b.dtypes), "ops": sorted(b.ops),
             "cost": b.cost, "fallback": b.fallback, "reference": b.reference,
             "plugin": registry.owner[f"backend:{b.name}"]}
            for b in sorted(backends.values(), key=lambda b: b.name)]
    if args.json:
        print(json.dumps({"backends": rows}, indent=2))
        return 0
    if args.quiet:
        return 0
    t = Table(title="backends", title_justify="left")
    for col in ("name", "dtypes", "op kinds", "cost", "description", "plugin"):
        t.add_column(col, justify="right" if col in ("op kinds", "cost") else "left")
    for r in rows:
        t.add_row(r["name"], ", ".join(r["dtypes"]), "all" if r["fallback"] else str(len(r["ops"])),
                  f"{r['cost']:g}", r["description"], r["plugin"])
    console = Console()
    console.print(t)
    console.print("cost: time per MAC relative to the cpu; graphopt run MODEL ... --target NAME shows where "
                  "each node runs")
    return 0


@graphopt.hookimpl
def graphopt_add_commands(subparsers, parents: list) -> None:
    sub = subparsers.add_parser("backends", parents=parents, help="list the registered backends (targets of --target)")
    sub.set_defaults(handler=cmd_backends)
