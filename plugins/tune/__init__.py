"""``graphopt tune``: search pipelines for one format under a budget, report the Pareto front of measured latency,
size and quality, and ship the best point that meets the budget as verified artifacts with its pipeline text."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import graphopt
from graphopt import UsageError

from .budget import describe, parse_budget

DEFAULT_TRIALS = 20


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number >= 1, got {text!r}")
    return int(text)


@graphopt.hookimpl
def graphopt_add_commands(subparsers, parents: list) -> None:
    p = subparsers.add_parser("tune", parents=parents, help="search pipelines for a budget: the Pareto front of "
                              "latency, size and quality, and the best point's verified artifacts")
    p.add_argument("model", help="path/to/file.py:callable or package.module:callable returning an nn.Module")
    p.add_argument("--input-shape", action="append", required=True, metavar="1x3x224x224")
    p.add_argument("--format", required=True, help="the one format to search for (onnx, ptl, tflite, pte; options "
                                                   "as in --emit: 'onnx(opset=18)')")
    p.add_argument("--budget", help="limits the chosen point meets: latency=5ms,size=2MB,macs=300M")
    p.add_argument("--quality", type=float, metavar="MIN", help="the least quality to accept; then the fastest point "
                   "wins (default: the best quality within the budget)")
    p.add_argument("--max-drop", type=float, metavar="D", help="as --quality: the unoptimized file's quality less D "
                   "(0.01: within one point of its accuracy)")
    p.add_argument("--eval", metavar="FILE.py:FN", help="quality: fn(runner) -> score, higher is better (default: "
                   "agreement with the original model on held-out inputs: top-1, else cosine)")
    p.add_argument("--data", metavar="INPUTS.npz|FILE.py:FN", help="unlabeled inputs: the last --held-out score "
                   "quality, the rest calibrate and distill (default: seeded Gaussian inputs)")
    p.add_argument("--held-out", type=_positive, default=64, help="inputs held out for quality (default: 64)")
    p.add_argument("--train", metavar="FILE.py:FN", help="your training function: finetune calls it instead of "
                   "distilling")
    p.add_argument("--weights", help="state_dict file to load")
    p.add_argument("--trials", type=_positive, default=DEFAULT_TRIALS, help=f"finished trials the study should "
                   f"hold (a resumed study counts its own; default: {DEFAULT_TRIALS})")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop asking for trials after this long")
    p.add_argument("--out", default="out/tune", help="output folder (default: out/tune)")
    p.add_argument("--study", metavar="FILE.db", help="the SQLite study; resumed if it exists (default: OUT/tune.db)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and the inputs (default: 0)")
    p.add_argument("--executor", choices=("local", "ray"), default="local", help="where trials run (default: local)")
    p.add_argument("--address", help="--executor ray: the cluster to join (default: start a local one)")
    p.add_argument("--parallel", type=_positive, default=1, help="trials asked and run at once (default: 1)")
    p.add_argument("--runs", type=_positive, default=30, help="timed runs per trial, round-robin with the "
                   "unoptimized artifact (default: 30)")
    p.add_argument("--threads", type=_positive, default=1, help="intra-op threads when timing (default: 1)")
    p.add_argument("--name", help="the artifacts' base name (default: the callable's name)")
    p.add_argument("--leaf-module", action="append", default=[], metavar="QUALNAME")
    p.set_defaults(handler=cmd_tune)


def cmd_tune(args, registry) -> int:
    from graphopt.cli import EXIT_OK, dump_json
    from graphopt.cli.artifacts import check_report_path
    from graphopt.cli.console import Ui
    from graphopt.cli.modelspec import check_out_dir, parse_shape
    from graphopt.driver import select_emitters
    from graphopt.emit import write_atomic, write_json_atomic

    from . import output, study as studies
    from .space import build_space, default_points, suggest_pipeline
    from .trial import Config, data_keys, prepare, save_training_inputs

    ui = Ui(args.quiet, args.json)
    budget = parse_budget(args.budget)
    (emitter, _), *more = select_emitters(registry, args.format) or [(None, None)]
    if emitter is None or more:
        raise UsageError(f"--format takes one format, got {args.format!r}")
    out = check_out_dir(Path(args.out))
    study_path = check_report_path(args.study, "the study") if args.study else out / "tune.db"
    if args.executor == "local" and args.address:
        raise UsageError("--address needs --executor ray")
    if args.quality is not None and args.max_drop is not None:
        raise UsageError("give --quality or --max-drop, not both")
    config = Config(model=args.model, shapes=tuple(parse_shape(s) for s in args.input_shape), format=args.format,
                    weights=args.weights, seed=args.seed, plugins=tuple(args.plugin),
                    blocked=tuple(b[3:] for b in args.block), data=args.data, held_out=args.held_out, eval=args.eval,
                    train=args.train, runs=args.runs, threads=args.threads,
                    name=args.name or args.model.rsplit(":", 1)[-1], leaf_modules=tuple(args.leaf_module))
    fixed = {} if args.train else {"finetune": {"distill": True}}
    space = build_space(registry, emitter, data_keys(config), fixed)
    started = time.perf_counter()
    with ui.progress("building the unoptimized artifact") as say:
        baseline = prepare(config)
        floor = args.quality if args.max_drop is None else baseline["quality"] - args.max_drop
        out.mkdir(parents=True, exist_ok=True)
        study = studies.open_study(study_path, config, args.seed, max(4, args.trials // 4), budget,
                                   default_points(space))
        executor = studies.RayExecutor(args.address, args.parallel) if args.executor == "ray" \
            else studies.LocalExecutor(args.parallel)

        def on_trial(result: dict, count: int) -> None:
            say(f"trial {result['trial']}: {result['pipeline']} ({count}/{args.trials})")
            ui.note(f"  trial {result['trial']}: " + (f"failed: {result['error']}" if "error" in result else
                                             f"{result['latency_ms']:.3f} ms, {result['bytes'] / 1e6:.3f} MB, "
                                             f"quality {result['quality']:.4f}"))
        try:
            studies.search(study, config, lambda t: suggest_pipeline(t, space, registry), executor, args.trials,
                           args.timeout, on_trial)
        finally:
            executor.close()
        done = studies.points(study)
        front = studies.pareto_front(done)
        chosen = studies.choose(done, budget, floor)
        title = f"{config.name} in {emitter.format}: {len(done)} trials, budget {describe(budget)}"
        write_atomic(out / "front.md", output.markdown(front, chosen, baseline).encode())
        output.plot(done, front, chosen, budget, out / "front.png", title)
        report = {"model": config.model, "format": args.format, "budget": budget, "min_quality": floor,
                  "quality": "eval" if args.eval else "agreement", "baseline": baseline, "space": space.describe(),
                  "skipped": space.skipped, "study": str(study_path), "trials": done,
                  "front": [p["trial"] for p in front], "chosen": chosen["trial"] if chosen else None,
                  "pipeline": chosen["pipeline"] if chosen else None, "ok": chosen is not None}
        if chosen is not None:
            say(f"writing the chosen point's artifacts (trial {chosen['trial']})")
            from .ship import ship
            report["artifacts"] = ship(config, chosen["pipeline"], out)
            write_atomic(out / "pipeline.txt", (chosen["pipeline"] + "\n").encode())
            save_training_inputs(config, out / "train_inputs.npz")
            report["command"] = _command(args, out)
        report["seconds"] = round(time.perf_counter() - started, 1)
        write_json_atomic(out / "tune.json", report)
    if args.json:
        dump_json(report)
    ui.print(output.front_table(front, chosen, baseline, title))
    if chosen is None:
        best = min((p for p in done if p["state"] == "complete"), key=lambda p: p["bytes"], default=None)
        raise UsageError(f"no trial met the budget ({describe(budget)}"
                         f"{f', quality >= {floor:.4g}' if floor is not None else ''}); "
                         + (f"the smallest was {best['bytes'] / 1e6:.3f} MB, {best['latency_ms']:.3f} ms, quality "
                            f"{best['quality']:.4f} (trial {best['trial']}); " if best else "no trial completed; ")
                         + f"the front is in {out}/front.md and the study in {study_path}")
    ui.print(f"chosen: trial {chosen['trial']}, {chosen['pipeline']}; artifacts, pipeline.txt, front.md, front.png "
             f"and tune.json in {out}/; the same files again: {report['command']}")
    return EXIT_OK


def _command(args, out: Path) -> str:
    """The graphopt run command that builds the chosen point's artifacts again, byte for byte."""
    import shlex

    data = shlex.quote(str(out / "train_inputs.npz"))
    parts = ["graphopt", "run", shlex.quote(args.model), *[f"--input-shape {s}" for s in args.input_shape],
             f"--pipeline \"$(cat {shlex.quote(str(out / 'pipeline.txt'))})\"", f"--calib {data}",
             *([f"--example {data}"] if args.data else []),
             f"--train-data {data}" if not args.train else f"--train {shlex.quote(args.train)}",
             f"--emit {shlex.quote(args.format)}", "--out OUT"]
    parts += [f"--weights {shlex.quote(args.weights)}"] if args.weights else []
    parts += [f"--plugin {shlex.quote(p)}" for p in args.plugin] + [f"-p {b}" for b in args.block]
    parts += [f"--leaf-module {m}" for m in args.leaf_module] + ([f"--name {args.name}"] if args.name else [])
    return " ".join(parts)
