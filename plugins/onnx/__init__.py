"""ONNX emitter: Graph -> torch.onnx.export (TorchScript or dynamo) -> onnxsim -> .onnx (fp16 graphs keep fp16 weights, fake-quant graphs become int8 QDQ), run by onnxruntime."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch

import graphopt
from graphopt import Artifact, EmitError, Emitter, Option, Tolerance
from graphopt.emit import as_inputs, captured_output, provenance, write_atomic
from graphopt.errors import first_line

from . import qdq as onnx_qdq
from .hard import integer_hard_activations
from .sources import record_origins
from .stem import space_to_depth_stems

OPTIONS = (
    Option("exporter", str, "torchscript", "torch.onnx exporter: torchscript (fast) or dynamo "
           "(torch.export based)", choices=("torchscript", "dynamo")),
    Option("opset", int, 17, "ONNX opset version of the default domain"),
    Option("dynamic_batch", bool, False, "name axis 0 of every input and output 'batch' "
           "so the model takes any batch size"),
    Option("simplify", bool, True, "simplify the exported model with onnxsim"),
    Option("integer_hard_activations", bool, True, "int8 graphs: quantized HardSigmoid gates and HardSwish as "
           "Add/Mul node units onnxruntime runs in int8 (it has no int8 kernel for either)"),
    Option("space_to_depth_stem", bool, True, "int8 graphs: a stride-2 convolution on at most 4 input channels "
           "as a stride-1 one on SpaceToDepth input (the same integer sums, a faster kernel)"),
    Option("source_map", bool, False, "record in each node's metadata the fx node and the line of the model's "
           "source that made it (graphopt.fx_node, graphopt.source); torchscript exporter"),
)
_LAYOUTS = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}   # others: "torch" (as given)


def _other(exporter: str) -> str:
    return "torchscript" if exporter == "dynamo" else "dynamo"


def _declared_inputs(graph: graphopt.Graph) -> tuple[torch.Tensor, ...]:
    """The example inputs in the dtypes the graph declares: fp16 where the fp16 pass
    (keep_io_types=false) recorded ``graphopt.precision`` fp16 on the placeholder."""
    nodes = [n for n in graph.module.graph.nodes if n.op == "placeholder"]
    return tuple(t.half() if n.meta.get("graphopt.precision") == "fp16" else t
                 for n, t in zip(nodes, graph.example_inputs))


def _output_names(graph: graphopt.Graph) -> list[str]:
    """The outputs' names in the file: the dict keys and named-tuple fields on each output's path
    (``logits``, ``aux.0``); ``output_<i>`` for a tensor or plain tuples and lists."""
    from torch.utils._pytree import GetAttrKey, MappingKey, tree_flatten_with_path

    with torch.no_grad():
        leaves = [path for path, value in tree_flatten_with_path(graph.module(*_declared_inputs(graph)))[0]
                  if isinstance(value, torch.Tensor)]
    names = [".".join(str(k.key) if isinstance(k, MappingKey) else k.name if isinstance(k, GetAttrKey) else
                      str(getattr(k, "idx", k)) for k in path) for path in leaves]
    named = any(isinstance(k, (MappingKey, GetAttrKey)) for path in leaves for k in path)
    return names if named and len(set(names)) == len(names) else [f"output_{i}" for i in range(len(leaves))]


def _export(graph: graphopt.Graph, opts: dict, output_names: list[str]) -> Any:
    """The exported ``onnx.ModelProto``; an export failure is an EmitError."""
    import onnx

    names = graph.input_names
    dynamic = {n: {0: "batch"} for n in names + output_names} if opts["dynamic_batch"] else None
    common = dict(input_names=names, output_names=output_names, opset_version=opts["opset"],
                  dynamic_axes=dynamic)
    inputs = _declared_inputs(graph)
    try:
        with captured_output():
            if opts["exporter"] == "dynamo":
                program = torch.onnx.export(graph.module, inputs, dynamo=True, verbose=False, **common)
                return program.model_proto
            buf = io.BytesIO()   # verbose: each node's doc_string holds the stack that made it (source_map)
            torch.onnx.export(graph.module, inputs, buf, dynamo=False, verbose=opts["source_map"], **common)
            model = onnx.load_model_from_string(buf.getvalue())
            if opts["source_map"]:
                record_origins(model, graph.module)
            return model
    except Exception as exc:
        raise EmitError(f"ONNX export of {graph.name} with the {opts['exporter']} exporter "
                        f"(opset {opts['opset']}) failed: {first_line(exc)}; "
                        f"try exporter={_other(opts['exporter'])} or another opset") from exc


def _simplify(model: Any) -> tuple[Any, str | None]:
    """``(simplified model, None)``, or ``(model unchanged, why onnxsim failed)``."""
    import onnxsim

    try:
        with captured_output():
            simplified, ok = onnxsim.simplify(model)
    except Exception as exc:
        return model, first_line(exc)
    return (simplified, None) if ok else (model, "onnxsim's check of the simplified model failed")


def _half_storage(model: Any) -> int:
    """Store the float32 initializers that fp16 holds exactly (more than one value) as float16,
    each read through a Cast to float32, and return how many. For an fp16 graph: the exporters
    and onnxsim fold fp16 weights upcast at use (``fp16(mode=weights)``) into float32
    initializers; this gives the file its fp16 weights back, computing as before."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    casts = []
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(init)
        half = array.astype(np.float16)
        if array.size < 2 or not np.array_equal(half.astype(np.float32), array):
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(half, f"{name}_fp16"))
        casts.append(helper.make_node("Cast", [f"{name}_fp16"], [name], name=f"{name}_upcast",
                                      to=TensorProto.FLOAT))
    nodes = [*casts, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(casts)


def _values(infos: Sequence[Any]) -> list[dict]:
    """Name, shape (ints; a dynamic axis by its name), dtype and layout of graph inputs/outputs."""
    import onnx

    out = []
    for info in infos:
        t = info.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        out.append({"name": info.name, "shape": shape,
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                    "layout": _LAYOUTS.get(len(shape), "torch")})
    return out


def _stamp(model: Any, graph: graphopt.Graph) -> None:
    """Name the graph, drop the exporters' per-node debug info (stack traces with local paths,
    which would make the file differ between checkouts; ``source_map``'s own is kept) and add graphopt's metadata_props
    (``graphopt.version``, ``.pipeline``, ``.inputs`` as the file declares them, ``.precision``)."""
    model.graph.name = graph.name
    for node in model.graph.node:
        node.doc_string = ""
        for prop in [p for p in node.metadata_props if not p.key.startswith("graphopt.")]:
            node.metadata_props.remove(prop)
    inputs = [{k: v[k] for k in ("name", "shape", "dtype")} for v in _values(model.graph.input)]
    del model.metadata_props[:]
    for key, value in provenance(graph, inputs=json.dumps(inputs)).items():
        model.metadata_props.add(key=f"graphopt.{key}", value=value)


def emit(graph: graphopt.Graph, options: dict, out_dir: Path) -> Artifact:
    """Export ``graph`` to ``out_dir/<name>.onnx``: checked, simplified unless told not to; a
    graph with fake-quant nodes becomes an int8 QDQ model (``onnx_qdq``) holding its scales."""
    import onnx

    opts = {o.name: o.default for o in OPTIONS} | dict(options)
    int8 = graph.precision == "int8"
    if int8 and opts["opset"] < 13:
        raise EmitError(f"{graph.name} is quantized: its per-channel int8 weights need opset 13 or later, "
                        f"got opset={opts['opset']}")
    if opts["source_map"] and opts["exporter"] != "torchscript":
        raise EmitError("source_map needs exporter=torchscript (the dynamo exporter does not record the model's lines)")
    model = _export(graph, opts, _output_names(graph))
    meta: dict[str, Any] = {"exporter": opts["exporter"], "simplified": False}
    if opts["simplify"]:   # onnxsim leaves Q/DQ nodes alone: onnxruntime fuses the same int8 units after it
        model, why = _simplify(model)
        meta["simplified"] = why is None
        if why:
            meta["simplify_error"] = why
    if graph.precision == "fp16":
        meta.update(precision="fp16", upcast_initializers=_half_storage(model))
    if int8:
        meta.update(precision="int8", **onnx_qdq.lower(model))
    _stamp(model, graph)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise EmitError(f"the ONNX model exported from {graph.name} is invalid: {first_line(exc)}; "
                        f"try exporter={_other(opts['exporter'])}") from exc
    if int8:
        meta["scales"] = onnx_qdq.check_scales(model, graph.module)
        if opts["integer_hard_activations"]:   # after the check: these grids are the file's own
            meta["integer_hard_activations"] = integer_hard_activations(model)
        if opts["space_to_depth_stem"]:
            meta["space_to_depth_stems"] = space_to_depth_stems(model)
    target = Path(out_dir) / f"{graph.name}.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, model.SerializeToString(deterministic=True))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset != opts["opset"]:   # the dynamo exporter keeps opset 18+ when it cannot convert down
        meta["opset_requested"] = opts["opset"]
    ops = Counter(node.op_type for node in model.graph.node)
    meta.update(opset=opset, nodes=len(model.graph.node), op_types=dict(sorted(ops.items())),
                inputs=_values(model.graph.input), outputs=_values(model.graph.output))
    return Artifact("onnx", target, meta)


def precision(path: Path) -> str:
    """The ``graphopt.precision`` metadata_prop (fp32 for a file from elsewhere)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return props.get("graphopt.precision", "fp32")


# onnxruntime type names that numpy spells differently ("tensor(int64)" -> "int64" needs none).
_ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64"}


def load(artifact: Artifact, threads: int | None = None) -> graphopt.emit.Runner:
    """A runner on onnxruntime's CPU provider; ``threads`` sets intra-op threads (None: ORT's choice)."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3   # errors only: no warnings about unused initializers on stderr
    if threads is not None:
        so.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(artifact.path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EmitError(f"onnxruntime cannot load {artifact.path}: {first_line(exc)}") from exc
    feeds = [(i.name, np.dtype(_ORT_TYPES.get(i.type, i.type[len("tensor("):-1])))
             for i in session.get_inputs()]

    def run(inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        feed = {name: np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype, copy=False))
                for (name, dtype), t in zip(feeds, as_inputs(inputs, len(feeds), artifact.path.name))}
        try:
            outputs = session.run(None, feed)
        except Exception as exc:
            raise EmitError(f"onnxruntime failed to run {artifact.path.name}: "
                            f"{' '.join(str(exc).split())}") from exc
        return [torch.from_numpy(out) for out in outputs]

    return run


@graphopt.hookimpl
def graphopt_register_emitters() -> list[Emitter]:
    return [Emitter(
        format="onnx",
        description="ONNX via torch.onnx.export, simplified by onnxsim, run by onnxruntime (CPU)",
        suffix=".onnx", emit=emit, load=load, options=OPTIONS, precision=precision,
        modules=("onnx", "onnxruntime", "onnxsim"),
        tolerance=Tolerance(max_rel=1e-4, min_cosine=0.9999))]
