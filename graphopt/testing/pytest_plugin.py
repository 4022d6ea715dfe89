"""pytest plugin (entry point ``pytest11``): the ``golden`` fixture and ``--update-golden``.

    def test_my_model_onnx(golden, tmp_path):
        golden.check("my_model", my_model, inputs)         # eager model vs stored outputs
        golden.check("my_model", artifact)                 # an emitted artifact, in its runtime
        golden.check("my_model", artifact, reference=my_model)   # recorded from my_model if updating

Golden files live in the ini option ``graphopt_golden_dir`` (default ``golden``); a missing
one fails the test until it is recorded with ``pytest --update-golden``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pytest
import torch

_RECORDED = pytest.StashKey[set]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("graphopt")
    group.addoption("--update-golden", action="store_true", default=False,
                    help="re-record graphopt golden outputs instead of comparing with them")
    parser.addini("graphopt_golden_dir", "folder of graphopt golden files, relative to rootdir",
                  default="golden")


class GoldenStore:
    """Compare outputs with, or (``--update-golden``) record, ``<dir>/<name>.npz``. Goldens hold
    the reference model's outputs: under --update-golden a plain module (or callable) is
    recorded, once per session and name; a captured Graph, GraphModule or Artifact is only
    checked, unless the test names its reference (``reference=``) or says ``record=True``."""

    def __init__(self, directory: Path, update: bool, recorded: set, test: str = ""):
        self.directory = Path(directory)
        self.update = update
        self.recorded = recorded          # names recorded in this session
        self.test = test

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.npz"

    def inputs(self, name: str) -> list:
        """The stored example inputs of ``name``."""
        from graphopt.testing.golden import GoldenCase
        return list(GoldenCase.load(self.path(name)).inputs.values())

    def _tolerance(self, name: str, subject: Any):
        from graphopt.emit import Artifact
        from graphopt.testing import _registry_once, default_tolerance
        from graphopt.testing.golden import GRAPH, Manifest, artifact_tolerance
        entry = Manifest.load(self.directory).entries.get(name)
        tolerances = entry.tolerances if entry is not None else {}
        if isinstance(subject, Artifact):
            return artifact_tolerance(tolerances, _registry_once().emitters[subject.format], subject)
        return tolerances.get(GRAPH) or default_tolerance(subject)

    def _record(self, name: str, source: Any, inputs: Sequence | None) -> None:
        from graphopt.testing import outputs_of
        from graphopt.testing.golden import GoldenCase
        path = self.path(name)
        if inputs is None:
            if not path.is_file():
                pytest.fail(f"recording {name!r} needs inputs: golden.check(name, subject, inputs)", pytrace=False)
            inputs = self.inputs(name)
        names = [f"input_{i}" for i in range(len(inputs))]
        GoldenCase(dict(zip(names, inputs)), outputs_of(source, inputs)).save(path)
        self.recorded.add(name)

    def _check_inputs(self, name: str, stored: list, inputs: Sequence | None) -> None:
        __tracebackhide__ = True
        if inputs is None:
            return
        given = list(inputs)
        same = len(given) == len(stored) and all(
            g.shape == s.shape and torch.equal(g, s) for g, s in zip(given, stored))
        if not same:
            pytest.fail(f"inputs given to golden.check({name!r}) differ from the recorded ones (given {_shapes(given)}, "
                        f"recorded {_shapes(stored)}); if the change is intended, re-record: {self._update_hint()}",
                        pytrace=False)

    def _update_hint(self) -> str:
        return f"pytest --update-golden {self.test}".rstrip()

    def check(self, name: str, subject: Any, inputs: Sequence | None = None, *, tolerance=None,
              reference: Any = None, record: bool = False):
        """Assert that ``subject`` (module, Graph, Artifact or callable) reproduces the golden
        outputs of ``name`` on its stored inputs; returns the Metrics. ``inputs``, when given,
        must be the recorded ones. With --update-golden the reference is recorded first (on
        ``inputs``, needed the first time): ``reference`` if given, else ``subject`` when it is
        a plain model, or any subject with ``record=True``."""
        __tracebackhide__ = True
        import torch.fx as fx

        from graphopt.emit import Artifact
        from graphopt.graph import Graph
        from graphopt.testing import assert_close, outputs_of
        from graphopt.testing.golden import GoldenCase
        path = self.path(name)
        optimized = isinstance(subject, (Graph, fx.GraphModule, Artifact))
        source = reference if reference is not None else (subject if record or not optimized else None)
        if self.update and source is not None and name not in self.recorded:
            self._record(name, source, inputs)
        elif self.update and source is None and not path.is_file():
            pytest.fail(f"golden.check({name!r}, {type(subject).__name__}) does not record: goldens hold the "
                        f"reference model's outputs; pass reference=MODEL, check the model first, or pass "
                        f"record=True to record this {type(subject).__name__} on purpose", pytrace=False)
        if not path.is_file():
            pytest.fail(f"no golden outputs for {name!r} at {path}; run pytest --update-golden "
                        f"to record them", pytrace=False)
        case = GoldenCase.load(path)
        stored = list(case.inputs.values())
        self._check_inputs(name, stored, inputs)
        return assert_close(case.outputs, outputs_of(subject, stored), tolerance or self._tolerance(name, subject),
                            what=f"outputs of {name!r}", hint=f"if the change is intended, re-record: "
                                                              f"{self._update_hint()}")


def _shapes(tensors: Sequence) -> str:
    return ", ".join("x".join(map(str, t.shape)) for t in tensors)


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> GoldenStore:
    """Golden-output checks for graphopt graphs and artifacts (see ``GoldenStore.check``)."""
    config = request.config
    directory = Path(config.rootpath) / config.getini("graphopt_golden_dir")
    return GoldenStore(directory, config.getoption("update_golden"), config.stash.setdefault(_RECORDED, set()),
                       request.node.nodeid)
