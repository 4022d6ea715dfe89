"""What each CLI subcommand does, given parsed arguments and the plugin registry."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from graphopt.cli import EXIT_OK, EXIT_UNVERIFIED, dump_json
from .console import Ui, artifacts_table, bench_table, passes_table
from graphopt.errors import UsageError, first_line
from graphopt.emit import Emitter
from graphopt.plugins import Registry


def _check_report_path(path: str | None) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir() or not p.parent.is_dir():
        raise UsageError(f"cannot write the report to {path}: give a file in an existing directory")
    return p


def _data_hint(registry: Registry):
    """How ``graphopt run`` gives a ``ctx.data`` key: the plugin that reads it says (its option)."""
    def hint(key: str) -> str:
        return registry.hook.graphopt_data_hint(key=key) or (
            f"graphopt run cannot give it: call graphopt.optimize(..., data={{{key!r}: ...}}) from Python")
    return hint


def _configured_pipeline(args, registry: Registry) -> str:
    """The pipeline text after every plugin's ``graphopt_configure_run`` (``--target``)."""
    pipeline = args.pipeline if args.pipeline is not None else registry.default_pipeline()
    for impl in reversed(registry.hook.graphopt_configure_run.get_hookimpls()):   # registration order
        pipeline = impl.function(options=args, pipeline=pipeline, registry=registry) or pipeline
    return pipeline


def _check_names(args, registry: Registry) -> None:
    """--explain and --print-ir-after name passes or named pipelines that exist."""
    known = set(registry.passes) | set(registry.pipelines)
    for name in args.explain + [p for p in args.print_ir_after if p != "all"]:
        if name not in known:
            raise UsageError(f"unknown pass {name!r} for --explain/--print-ir-after")


def cmd_run(args, registry: Registry) -> int:
    from graphopt.driver import check_out_dir, optimize, select_emitters
    from graphopt.emit import write_json_atomic
    from .modelspec import example_inputs, load_model, parse_shape
    from graphopt.passmanager import check_needs
    from graphopt.pipeline import parse_pipeline, resolve
    ui = Ui(args.quiet, args.json)
    shapes = [parse_shape(s) for s in args.input_shape]
    formats = select_emitters(registry, args.emit)
    out = check_out_dir(Path(args.out))
    report_path = _check_report_path(args.report)
    pipeline = _configured_pipeline(args, registry)
    loaders = {k: v for d in registry.hook.graphopt_run_data(options=args) if d for k, v in d.items()}
    if pipeline:
        check_needs(resolve(registry.expand(parse_pipeline(pipeline)), registry.passes), loaders,
                    _data_hint(registry))
    _check_names(args, registry)
    _check_timing(args)
    model = load_model(args.model, args.weights)
    inputs = example_inputs(shapes, args.seed)
    data = {key: load(model, inputs) for key, load in loaders.items()}

    def show_ir(name: str, code: str) -> None:
        ui.print(f"[bold]--- IR after {name} ---[/bold]")
        ui.out.print(code, markup=False) if not ui.quiet else None

    def pass_done(record) -> None:   # plugins' report sections, as soon as the pass ran
        registry.hook.graphopt_pass_done(record=record, options=args, ui=ui)

    with ui.progress("starting") as progress:
        result = optimize(model, inputs, registry, pipeline=pipeline, formats=args.emit, out_dir=out,
                          model_spec=args.model, name=args.model.rsplit(":", 1)[-1], verify=not args.no_verify,
                          leaf_modules=args.leaf_module, data=data, print_ir_after=args.print_ir_after,
                          on_ir=show_ir, on_pass=pass_done, progress=progress)
    report = result.report
    if result.ok:
        files = [f for names in registry.hook.graphopt_run_done(result=result, options=args, out_dir=out, ui=ui)
                 if names for f in names]
        if files:
            ui.print(f"{', '.join(files)} in {out}/")
    bench_rows = []
    if args.bench and result.ok:
        bench_rows = _bench_run(args, result, model, registry, ui)
        report["bench"] = [r.as_dict() for r in bench_rows]
    if report_path:
        write_json_atomic(report_path, report)
    if args.json:
        dump_json(report)
    ui.print(passes_table(report["model"], result.pipeline.records))
    explained = [(rec.name, rec.group, rec.explanations) for rec in result.pipeline.records] + [
        (f"{p['pass']} (preparing {c.artifact.format})", p.get("group", ""), p["explanations"])
        for c in result.artifacts for p in c.artifact.meta.get("prepared", [])]
    for name, group, lines in explained:
        if name.split("(")[0].strip() in args.explain or group in args.explain:
            ui.print(f"[bold]explain {name}{f' ({group} member)' if group else ''}[/bold]")
            for line in lines or ["(no candidates)"]:
                ui.out.print(f"  {line}", markup=False) if not ui.quiet else None
    if report["artifacts"]:
        ui.print(artifacts_table(report["artifacts"]))
    if bench_rows:
        ui.print(bench_table(bench_rows))
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
    if args.json:
        dump_json({"passes": rows, "default_pipeline": registry.default_pipeline()})
        return EXIT_OK
    ui = Ui(args.quiet)
    t = Table(title="passes", title_justify="left")
    for col in ("name", "effect", "description", "options", "plugin"):
        t.add_column(col)
    for p in sorted(registry.passes.values(), key=lambda p: p.name):
        opts = "\n".join(f"{o.describe()}  {o.help}" for o in p.options) or "-"
        t.add_row(p.name, p.effect.value, p.description, opts, registry.owner[f"pass:{p.name}"])
    ui.print(t)
    ui.print(f"default pipeline: {registry.default_pipeline() or '(empty)'}")
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


def cmd_verify(args, registry: Registry) -> int:
    from graphopt.metrics import compare
    from graphopt.testing import outputs_of
    case, tolerances = _reference_case(args)
    rows = []
    for path, emitter in _artifact_files(args.artifacts, registry):
        try:
            artifact = emitter.artifact_for(path)
            outputs = outputs_of(artifact, list(case.inputs.values()))
            metrics = compare(case.outputs, outputs)
        except Exception as exc:
            raise UsageError(f"{path} cannot be checked against this reference: {first_line(exc)}") from exc
        tolerance = (tolerances[emitter.format] if emitter.format in tolerances
                     else emitter.tolerance_for(artifact.meta))
        problems = tolerance.violations(metrics)
        rows.append({"format": emitter.format, "path": str(path), "bytes": path.stat().st_size,
                     "verified": not problems, "problems": problems, "max_abs_err": metrics.max_abs,
                     "cosine": metrics.cosine})
    if args.json:
        dump_json({"artifacts": rows, "ok": all(r["verified"] for r in rows)})
    else:
        Ui(args.quiet).print(artifacts_table(rows))
    return EXIT_OK if all(r["verified"] for r in rows) else EXIT_UNVERIFIED


def _reference_case(args):
    """The golden case named by ``--golden NAME`` (with its manifest tolerances) or given as
    ``--reference CASE.npz`` (no tolerances: each emitter's own for the artifact's precision)."""
    from graphopt.testing.golden import GoldenCase, Manifest
    if args.golden:
        manifest = Manifest.load(Path(args.golden_dir))
        entry = manifest.entry(args.golden)
        return GoldenCase.load(manifest.case_path(entry.name)), entry.tolerances
    return GoldenCase.load(Path(args.reference)), {}


def _artifact_files(names: list[str], registry: Registry) -> list[tuple[Path, Emitter]]:
    """Each artifact file with the emitter that reads it (by suffix); a missing file or an
    unknown suffix is a UsageError."""
    by_suffix = {e.suffix: e for e in registry.emitters.values()}
    files = []
    for path in map(Path, names):
        if not path.is_file():
            raise UsageError(f"artifact {path} does not exist")
        if path.suffix not in by_suffix:
            raise UsageError(f"no emitter reads {path.suffix} files; known: {', '.join(sorted(by_suffix))}")
        files.append((path, by_suffix[path.suffix]))
    return files


def cmd_golden(args, registry: Registry) -> int:
    from graphopt.driver import select_emitters
    from graphopt.testing.golden import GRAPH, GoldenEntry, Manifest, check, record
    from graphopt.pipeline import parse_pipeline
    from graphopt.metrics import Tolerance
    from .modelspec import parse_shape
    ui = Ui(args.quiet, args.json)
    manifest = Manifest.load(Path(args.dir))
    if args.model:
        if args.action != "record" or len(args.names) != 1 or not args.input_shape:
            raise UsageError("--model adds one model: graphopt golden record NAME --model SPEC --input-shape S")
        shapes = [list(parse_shape(s)) for s in args.input_shape]
        tol = {GRAPH: Tolerance(max_rel=1e-5)}
        for item in parse_pipeline(args.formats).items if args.formats else ():
            ((emitter, options),) = select_emitters(registry, str(item))
            tol[str(item)] = emitter.tolerance_for(options)
        manifest.entries[args.names[0]] = GoldenEntry(
            args.names[0], args.model, {f"input_{i}": s for i, s in enumerate(shapes)},
            pipeline=args.pipeline, tolerances=tol)
    names = args.names or sorted(manifest.entries)
    if not names:
        raise UsageError(f"no golden models in {manifest.path}; add one with "
                         f"graphopt golden record NAME --model SPEC --input-shape S")
    entries = [manifest.entry(n) for n in names]
    if args.action == "record":
        for entry in entries:
            record(manifest, entry)
            ui.print(f"recorded {manifest.case_path(entry.name)}")
        manifest.save()
        return EXIT_OK
    rows = []
    with ui.progress("checking") as progress:
        for entry in entries:
            rows += check(manifest, entry, registry, progress=progress)
    dicts = [{"model": r.model, "format": r.format, "verified": r.ok, "problems": r.problems,
              "max_abs_err": r.metrics.max_abs if r.metrics else None,
              "cosine": r.metrics.cosine if r.metrics else None} for r in rows]
    if args.json:
        dump_json({"checks": dicts, "ok": all(r.ok for r in rows)})
    t = Table(title=f"golden check ({manifest.path})", title_justify="left")
    for col in ("model", "format", "max abs err", "cosine", "ok"):
        t.add_column(col)
    for d in dicts:
        t.add_row(d["model"], d["format"], "-" if d["max_abs_err"] is None else f"{d['max_abs_err']:.2e}",
                  "-" if d["cosine"] is None else f"{d['cosine']:.6f}",
                  "yes" if d["verified"] else "NO: " + "; ".join(d["problems"]))
    ui.print(t)
    return EXIT_OK if all(r.ok for r in rows) else EXIT_UNVERIFIED


def cmd_demo(args, registry: Registry) -> int:
    from .demo import run_demo
    return run_demo(args, registry)


def _check_timing(args) -> None:
    if args.threads < 1 or args.runs < 1:
        raise UsageError("--threads and --runs take a positive number")
    if args.eval and not Path(args.eval).is_file():
        raise UsageError(f"eval data {args.eval} does not exist")


def _bench_run(args, result, model, registry: Registry, ui: Ui) -> list:
    import tempfile

    from .bench import bench, load_eval, plot, run_subjects
    from graphopt.emit import write_json_atomic
    out = Path(args.out)
    eval_data = load_eval(Path(args.eval), result.original.input_names) if args.eval else None
    with tempfile.TemporaryDirectory() as tmp, ui.progress("emitting the unoptimized baselines") as progress:
        subjects = run_subjects(result, registry, Path(tmp), model, args.threads)
        rows = bench(subjects, result.original.example_inputs, reference=result.pipeline.reference,
                     threads=args.threads, runs=args.runs, eval_data=eval_data, progress=progress)
    write_json_atomic(out / "bench.json", [r.as_dict() for r in rows])
    plot(rows, out / "bench.png", f"{result.original.name}: graphopt artifacts vs unoptimized")
    return rows


def cmd_bench(args, registry: Registry) -> int:
    from .bench import Subject, bench, load_eval, plot
    from graphopt.emit import write_json_atomic
    from .modelspec import example_inputs, parse_shape
    ui = Ui(args.quiet, args.json)
    _check_timing(args)
    files = _artifact_files(args.artifacts, registry)
    for target in (args.plot, args.save):
        _check_report_path(target)
    if args.input_shape:
        inputs, reference = list(example_inputs([parse_shape(s) for s in args.input_shape])), None
        names = [f"input_{i}" for i in range(len(inputs))]
    else:
        case, _ = _reference_case(args)
        inputs, reference, names = list(case.inputs.values()), case.outputs, list(case.inputs)
    eval_data = load_eval(Path(args.eval), names) if args.eval else None
    subjects = []
    first = files[0][0]
    for path, emitter in files:
        try:
            runner = emitter.load(emitter.artifact_for(path), threads=args.threads)
            if reference is None:
                reference = runner(inputs)
        except Exception as exc:
            raise UsageError(f"{path} cannot run on these inputs: {first_line(exc)}") from exc
        subjects.append(Subject(path.name, emitter.format, runner, path, path.stat().st_size,
                                baseline=first.name if path != first else None))
    with ui.progress("benchmarking") as progress:
        rows = bench(subjects, inputs, reference=reference, threads=args.threads, runs=args.runs,
                     eval_data=eval_data, progress=progress)
    write_json_atomic(Path(args.save), [r.as_dict() for r in rows])
    plot(rows, Path(args.plot), "graphopt bench")
    if args.json:
        dump_json([r.as_dict() for r in rows])
    ui.print(bench_table(rows))
    ui.print(f"{args.save} and {args.plot} written")
    return EXIT_OK
