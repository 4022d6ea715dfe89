"""``graphopt demo``: a digits CNN (trained in seconds, cached) pruned to half its channels,
fine-tuned, folded, fused and quantized to int8 (calibrated on training digits), then taken
to every available format, each verified and scored on held-out digits."""
from __future__ import annotations

from pathlib import Path

import torch

from graphopt.cli import EXIT_OK, EXIT_UNVERIFIED, dump_json
from graphopt.driver import optimize
from graphopt.emit import write_json_atomic
from graphopt.metrics import Tolerance, compare
from graphopt.plugins import Registry

from .console import Ui, artifacts_table, passes_table
from .demo_model import accuracy, finetune, load_data, load_or_train
from .modelspec import check_out_dir

DEMO_PIPELINE = "cleanup,prune(ratio=0.5),finetune(epochs=8),fold-bn,fuse,quantize(prefer=size)"


def _per_sample(fn, x: torch.Tensor) -> torch.Tensor:
    """Logits for every row of ``x``, one sample at a time (artifacts have a static batch of 1)."""
    return torch.cat([fn([x[i:i + 1]])[0] for i in range(len(x))])


def demo_formats(registry: Registry, quantized: bool) -> str:
    """Every installed format: once for a quantized graph (its artifacts are int8), else
    once per float precision it offers (fp32, fp16)."""
    items = []
    for fmt, emitter in sorted(registry.emitters.items()):
        if emitter.missing():
            continue
        items.append(fmt)
        if quantized:
            continue
        precision = emitter.option("precision")
        if precision is not None:
            items += [f"{fmt}(precision={p})" for p in precision.choices if p not in (precision.default, "int8")]
    return ",".join(items)


def run_demo(args, registry: Registry) -> int:
    ui = Ui(args.quiet, args.json)
    out = check_out_dir(Path(args.out))
    pipeline = DEMO_PIPELINE if args.pipeline is None else args.pipeline
    formats = demo_formats(registry, "quantize" in pipeline)
    with ui.progress("training the digits CNN (cached after the first run)") as progress:
        model = load_or_train()
        x_train, _, x_test, y_test = load_data()
        result = optimize(model, (x_test[:1],), registry, pipeline=pipeline, formats=formats,
                          out_dir=out, model_spec="graphopt.cli.demo_model:DigitsNet", name="digits_net",
                          data={"train": finetune, "calibration": list(x_train[:512].split(64))},
                          progress=progress)
        progress("scoring every format on the held-out digits")
        with torch.no_grad():
            eager = model(x_test)
        # every format must reproduce the graph the pipeline made (pruned and fine-tuned:
        # a different function from the eager model, which is shown for its accuracy)
        graph = _per_sample(result.graph.run, x_test)
        rows = [{"format": "pytorch", "path": "(eager model, before the pipeline)",
                 "bytes": result.report["model"]["bytes"], "max_abs_err": None, "cosine": None,
                 "verified": True, "accuracy": accuracy(eager, y_test)},
                _row("fx graph", "(after the pipeline)", result.graph.stats()["bytes"], graph, graph, y_test, Tolerance())]
        for (emitter, options), check in zip(result.requests, result.artifacts):
            logits = _per_sample(emitter.load(check.artifact), x_test)
            precision = check.artifact.meta.get("precision", options.get("precision", "fp32"))
            label = emitter.format + ("" if precision == "fp32" else f" {precision}")
            rows.append(_row(label, str(check.artifact.path), check.bytes, graph, logits, y_test,
                             emitter.tolerance_for({**options, "precision": precision}), check.problems))
    report = dict(result.report, demo={"held_out": len(y_test), "formats": rows})
    if result.ok:
        write_json_atomic(out / "report.json", report)
    if args.json:
        dump_json(report)
    ui.print(passes_table(report["model"], result.pipeline.records))
    ui.print(artifacts_table(rows, extra="accuracy"))
    ui.print(f"errors against the fx graph after the pipeline, and accuracy, over {len(y_test)} held-out "
             f"digits; artifacts and report.json in {out}/")
    return EXIT_OK if result.ok and all(r["verified"] for r in rows) else EXIT_UNVERIFIED


def _row(fmt: str, path: str, nbytes: int, reference: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
         tolerance: Tolerance, problems: list[str] | None = None) -> dict:
    """One table row, verified again on all held-out digits under the format's tolerance."""
    m = compare([reference], [logits])
    problems = list(problems or []) + [f"held-out: {p}" for p in tolerance.violations(m)]
    return {"format": fmt, "path": path, "bytes": nbytes, "max_abs_err": m.max_abs, "cosine": m.cosine,
            "verified": not problems, "problems": problems, "accuracy": accuracy(logits, y)}
