"""The emitter contract: ``emit(graph, options, out_dir) -> Artifact`` and
``load(artifact) -> runner``. A runner takes and returns torch-layout tensors, so one
verification path serves every format.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from .metrics import Tolerance
from .passes import Option

if TYPE_CHECKING:
    from .graph import Graph

Runner = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


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
    """A registered output format."""

    format: str                                   # "onnx", "tflite", "ptl", ...
    description: str
    suffix: str                                   # ".onnx"
    emit: Callable[["Graph", dict, Path], Artifact]
    load: Callable[[Artifact], Runner]
    options: tuple[Option, ...] = ()
    modules: tuple[str, ...] = ()                 # Python modules it needs at run time
    tolerance: Tolerance = Tolerance(max_rel=1e-4, min_cosine=0.9999)

    def missing(self) -> list[str]:
        """Required modules that are not installed (empty when the emitter can run)."""
        return [m for m in self.modules if importlib.util.find_spec(m) is None]

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def problems(self) -> list[str]:
        """Why this definition is invalid (empty when it is fine)."""
        out = []
        if not self.suffix.startswith("."):
            out.append(f"emitter {self.format!r}: suffix {self.suffix!r} must start with a dot")
        if not (callable(self.emit) and callable(self.load)):
            out.append(f"emitter {self.format!r}: emit and load must be callable")
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            out.append(f"emitter {self.format!r} declares an option twice")
        return out

    def artifact_for(self, path: Path) -> Artifact:
        """An Artifact for an existing file of this format (for verify/bench)."""
        return Artifact(self.format, Path(path), {})


def graphopt_version() -> str:
    from . import __version__
    return __version__


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A scratch folder inside ``out_dir`` (same file system, so moves are atomic), removed
    on exit whatever happens."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".graphopt-", dir=out_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def install(staged: Path, target: Path) -> None:
    """Move a finished file into place atomically (``os.replace``), with the permissions an
    ordinary ``open(..., "w")`` would have given it (temp files start as 0600)."""
    os.chmod(staged, 0o666 & ~_umask())
    os.replace(staged, target)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
        install(Path(tmp), path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
