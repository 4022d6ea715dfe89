"""The emitter contract: ``emit(graph, options, out_dir) -> Artifact`` and ``load(artifact, threads=None) ->
runner``; a runner takes and returns torch-layout tensors, so one verification path serves every format. Helpers:
``provenance``, ``as_inputs``, ``to_channels_last``/``to_channels_first``, ``write_atomic``, ``captured_output``."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from . import __version__
from .errors import EmitError
from .metrics import Tolerance
from .passes import Effect, Option, Pass

if TYPE_CHECKING:
    from .graph import Graph

Runner = Callable[[torch.Tensor | Sequence[torch.Tensor]], list[torch.Tensor]]   # see as_inputs


@dataclass
class Artifact:
    """A file an emitter wrote, and facts about it (opset, layouts, ...) for the report."""

    format: str
    path: Path
    meta: dict = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size


@dataclass(frozen=True)
class Emitter:
    """A registered output format. ``load(artifact, threads=None)`` returns the runner (``threads``: intra-op threads,
    None: the runtime's default). ``prepare`` is pipeline text the driver runs, verified, on a copy of the graph only
    this emitter sees (rewrites the format needs). ``precision(path)``: an artifact's precision (fp32, fp16, int8)."""

    format: str                                   # "onnx", "tflite", "ptl", ...
    description: str
    suffix: str                                   # ".onnx"
    emit: Callable[["Graph", dict, Path], Artifact]
    load: Callable[..., Runner]
    options: tuple[Option, ...] = ()
    modules: tuple[str, ...] = ()                 # Python modules it needs at run time
    tolerance: Tolerance = Tolerance(max_rel=1e-4, min_cosine=0.9999)
    prepare: str = ""
    precision: Callable[[Path], str] | None = None
    takes: tuple[str, ...] = ("fp32", "fp16", "int8")   # the graph precisions it emits (checked before a run)
    option = Pass.option                          # the Option named so, or None

    def tolerance_for(self, options: dict) -> Tolerance:
        """The emitter's tolerance, or for an fp16/int8 ``precision`` option that of a pass of that effect."""
        precision = options.get("precision", "fp32")
        return self.tolerance if precision == "fp32" else Effect(precision).tolerance

    def missing(self) -> list[str]:
        """Required modules that are not installed (empty when the emitter can run)."""
        return [m for m in self.modules if importlib.util.find_spec(m) is None]

    def problems(self) -> list[str]:
        """Why this definition is invalid (empty when it is fine)."""
        return [f"emitter {self.format!r}{why}" for bad, why in [
            (not self.suffix.startswith("."), f": suffix {self.suffix!r} must start with a dot"),
            (not (callable(self.emit) and callable(self.load)), ": emit and load must be callable"),
            (len({o.name for o in self.options}) != len(self.options), " declares an option twice")] if bad]

    def artifact_for(self, path: Path) -> Artifact:
        """An Artifact for an existing file of this format (verify, bench), with its recorded precision if readable."""
        path = Path(path)
        return Artifact(self.format, path, {"precision": self.precision(path)} if self.precision else {})


def provenance(graph: "Graph", **facts: Any) -> dict:
    """What an emitter records in its file, under its format's own keys: graphopt's version, the
    pipeline text, the input specs and ``graph.precision``; ``facts`` add to or replace them."""
    return {"version": __version__, "pipeline": str(graph.meta.get("pipeline", "")),
            "inputs": graph.input_specs(), "precision": graph.precision, **facts}


def as_inputs(inputs: torch.Tensor | Sequence[torch.Tensor], count: int | None, name: str) -> list[torch.Tensor]:
    """A runner's ``inputs`` as a list (a bare tensor is one input), checked to be ``count``
    (None: any number); else an EmitError saying what ``name`` (the file) takes."""
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if count is not None and len(inputs) != count:
        raise EmitError(f"{name} takes {count} inputs, got {len(inputs)}")
    return inputs


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """NCHW -> NHWC (NCL -> NLC, NCDHW -> NDHWC): torch's layout as channels-last runtimes take it."""
    return t.permute(0, *range(2, t.dim()), 1)


def to_channels_first(t: torch.Tensor) -> torch.Tensor:
    """NHWC -> NCHW (NLC -> NCL, NDHWC -> NCDHW): a channels-last runtime's tensor in torch's layout."""
    return t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A scratch folder inside ``out_dir`` (same file system, so moves are atomic), removed on exit whatever happens."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".graphopt-", dir=out_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _flush() -> None:
    for stream in {sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__} - {None}:
        stream.flush()


@contextlib.contextmanager
def captured_output() -> Iterator[SimpleNamespace]:
    """Keep converters' prints, warnings and logs (C++ and child processes' too) off the console: fds 1 and 2 and
    Python's streams go to a temporary file inside the block, its text ``.text`` after; warnings are ignored."""
    _flush()
    captured, saved = SimpleNamespace(text=""), [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as log, \
            open(log.fileno(), "w", buffering=1, errors="replace", closefd=False) as stream:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                warnings.simplefilter("ignore")
                for fd in (1, 2):
                    os.dup2(log.fileno(), fd)
                yield captured
        finally:
            _flush()
            stream.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            log.seek(0)
            captured.text = log.read().decode(errors="replace")


def install(staged: Path, target: Path) -> None:
    """Move a finished file into place atomically (``os.replace``), with the permissions an
    ordinary ``open(..., "w")`` would have given it (temp files start as 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staged, 0o666 & ~umask)
    os.replace(staged, target)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        install(Path(tmp), path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON with ``write_atomic``."""
    write_atomic(path, (json.dumps(data, indent=2, default=str) + "\n").encode())
