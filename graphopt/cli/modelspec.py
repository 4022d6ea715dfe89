"""Turn the CLI's MODEL, --input-shape, --train and --out text into a module, example
inputs, a training function and a checked output folder."""
from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn

from graphopt.errors import UsageError, first_line


def parse_shape(text: str) -> tuple[int, ...]:
    """``1x3x224x224`` -> (1, 3, 224, 224)."""
    if not re.fullmatch(r"\d+(x\d+)*", text.strip()) or any(int(d) == 0 for d in text.split("x")):
        raise UsageError(f"bad input shape {text!r}: write positive sizes joined by x, e.g. 1x3x224x224")
    return tuple(int(d) for d in text.strip().split("x"))


def example_inputs(shapes: list[tuple[int, ...]], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic standard-normal float32 inputs of the given shapes."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=gen) for s in shapes)


def import_object(spec: str, what: str = "model"):
    """The object named by ``path/to/file.py:name`` or ``package.module:name``; ``what`` it is
    for ("model", "training function") words the one-line UsageError when it cannot be had."""
    if ":" not in spec:
        raise UsageError(f"bad {what} spec {spec!r}: write path/to/file.py:callable or package.module:callable")
    where, attr = spec.rsplit(":", 1)
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"{what} file {where} does not exist")
        mod_name = f"graphopt_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        sys.path.insert(0, str(path.resolve().parent))
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise UsageError(f"importing {where} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise UsageError(f"cannot import module {where}: {type(exc).__name__}: {exc}") from exc
    target = getattr(module, attr, None)
    if target is None:
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise UsageError(f"{where} has no {attr!r}; callables there: {', '.join(names[:12]) or 'none'}")
    return target


def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """Build the model named by ``spec`` and optionally load a state_dict (weights_only)."""
    target = import_object(spec)
    try:
        model = target() if callable(target) and not isinstance(target, nn.Module) else target
    except Exception as exc:
        raise UsageError(f"calling {spec} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise UsageError(f"weights file {weights} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:   # torch's message carries ANSI codes and a page of advice
            raise UsageError(f"{weights} is not a plain state_dict (weights_only=True will not unpickle the "
                             f"objects in it, e.g. a whole pickled model); save model.state_dict() instead") from exc
        except Exception as exc:
            raise UsageError(f"cannot read weights {weights}: {_ANSI.sub('', first_line(exc))}") from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UsageError(f"{weights} holds a {type(state).__name__}, not a state_dict")
        if problems := _mismatch(model.state_dict(), state):
            raise UsageError(f"cannot load weights {weights} into {spec}: {problems}")
        model.load_state_dict(state)
    return model


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _mismatch(expected: dict, given: dict, show: int = 4) -> str:
    """What keeps ``given`` from loading where ``expected`` is: missing and unexpected keys, and
    shapes that differ, a few of each named (empty when it loads)."""
    def some(keys: list) -> str:
        return ", ".join(keys[:show]) + (f" and {len(keys) - show} more" if len(keys) > show else "")

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} is {'x'.join(map(str, given[k].shape))} in the file, {'x'.join(map(str, v.shape))} in the model"
              for k, v in expected.items() if k in given and hasattr(given[k], "shape") and given[k].shape != v.shape]
    return "; ".join(part for part in (f"{len(missing)} missing ({some(missing)})" if missing else "",
                                       f"{len(unexpected)} unexpected ({some(unexpected)})" if unexpected else "",
                                       some(shapes) if shapes else "") if part)


def load_train_function(spec: str):
    """The training function named by ``--train FILE.py:FN`` (or ``package.module:FN``)."""
    target = import_object(spec, "training function")
    if not callable(target):
        raise UsageError(f"--train {spec} is not callable (it is {type(target).__name__}); "
                         f"name a function fn(module, *, epochs)")
    return target


def check_out_dir(path: Path) -> Path:
    """Fail early, before any work, if ``path`` cannot become a writable directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output path {path} exists and is not a directory; choose another --out")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {path}: {probe} is not a writable directory; choose another --out")
    return path
