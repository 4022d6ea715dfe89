"""Every hook the engine offers a graphopt plugin. A plugin is a module (or object) with
functions named after these specs and marked ``@graphopt.hookimpl``.

Hooks only contribute; the pass manager alone decides what runs, in the order the pipeline
text gives. Results are collected from every plugin unless a spec says the first one wins.
A feature may add hookspecs of its own (``graphopt_addhooks``), as partition does for
backends.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("graphopt")
hookimpl = pluggy.HookimplMarker("graphopt")


@hookspec(historic=True)
def graphopt_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Receives the plugin manager at registration; a plugin adds its own hookspecs with
    ``pluginmanager.add_hookspecs(module)``. Returns nothing."""


@hookspec
def graphopt_configure(registry) -> None:
    """Receives the :class:`graphopt.Registry` once every plugin is loaded and its passes,
    pipelines and emitters collected; a feature collects and validates what its own hooks
    gather (``registry.collect``), so bad definitions fail at load. Returns nothing."""


@hookspec
def graphopt_register_passes() -> list:
    """Receives nothing; returns a list of :class:`graphopt.Pass` this plugin provides.

    Every plugin's list is collected. Pass and named-pipeline names must be unique across
    all plugins: a clash is a PluginError naming both plugins.
    """


@hookspec
def graphopt_register_pipelines() -> list:
    """Receives nothing; returns a list of :class:`graphopt.NamedPipeline`: composites such
    as ``fuse`` that the pipeline parser expands into their member passes, each verified on
    its own. Members whose plugin is absent or blocked are left out. Every list is collected.
    """


@hookspec
def graphopt_register_emitters() -> list:
    """Receives nothing; returns a list of :class:`graphopt.Emitter` (one per format).

    Every plugin's list is collected. Format names must be unique across all plugins.
    """


@hookspec
def graphopt_add_options(command: str, parser) -> None:
    """Receives a CLI command's name (``run``) and its argparse parser; the plugin adds the
    options its feature reads (``--calib``, ``--target``). Returns nothing."""


@hookspec
def graphopt_add_commands(subparsers, parents: list) -> None:
    """Receives argparse's subparsers and the common parent parsers; the plugin adds its
    commands, each with ``set_defaults(handler=fn)``, ``fn(args, registry) -> exit code``."""


@hookspec
def graphopt_configure_run(options, pipeline: str, registry) -> str | None:
    """Receives ``graphopt run``'s parsed options and pipeline text before any work starts;
    returns the pipeline text to run instead (None: unchanged). Plugins are called in turn,
    each seeing the text the one before returned. Raise UsageError for bad options."""


@hookspec
def graphopt_run_data(options) -> dict | None:
    """Receives ``graphopt run``'s options before any work starts; returns the ``ctx.data``
    entries the plugin's options give, each as a loader ``fn(model, example_inputs) -> value``
    called once the model is loaded (``{"calibration": ...}``)."""


@hookspec(firstresult=True)
def graphopt_data_hint(key: str) -> str | None:
    """Receives a ``ctx.data`` key a pass needs and nobody gave; returns how to give it on
    the command line (``pass --calib DATA.npz``). The first answer wins."""


@hookspec
def graphopt_pass_done(record, options, ui) -> None:
    """Receives each pass's :class:`graphopt.PassRecord` as soon as the pass is verified,
    the run's options and the console; prints the plugin's report section. Returns nothing."""


@hookspec
def graphopt_run_done(result, options, out_dir, ui) -> list | None:
    """Receives a finished, verified run (:class:`graphopt.RunResult`), its options, the
    output folder and the console; writes the plugin's extra files and returns their names."""
