"""Round-robin timing repeated in fresh processes.

One process's timings carry that process's luck: what else it loaded and did, where the loader and
the allocator put code and buffers. The same MobileNetV3-style .onnx files (graphopt int8,
onnxruntime's int8, graphopt fp32) timed round-robin: in the process that built them (torch,
TensorFlow and ExecuTorch loaded, 14 subjects) graphopt int8 took 0.94x onnxruntime's int8 time and
1.00x graphopt fp32's; in eight fresh processes 0.83-0.86x and 0.85-0.95x, one process's times up
to 1.6x another's. So the subjects' files are timed round-robin (``graphopt.cli.bench.bench``) in
each of N fresh processes that load only them; a time is the median over the processes, a ratio the
median of the per-process ratios (pyperf spawns worker processes for the same reason).

    python bench/timing.py SPEC.json OUT.json      (a worker: what :func:`time_in_processes` runs)
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

EAGER = "eager"   # the subject that is the model itself, rebuilt in each worker


def time_in_processes(model: str, subjects: dict, inputs: list[torch.Tensor], *, runs: int, threads: int,
                      processes: int, folder: Path, engines: dict[str, str] | None = None) -> dict[str, dict]:
    """Time ``subjects`` (key -> ``Subject``; key ``eager``: ``model``, a zoo name, in eager mode; the others load
    from their files, a ptl subject under ``engines[key]``) round-robin in ``processes`` fresh processes: key ->
    the first process's row (errors vs eager) with ``median_ms``, ``p10_ms``, ``p90_ms`` the medians over the
    processes and ``process_medians`` each process's median."""
    torch.save(list(inputs), folder / "inputs.pt")
    spec = {"model": model, "inputs": str(folder / "inputs.pt"), "runs": runs, "threads": threads,
            "subjects": [{"key": k, "label": s.label, "format": s.format, "path": str(s.path) if s.path else None,
                          "bytes": s.bytes, "engine": (engines or {}).get(k)} for k, s in subjects.items()]}
    (folder / "spec.json").write_text(json.dumps(spec))
    per_process = []
    for i in range(processes):
        out = folder / f"rows_{i}.json"
        code = subprocess.run([sys.executable, __file__, str(folder / "spec.json"), str(out)]).returncode
        if code != 0 or not out.exists():
            raise RuntimeError(f"timing process {i + 1} of {processes} exited with {code}")
        per_process.append(json.loads(out.read_text()))
    rows = {}
    for key in subjects:
        runs_of = [p[key] for p in per_process]
        rows[key] = {**runs_of[0], **{k: statistics.median(r[k] for r in runs_of)
                                      for k in ("median_ms", "p10_ms", "p90_ms")},
                     "process_medians": [r["median_ms"] for r in runs_of]}
    return rows


def ratio(a: dict, b: dict) -> float:
    """``a``'s time over ``b``'s: the median of the per-process ratios when both carry them."""
    if a.get("process_medians") and len(a["process_medians"]) == len(b.get("process_medians") or []):
        return statistics.median(x / y for x, y in zip(a["process_medians"], b["process_medians"]))
    return a["median_ms"] / b["median_ms"]


def _worker(spec_path: str, out_path: str) -> None:
    import graphopt
    from graphopt.cli.bench import Subject, bench
    from graphopt.emit import Artifact
    from graphopt_plugins.ptl.int8 import quantized_engine
    from zoo import FAMILIES, ZOO

    spec = json.loads(Path(spec_path).read_text())
    registry, inputs = graphopt.load_plugins(), torch.load(spec["inputs"])
    model = {**ZOO, **FAMILIES}[spec["model"]][0]().eval()

    def eager(xs):
        with torch.no_grad():
            return [model(*xs)]

    def runner(s: dict):
        run = registry.emitters[s["format"]].load(Artifact(s["format"], Path(s["path"])), threads=spec["threads"])
        if not s["engine"]:
            return run

        def engined(xs):
            with quantized_engine(s["engine"]):
                return run(xs)
        return engined

    subjects = {s["key"]: Subject(s["label"], s["format"], eager if s["key"] == EAGER else runner(s),
                                  Path(s["path"]) if s["path"] else None, s["bytes"]) for s in spec["subjects"]}
    rows = bench(list(subjects.values()), inputs, reference=eager(inputs), threads=spec["threads"],
                 runs=spec["runs"])
    Path(out_path).write_text(json.dumps({k: r.as_dict() for k, r in zip(subjects, rows)}))


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
