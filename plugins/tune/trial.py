"""One trial, wherever it runs (this process or a Ray worker): optimize with the trial's pipeline, emit and verify
in the format, score the artifact in its runtime, and time it round-robin beside the unoptimized artifact of the
same format, built and timed in the same worker, so latencies from mixed machines compare as ratios.

``evaluate`` never raises: a trial that fails says why (``error``), an evaluation function that raises says so
(``eval_error``), which stops the study."""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from graphopt import GraphoptError, UsageError
from graphopt.errors import first_line
from graphopt.graph import flatten_outputs

HELD_OUT, RANDOM_SAMPLES = 64, 256


@dataclass(frozen=True)
class Config:
    """Everything a worker needs to rebuild a trial's world (picklable: paths and texts, no tensors)."""

    model: str
    shapes: tuple[tuple[int, ...], ...]
    format: str                      # the --format item, options included: "tflite" or "onnx(opset=18)"
    weights: str | None = None
    seed: int = 0
    plugins: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()
    data: str | None = None          # unlabeled inputs: DATA.npz or FILE.py:FN / module:FN returning them
    held_out: int = HELD_OUT
    eval: str | None = None          # FILE.py:FN, fn(runner) -> score (higher is better)
    train: str | None = None         # FILE.py:FN for finetune without distillation
    runs: int = 30
    threads: int = 1
    name: str = "model"
    leaf_modules: tuple[str, ...] = ()


@dataclass
class _World:
    registry: Any
    model: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    data: dict
    held_out: list[torch.Tensor]
    reference: torch.Tensor          # the original model's first output on the held-out inputs
    eval_fn: Callable | None
    train: list[torch.Tensor]        # the inputs trials calibrate and distill on
    baseline: Any = None             # (runner, bytes, macs) of the unoptimized artifact
    baseline_quality: dict | None = None


_WORLDS: dict[Config, _World] = {}


def _samples(config: Config, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Unlabeled samples, one tensor per input, from --data, else seeded Gaussian ones."""
    if config.data is None:
        g = torch.Generator().manual_seed(config.seed + 1)
        count = RANDOM_SAMPLES + config.held_out
        return [torch.randn(count, *x.shape[1:], generator=g).to(x.dtype) for x in inputs]
    if config.data.endswith(".npz"):
        from graphopt.cli.calibration import load_calibration
        return [torch.cat(parts) for parts in zip(*load_calibration(config.data, model, inputs))]
    from graphopt.cli.modelspec import import_object
    made = import_object(config.data, "data function")
    made = made() if callable(made) else made
    tensors = [made] if not isinstance(made, (tuple, list)) else list(made)
    tensors = [torch.as_tensor(t).to(x.dtype) for t, x in zip(tensors, inputs)]
    if len(tensors) != len(inputs) or any(t.shape[1:] != x.shape[1:] for t, x in zip(tensors, inputs)):
        raise UsageError(f"--data {config.data} gives samples of shapes {[tuple(t.shape[1:]) for t in tensors]}; "
                         f"the model takes {[tuple(x.shape[1:]) for x in inputs]}")
    return tensors


def chunked(runner: Callable, inputs: list[torch.Tensor], batch: int) -> torch.Tensor:
    """The runner's first output for every sample, fed in chunks of its static ``batch`` (the last one padded)."""
    outs = []
    for start in range(0, len(inputs[0]), batch):
        chunk = [t[start:start + batch] for t in inputs]
        size = len(chunk[0])
        if size < batch:
            chunk = [torch.cat([c, c[:1].expand(batch - size, *c.shape[1:])]) for c in chunk]
        outs.append(runner(chunk)[0][:size].float())
    return torch.cat(outs)


def data_keys(config: Config) -> set[str]:
    """The ``ctx.data`` keys every trial's passes get (``_world`` builds them; ``original`` is the pass
    manager's): what decides which passes the search can use."""
    return {"calibration", "train_inputs", "original", *(["train"] if config.train else [])}


def _world(config: Config) -> _World:
    if config in _WORLDS:
        return _WORLDS[config]
    from graphopt.cli.modelspec import example_inputs, import_object, load_model, load_train_function
    from graphopt.plugins import load_plugins

    registry = load_plugins(config.plugins, config.blocked)
    model = load_model(config.model, config.weights).eval()
    inputs = example_inputs(list(config.shapes), config.seed)
    samples = _samples(config, model, inputs)
    if len(samples[0]) <= config.held_out:
        raise UsageError(f"--data has {len(samples[0])} samples; tune holds out {config.held_out} and needs more "
                         f"to calibrate and distill on")
    train = [t[:-config.held_out] for t in samples]
    step = inputs[0].shape[0]      # batched as graphopt run batches --calib: the same calibration, the same bytes
    batches = [tuple(t[i:i + step] for t in train) for i in range(0, len(train[0]), step)]
    if config.data is not None:    # the example is a real sample (graphopt run --example): Gaussian noise far
        inputs = batches[0]        # outside the data makes int8 keep every layer fp32 to stay verified
    data = {"calibration": batches, "train_inputs": batches}
    if config.train:
        data["train"] = load_train_function(config.train)
    held_out = [t[-config.held_out:] for t in samples]
    with torch.no_grad():
        reference = chunked(lambda x: flatten_outputs(model(*x)), held_out, inputs[0].shape[0])
    eval_fn = import_object(config.eval, "evaluation function") if config.eval else None
    _WORLDS[config] = world = _World(registry, model, inputs, data, held_out, reference, eval_fn, train)
    return world


def save_training_inputs(config: Config, path: Path) -> list[str]:
    """The inputs trials calibrated and distilled on, as --calib and --train-data read them (one array per
    forward argument); returns the array names."""
    import inspect

    import numpy as np

    world = _world(config)
    names = list(inspect.signature(world.model.forward).parameters)[:len(world.inputs)]
    with path.open("wb") as f:
        np.savez(f, **{n: t.numpy() for n, t in zip(names, world.train)})
    return names


def _quality(config: Config, world: _World, runner: Callable) -> dict:
    """The user's score, or agreement with the original model on the held-out inputs: top-1 for a classifier's
    logits, else the mean cosine similarity of the first output."""
    if world.eval_fn is not None:
        try:
            value = float(world.eval_fn(runner))
        except Exception as exc:
            raise _EvalError(f"evaluation function {config.eval} raised {type(exc).__name__}: {first_line(exc)}") \
                from exc
        return {"quality": value}
    out = chunked(runner, world.held_out, world.inputs[0].shape[0])
    ref = world.reference
    cosine = float(F.cosine_similarity(out.flatten(1), ref.flatten(1), dim=1).mean())
    top1 = float((out.argmax(1) == ref.argmax(1)).float().mean()) if ref.dim() == 2 and ref.shape[1] > 1 else None
    return {"quality": top1 if top1 is not None else cosine, "top1": top1, "cosine": cosine}


class _EvalError(UsageError):
    """The user's evaluation function raised: the study stops (a bug in it would fail every trial)."""


def _emit(world: _World, config: Config, pipeline: str, out: Path):
    """Optimize, emit and verify; ``(runner, bytes, macs, expanded pipeline)`` or a GraphoptError."""
    from graphopt.driver import optimize

    result = optimize(world.model, world.inputs, world.registry, pipeline=pipeline, formats=config.format,
                      out_dir=out, name=config.name, data=world.data, verify_inputs=1,
                      leaf_modules=config.leaf_modules)
    check = result.artifacts[0]
    if not result.ok:
        raise GraphoptError(f"the {check.artifact.format} file did not verify: {'; '.join(check.problems)}")
    emitter = result.requests[0][0]
    macs = result.pipeline.records[-1].macs if result.pipeline.records else result.report["model"]["macs"]
    return emitter.load(check.artifact, threads=config.threads), check.bytes, macs, result.pipeline.pipeline


def prepare(config: Config) -> dict:
    """Build the worker's world and its unoptimized artifact now (bad input fails here, before any trial);
    returns the baseline's figures."""
    world = _world(config)
    if world.baseline is None:
        scratch = Path(tempfile.mkdtemp(prefix="graphopt-tune-"))
        try:
            world.baseline = _emit(world, config, "", scratch)
            world.baseline_quality = _quality(config, world, world.baseline[0])
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"bytes": world.baseline[1], "macs": world.baseline[2], **world.baseline_quality}


def evaluate(config: Config, pipeline: str) -> dict:
    """The figures of ``pipeline`` in ``config.format``: ``bytes``, ``macs``, ``latency_ms`` (median),
    ``baseline_ms`` and ``latency_ratio`` (the unoptimized artifact timed alongside), the quality figures;
    or ``error`` / ``eval_error``."""
    from graphopt.cli.bench import Subject, bench

    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="graphopt-tune-"))
    try:
        baseline = prepare(config)
        world = _world(config)
        runner, size, macs, expanded = _emit(world, config, pipeline, scratch / "trial")
        quality = _quality(config, world, runner)
        subjects = [Subject("unoptimized", config.format, world.baseline[0]), Subject("trial", config.format, runner)]
        rows = bench(subjects, world.inputs, reference=None, threads=config.threads, runs=config.runs, warmup=3)
        return {"pipeline": pipeline, "expanded": expanded, "bytes": size, "macs": macs,
                "latency_ms": rows[1].median_ms, "baseline_ms": rows[0].median_ms,
                "latency_ratio": rows[1].median_ms / rows[0].median_ms, **quality,
                "baseline": baseline,
                "seconds": round(time.perf_counter() - start, 2)}
    except _EvalError as exc:
        return {"pipeline": pipeline, "eval_error": str(exc)}
    except GraphoptError as exc:
        return {"pipeline": pipeline, "error": " ".join(str(exc).split())}
    except Exception as exc:   # a trial is one point of a search: its failure is recorded, the search goes on
        return {"pipeline": pipeline, "error": f"{type(exc).__name__}: {first_line(exc)}"}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
