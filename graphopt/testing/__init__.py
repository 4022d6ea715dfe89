"""Assertions for a user's own test suite: outputs of a model, graph or artifact must match
a reference under a tolerance. The pytest plugin's ``golden`` fixture builds on these."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from graphopt.emit import Artifact
from graphopt.graph import Graph, flatten_outputs
from graphopt.metrics import Metrics, Tolerance, compare

_registry = None


def _registry_once():
    global _registry
    if _registry is None:
        from graphopt.plugins import load_plugins
        _registry = load_plugins()
    return _registry


def default_tolerance(subject: Any) -> Tolerance:
    """fp32 exactness for modules and graphs; the emitter's tolerance for an artifact's
    precision (its meta's, else the one recorded in its file)."""
    if isinstance(subject, Artifact):
        from graphopt.testing.golden import artifact_tolerance
        return artifact_tolerance({}, _registry_once().emitters[subject.format], subject)
    return Tolerance(max_rel=1e-5)


def outputs_of(subject: Any, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run an nn.Module, a Graph, an Artifact (in its own runtime) or a callable on ``inputs``."""
    inputs = list(inputs)
    if isinstance(subject, Graph):
        return subject.run(inputs)
    if isinstance(subject, Artifact):
        emitters = _registry_once().emitters
        if subject.format not in emitters:
            raise AssertionError(f"no emitter for format {subject.format!r} to run {subject.path}")
        return emitters[subject.format].load(subject)(inputs)
    if isinstance(subject, nn.Module):
        was_training = subject.training
        subject.eval()
        try:
            with torch.no_grad():
                return flatten_outputs(subject(*inputs))
        finally:
            subject.train(was_training)
    if callable(subject):
        with torch.no_grad():
            return flatten_outputs(subject(*inputs))
    raise TypeError(f"cannot run a {type(subject).__name__}: give a module, Graph, Artifact or callable")


def assert_close(reference: Sequence[torch.Tensor], actual: Sequence[torch.Tensor],
                 tolerance: Tolerance, what: str = "outputs", hint: str = "") -> Metrics:
    """Raise AssertionError naming the metric that failed, the worst output and every metric
    when ``actual`` misses ``tolerance``; ``hint`` ends the message (what to do)."""
    __tracebackhide__ = True
    reference, actual = list(reference), list(actual)
    metrics = compare(reference, actual)
    problems = tolerance.violations(metrics)
    if problems:
        worst = max(range(len(reference)), key=lambda i: (len(tolerance.violations(
            compare([reference[i]], [actual[i]]))), compare([reference[i]], [actual[i]]).max_rel))
        top1 = f", top-1 {metrics.top1:.3f}" if metrics.top1 is not None else ""
        raise AssertionError(f"{what} differ from the reference: {'; '.join(problems)}; worst: output {worst} of "
                             f"{len(reference)} (max abs {metrics.max_abs:.3g}, max rel {metrics.max_rel:.3g}, "
                             f"cosine {metrics.cosine:.6f}, SQNR {metrics.sqnr_db:.1f} dB{top1})"
                             + (f"; {hint}" if hint else ""))
    return metrics
