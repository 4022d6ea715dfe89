"""``--calib DATA.npz``: the CLI hooks every feature that reads ``ctx.data["calibration"]``
re-exports as its own (quantize, fp16), and the loader of the calibration batches."""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import graphopt
from graphopt.errors import UsageError, first_line


@graphopt.hookimpl
def graphopt_add_options(command: str, parser) -> None:
    if command == "run":           # several features add it: the run parser resolves the repeat
        parser.add_argument("--calib", metavar="DATA.npz", help="calibration inputs for quantize and fp16: one "
                            "array per input name (or one array), samples along the first dim")


@graphopt.hookimpl
def graphopt_run_data(options) -> dict | None:
    path = getattr(options, "calib", None)
    return {"calibration": lambda model, inputs: load_calibration(path, model, inputs)} if path else None


@graphopt.hookimpl
def graphopt_data_hint(key: str) -> str | None:
    return "pass --calib DATA.npz" if key == "calibration" else None


def load_calibration(path: str, model: nn.Module,
                     example: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """``--calib DATA.npz``: one array per input (keyed by the forward argument's name, or
    any single array for a one-input model), samples along the first dim, fed in batches of
    the example inputs' batch size."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"calibration data {path} does not exist")
    names = list(inspect.signature(model.forward).parameters)[:len(example)]
    try:
        with np.load(file, allow_pickle=False) as data:
            if len(example) == 1 and len(data.files) == 1:
                arrays = [data[data.files[0]]]
            else:
                missing = [n for n in names if n not in data.files]
                if missing:
                    raise UsageError(f"calibration data {path} lacks {', '.join(missing)} (it has "
                                     f"{', '.join(data.files)}); give one array per input name")
                arrays = [data[n] for n in names]
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read calibration data {path}: {first_line(exc)}") from exc
    for name, arr, ex in zip(names, arrays, example):
        if tuple(arr.shape[1:]) != tuple(ex.shape[1:]):
            raise UsageError(f"calibration array {name} has samples of shape {tuple(arr.shape[1:])}, "
                             f"the model takes {tuple(ex.shape[1:])} (--input-shape)")
    if len({len(a) for a in arrays}) != 1:
        raise UsageError(f"calibration arrays in {path} differ in length")
    step = example[0].shape[0]
    tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(ex.dtype) for a, ex in zip(arrays, example)]
    return [tuple(t[i:i + step] for t in tensors) for i in range(0, len(tensors[0]), step)]
