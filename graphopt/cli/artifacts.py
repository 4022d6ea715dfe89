"""``graphopt verify``, ``golden`` and ``bench``: artifacts checked and timed in their runtimes."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from graphopt.cli import EXIT_OK, EXIT_UNVERIFIED, dump_json
from graphopt.emit import Emitter
from graphopt.errors import GraphoptError, UsageError, first_line
from graphopt.plugins import Registry

from .console import Ui, artifacts_table, bench_table


def check_report_path(path: str | None, what: str = "the report") -> Path | None:
    """``path`` as a file to write ``what`` to in an existing folder (None stays None), else a UsageError."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"cannot write {what} to {path}: it is a directory; give a file name")
    if not p.parent.is_dir():
        raise UsageError(f"cannot write {what} to {path}: directory {p.parent} does not exist")
    return p


def _why(exc: BaseException) -> str:
    """graphopt's own message whole (a runner's error keeps the runtime's sentence: onnxruntime's
    shape errors span lines), anything else's first line."""
    return " ".join(str(exc).split()) if isinstance(exc, GraphoptError) else first_line(exc)


def _labels(paths: list[Path]) -> list[str]:
    """Each file's name, with as many parent folders as tell files of one name apart."""
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) < len(resolved):
        twice = next(p for p, r in zip(paths, resolved) if resolved.count(r) > 1)
        raise UsageError(f"artifact {twice} is given twice")
    depth = 1
    while True:
        labels = ["/".join(r.parts[-depth:]) for r in resolved]
        if len(set(labels)) == len(labels):
            return labels
        depth += 1


def cmd_verify(args, registry: Registry) -> int:
    from graphopt.metrics import compare
    from graphopt.testing import outputs_of
    from graphopt.testing.golden import artifact_tolerance
    case, tolerances = _reference_case(args)
    rows = []
    for path, emitter in _artifact_files(args.artifacts, registry):
        try:
            artifact = emitter.artifact_for(path)
            outputs = outputs_of(artifact, list(case.inputs.values()))
            metrics = compare(case.outputs, outputs)
        except Exception as exc:
            raise UsageError(f"{path} cannot be checked against this reference: {_why(exc)}") from exc
        problems = artifact_tolerance(tolerances, emitter, artifact).violations(metrics)
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
    ``--reference CASE.npz`` (no manifest: each emitter's tolerance for the file's precision)."""
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
    from graphopt.metrics import Tolerance
    from graphopt.pipeline import parse_pipeline
    from graphopt.testing.golden import GRAPH, GoldenEntry, Manifest, check, record

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


def check_timing(args) -> None:
    if args.threads < 1 or args.runs < 1:
        raise UsageError("--threads and --runs take a positive number")
    if args.eval and not Path(args.eval).is_file():
        raise UsageError(f"eval data {args.eval} does not exist")


def bench_run(args, result, model, registry: Registry, ui: Ui) -> list:
    import tempfile

    from graphopt.emit import write_json_atomic

    from .bench import bench, load_eval, plot, run_subjects
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
    from graphopt.emit import write_json_atomic

    from .bench import Subject, bench, load_eval, plot
    from .modelspec import example_inputs, parse_shape
    ui = Ui(args.quiet, args.json)
    check_timing(args)
    files = _artifact_files(args.artifacts, registry)
    check_report_path(args.plot, "the plot")
    check_report_path(args.save, "the results")
    if args.input_shape:
        inputs, reference = list(example_inputs([parse_shape(s) for s in args.input_shape])), None
        names = [f"input_{i}" for i in range(len(inputs))]
    else:
        case, _ = _reference_case(args)
        inputs, reference, names = list(case.inputs.values()), case.outputs, list(case.inputs)
    eval_data = load_eval(Path(args.eval), names) if args.eval else None
    subjects = []
    labels = _labels([path for path, _ in files])
    for (path, emitter), label in zip(files, labels):
        try:
            runner = emitter.load(emitter.artifact_for(path), threads=args.threads)
            if reference is None:
                reference = runner(inputs)
        except Exception as exc:
            raise UsageError(f"{path} cannot run on these inputs: {_why(exc)}") from exc
        subjects.append(Subject(label, emitter.format, runner, path, path.stat().st_size,
                                baseline=labels[0] if label != labels[0] else None))
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
