"""Every hook a graphopt plugin can implement. A plugin is a module (or object) with
functions named after these specs and marked ``@graphopt.hookimpl``.

Hooks only contribute definitions; the pass manager alone decides what runs, in the order
the pipeline text gives. Results of a hook are collected from every plugin (no hook here
stops at the first result).
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("graphopt")
hookimpl = pluggy.HookimplMarker("graphopt")


@hookspec
def graphopt_register_passes() -> list:
    """Receives nothing; returns a list of :class:`graphopt.Pass` this plugin provides.

    Every plugin's list is collected. Pass names must be unique across all plugins: a
    clash is a PluginError naming both plugins.
    """


@hookspec
def graphopt_register_emitters() -> list:
    """Receives nothing; returns a list of :class:`graphopt.Emitter` (one per format).

    Every plugin's list is collected. Format names must be unique across all plugins.
    """


@hookspec
def graphopt_register_backends() -> list:
    """Receives nothing; returns a list of :class:`graphopt.Backend` (targets of the
    ``partition`` pass: which ops, dtypes and shapes a runtime or accelerator takes).

    Every plugin's list is collected. Backend names must be unique across all plugins.
    """
