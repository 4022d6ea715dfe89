"""Plugin discovery and the registry of passes, named pipelines and emitters. Plugins come from the entry-point
group ``graphopt`` (built-ins and third-party packages alike) and from ``--plugin PATH.py|module``; ``-p no:NAME``
blocks one by name."""
from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .emit import Emitter
from .errors import PipelineError, PluginError
from .passes import Pass
from .pipeline import NamedPipeline, Pipeline, parse_pipeline

GROUP = "graphopt"


@dataclass
class PluginInfo:
    name: str
    source: str          # "entry point pkg.mod (dist 1.0)" or a file path


@dataclass
class Registry:
    """Loaded plugins and what they registered."""

    manager: pluggy.PluginManager
    plugins: list[PluginInfo] = field(default_factory=list)
    passes: dict[str, Pass] = field(default_factory=dict)
    pipelines: dict[str, NamedPipeline] = field(default_factory=dict)
    emitters: dict[str, Emitter] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)   # "pass:NAME" / "emitter:FMT" / ... -> plugin
    _collected: dict[str, dict] = field(default_factory=dict, repr=False)

    @property
    def hook(self) -> Any:
        return self.manager.hook

    def default_pipeline(self) -> str:
        """Passes and named pipelines that declare a ``default_order``, in that order."""
        chosen = sorted((p for p in [*self.passes.values(), *self.pipelines.values()]
                         if p.default_order is not None), key=lambda p: (p.default_order, p.name))
        return ",".join(p.name for p in chosen)

    def collect(self, hook: str, kind: type, key: str) -> dict[str, Any]:
        """Every plugin's items from the list-returning ``hook`` (once), validated and keyed
        by ``getattr(item, key)``: how a feature gathers what its own hookspec collects."""
        if hook not in self._collected:
            self._collected[hook] = _collect(self, hook, kind, key)
        return self._collected[hook]

    def expand(self, pipeline: Pipeline) -> Pipeline:
        """``pipeline`` with named pipelines expanded to registered members (``group``: the composite each is from)."""
        items = []
        for item in pipeline.items:
            if (named := self.pipelines.get(item.name)) is None:
                items.append(item)
                continue
            if item.options:
                raise PipelineError(f"{item.name} is a named pipeline ({named.pipeline}); "
                                    f"give options to its members instead")
            members = self.expand(parse_pipeline(named.pipeline)).items
            items += [replace(m, group=m.group or item.name) for m in members if m.name in self.passes]
        return Pipeline(tuple(items))


def _load_path(spec: str) -> tuple[str, ModuleType]:
    """Import ``spec``: a ``.py`` file path or a dotted module name."""
    path = Path(spec)
    if spec.endswith(".py") or "/" in spec or path.is_file():
        if not path.is_file():
            raise PluginError(f"plugin file {spec} does not exist")
        mod_name = f"graphopt_user_plugin_{path.stem}"
        try:
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = sys.modules[mod_name] = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise PluginError(f"plugin {path.stem} ({path}) failed to import: {type(exc).__name__}: {exc}") from exc
        return path.stem, module
    try:
        return spec.rsplit(".", 1)[-1], importlib.import_module(spec)
    except Exception as exc:
        raise PluginError(f"plugin module {spec} failed to import: {type(exc).__name__}: {exc}") from exc


def _collect(reg: Registry, hook: str, kind: type, key: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for impl in getattr(reg.hook, hook).get_hookimpls():   # registration order
        plugin = impl.plugin_name
        try:
            items = impl.function()
        except Exception as exc:
            raise PluginError(f"plugin {plugin}: hook {hook} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(items, (list, tuple)):
            raise PluginError(f"plugin {plugin}: hook {hook} must return a list, got {type(items).__name__}")
        for item in items:
            if not isinstance(item, kind):
                raise PluginError(f"plugin {plugin}: hook {hook} returned {type(item).__name__}, "
                                  f"expected {kind.__name__}")
            if item.problems():
                raise PluginError(f"plugin {plugin}: {'; '.join(item.problems())}")
            name = getattr(item, key)
            label = f"{kind.__name__.lower()}:{name}"
            if name in found:
                raise PluginError(f"plugin {plugin}: {kind.__name__.lower()} {name!r} is already "
                                  f"registered by plugin {reg.owner[label]}; block one with -p no:NAME")
            found[name] = item
            reg.owner[label] = plugin
    return found


def load_plugins(extra: Iterable[str] = (), blocked: Iterable[str] = (), *, entry_points: bool = True) -> Registry:
    """Discover, import and validate plugins; returns the registry of passes, named pipelines and emitters."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    pm.hook.graphopt_addhooks.call_historic(kwargs={"pluginmanager": pm})
    blocked = list(blocked)
    for name in blocked:
        pm.set_blocked(name)
    reg = Registry(pm)
    eps = sorted(md.entry_points(group=GROUP) if entry_points else [], key=lambda e: e.name)
    seen_blocked = {ep.name for ep in eps if ep.name in blocked}   # blocked entry points are never imported
    candidates: list[tuple[str | None, str, Any]] = [
        (ep.name, f"entry point {ep.value} ({f'{ep.dist.name} {ep.dist.version}' if ep.dist else 'unknown distribution'})", ep)
        for ep in eps if ep.name not in blocked] + [(None, spec, spec) for spec in extra]
    for name, source, what in candidates:
        if isinstance(what, md.EntryPoint):
            try:
                module = what.load()
            except Exception as exc:
                raise PluginError(f"plugin {name} ({source}) failed to import: {type(exc).__name__}: {exc}") from exc
        else:
            (name, module), source = _load_path(what), what
            if name in blocked:
                seen_blocked.add(name)
                continue
        if pm.get_plugin(name) is not None:
            raise PluginError(f"two plugins are named {name!r} ({source}); rename one")
        try:
            pm.register(module, name=name)
        except pluggy.PluginValidationError as exc:
            detail = " ".join(str(exc).splitlines()[1:]) or str(exc)
            raise PluginError(f"plugin {name} ({source}): bad hook signature: {detail}") from exc
        except ValueError as exc:
            raise PluginError(f"plugin {name} ({source}): {exc}") from exc
        reg.plugins.append(PluginInfo(name, source))
    if unknown := [b for b in blocked if b not in seen_blocked]:
        raise PluginError(f"cannot block {', '.join(unknown)}: no such plugin "
                          f"(plugins: {', '.join(p.name for p in reg.plugins) or 'none'})")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or "?"
        hook = str(exc).split("'")[1] if "'" in str(exc) else "?"
        raise PluginError(f"plugin {name}: unknown hook {hook}; valid hooks: "
                          f"{', '.join(sorted(n for n, h in vars(pm.hook).items() if h.spec))}") from exc
    reg.passes = reg.collect("graphopt_register_passes", Pass, "name")
    reg.pipelines = reg.collect("graphopt_register_pipelines", NamedPipeline, "name")
    reg.emitters = reg.collect("graphopt_register_emitters", Emitter, "format")
    for name in reg.pipelines.keys() & reg.passes.keys():
        raise PluginError(f"plugin {reg.owner[f'namedpipeline:{name}']}: named pipeline {name!r} clashes "
                          f"with the pass of plugin {reg.owner[f'pass:{name}']}")
    reg.hook.graphopt_configure(registry=reg)
    return reg
