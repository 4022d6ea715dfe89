"""Every hook the engine offers a plugin (functions named after these specs, marked ``@graphopt.hookimpl``). Hooks only
contribute; the pass manager alone decides what runs, in the pipeline text's order. Every plugin's result is collected
unless a spec says the first one wins. A feature may add its own hookspecs, as partition does for backends."""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("graphopt")
hookimpl = pluggy.HookimplMarker("graphopt")


@hookspec(historic=True)
def graphopt_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Receives the plugin manager; adds the plugin's own hookspecs (``add_hookspecs``)."""


@hookspec
def graphopt_register_passes() -> list:
    """Returns the :class:`graphopt.Pass` list this plugin provides. Pass and named-pipeline
    names are unique across plugins: a clash is a PluginError naming both."""


@hookspec
def graphopt_register_pipelines() -> list:
    """Returns :class:`graphopt.NamedPipeline` composites (``fuse``) that the pipeline parser
    expands into their members, each verified on its own; absent or blocked members are left out."""


@hookspec
def graphopt_register_emitters() -> list:
    """Returns :class:`graphopt.Emitter` objects, one per format; formats are unique."""


@hookspec
def graphopt_configure(registry) -> None:
    """Receives the :class:`graphopt.Registry` once every plugin is loaded; a feature collects
    and validates what its own hooks gather (``registry.collect``), so bad definitions fail at load."""


@hookspec
def graphopt_add_options(command: str, parser) -> None:
    """Receives a CLI command's name (``run``) and its argparse parser; adds the feature's options."""


@hookspec
def graphopt_add_commands(subparsers, parents: list) -> None:
    """Receives argparse's subparsers and the common parents; adds commands, each with
    ``set_defaults(handler=fn)``, ``fn(args, registry) -> exit code``."""


@hookspec
def graphopt_configure_run(options, pipeline: str, registry) -> str | None:
    """Receives ``graphopt run``'s options and pipeline text before any work; returns the text to
    run instead (None: unchanged), each plugin in turn seeing the one before. Bad options: UsageError."""


@hookspec
def graphopt_run_data(options) -> dict | None:
    """Receives ``graphopt run``'s options before any work; returns the ``ctx.data`` entries they
    give, each a loader ``fn(model, example_inputs) -> value`` called once the model is loaded."""


@hookspec(firstresult=True)
def graphopt_data_hint(key: str) -> str | None:
    """Receives a ``ctx.data`` key a pass needs and nobody gave; returns how to give it on the
    command line (``pass --calib DATA.npz``). The first answer wins."""


@hookspec
def graphopt_pass_done(record, options, ui) -> None:
    """Receives each verified pass's :class:`graphopt.PassRecord`, the run's options and the
    console; prints the feature's report section."""


@hookspec
def graphopt_run_done(result, options, out_dir, ui) -> list | None:
    """Receives a verified :class:`graphopt.RunResult`, its options, the output folder and the
    console; writes the feature's extra files and returns their names."""
