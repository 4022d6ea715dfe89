"""TorchScript-Lite emitter: Graph -> torch.jit.trace (or script) -> freeze/optimize_for_mobile -> .ptl, run by the lite interpreter."""
from __future__ import annotations

import contextlib
import io
import json
import pickletools
import struct
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

import graphopt
from graphopt import Artifact, EmitError, Emitter, Option, Tolerance
from graphopt.emit import as_inputs, provenance, write_atomic
from graphopt.errors import first_line
from graphopt.graph import flatten_outputs

from . import int8 as ptl_int8
from . import scales as ptl_scales

OPTIONS = (
    Option("optimize_for_mobile", bool, True, "run torch's optimize_for_mobile (needs a torch "
           "build with XNNPACK; without it the module is only frozen, and meta says why)"),
    Option("engine", str, "onednn", "torch's quantized engine for an int8 graph (one with quantize's "
           "fake-quant nodes): onednn (x86, exact with 8-bit activations), x86 (fbgemm for depthwise "
           "convolutions, which saturates with 8-bit activations) or qnnpack (ARM); recorded in the "
           "file and set when it is loaded and run", ptl_int8.ENGINES),
)
EXTRA_FILE = "graphopt.json"          # inside the archive: extra/graphopt.json
NO_XNNPACK = "skipped: this torch build has no XNNPACK"
FP16_KEPT = "skipped: it would fold the fp16 weights' upcasts into fp32 constants"
_WRITER_RECORDS = ("version", ".data/version", ".data/serialization_id")   # the writer adds its own


def _flat_module(graph: graphopt.Graph) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """A copy of ``graph.module`` that returns its output tensors as one flat tuple in
    ``graph.run`` order (a lone tensor stays bare), whatever tuples and dicts the model
    returns, and those outputs for the example inputs."""
    gm = graph.module
    with torch.no_grad():
        values, _ = tree_flatten(gm(*graph.example_inputs))
    flat = fx.Graph()
    nodes, _ = tree_flatten(flat.graph_copy(gm.graph, {}))
    kept = [(n, v) for n, v in zip(nodes, values) if isinstance(v, torch.Tensor)]
    flat.output(kept[0][0] if len(kept) == 1 else tuple(n for n, _ in kept))
    return fx.GraphModule(gm, flat, type(gm).__name__), [v for _, v in kept]


def _torchscript(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], name: str) -> tuple[Any, dict]:
    """Trace ``gm``: fx graphs are straight-line code, so the trace is faithful unless the
    tracer warns that it turned a tensor into a Python value (``.item()``, ``.tolist()``...)
    and froze it as a constant. Then, or when tracing fails, script ``gm`` instead."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            traced = torch.jit.trace(gm, tuple(inputs), check_trace=False, _store_inputs=False)
            why = next((f"the tracer warned: {first_line(w.message).split('. ')[0]}" for w in caught
                        if issubclass(w.category, torch.jit.TracerWarning)), None)
        except Exception as exc:
            why = f"tracing failed: {first_line(exc)}"
    if why is None:
        return traced, {"torchscript": "traced"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.script(gm), {"torchscript": "scripted", "scripted_because": why}
    except Exception as exc:
        raise EmitError(f"cannot make TorchScript of {name}: {why}; and torch.jit.script failed: "
                        f"{first_line(exc)}; keep values as tensors (no .item(), .tolist() or numpy) "
                        f"so that a trace can follow them") from exc


def _has_xnnpack() -> bool:
    import torch.backends.xnnpack
    return bool(torch.backends.xnnpack.enabled)


def _optimize(module: Any, wanted: bool, name: str, keep: list[str]) -> tuple[Any, str]:
    """``optimize_for_mobile`` when wanted and this torch build can run it, else only
    ``torch.jit.freeze`` (its first step); and what happened, for ``meta``. The attributes in
    ``keep`` (fp16 tensors read through get_attr) stay attributes: freezing would fold their
    upcasts to fp32 into fp32 constants, and optimize_for_mobile, which freezes all, is skipped."""
    from torch.utils import mobile_optimizer

    module, status = module.eval(), "off"
    if wanted and not _has_xnnpack():
        status = NO_XNNPACK
    elif wanted and keep:
        status = FP16_KEPT
    elif wanted:
        try:
            return mobile_optimizer.optimize_for_mobile(module), "applied"
        except Exception as exc:
            status = f"skipped: {first_line(exc)}"
    try:
        return torch.jit.freeze(module, preserved_attrs=keep), status
    except Exception as exc:
        raise EmitError(f"torch.jit.freeze of the TorchScript of {name} failed: {first_line(exc)}") from exc


@contextlib.contextmanager
def _own_type_names() -> Iterator[None]:
    """Compile into a fresh TorchScript compilation unit and type cache, so the class names
    in the archive do not depend on what this process compiled before (torch renames a
    repeated class ``___torch_mangle_N``)."""
    from torch.jit import _recursive, _state

    saved = _state._python_cu, _recursive.concrete_type_store
    _state._python_cu, _recursive.concrete_type_store = torch._C.CompilationUnit(), _recursive.ConcreteTypeStore()
    try:
        yield
    finally:
        _state._python_cu, _recursive.concrete_type_store = saved


def _renamed(pickle: bytes, names: dict[str, str]) -> bytes:
    """``pickle`` with the strings in ``names`` renamed. TorchScript pickles are protocol 2:
    no frames, so nothing records an offset that the new lengths would shift."""
    parts, end = [], 0
    for op, arg, pos in pickletools.genops(pickle):
        if op.name == "BINUNICODE" and arg in names:
            new = names[arg].encode()
            parts += [pickle[end:pos], b"X", struct.pack("<I", len(new)), new]
            end = pos + 5 + len(arg.encode())
    return b"".join(parts) + pickle[end:]


def _stored_once(records: dict[str, bytes]) -> dict[str, bytes]:
    """``records`` with byte-identical tensor storages (``constants/N.storage``) written once.
    The TorchScript constants and the lite bytecode each pickle a quantized layer's packed
    weights, and engines whose packed weights unpack into new tensors (x86, oneDNN) would
    store them twice."""
    first: dict[bytes, str] = {}
    alias = {}
    for name, data in records.items():
        if name.startswith("constants/") and name.endswith(".storage"):
            key = name.removeprefix("constants/")
            kept = first.setdefault(data, key)
            if kept != key:
                alias[key] = kept
    if not alias or not all(records[p][:2] == b"\x80\x02" for p in records if p.endswith(".pkl")):
        return records
    return {name: _renamed(data, alias) if name.endswith(".pkl") else data for name, data in records.items()
            if name.removeprefix("constants/") not in alias}


def _serialize(module: Any, extra: dict[str, str]) -> bytes:
    """The .ptl bytes without the archive's ``*.debug_pkl`` records (source ranges naming this
    machine's paths and per-process counters, which the lite interpreter never reads), each
    tensor storage written once."""
    saved = io.BytesIO(module._save_to_buffer_for_lite_interpreter(_extra_files=extra))
    reader, out = torch._C.PyTorchFileReader(saved), io.BytesIO()
    writer = torch._C.PyTorchFileWriter(out)
    records = reader.get_all_records()
    kept = _stored_once({r: reader.get_record(r) for r in records
                         if not r.endswith(".debug_pkl") and r not in _WRITER_RECORDS})
    for record, data in kept.items():
        writer.write_record(record, data, len(data))
    version = "version" if "version" in records else ".data/version"   # where torch put it this time
    writer.set_min_version(int(reader.get_record(version)))
    writer.write_end_of_file()
    return out.getvalue()


def _specs(tensors: Sequence[torch.Tensor]) -> list[dict]:
    return [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in tensors]


def _fp16(gm: fx.GraphModule, precision: str) -> tuple[dict, list[str]]:
    """For an fp16 graph: its ``meta`` (the lite interpreter runs half conv2d and
    linear on CPU, so the graph is saved as it is: half activations too, or fp16 weights upcast
    at use after ``fp16(mode=weights)``) and the fp16 attributes read through get_attr."""
    if precision != "fp16":
        return {}, []
    state = gm.state_dict()
    reads = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    half = any(n.meta.get("graphopt.dtype") == "float16" for n in gm.graph.nodes
               if n.op in ("call_module", "call_function", "call_method"))
    return ({"precision": "fp16", "fp16": "weights and activations" if half else "weights"},
            sorted(k for k, t in state.items() if t.dtype == torch.float16 and k in reads))


def _engine(engine: str | None) -> contextlib.AbstractContextManager:
    """The quantized engine set inside (nothing to set for a file without int8 kernels)."""
    if engine is None:
        return contextlib.nullcontext()
    if ptl_int8.missing_engine(engine):
        raise EmitError(ptl_int8.missing_engine(engine))
    return ptl_int8.quantized_engine(engine)


def _int8(gm: fx.GraphModule, engine: str | None) -> tuple[fx.GraphModule, dict]:
    """For a graph holding fake-quant nodes (an engine given): its lowering to quantized kernels
    and ``meta``."""
    if engine is None:
        return gm, {}
    lowered = ptl_int8.lower(gm)
    return lowered.module, {"precision": "int8", "engine": engine, "int8": lowered.summary()}


def emit(graph: graphopt.Graph, options: dict, out_dir: Path) -> Artifact:
    """Write ``graph`` to ``out_dir/<name>.ptl`` for the lite interpreter, frozen, with
    graphopt's version, pipeline and input specs (and precision, and engine when int8) in
    ``extra/graphopt.json``.
    A graph with fake-quant nodes (``quantize``) is saved with quantized kernels (``ptl_int8``)."""
    from torch.jit.mobile import _export_operator_list, _get_model_bytecode_version, _load_for_lite_interpreter

    opts = {o.name: o.default for o in OPTIONS} | dict(options)
    gm, outputs = _flat_module(graph)
    engine = opts["engine"] if graph.precision == "int8" else None
    fp16, keep = _fp16(gm, graph.precision)
    recorded = provenance(graph) | ({"engine": engine} if engine else {})
    extra = {EXTRA_FILE: json.dumps(recorded)}
    with warnings.catch_warnings(), _own_type_names(), _engine(engine):
        warnings.simplefilter("ignore")
        gm, int8 = _int8(gm, engine)
        module, meta = _torchscript(gm, graph.example_inputs, graph.name)
        module, meta["optimize_for_mobile"] = _optimize(module, opts["optimize_for_mobile"], graph.name, keep)
        try:
            data = _serialize(module, extra)
            lite = _load_for_lite_interpreter(io.BytesIO(data))
        except Exception as exc:
            raise EmitError(f"saving {graph.name} for the lite interpreter failed: {first_line(exc)}") from exc
    target = Path(out_dir) / f"{graph.name}.ptl"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, data)
    if engine:
        meta["scales"] = ptl_scales.scale_check(data, graph.module)
    meta.update(bytecode_version=_get_model_bytecode_version(io.BytesIO(data)),
                ops=sorted(_export_operator_list(lite)), inputs=recorded["inputs"], outputs=_specs(outputs),
                **fp16, **int8)
    return Artifact("ptl", target, meta)


def _recorded(path: Path) -> dict:
    """What graphopt recorded in the archive (empty for a .ptl from elsewhere)."""
    reader = torch._C.PyTorchFileReader(str(path))
    if not reader.has_record(f"extra/{EXTRA_FILE}"):
        return {}
    return json.loads(reader.get_record(f"extra/{EXTRA_FILE}"))


def precision(path: Path) -> str:
    """The precision recorded in ``extra/graphopt.json`` (fp32 for a .ptl from elsewhere)."""
    return _recorded(path).get("precision", "fp32")


def load(artifact: Artifact, threads: int | None = None) -> graphopt.emit.Runner:
    """A runner on the lite interpreter; ``threads`` sets torch's intra-op threads for each
    call (None: torch's setting), restored afterwards; so is the quantized engine of an int8 file."""
    from torch.jit.mobile import _load_for_lite_interpreter

    name = artifact.path.name
    try:
        recorded = _recorded(artifact.path)
        specs, engine = recorded.get("inputs"), recorded.get("engine")
        with warnings.catch_warnings(), _engine(engine):
            warnings.simplefilter("ignore")
            module = _load_for_lite_interpreter(str(artifact.path))
    except EmitError:
        raise
    except Exception as exc:
        raise EmitError(f"the lite interpreter cannot load {artifact.path}: {first_line(exc)}") from exc

    def run(inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        inputs = as_inputs(inputs, None if specs is None else len(specs), name)
        if specs is not None:
            inputs = [t.to(getattr(torch, s["dtype"])) for t, s in zip(inputs, specs)]
        before = torch.get_num_threads()
        try:
            if threads is not None:
                torch.set_num_threads(threads)
            with torch.no_grad(), _engine(engine):
                return flatten_outputs(module(*inputs))
        except Exception as exc:
            raise EmitError(f"the lite interpreter failed to run {name}: {first_line(exc)}") from exc
        finally:
            if threads is not None:
                torch.set_num_threads(before)

    return run


@graphopt.hookimpl
def graphopt_register_emitters() -> list[Emitter]:
    return [Emitter(
        format="ptl",
        description="TorchScript-Lite via torch.jit.trace (or script), frozen, run by the lite interpreter",
        suffix=".ptl", emit=emit, load=load, options=OPTIONS, precision=precision,
        tolerance=Tolerance(max_rel=1e-4, min_cosine=0.9999))]
