"""Save a pruned graph and load it back without pickling any class: ``plan.json`` (the
surgeries ``prune`` recorded, in order) is replayed on a fresh capture of the original
model, then ``weights.pt`` (a plain state_dict, read with ``weights_only=True``) is loaded.

Save right after ``prune`` (and ``finetune``): passes that restructure the graph later,
such as ``fold-bn``, change which weights exist, and replay reproduces pruning only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.capture import capture
from graphopt.emit import install, staging_dir
from graphopt.passes import PassContext

from . import PLAN, split_attention
from .apply import Surgery, apply

FORMAT = 1


def save_pruned(gm: fx.GraphModule, directory: str | Path) -> Path:
    """Write ``plan.json`` and ``weights.pt`` into ``directory`` (both or neither)."""
    plans = gm.meta.get(PLAN)
    if not plans:
        raise ValueError("this graph carries no pruning plan; save the graph the prune pass returned")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with staging_dir(directory) as stage:
        (stage / "plan.json").write_text(json.dumps({"format": FORMAT, "steps": plans}, indent=1) + "\n")
        torch.save(gm.state_dict(), stage / "weights.pt")
        for name in ("plan.json", "weights.pt"):
            install(stage / name, directory / name)
    return directory


def load_pruned(model: nn.Module, example_inputs: Sequence[torch.Tensor], directory: str | Path, *,
                leaf_modules: Iterable = ()) -> fx.GraphModule:
    """The pruned graph: ``model`` (the unpruned architecture) captured, the saved plan
    replayed, the saved weights loaded."""
    directory = Path(directory)
    try:
        saved = json.loads((directory / "plan.json").read_text())
        state = torch.load(directory / "weights.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"cannot read a pruned model from {directory}: {exc}") from exc
    if saved.get("format") != FORMAT:
        raise ValueError(f"{directory}/plan.json is format {saved.get('format')}, this graphopt reads {FORMAT}")
    graph = capture(model, tuple(example_inputs), leaf_modules=leaf_modules)
    gm = graph.module
    for step in saved["steps"]:
        surgery = Surgery.from_dict(step)
        if surgery.decomposed:
            split_attention(gm, PassContext(options={}, graph=graph.replace(gm)))
        apply(gm, surgery)
    try:
        gm.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"the weights in {directory} do not fit the replayed plan (was the graph saved "
                         f"right after prune/finetune?): {str(exc).splitlines()[0]}") from exc
    gm.meta[PLAN] = saved["steps"]
    return gm.eval()
