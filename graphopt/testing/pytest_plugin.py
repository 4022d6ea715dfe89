"""pytest plugin (entry point ``pytest11``): the ``golden`` fixture and ``--update-golden``.

    def test_my_model_onnx(golden, tmp_path):
        golden.check("my_model", my_model)                 # eager model vs stored outputs
        golden.check("my_model", artifact)                 # an emitted artifact, in its runtime

Golden files live in the ini option ``graphopt_golden_dir`` (default ``golden``); a missing
one fails the test until it is recorded with ``pytest --update-golden``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("graphopt")
    group.addoption("--update-golden", action="store_true", default=False,
                    help="re-record graphopt golden outputs instead of comparing with them")
    parser.addini("graphopt_golden_dir", "folder of graphopt golden files, relative to rootdir",
                  default="golden")


class GoldenStore:
    """Compare outputs with, or (``--update-golden``) record, ``<dir>/<name>.npz``."""

    def __init__(self, directory: Path, update: bool):
        self.directory = Path(directory)
        self.update = update

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.npz"

    def inputs(self, name: str) -> list:
        """The stored example inputs of ``name``."""
        from graphopt.testing.golden import GoldenCase
        return list(GoldenCase.load(self.path(name)).inputs.values())

    def _tolerance(self, name: str, subject: Any):
        from graphopt.emit import Artifact
        from graphopt.testing.golden import GRAPH, Manifest
        from graphopt.testing import default_tolerance
        entry = Manifest.load(self.directory).entries.get(name)
        key = subject.format if isinstance(subject, Artifact) else GRAPH
        if entry is not None and key in entry.tolerances:
            return entry.tolerances[key]
        return default_tolerance(subject)

    def check(self, name: str, subject: Any, inputs: Sequence | None = None, *, tolerance=None):
        """Assert that ``subject`` (module, Graph, Artifact or callable) reproduces the golden
        outputs of ``name`` on its stored inputs; returns the Metrics. With --update-golden,
        records ``subject``'s outputs instead (``inputs`` needed the first time; a
        recorded case is always checked on its stored inputs)."""
        from graphopt.testing.golden import GoldenCase
        from graphopt.testing import assert_close, outputs_of
        path = self.path(name)
        if self.update or not path.is_file():
            if not self.update:
                pytest.fail(f"no golden outputs for {name!r} at {path}; run pytest --update-golden "
                            f"to record them", pytrace=False)
            if inputs is None:
                if not path.is_file():
                    pytest.fail(f"recording {name!r} needs inputs: golden.check(name, subject, inputs)",
                                pytrace=False)
                inputs = self.inputs(name)
            names = [f"input_{i}" for i in range(len(inputs))]
            case = GoldenCase(dict(zip(names, inputs)), outputs_of(subject, inputs))
            case.save(path)
            return None
        case = GoldenCase.load(path)
        stored = list(case.inputs.values())
        actual = outputs_of(subject, stored)
        return assert_close(case.outputs, actual, tolerance or self._tolerance(name, subject),
                            what=f"outputs of {name!r}")


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> GoldenStore:
    """Golden-output checks for graphopt graphs and artifacts (see ``GoldenStore.check``)."""
    config = request.config
    directory = Path(config.rootpath) / config.getini("graphopt_golden_dir")
    return GoldenStore(directory, config.getoption("update_golden"))
