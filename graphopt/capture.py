"""Model -> Graph: deep copy, eval mode, torch.fx symbolic trace, shapes into node.meta."""
from __future__ import annotations

import copy
import os
import traceback
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import CaptureError, first_line
from .graph import Graph, annotate, flatten_outputs
from .metrics import compare

_TORCH_DIR, _OWN_DIR = os.path.dirname(torch.__file__), os.path.dirname(__file__)


class _Tracer(fx.Tracer):
    """symbolic_trace's tracer, plus user leaf modules and the path of the module being traced."""

    def __init__(self, leaf_modules: Iterable[type | str]):
        super().__init__()
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self._leaf_names or isinstance(m, self._leaf_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or self.path_of_module(m)   # the innermost module that failed
            raise

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:   # meta["source"]: "path:line" that made it
        node, frame = super().create_node(*args, **kwargs), _user_frame(traceback.extract_stack())
        node.meta.update({"source": f"{frame.filename}:{frame.lineno}"} if frame else {})
        return node


def _user_frame(frames: traceback.StackSummary) -> traceback.FrameSummary | None:
    """The innermost frame in the user's code (not torch's, not graphopt's)."""
    frames = [f for f in frames if not f.filename.startswith((_TORCH_DIR, _OWN_DIR)) and "<" not in f.filename]
    return frames[-1] if frames else None


def _trace_error(model: nn.Module, tracer: _Tracer, exc: Exception) -> CaptureError:
    path, frame = tracer.failed_in, _user_frame(traceback.extract_tb(exc.__traceback__))
    kind = type(model.get_submodule(path)).__name__ if path else ""
    where = f"module `{path}` ({kind})" if path else f"the top-level module ({type(model).__name__})"
    line = f" at {os.path.basename(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()}`" if frame else ""
    hint = f"mark it as a leaf module: --leaf-module {path} (in Python leaf_modules=[{kind}] or ['{path}'])" if path \
        else "move that code into a submodule and mark it as a leaf module (--leaf-module NAME; leaf_modules=[...])"
    return CaptureError(f"torch.fx cannot trace {where}{line}: {first_line(exc)}; {hint}, "
                        f"or, in Python, fix the control-flow value with concrete_args")


def as_input_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise CaptureError("example_inputs must be a tensor or a non-empty sequence of tensors")
    return inputs


def capture(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], *,
            leaf_modules: Iterable[type | str] = (), concrete_args: dict | None = None,
            name: str | None = None) -> Graph:
    """Capture ``model`` as a :class:`Graph`; the caller's model is never mutated. ``leaf_modules``: module types or
    qualified names kept as opaque ``call_module`` nodes; ``concrete_args`` as in ``fx.symbolic_trace``."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    model = copy.deepcopy(model).eval()
    shapes = ", ".join("x".join(map(str, t.shape)) for t in inputs)
    try:
        with torch.no_grad():
            eager = flatten_outputs(model(*inputs))
    except Exception as exc:  # the model itself rejects these inputs
        raise CaptureError(f"{type(model).__name__} fails on inputs of shape {shapes}: {first_line(exc)}; "
                           f"check --input-shape") from exc
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args)
    except Exception as exc:
        raise _trace_error(model, tracer, exc) from exc
    gm = fx.GraphModule(tracer.root, graph, name or type(model).__name__).eval()
    try:
        traced = annotate(gm, inputs)
    except Exception as exc:
        raise CaptureError(f"the traced graph of {type(model).__name__} fails on inputs of shape "
                           f"{shapes}: {exc}; mark the submodule involved as a leaf module") from exc
    if compare(eager, traced).max_rel > 1e-6:
        random = [n.name for n in gm.graph.nodes if "dropout" in str(n.target) or "rand" in str(n.target)]
        hint = f" (random ops: {', '.join(random)}, e.g. F.dropout defaults to training=True)" if random else ""
        raise CaptureError(f"{type(model).__name__} gives different outputs on the same inputs in eval "
                           f"mode{hint}; passes cannot be verified against a random reference")
    half = any(t.dtype == torch.float16 for t in gm.state_dict().values())
    return Graph(gm, inputs, name or type(model).__name__, {"precision": "fp16"} if half else {})
