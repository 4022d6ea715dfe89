"""The search: an Optuna study (ask-and-tell, multi-objective TPE) stored in SQLite, so a stopped search resumes
where it was, and the executors that run its trials (this process, or Ray tasks on a cluster).

The sampler is told each trial's MACs, bytes and quality, all deterministic: the same seed asks the same
pipelines whichever executor runs them, trials are asked in batches of ``parallel`` and told in order. The
front and the choice use the measured latency, kept with every trial's pipeline, figures and failure reason."""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from graphopt import UsageError

from .budget import KEYS, meets
from .trial import Config, evaluate

STUDY = "graphopt-tune"
DIRECTIONS = ("minimize", "minimize", "maximize")          # MACs, bytes, quality
_IDENTITY = ("model", "weights", "shapes", "format", "data", "held_out", "eval", "train", "seed", "plugins", "blocked")


class LocalExecutor:
    """Trials one after another in this process."""

    name = "local"

    def __init__(self, parallel: int = 1):
        self.parallel = parallel

    def run(self, config: Config, pipelines: Sequence[str]) -> list[dict]:
        return [evaluate(config, p) for p in pipelines]

    def close(self) -> None:
        pass


class RayExecutor:
    """Trials as Ray tasks (one CPU each) on the cluster at ``address``, or on a local one with ``cpus`` CPUs.
    Each worker builds and times its own unoptimized artifact, so latencies compare as ratios."""

    name = "ray"

    def __init__(self, address: str | None, parallel: int, cpus: int | None = None):
        try:
            import ray
        except ImportError as exc:
            raise UsageError("--executor ray needs Ray: pip install 'graphopt[tune]'") from exc
        self.ray, self.parallel = ray, parallel
        try:
            ray.init(address=address, num_cpus=None if address else (cpus or parallel), include_dashboard=False,
                     log_to_driver=False, configure_logging=False, ignore_reinit_error=True)
        except Exception as exc:
            raise UsageError(f"cannot start or reach a Ray cluster{f' at {address}' if address else ''}: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        self._task = ray.remote(num_cpus=1, max_retries=0)(evaluate)

    def run(self, config: Config, pipelines: Sequence[str]) -> list[dict]:
        return self.ray.get([self._task.remote(config, p) for p in pipelines])

    def close(self) -> None:
        self.ray.shutdown()


def identity(config: Config) -> dict:
    """What makes two searches the same search (a study resumes only its own)."""
    return {k: getattr(config, k) for k in _IDENTITY} | {"shapes": [list(s) for s in config.shapes]}


def _constraints(budget: dict) -> Callable[[Any], list[float]]:
    """The sampler's constraints: the deterministic budgets (size, MACs), <= 0 when met; latency is measured."""
    keys = [(KEYS[name], limit) for name, limit in budget.items() if name != "latency"]
    return lambda trial: [trial.user_attrs.get(key, float("inf")) / limit - 1 for key, limit in keys]


def open_study(path: Path, config: Config, seed: int, startup: int, budget: dict, start: Sequence[dict] = ()) -> Any:
    """The study in ``path`` (created, or resumed if it is this search's); trials a killed run left running
    are closed as failed ("interrupted"). A new study first runs the ``start`` points (parameter dicts)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # multivariate TPE and constraints are "experimental"
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                             constraints_func=_constraints(budget) if budget else None)
    try:
        study = optuna.create_study(storage=f"sqlite:///{path}", study_name=STUDY, directions=list(DIRECTIONS),
                                    sampler=sampler, load_if_exists=True)
    except Exception as exc:
        raise UsageError(f"cannot open the study {path}: {str(exc).splitlines()[0]}") from exc
    mine = json.loads(json.dumps(identity(config)))
    theirs = study.user_attrs.get("search")
    if theirs is None:
        study.set_user_attr("search", mine)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for params in start:
                study.enqueue_trial(params, skip_if_exists=True)
    elif theirs != mine:
        differ = ", ".join(k for k in mine if mine[k] != theirs.get(k))
        raise UsageError(f"study {path} holds another search (its {differ} differ); give a new --study")
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # a finished trial's attributes are frozen and a FrozenTrial has no setter: the storage's own, before tell
        study._storage.set_trial_user_attr(trial._trial_id, "error", "interrupted (the search was stopped)")
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return study


def finished(study: Any) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]


def search(study: Any, config: Config, suggest: Callable[[Any], str], executor: Any, trials: int,
           timeout: float | None, on_trial: Callable[[dict, int], None] = lambda result, count: None) -> None:
    """Run trials until the study has ``trials`` finished ones or ``timeout`` seconds passed; ``on_trial(result,
    finished count)`` sees each. A pipeline the study already measured is not built again: its figures are reused.
    An evaluation function that raises stops the search (a UsageError), every trial before it kept."""
    import optuna

    start, done = time.monotonic(), finished(study)
    count = len(done)
    seen = {t.user_attrs["pipeline"]: t.user_attrs for t in done if t.state == optuna.trial.TrialState.COMPLETE}
    while count < trials and (timeout is None or time.monotonic() - start < timeout):
        batch = [study.ask() for _ in range(min(executor.parallel, trials - count))]
        pipelines = [suggest(t) for t in batch]
        fresh = sorted({p for p in pipelines if p not in seen})
        results = dict(zip(fresh, executor.run(config, fresh)))
        for trial, pipeline in zip(batch, pipelines):
            result = dict(seen[pipeline], repeat_of=seen[pipeline].get("trial")) if pipeline in seen \
                else results[pipeline]
            result = {**result, "trial": trial.number}
            for key, value in result.items():
                trial.set_user_attr(key, value)
            failed = "error" in result or "eval_error" in result
            if failed:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, [result["macs"], result["bytes"], result["quality"]])
            count += 1
            if "eval_error" in result:
                raise UsageError(f"{result['eval_error']} (trial {trial.number}: {pipeline}); the study keeps "
                                 f"its {count} trials")
            if not failed:
                seen.setdefault(pipeline, result)
            on_trial(result, count)


def points(study: Any) -> list[dict]:
    """Every finished trial as a dict: its figures, or its ``error``."""
    return [{"trial": t.number, "state": t.state.name.lower(), **t.user_attrs} for t in finished(study)]


def pareto_front(done: list[dict]) -> list[dict]:
    """The completed points no other point beats on latency, size and quality at once (ties kept once)."""
    ok = [p for p in done if p["state"] == "complete"]

    def beats(a: dict, b: dict) -> bool:
        no_worse = a["latency_ms"] <= b["latency_ms"] and a["bytes"] <= b["bytes"] and a["quality"] >= b["quality"]
        return no_worse and (a["latency_ms"], a["bytes"], -a["quality"]) != (b["latency_ms"], b["bytes"], -b["quality"])

    front = [p for p in ok if p.get("repeat_of") is None and not any(beats(q, p) for q in ok)]
    return sorted(front, key=lambda p: p["latency_ms"])


def choose(done: list[dict], budget: dict, min_quality: float | None) -> dict | None:
    """The point to ship: within the budget (and at least ``min_quality``); with a quality floor the fastest,
    else the best quality, the faster of equals."""
    ok = [p for p in done if p["state"] == "complete" and meets(p, budget)
          and (min_quality is None or p["quality"] >= min_quality)]
    if not ok:
        return None
    if min_quality is not None:
        return min(ok, key=lambda p: (p["latency_ms"], -p["quality"]))
    return min(ok, key=lambda p: (-round(p["quality"], 6), p["latency_ms"]))
