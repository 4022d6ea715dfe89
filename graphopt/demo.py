"""``graphopt demo``: a digits CNN (trained in seconds, cached) through the default pipeline
and every available format, each verified and scored on held-out digits."""
from __future__ import annotations

from pathlib import Path

import torch

from .cli import EXIT_OK, EXIT_UNVERIFIED, dump_json
from .console import Ui, artifacts_table, passes_table
from .demo_model import accuracy, load_data, load_or_train
from .driver import check_out_dir, optimize
from .emit import write_json_atomic
from .metrics import Tolerance, compare
from .plugins import Registry


def _per_sample(fn, x: torch.Tensor) -> torch.Tensor:
    """Logits for every row of ``x``, one sample at a time (artifacts have a static batch of 1)."""
    return torch.cat([fn([x[i:i + 1]])[0] for i in range(len(x))])


def demo_formats(registry: Registry) -> str:
    """Every installed format, once per precision it offers (fp32 and fp16; int8 needs
    calibration and is not part of the demo)."""
    items = []
    for fmt, emitter in sorted(registry.emitters.items()):
        if emitter.missing():
            continue
        items.append(fmt)
        precision = emitter.option("precision")
        if precision is not None:
            items += [f"{fmt}(precision={p})" for p in precision.choices if p not in (precision.default, "int8")]
    return ",".join(items)


def run_demo(args, registry: Registry) -> int:
    ui = Ui(args.quiet, args.json)
    out = check_out_dir(Path(args.out))
    formats = demo_formats(registry)
    with ui.progress("training the digits CNN (cached after the first run)") as progress:
        model = load_or_train()
        _, _, x_test, y_test = load_data()
        result = optimize(model, (x_test[:1],), registry, pipeline=args.pipeline, formats=formats,
                          out_dir=out, model_spec="graphopt.demo_model:DigitsNet", name="digits_net",
                          progress=progress)
        progress("scoring every format on the held-out digits")
        with torch.no_grad():
            eager = model(x_test)
        rows = [{"format": "pytorch", "path": "(eager model)", "bytes": result.report["model"]["bytes"],
                 "max_abs_err": 0.0, "cosine": 1.0, "verified": True, "accuracy": accuracy(eager, y_test)},
                _row("fx graph", "(after pipeline)", result.graph.stats()["bytes"], eager,
                     _per_sample(result.graph.run, x_test), y_test, Tolerance(max_rel=1e-4))]
        for (emitter, options), check in zip(result.requests, result.artifacts):
            logits = _per_sample(emitter.load(check.artifact), x_test)
            label = emitter.format + ("" if options.get("precision", "fp32") == "fp32" else f" {options['precision']}")
            rows.append(_row(label, str(check.artifact.path), check.bytes, eager, logits, y_test,
                             emitter.tolerance_for(options), check.problems))
    report = dict(result.report, demo={"held_out": len(y_test), "formats": rows})
    if result.ok:
        write_json_atomic(out / "report.json", report)
    if args.json:
        dump_json(report)
    ui.print(passes_table(report["model"], result.pipeline.records))
    ui.print(artifacts_table(rows, extra="accuracy"))
    ui.print(f"max abs err and accuracy over {len(y_test)} held-out digits; "
             f"artifacts and report.json in {out}/")
    return EXIT_OK if result.ok and all(r["verified"] for r in rows) else EXIT_UNVERIFIED


def _row(fmt: str, path: str, nbytes: int, eager: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
         tolerance: Tolerance, problems: list[str] | None = None) -> dict:
    """One table row, verified again on all held-out digits under the format's tolerance."""
    m = compare([eager], [logits])
    problems = list(problems or []) + [f"held-out: {p}" for p in tolerance.violations(m)]
    return {"format": fmt, "path": path, "bytes": nbytes, "max_abs_err": m.max_abs, "cosine": m.cosine,
            "verified": not problems, "problems": problems, "accuracy": accuracy(logits, y)}
