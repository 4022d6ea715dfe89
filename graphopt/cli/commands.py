"""What each CLI subcommand does, given parsed arguments and the plugin registry."""
from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table

from graphopt import __version__
from graphopt.cli import EXIT_OK, EXIT_UNVERIFIED, dump_json
from graphopt.errors import GraphoptError, UsageError
from graphopt.pipeline import parse_pipeline
from graphopt.plugins import Registry

from .artifacts import bench_run, check_report_path, check_timing, cmd_bench, cmd_golden, cmd_verify  # noqa: F401
from .console import Ui, artifacts_table, bench_table, human_count, macs_line, macs_vs_speed, passes_table


def _data_hint(registry: Registry):
    """How ``graphopt run`` gives a ``ctx.data`` key: the plugin that reads it says (its option)."""
    def hint(key: str) -> str:
        return registry.hook.graphopt_data_hint(key=key) or (
            f"graphopt run cannot give it: call graphopt.optimize(..., data={{{key!r}: ...}}) from Python")
    return hint


def _configured_pipeline(args, registry: Registry) -> str:
    """The pipeline text after every plugin's ``graphopt_configure_run`` (``--target``)."""
    pipeline = args.pipeline if args.pipeline is not None else registry.default_pipeline()
    for impl in registry.hook.graphopt_configure_run.get_hookimpls():   # registration order
        pipeline = impl.function(options=args, pipeline=pipeline, registry=registry) or pipeline
    return pipeline


def _check_names(args, registry: Registry, pipeline: str) -> None:
    """--explain and --print-ir-after name passes (or named pipelines) that this run runs: the
    pipeline's, or an emitter's ``prepare`` pass for a format asked for (explain only)."""
    from graphopt.driver import select_emitters
    from graphopt.pipeline import did_you_mean

    known = sorted(set(registry.passes) | set(registry.pipelines))
    ran = registry.expand(parse_pipeline(pipeline)).items if pipeline else ()
    runs = {i.name for i in ran} | {i.group for i in ran if i.group}
    prepared = {i.name for emitter, _ in select_emitters(registry, args.emit) if emitter.prepare
                for i in registry.expand(parse_pipeline(emitter.prepare)).items}
    for flag, names, also in (("--explain", args.explain, prepared),
                              ("--print-ir-after", [p for p in args.print_ir_after if p != "all"], set())):
        for name in names:
            if name not in known:
                raise UsageError(f"{flag} {name}: no such pass; {did_you_mean(name, known)}known: {', '.join(known)}")
            if name not in runs | also:
                raise UsageError(f"{flag} {name}: the pipeline does not run it ({pipeline or 'empty'})")


def _check_precision(passes: list, requests: list) -> None:
    """Each format asked for takes the precision the pipeline's graph will have (its fp16 or int8
    pass), found before any work."""
    from graphopt.passes import Effect

    made = next(((p.name, e.value) for e in (Effect.FP16, Effect.INT8) for p, _ in passes if p.effect == e), None)
    for emitter, _ in requests:
        if made and made[1] not in emitter.takes:
            raise UsageError(f"--emit {emitter.format} takes {' and '.join(emitter.takes)} graphs, and the pipeline "
                             f"makes an {made[1]} one ({made[0]}): leave {made[0]} out for {emitter.format}")


def _explain(args, ui: Ui, explained: list[tuple[str, str, list[str]]]) -> None:
    """The --explain sections: each ``(pass, group, lines)`` asked for by its name or its group's."""
    for name, group, lines in explained:
        if name.split("(")[0].strip() in args.explain or group in args.explain:
            ui.asked(f"[bold]explain {name}{f' ({group} member)' if group else ''}[/bold]")
            for line in lines or ["(no candidates)"]:
                ui.asked(f"  {line}", markup=False)


def cmd_run(args, registry: Registry) -> int:
    from graphopt.driver import REPORT_VERSION, optimize, select_emitters
    from graphopt.passmanager import check_needs
    from graphopt.pipeline import resolve

    from .modelspec import check_out_dir, example_inputs, load_model, parse_shape
    from .report import explained, write_report
    ui = Ui(args.quiet, args.json)
    shapes = [parse_shape(s) for s in args.input_shape]
    select_emitters(registry, args.emit)           # an unknown or uninstalled format fails before any work
    out = check_out_dir(Path(args.out))
    report_path = check_report_path(args.report)
    pipeline = _configured_pipeline(args, registry)
    loaders = {k: v for d in registry.hook.graphopt_run_data(options=args) if d for k, v in d.items()}
    if pipeline:
        passes = resolve(registry.expand(parse_pipeline(pipeline)), registry.passes)
        check_needs(passes, loaders, _data_hint(registry))
        _check_precision(passes, select_emitters(registry, args.emit))
    _check_names(args, registry, pipeline)
    check_timing(args)
    model = load_model(args.model, args.weights)
    inputs = example_inputs(shapes, args.seed)
    if args.example:   # the first batch of the user's data: what verification and int8's checks see first
        from .calibration import load_calibration
        try:
            inputs = load_calibration(args.example, model, inputs)[0]
        except UsageError as exc:
            raise UsageError(f"--example: {exc}") from None
    data = {key: load(model, inputs) for key, load in loaders.items()}

    def show_ir(name: str, code: str) -> None:
        ui.asked(f"[bold]--- IR after {name} ---[/bold]")
        ui.asked(code, markup=False)

    done: list = []

    def pass_done(record) -> None:   # plugins' report sections, as soon as the pass ran
        done.append(record)
        ui.note(f"  {record.name}: {record.seconds:.2f} s, {'changed' if record.modified else 'no change'}, "
                f"{record.nodes} nodes, {human_count(record.macs)} MACs")
        registry.hook.graphopt_pass_done(record=record, options=args, ui=ui)

    name, started = args.name or args.model.rsplit(":", 1)[-1], time.perf_counter()
    try:
        with ui.progress("starting") as progress:
            result = optimize(model, inputs, registry, pipeline=pipeline, formats=args.emit, out_dir=out,
                              model_spec=args.model, name=name, verify=not args.no_verify,
                              verify_inputs=args.verify_inputs, leaf_modules=args.leaf_module, data=data,
                              print_ir_after=args.print_ir_after, on_ir=show_ir, on_pass=pass_done,
                              progress=progress)
    except GraphoptError as exc:   # what ran is kept: the report, the explanations asked for
        failed = {"version": REPORT_VERSION, "graphopt": __version__, "model": {"spec": args.model, "name": name},
                  "pipeline": pipeline, "passes": [r.as_dict() for r in done], "artifacts": [], "ok": False,
                  "error": str(exc), "failed_pass": getattr(exc, "pass_name", "") or None,
                  "seconds": round(time.perf_counter() - started, 3), "out": str(out.resolve()), "files": []}
        if report_path:
            write_report(report_path, failed)
        if args.json:
            dump_json(failed)
        _explain(args, ui, explained(failed))
        raise
    report, files = result.report, []
    if result.ok:
        files = [f for names in registry.hook.graphopt_run_done(result=result, options=args, out_dir=out, ui=ui)
                 if names for f in names]
        if files:
            ui.print(f"{', '.join(files)} in {out}/")
    bench_rows = []
    if args.bench and result.ok:
        bench_rows = bench_run(args, result, model, registry, ui)
        files += ["bench.json", "bench.png"]
        report["bench"] = [r.as_dict() for r in bench_rows]
        report["bench_macs"] = macs_vs_speed(report["model"]["macs"], result.pipeline.records[-1].macs
                                             if result.pipeline.records else report["model"]["macs"], bench_rows)
    report.update(out=str(out.resolve()), files=files)   # what the run wrote besides the artifacts
    if report_path:
        write_report(report_path, report)
    if args.json:
        dump_json(report)
    ui.print(passes_table(report["model"], result.pipeline.records))
    _explain(args, ui, explained(report))
    if report["artifacts"]:
        ui.print(artifacts_table(report["artifacts"]))
    if bench_rows:
        ui.print(bench_table(bench_rows))
        if report.get("bench_macs"):
            ui.out.print(macs_line(report["bench_macs"]), markup=False) if not ui.quiet else None
        ui.print(f"bench.json and bench.png in {out}/")
    if not result.ok:
        ui.err.print("graphopt: some artifacts did not verify; nothing was written to the output directory",
                     markup=False)
        return EXIT_UNVERIFIED
    return EXIT_OK


def cmd_passes(args, registry: Registry) -> int:
    rows = [{"name": p.name, "description": p.description, "effect": p.effect.value,
             "plugin": registry.owner[f"pass:{p.name}"], "default_order": p.default_order,
             "options": [{"name": o.name, "type": o.type.__name__, "default": o.default, "help": o.help}
                         for o in p.options]} for p in sorted(registry.passes.values(), key=lambda p: p.name)]
    named = [{"name": p.name, "description": p.description, "pipeline": p.pipeline,
              "expanded": str(registry.expand(parse_pipeline(p.name))), "default_order": p.default_order,
              "plugin": registry.owner[f"namedpipeline:{p.name}"]}
             for p in sorted(registry.pipelines.values(), key=lambda p: p.name)]
    if args.json:
        dump_json({"passes": rows, "pipelines": named, "default_pipeline": registry.default_pipeline()})
        return EXIT_OK
    ui = Ui(args.quiet)
    t = Table(title="passes", title_justify="left")
    for col in ("name", "effect", "description", "options", "plugin"):
        t.add_column(col)
    for p in sorted(registry.passes.values(), key=lambda p: p.name):
        opts = "\n".join(f"{o.describe()}  {o.help}" for o in p.options) or "-"
        t.add_row(p.name, p.effect.value, p.description, opts, registry.owner[f"pass:{p.name}"])
    ui.print(t)
    if named:
        t = Table(title="named pipelines (expanded where they appear; each member verified on its own)",
                  title_justify="left")
        for col in ("name", "members", "description", "plugin"):
            t.add_column(col)
        for p in named:
            t.add_row(p["name"], p["expanded"] or "(no member registered)", p["description"], p["plugin"])
        ui.print(t)
    default = registry.default_pipeline()
    expanded = str(registry.expand(parse_pipeline(default))) if default else ""
    ui.print(f"default pipeline: {default or '(empty)'}" + (f" = {expanded}" if expanded != default else ""))
    return EXIT_OK


def cmd_emitters(args, registry: Registry) -> int:
    rows = [{"format": e.format, "suffix": e.suffix, "description": e.description,
             "available": not e.missing(), "missing": e.missing(),
             "plugin": registry.owner[f"emitter:{e.format}"],
             "options": [{"name": o.name, "type": o.type.__name__, "default": o.default, "help": o.help}
                         for o in e.options]} for e in sorted(registry.emitters.values(), key=lambda e: e.format)]
    if args.json:
        dump_json({"emitters": rows})
        return EXIT_OK
    t = Table(title="emitters", title_justify="left")
    for col in ("format", "file", "description", "options", "available"):
        t.add_column(col)
    for e, r in zip(sorted(registry.emitters.values(), key=lambda e: e.format), rows):
        t.add_row(e.format, e.suffix, e.description, "\n".join(o.describe() for o in e.options) or "-",
                  "yes" if r["available"] else f"no: needs {', '.join(r['missing'])}")
    Ui(args.quiet).print(t)
    return EXIT_OK


def cmd_demo(args, registry: Registry) -> int:
    from .demo import run_demo
    return run_demo(args, registry)


def cmd_report(args, registry: Registry) -> int:
    """``graphopt report r.json -o r.html``: a run report as one self-contained HTML page."""
    from .report import load_report, write_report

    source = Path(args.report)
    report = load_report(source)
    target = check_report_path(args.output, "the HTML report") or source.with_suffix(".html")
    if target.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"-o takes an .html file, got {args.output}")
    if target.resolve() == source.resolve():
        raise UsageError(f"-o {args.output} would overwrite the report it reads")
    write_report(target, report)
    Ui(args.quiet, args.json).print(f"wrote {target}")
    return EXIT_OK
