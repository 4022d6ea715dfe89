"""ExecuTorch emitter: Graph -> partition(backend=xnnpack) -> torch.export -> XNNPACK delegates
for graphopt's partitions, portable kernels for the rest (``pte_lower``) -> .pte (fp32, or int8
for a quantized graph), run by ExecuTorch's runtime."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

import graphopt
from graphopt import Artifact, EmitError, Emitter, Tolerance
from graphopt.emit import as_inputs, captured_output, write_atomic
from graphopt.errors import first_line

_pool = {"default": None, "resets": 0}   # ExecuTorch's one thread pool, shared by every .pte


def emit(graph: graphopt.Graph, options: dict, out_dir: Path) -> Artifact:
    """Lower ``graph``, partitioned for xnnpack, to ``out_dir/<name>.pte`` (``<name>_int8.pte``
    for a graph with fake quants, which XNNPACK runs with int8 kernels)."""
    from . import lower as pte_lower

    if graph.precision == "fp16":
        raise EmitError(f"{graph.name} holds fp16 tensors; pte takes fp32 and int8 graphs (graphopt's xnnpack "
                        f"partitions hold no fp16 nodes): leave fp16 out of the pipeline for pte")
    try:
        with captured_output():
            from executorch.version import __version__ as version
    except ImportError as exc:
        raise EmitError(f"pte needs ExecuTorch: {first_line(exc)}; pip install 'graphopt[pte]'") from exc
    data, info = pte_lower.lower(graph.module, graph.example_inputs, graph.name)
    precision = info.pop("precision")
    target = Path(out_dir) / f"{graph.name}{'_int8' if precision == 'int8' else ''}.pte"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, data)
    return Artifact("pte", target, {"precision": precision, "executorch": version,
                                    "inputs": graph.input_specs(), **info})


def _threadpool(threads: int | None) -> int:
    """Size ExecuTorch's thread pool for ``threads`` (None: its default, a thread per core) and
    return how many times it was replaced. Replacing it frees the pool that XNNPACK delegates
    loaded before hold, so a runner reloads its method when this count moved."""
    from executorch.extension.pybindings import portable_lib

    current = portable_lib._threadpool_get_thread_count()
    if _pool["default"] is None:
        _pool["default"] = current
    wanted = _pool["default"] if threads is None else threads
    if wanted != current:
        with captured_output():   # "Resetting threadpool to N threads."
            portable_lib._unsafe_reset_threadpool(wanted)
        _pool["resets"] += 1
    return _pool["resets"]


def precision(path: Path) -> str:
    """The precision ``emit`` recorded in the program (its constant method ``graphopt_precision``);
    fp32 for a .pte from elsewhere."""
    from .lower import PRECISION

    with captured_output():   # cpuinfo lines
        from executorch.runtime import Runtime
        program = Runtime.get().load_program(Path(path).read_bytes())
        return program.load_method(PRECISION).execute([])[0] if PRECISION in program.method_names else "fp32"


def load(artifact: Artifact, threads: int | None = None) -> graphopt.emit.Runner:
    """A runner on ExecuTorch's runtime. ``threads`` sizes the process-wide pool XNNPACK runs
    on (None: a thread per core) before each call: runners of different thread counts take
    turns resizing it and reload their method after another resized it."""
    path = Path(artifact.path)
    data = path.read_bytes()
    loaded = {"resets": None}

    def method():
        resets = _threadpool(threads)
        if loaded["resets"] != resets:
            program = runtime.load_program(data)
            loaded.update(program=program, method=program.load_method("forward"), resets=resets)
        return loaded["method"]

    try:
        with captured_output():   # cpuinfo's lines as the thread pool is made
            from executorch.runtime import Runtime
            runtime = Runtime.get()
            method()
    except Exception as exc:
        raise EmitError(f"ExecuTorch cannot load {path}: {first_line(exc)}") from exc
    count = loaded["program"].metadata("forward").num_inputs()

    def run(inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        inputs = as_inputs(inputs, count, path.name)
        try:
            outputs = method().execute([t.detach().contiguous() for t in inputs])
        except Exception as exc:
            raise EmitError(f"ExecuTorch failed to run {path.name}: {first_line(exc)}") from exc
        return [o for o in outputs if isinstance(o, torch.Tensor)]

    return run


@graphopt.hookimpl
def graphopt_register_emitters() -> list[Emitter]:
    return [Emitter(
        format="pte",
        description="ExecuTorch via torch.export: graphopt's xnnpack partitions as XNNPACK delegates "
                    "(int8 kernels for a quantized graph), portable kernels for the rest",
        suffix=".pte", emit=emit, load=load, modules=("executorch",), precision=precision,
        tolerance=Tolerance(max_rel=1e-4, min_cosine=0.9999), prepare="partition(backend=xnnpack)",
        takes=("fp32", "int8"))]
