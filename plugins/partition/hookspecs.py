"""The hook partition adds to graphopt's: backends, the targets of ``partition``."""
from __future__ import annotations

import graphopt.hookspecs

hookspec = graphopt.hookspecs.hookspec


@hookspec
def graphopt_register_backends() -> list:
    """Receives nothing; returns a list of :class:`graphopt_plugins.partition.Backend` (which
    ops, dtypes and shapes a runtime or accelerator takes).

    Every plugin's list is collected. Backend names must be unique across all plugins.
    """
