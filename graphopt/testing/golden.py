"""Golden references: per model, example inputs and reference outputs (npz) plus a manifest
with per-format tolerances. ``graphopt golden record|check`` and the pytest plugin use it.

``golden/manifest.json``::

    {"version": 1, "root": "..",
     "models": {"tiny_resnet": {"model": "tests/zoo/cnn.py:tiny_resnet", "seed": 0,
                                "inputs": {"x": [1, 3, 32, 32]}, "pipeline": "cleanup,fold-bn",
                                "tolerances": {"graph": {"max_rel": 1e-5},
                                               "onnx": {"max_rel": 1e-4}}}}}

``root`` (relative to the manifest) is where model paths start; a case's file is
``<name>.npz`` beside the manifest, holding ``input.<name>`` and ``output.<i>`` arrays.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from graphopt.emit import install
from graphopt.errors import UsageError
from graphopt.metrics import Metrics, Tolerance, compare

MANIFEST = "manifest.json"
GRAPH = "graph"   # the tolerance key for the optimized fx graph itself
_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass
class GoldenCase:
    """Stored inputs (by name, in order) and reference outputs of one model."""

    inputs: dict[str, torch.Tensor]
    outputs: list[torch.Tensor]

    def save(self, path: Path) -> None:
        """Write a byte-reproducible npz atomically."""
        arrays = {f"input.{k}": v for k, v in self.inputs.items()}
        arrays.update({f"output.{i}": t for i, t in enumerate(self.outputs)})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zf:
                for key, tensor in arrays.items():
                    buf = io.BytesIO()
                    np.lib.format.write_array(buf, tensor.detach().cpu().numpy(), allow_pickle=False)
                    info = zipfile.ZipInfo(f"{key}.npy", date_time=_EPOCH)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(info, buf.getvalue())
            install(Path(tmp), path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: Path) -> "GoldenCase":
        if not Path(path).is_file():
            raise UsageError(f"no golden file {path}; record it with `graphopt golden record` "
                             f"or pytest --update-golden")
        with np.load(path, allow_pickle=False) as data:
            inputs = {k[len("input."):]: torch.from_numpy(data[k].copy()) for k in data.files
                      if k.startswith("input.")}
            outs = sorted((int(k[len("output."):]), k) for k in data.files if k.startswith("output."))
            outputs = [torch.from_numpy(data[k].copy()) for _, k in outs]
        return cls(inputs, outputs)


@dataclass
class GoldenEntry:
    name: str
    model: str
    inputs: dict[str, list[int]]
    seed: int = 0
    pipeline: str | None = None
    weights: str | None = None
    tolerances: dict[str, Tolerance] = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {"model": self.model, "seed": self.seed, "inputs": self.inputs, "pipeline": self.pipeline,
             "weights": self.weights, "tolerances": {k: t.as_dict() for k, t in self.tolerances.items()}}
        return {k: v for k, v in d.items() if v is not None}


@dataclass
class Manifest:
    path: Path
    root: str = ".."
    entries: dict[str, GoldenEntry] = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return (self.path.parent / self.root).resolve()

    def case_path(self, name: str) -> Path:
        return self.path.parent / f"{name}.npz"

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        path = Path(path)
        if path.suffix != ".json":                 # a golden folder, made on the first save
            if path.exists() and not path.is_dir():
                raise UsageError(f"golden folder {path} exists and is not a folder; choose another --dir")
            path = path / MANIFEST
        if not path.is_file():
            return cls(path)
        try:
            raw = json.loads(path.read_text())
            entries = {}
            for name, e in raw.get("models", {}).items():
                tol = {k: Tolerance.from_dict(v) for k, v in e.get("tolerances", {}).items()}
                entries[name] = GoldenEntry(name, e["model"], {k: list(v) for k, v in e["inputs"].items()},
                                            int(e.get("seed", 0)), e.get("pipeline"), e.get("weights"), tol)
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"golden manifest {path} is invalid: {exc}") from exc
        return cls(path, raw.get("root", ".."), entries)

    def save(self) -> None:
        from graphopt.emit import write_json_atomic
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"version": 1, "root": self.root, "models": {
            n: e.as_dict() for n, e in sorted(self.entries.items())}})

    def entry(self, name: str) -> GoldenEntry:
        if name not in self.entries:
            raise UsageError(f"no golden model {name!r} in {self.path}; known: "
                             f"{', '.join(sorted(self.entries)) or 'none'}")
        return self.entries[name]


def build_model(manifest: Manifest, entry: GoldenEntry) -> torch.nn.Module:
    from graphopt.cli.modelspec import load_model
    where, _, attr = entry.model.rpartition(":")
    spec = f"{manifest.base / where}:{attr}" if where.endswith(".py") else entry.model
    weights = str(manifest.base / entry.weights) if entry.weights else None
    torch.manual_seed(entry.seed)
    return load_model(spec, weights).eval()


def record(manifest: Manifest, entry: GoldenEntry) -> GoldenCase:
    """Run the entry's model eagerly on seeded inputs and store inputs and outputs."""
    from graphopt.cli.modelspec import example_inputs
    from graphopt.graph import flatten_outputs
    model = build_model(manifest, entry)
    inputs = example_inputs([tuple(s) for s in entry.inputs.values()], entry.seed)
    with torch.no_grad():
        outputs = flatten_outputs(model(*inputs))
    case = GoldenCase(dict(zip(entry.inputs, inputs)), outputs)
    case.save(manifest.case_path(entry.name))
    return case


@dataclass
class CheckRow:
    model: str
    format: str
    ok: bool
    metrics: Metrics | None
    problems: list[str]


def check(manifest: Manifest, entry: GoldenEntry, registry, *,
          progress: Callable[[str], None] | None = None) -> list[CheckRow]:
    """Optimize the entry's model, emit each format it has a tolerance for, and compare the
    graph and every artifact with the stored outputs."""
    from graphopt.capture import capture
    from graphopt.driver import emit_one, select_emitters
    from graphopt.emit import staging_dir
    from graphopt.passmanager import run_pipeline
    case = GoldenCase.load(manifest.case_path(entry.name))
    inputs = list(case.inputs.values())
    graph = capture(build_model(manifest, entry), inputs, name=entry.name)
    text = entry.pipeline if entry.pipeline is not None else registry.default_pipeline()
    if text:
        graph = run_pipeline(graph, text, registry).graph
    graph.meta["pipeline"] = text
    rows = [_row(entry.name, GRAPH, case.outputs, graph.run(inputs),
                 entry.tolerances.get(GRAPH, Tolerance(max_rel=1e-5)))]
    formats = [f for f in entry.tolerances if f != GRAPH]
    with tempfile.TemporaryDirectory() as tmp:
        with staging_dir(Path(tmp)) as stage:
            for key in formats:
                ((emitter, options),) = select_emitters(registry, key)
                if progress:
                    progress(f"{entry.name}: {key}")
                artifact = emit_one(graph, emitter, options, stage, registry)
                outputs = emitter.load(artifact)(inputs)
                rows.append(_row(entry.name, key, case.outputs, outputs,
                                 artifact_tolerance(entry.tolerances, emitter, artifact)))
    return rows


def artifact_tolerance(tolerances: dict[str, Tolerance], emitter, artifact) -> Tolerance:
    """The one rule for an artifact checked against a golden case (``golden check``, ``verify
    --golden`` and ``--reference``, the pytest fixture): the manifest's tolerance for the
    artifact's format at the precision its file records (key ``onnx``: fp32;
    ``tflite(precision=fp16)``: fp16), else the emitter's tolerance for that precision."""
    from graphopt.pipeline import parse_pipeline
    precision = artifact.meta.get("precision") or emitter.artifact_for(artifact.path).meta.get("precision", "fp32")
    for key, tolerance in tolerances.items():
        item = parse_pipeline(key).items[0] if key != GRAPH else None
        if item is not None and item.name == emitter.format and dict(item.options).get("precision", "fp32") == precision:
            return tolerance
    return emitter.tolerance_for({"precision": precision})


def _row(name: str, fmt: str, reference: Sequence[torch.Tensor], actual: Sequence[torch.Tensor],
         tolerance: Tolerance) -> CheckRow:
    try:
        metrics = compare(reference, actual)
    except ValueError as exc:
        return CheckRow(name, fmt, False, None, [str(exc)])
    problems = tolerance.violations(metrics)
    return CheckRow(name, fmt, not problems, metrics, problems)
