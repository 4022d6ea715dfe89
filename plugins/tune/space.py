"""The search space, read off the registry: every pass option that declares ``tune`` values is searched, so a
third-party pass joins without a change here. A trial's pipeline is built in a fixed order of effects:

``cleanup``, passes that change the function (prune), passes that retrain (finetune, only after one of those),
``fuse``, other exact passes, then one precision step: none (fp32), or a pass of effect fp16 or int8 the format
takes (quantize, fp16). Each optional pass is on or off (``use.<pass>``), its options ``<pass>.<option>``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from graphopt import Effect, Emitter, Option, Pass, Registry

_ORDER = (Effect.STRUCTURAL, Effect.TRAINED, Effect.EXACT)


@dataclass
class Space:
    optional: list[Pass]                        # on/off, in pipeline order
    precision: list[Pass]                       # every fp16/int8 pass the format takes (and fp32, always)
    fixed: dict[str, dict[str, Any]] = field(default_factory=dict)   # options tune sets, e.g. finetune distill
    skipped: dict[str, str] = field(default_factory=dict)            # pass -> why it is not searched

    def describe(self) -> list[str]:
        """One line per searched pass: its tunable options and their values."""
        lines = []
        for p in self.optional + self.precision:
            tuned = ", ".join(f"{o.name} in {list(o.tune)}" for o in p.options if o.tune) or "as it is"
            lines.append(f"{p.name}: {tuned}")
        return lines


def build_space(registry: Registry, emitter: Emitter, data: set[str], fixed: dict | None = None) -> Space:
    """The passes to search for ``emitter``'s format given the ``ctx.data`` keys ``data`` a trial will have."""
    space = Space([], [], dict(fixed or {}))
    for name, spec in sorted(registry.passes.items()):
        if not any(o.tune for o in spec.options) and spec.effect not in (Effect.FP16, Effect.INT8):
            continue
        missing = [k for k in spec.needs if k not in data]
        if missing:
            space.skipped[name] = f"needs {', '.join(missing)}"
        elif spec.effect in (Effect.FP16, Effect.INT8):
            if spec.effect.value in emitter.takes:
                space.precision.append(spec)
            else:
                space.skipped[name] = f"{emitter.format} does not take {spec.effect.value} graphs"
        elif spec.effect in _ORDER:
            space.optional.append(spec)
    space.optional.sort(key=lambda p: (_ORDER.index(p.effect), p.default_order or 0, p.name))
    return space


def _evenly_spaced(values: tuple) -> bool:
    if len(values) < 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return False
    step = values[1] - values[0]
    return step > 0 and all(abs((b - a) - step) < 1e-9 * max(1.0, abs(step)) for a, b in zip(values, values[1:]))


def suggest_value(trial: Any, name: str, option: Option) -> Any:
    """Ask the trial for ``option``'s value: a range for evenly spaced numbers, else one of the values."""
    values = option.tune
    if _evenly_spaced(values):
        step = round(values[1] - values[0], 12)   # 0.993 - 0.99 is 0.0030000000000000027 in binary
        if option.type is int:
            return trial.suggest_int(name, values[0], values[-1], step=step)
        return round(trial.suggest_float(name, values[0], values[-1], step=step), 10)
    return trial.suggest_categorical(name, list(values))


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _item(spec: Pass, trial: Any, fixed: dict) -> str:
    options = {o.name: suggest_value(trial, f"{spec.name}.{o.name}", o) for o in spec.options if o.tune}
    options.update(fixed.get(spec.name, {}))
    return spec.name + (f"({','.join(f'{k}={_text(v)}' for k, v in sorted(options.items()))})" if options else "")


def suggest_pipeline(trial: Any, space: Space, registry: Registry) -> str:
    """The pipeline text of one trial (Optuna's ask-and-tell ``trial``, or anything with its suggest methods)."""
    items = ["cleanup"] if "cleanup" in registry.passes else []
    changed = False
    for spec in space.optional:
        if spec.effect is Effect.TRAINED and not changed:   # recovery only after a pass that changed the function
            continue
        if spec.effect is Effect.EXACT and "fuse" in registry.pipelines and "fuse" not in items:
            items.append("fuse")
        if trial.suggest_categorical(f"use.{spec.name}", [False, True]):
            items.append(_item(spec, trial, space.fixed))
            changed = changed or spec.effect is Effect.STRUCTURAL
    if "fuse" in registry.pipelines and "fuse" not in items:
        items.append("fuse")
    choices = ["fp32"] + [p.name for p in space.precision]
    step = trial.suggest_categorical("precision", choices) if len(choices) > 1 else "fp32"
    if step != "fp32":
        items.append(_item(registry.passes[step], trial, space.fixed))
    return ",".join(items)


def _default(option: Option) -> Any:
    """The option's default, or the nearest of its tune values when the default is not one of them."""
    if option.default in option.tune:
        return option.default
    if isinstance(option.default, (int, float)) and not isinstance(option.default, bool):
        return min(option.tune, key=lambda v: abs(v - option.default))
    return option.tune[0]


def default_points(space: Space) -> list[dict]:
    """Where the search starts, at the pass authors' defaults: each precision (fp32 too) alone, then every optional
    pass on with its defaults before each (the same points whatever the seed or executor)."""
    def options(spec: Pass) -> dict:
        return {f"{spec.name}.{o.name}": _default(o) for o in spec.options if o.tune}

    precisions = [{"precision": "fp32"}] + [{"precision": p.name, **options(p)} for p in space.precision]
    every = {k: v for spec in space.optional for k, v in {f"use.{spec.name}": True, **options(spec)}.items()}
    off = {f"use.{spec.name}": False for spec in space.optional}
    return [{**off, **p} for p in precisions] + ([{**every, **p} for p in precisions] if space.optional else [])
