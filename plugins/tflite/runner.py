"""The .tflite file: graphopt's metadata entry, its operators, and the LiteRT runner taking torch-layout tensors."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import graphopt
from graphopt import Artifact, EmitError
from graphopt.emit import as_inputs, captured_output, provenance, to_channels_first, to_channels_last
from graphopt.errors import first_line
from graphopt.metrics import compare

METADATA = "graphopt"   # the .tflite metadata entry: graphopt version, pipeline, input/output layouts


def _read(data: bytes) -> Any:
    from ai_edge_litert import schema_py_generated as schema
    return schema.Model.GetRootAs(data, 0)


def operators(data: bytes) -> tuple[Counter, list[str]]:
    """The operators of a .tflite file's bytes: counts of the builtin ones by name (CONV_2D),
    and the custom ones by code (Flex ops, i.e. select TensorFlow ops, are FlexErf and the like)."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model, builtin, custom = _read(data), Counter(), set()
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for i in range(subgraph.OperatorsLength()):
            code = model.OperatorCodes(subgraph.Operators(i).OpcodeIndex())
            number = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if number == schema.BuiltinOperator.CUSTOM:
                custom.add(code.CustomCode().decode())
            else:
                builtin[names[number]] += 1
    return builtin, sorted(custom)


def builtin_operators(data: bytes, model: str) -> Counter:
    """The builtin operators of ``model``'s .tflite bytes; an EmitError if it uses others."""
    ops, custom = operators(data)
    if custom:
        raise EmitError(f"{model} uses ops outside the TFLite builtins ({', '.join(custom)}); "
                        f"graphopt ships builtin ops only")
    return ops


def record(graph: graphopt.Graph, **facts: Any) -> dict:
    """The metadata entry's JSON: ``provenance`` with graphopt's version under "graphopt", in
    the order older files have."""
    made = provenance(graph, **facts)
    return {"graphopt": made.pop("version"), "pipeline": made.pop("pipeline"), "precision": made.pop("precision"),
            **made}


def unpacked(data: bytes) -> Any:
    """The .tflite bytes as the flatbuffer's object tree (``ModelT``), buffers the converter stored after
    the flatbuffer (``offset``/``size``, litert-torch's fp16 files) moved into it: repacking drops what
    follows the flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytes(data), 0)
    for buffer in model.buffers:
        if buffer.offset > 1:
            buffer.data = np.frombuffer(data, np.uint8, buffer.size, buffer.offset)
            buffer.offset = buffer.size = 0
    return model


def packed(model: Any, size: int) -> bytes:
    """``model`` (``unpacked``) as .tflite bytes; ``size``: about how many."""
    import flatbuffers

    builder = flatbuffers.Builder(size + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def with_metadata(data: bytes, info: dict) -> bytes:
    """``data`` with ``info`` as JSON in the metadata entry METADATA."""
    from ai_edge_litert import schema_py_generated as schema

    model = unpacked(data)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(info).encode(), np.uint8)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA, len(model.buffers)
    model.buffers.append(buffer)
    model.metadata = [*(model.metadata or []), entry]
    return packed(model, len(data))


def _metadata(data: bytes, path: Path) -> dict:
    model = _read(data)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == METADATA.encode():
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    raise EmitError(f"{path} has no graphopt metadata (tensor layouts); emit it with graphopt")


def _channels_last(layout: str) -> bool:
    return len(layout) >= 3 and layout.endswith("C")


def to_torch(array: np.ndarray, layout: str, quantization: list | None = None) -> torch.Tensor:
    """A .tflite output in torch's layout (and real numbers, for an int8 one with ``quantization``)."""
    if quantization:                                   # an int8 output: back to real numbers
        scale, zero_point = quantization
        array = (array.astype(np.float32) - zero_point) * np.float32(scale)
    t = torch.from_numpy(np.ascontiguousarray(array))
    return to_channels_first(t).contiguous() if _channels_last(layout) else t


def feed(inputs: torch.Tensor | Sequence[torch.Tensor], specs: list[dict], file: str) -> dict[str, np.ndarray]:
    """The signature runner's arguments for torch-layout ``inputs``: in the file's layouts and
    dtypes (int8 inputs quantized with their scales)."""
    out = {}
    for t, spec in zip(as_inputs(inputs, len(specs), file), specs):
        x = t.detach().cpu()
        array = (to_channels_last(x) if _channels_last(spec["layout"]) else x).numpy()
        if spec.get("quantization"):                   # an int8 input: quantize with its scale
            scale, zero_point = spec["quantization"]
            array = np.clip(np.round(array / scale) + zero_point, -128, 127)
        array = array.astype(spec["dtype"], copy=False)
        if list(array.shape) != spec["shape"]:
            raise EmitError(f"{file} takes {spec['name']} of shape {spec['shape']} ({spec['layout']}), "
                            f"got {list(t.shape)} in torch layout")
        out[spec["name"]] = np.ascontiguousarray(array)
    return out


def precision(path: Path) -> str:
    """The precision in graphopt's metadata entry (fp32 when an older graphopt left it out)."""
    return _metadata(Path(path).read_bytes(), path).get("precision", "fp32")


def load(artifact: Artifact, threads: int | None = None) -> graphopt.emit.Runner:
    """A runner on LiteRT's interpreter (XNNPACK on CPU); ``threads`` sets its thread count."""
    from ai_edge_litert.interpreter import Interpreter

    path = Path(artifact.path)
    data = path.read_bytes()
    info = _metadata(data, path)
    try:
        with captured_output():   # "Created TensorFlow Lite XNNPACK delegate" on stderr
            interpreter = Interpreter(model_content=data, num_threads=threads)
            interpreter.allocate_tensors()
        signature = interpreter.get_signature_runner()
    except Exception as exc:
        raise EmitError(f"LiteRT cannot load {path}: {first_line(exc)}") from exc

    def run(inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        arguments = feed(inputs, info["inputs"], path.name)
        try:
            outputs = signature(**arguments)
        except Exception as exc:
            raise EmitError(f"LiteRT failed to run {path.name}: {first_line(exc)}") from exc
        return [to_torch(outputs[o["name"]], o["layout"], o.get("quantization")) for o in info["outputs"]]

    return run


def disagreement(artifact: Artifact, graph: graphopt.Graph, tolerance: graphopt.Tolerance) -> str | None:
    """How the file's outputs on the example miss the graph's under ``tolerance``, or None."""
    try:
        problems = tolerance.violations(compare(graph.run(), load(artifact)(list(graph.example_inputs))))
    except Exception as exc:   # it fails to run: the driver's verification reports that too
        return f"fails to run ({first_line(exc)})"
    return f"disagrees with the graph on the example ({problems[0]})" if problems else None
