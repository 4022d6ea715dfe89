"""TFLite emitter: Graph (fp16 upcast) -> .onnx (onnx emitter) -> onnx2tf -> builtin ops only -> .tflite;
int8, and fp32 where onnx2tf cannot: litert-torch (int8.py); run: runner.py."""
from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import graphopt
from graphopt import Artifact, EmitError, Emitter, Option, Tolerance
from graphopt.emit import captured_output, to_channels_last, write_atomic
from graphopt.errors import first_line

from .runner import operators  # noqa: F401  for bench/ and tests
from .runner import builtin_operators, disagreement, feed, load, precision, record, to_torch, with_metadata

OPTIONS = (
    Option("precision", str, "fp32", "fp32, or fp16 weights (half the file, errors ~1e-3)",
           choices=("fp32", "fp16")),
    Option("keep_nchw", bool, False, "keep torch's channels-first layout for 3-5-D inputs "
           "(default: channels-last, NHWC, as TFLite kernels want)"),
    Option("int8_io", bool, False, "quantized graphs: int8 inputs and outputs (default: float, "
           "quantized inside)"),
    Option("float_islands", bool, True, "quantized graphs: int8 elementwise ops LiteRT's XNNPACK delegate "
           "refuses (HARD_SWISH, LOGISTIC...) run in float between DEQUANTIZE/QUANTIZE, inside the delegate; "
           "off: int8 kernels throughout, for integer-only accelerators"),
    Option("route", str, "auto", "auto: onnx2tf, else litert-torch where onnx2tf fails or its file disagrees "
           "with the graph (fp32); or force one", choices=("auto", "onnx2tf", "litert-torch")),
)
TOLERANCE = Tolerance(max_rel=1e-4, min_cosine=0.9999)
# onnx2tf downloads these sample images for 4-D 3-channel inputs unless the file is in its working directory.
CALIBRATION = "calibration_image_sample_data_20x128x128x3_float32.npy"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NOT_BUILTIN = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")


def _calibration(inputs: Sequence[torch.Tensor]) -> np.ndarray:
    """onnx2tf's sample file (20x128x128x3 float32), made of the first 4-D 3-channel example
    input, NHWC, nearest-resized; onnx2tf resizes it back for its own check inference."""
    x = next((t for t in inputs if t.dim() == 4 and t.shape[1] == 3), None)
    if x is None:   # onnx2tf reads the file only for such inputs: shape and dtype are all that matter
        return np.zeros((20, 128, 128, 3), np.float32)
    nhwc = to_channels_last(x.detach().float())
    rows, cols = (torch.arange(128) * n // 128 for n in nhwc.shape[1:3])
    return nhwc[:, rows][:, :, cols][torch.arange(20) % len(nhwc)].numpy()


def _conversion_error(exc: BaseException, log: str, onnx_model: Any, name: str) -> EmitError:
    """One line naming the ONNX node onnx2tf stopped at (its name and op type, the fx node and the model's line that
    made it) and why: its first ERROR line before the traceback it logs, else the exception's own message."""
    log = _ANSI.sub("", log)
    nodes = re.findall(r"onnx_op_name: (\S+)", log)
    node = getattr(exc, "onnx_op_name", None) or (nodes[-1] if nodes else None)
    before_trace = log.split("The trace log is below.")[0]
    reasons = [line.strip()[len("ERROR:"):].strip() for line in before_trace.splitlines()
               if line.strip().startswith("ERROR:") and line.strip() != "ERROR:"]
    reason = (reasons[0] if reasons else first_line(exc)).rstrip(". ")
    if node is None:
        return EmitError(f"onnx2tf cannot convert {name}: {reason}")
    found = next((n for n in onnx_model.graph.node if n.name == node), None)
    made_by = _onnx_emitter().sources.origin(found) if found is not None else None
    return EmitError(f"onnx2tf cannot convert ONNX node {node} ({found.op_type if found else '?'}) of {name}"
                     f"{f', made by {made_by}' if made_by else ''}: {reason}; rewrite that op before emitting tflite")


def _to_keras(onnx_path: Path, graph: graphopt.Graph, keep: list[str], work: Path) -> Any:
    """onnx2tf's Keras model of the ONNX file, converted in ``work`` (which it may litter);
    the 3-5-D inputs named in ``keep`` stay channels-first."""
    import onnx
    import onnx2tf
    import tf_keras

    np.save(work / CALIBRATION, _calibration(graph.example_inputs))
    tf_keras.backend.clear_session()   # Keras numbers layer names per session: same names, same bytes
    onnx_model = onnx.load(onnx_path)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with captured_output() as log:
            return onnx2tf.convert(
                input_onnx_file_path=str(onnx_path), output_folder_path=str(work / "saved_model"),
                not_use_onnxsim=True, disable_model_save=True, non_verbose=True,
                keep_ncw_or_nchw_or_ncdhw_input_names=keep or None)
    except (Exception, SystemExit) as exc:   # onnx2tf calls sys.exit(1) on many errors
        raise _conversion_error(exc, log.text, onnx_model, graph.name) from exc
    finally:
        os.chdir(cwd)


def converter_for(model: Any, output_names: list[str]) -> Any:
    """A TFLite converter of the Keras model whose signature's inputs and outputs carry the
    ONNX names (the emitter's, and bench peers' that set their own options)."""
    import tensorflow as tf

    def named(*inputs):
        return dict(zip(output_names, tf.nest.flatten(model(list(inputs)))))

    function = tf.function(named, input_signature=[tf.TensorSpec(t.shape, t.dtype, t.name)
                                                   for t in model.inputs])
    # The converter saves the function's owner as a SavedModel. Not the Keras model, whose config
    # TF would serialize to JSON, constants and all (4 minutes for ResNet-18): its weights only.
    owner = tf.Module()
    owner.weights = list(model.weights)
    return tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()], owner)


def _to_tflite(model: Any, output_names: list[str], precision: str, name: str) -> bytes:
    """The .tflite bytes of the Keras model, TFLite builtin ops only."""
    import tensorflow as tf

    converter = converter_for(model, output_names)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    try:
        with captured_output():
            data = converter.convert()
    except Exception as exc:
        ops = sorted(set(_NOT_BUILTIN.findall(str(exc))))
        if ops:
            raise EmitError(f"{name} needs TensorFlow ops that are not TFLite builtins ({', '.join(ops)}); "
                            f"rewrite them before emitting tflite (graphopt never uses Flex ops)") from exc
        raise EmitError(f"TFLite conversion of {name} failed: {first_line(exc)}") from exc
    return data


def _fits(value: dict, details: dict) -> list[str]:
    """The layouts in which the .tflite may hold torch's ``value``: its own, channels-last."""
    shape, layout = value["shape"], value["layout"]
    actual = [int(d) for d in details[value["name"]]["shape"]]
    fits = [layout] if actual == shape else []
    if layout in ("NCL", "NCHW", "NCDHW") and actual == [shape[0], *shape[2:], shape[1]]:
        fits.append(layout.replace("C", "") + "C")
    if not fits:
        raise EmitError(f"onnx2tf gave {value['name']} the shape {actual}, no layout of torch's {shape}")
    return fits


def _spec(value: dict, details: dict, layout: str) -> dict:
    detail = details[value["name"]]
    return {"name": value["name"], "shape": [int(d) for d in detail["shape"]],
            "dtype": np.dtype(detail["dtype"]).name, "layout": layout}


def _closest(fits: list[str], actual: np.ndarray, expected: torch.Tensor) -> str:
    return min(fits, key=lambda layout: float((to_torch(actual, layout) - expected).abs().max()))


def _specs(data: bytes, onnx_meta: dict, graph: graphopt.Graph, keep_nchw: bool) -> tuple[list, list]:
    """Name, shape, dtype and layout of the .tflite's inputs and outputs, in torch order. An
    output whose shape fits both layouts gets the one that reproduces ``graph``'s numbers."""
    from ai_edge_litert.interpreter import Interpreter

    signature = Interpreter(model_content=data).get_signature_runner()
    details = signature.get_input_details()
    inputs = [_spec(v, details, _fits(v, details)[0 if keep_nchw else -1]) for v in onnx_meta["inputs"]]
    details = signature.get_output_details()
    fits = [_fits(v, details) for v in onnx_meta["outputs"]]
    if any(len(f) > 1 for f in fits):
        with captured_output():
            actual = signature(**feed(graph.example_inputs, inputs, graph.name))
        fits = [[_closest(f, actual[v["name"]], expected)]
                for f, v, expected in zip(fits, onnx_meta["outputs"], graph.run())]
    return inputs, [_spec(v, details, f[0]) for v, f in zip(onnx_meta["outputs"], fits)]


def _fp32_copy(graph: graphopt.Graph) -> graphopt.Graph | None:
    """For a graph holding fp16 tensors (after the fp16 pass), the same graph computing in fp32:
    fp16 tensors upcast, casts to fp16 dropped, inputs fp32 (``graphopt.precision`` cleared).
    TFLite's float16 conversion then stores its weights in half again. None for a graph
    without fp16 tensors."""
    if graph.precision != "fp16":
        return None
    gm = copy.deepcopy(graph.module)
    gm._apply(lambda t: t.float() if t.dtype == torch.float16 else t)
    for node in list(gm.graph.nodes):
        node.meta.pop("graphopt.precision", None)
        if node.op == "call_method" and (node.target == "half" or (
                node.target == "to" and torch.float16 in (*node.args[1:], *node.kwargs.values()))):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    upcast = graph.replace(gm)
    upcast.meta["precision"] = "fp32"
    return upcast


def _onnx_emitter() -> Any:
    try:
        import graphopt_plugins.onnx as onnx_emitter
    except ImportError as exc:
        raise EmitError(f"the tflite emitter converts through ONNX but the onnx emitter plugin is missing "
                        f"({first_line(exc)})") from exc
    return onnx_emitter


def emit(graph: graphopt.Graph, options: dict, out_dir: Path) -> Artifact:
    """Convert ``graph`` to ``out_dir/<name>.tflite`` (``<name>_fp16.tflite`` for fp16, which an
    fp16 graph always gets). ``route=auto``: through onnx2tf; where onnx2tf fails, or its file
    disagrees with the graph on the example, through litert-torch instead (``meta.route`` says which
    made the file and why). An int8 graph always takes litert-torch."""
    opts = {o.name: o.default for o in OPTIONS} | dict(options)
    if graph.precision == "int8" or opts["route"] == "litert-torch":
        return _litert(graph, opts, out_dir, "asked for" if graph.precision != "int8" else "int8")
    if opts["int8_io"]:
        raise EmitError(f"int8_io needs a quantized graph; {graph.name} is not (run quantize first)")
    fallback = opts["route"] == "auto"
    try:
        artifact = _onnx2tf(graph, opts, out_dir)
    except Exception as exc:   # onnx2tf and TensorFlow raise their own errors, not only EmitError
        if not fallback:
            raise
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
        reason = next((line for line in lines if "Error" in line and line != lines[0]), lines[-1]) \
            if lines[0].endswith(":") else lines[0]      # TensorFlow's "in user code:", its error further down
        why = str(exc) if isinstance(exc, EmitError) else \
            reason if reason.startswith(type(exc).__name__) else f"{type(exc).__name__}: {reason}"
        try:
            return _litert(graph, opts, out_dir, why)
        except EmitError as again:
            raise EmitError(f"{why}; the litert-torch route failed too: {again}") from exc
    tolerance = graphopt.Effect.FP16.tolerance if "fp16" in (graph.precision, opts["precision"]) else TOLERANCE
    why = disagreement(artifact, graph, tolerance) if fallback else None
    if why is None:
        artifact.meta["route"] = "onnx2tf"
        return artifact
    artifact.path.unlink()
    return _litert(graph, opts, out_dir, f"its file {why}")


def _litert(graph: graphopt.Graph, opts: dict, out_dir: Path, why: str) -> Artifact:
    """The litert-torch route (``int8.emit``), ``meta.route`` saying why it was taken."""
    from . import int8 as litert_route

    fp16 = "fp16" in (graph.precision, opts["precision"])
    artifact = litert_route.emit(_fp32_copy(graph) or graph, opts, out_dir, fp16=fp16)
    artifact.meta["route"] = "litert-torch" + ("" if why in ("int8", "asked for") else f" (onnx2tf: {why})")
    return artifact


def _onnx2tf(graph: graphopt.Graph, opts: dict, out_dir: Path) -> Artifact:
    """The onnx2tf route: the ONNX emitter's unsimplified file -> onnx2tf -> Keras -> TFLite."""
    upcast = _fp32_copy(graph)
    if upcast is not None:
        graph, opts["precision"] = upcast, "fp16"
    onnx_emitter = _onnx_emitter()
    try:
        with captured_output():
            import ai_edge_litert.interpreter  # noqa: F401
            import onnx2tf
            import tensorflow
    except ImportError as exc:
        raise EmitError(f"tflite conversion needs onnx2tf, TensorFlow and LiteRT: {first_line(exc)}; "
                        f"pip install 'graphopt[tflite]'") from exc
    work = Path(tempfile.mkdtemp(prefix="graphopt-tflite-"))
    try:
        # Unsimplified: onnxsim turns 3-D MatMul into Reshape -> Gemm -> Reshape, whose tokens
        # onnx2tf then lays out wrongly (Swin: 0.49 relative error); TFLite folds constants anyway.
        onnx_artifact = onnx_emitter.emit(graph, {"simplify": False, "source_map": True}, work)
        onnx_meta = onnx_artifact.meta
        keep = [v["name"] for v in onnx_meta["inputs"] if opts["keep_nchw"] and 3 <= len(v["shape"]) <= 5]
        model = _to_keras(onnx_artifact.path, graph, keep, work)
        output_names = [v["name"] for v in onnx_meta["outputs"]]
        if len(model.outputs) != len(output_names):
            raise EmitError(f"onnx2tf kept {len(model.outputs)} of the {len(output_names)} outputs "
                            f"of {graph.name}")
        data = _to_tflite(model, output_names, opts["precision"], graph.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ops = builtin_operators(data, f"the TFLite model of {graph.name}")
    inputs, outputs = _specs(data, onnx_meta, graph, opts["keep_nchw"])
    info = record(graph, precision=opts["precision"], inputs=inputs, outputs=outputs)
    suffix = "" if opts["precision"] == "fp32" else f"_{opts['precision']}"
    target = Path(out_dir) / f"{graph.name}{suffix}.tflite"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, with_metadata(data, info))
    meta = {"precision": opts["precision"], "onnx_opset": onnx_meta["opset"],
            "converter": f"onnx2tf {onnx2tf.__version__}, TensorFlow {tensorflow.__version__}",
            "op_types": dict(sorted(ops.items())), "inputs": inputs, "outputs": outputs}
    if upcast is not None:
        meta["fp16"] = "weights: the fp16 graph upcast to fp32, converted with TFLite float16 weights"
    return Artifact("tflite", target, meta)


@graphopt.hookimpl
def graphopt_register_emitters() -> list[Emitter]:
    return [Emitter(
        format="tflite",
        description="TFLite via ONNX and onnx2tf, builtin ops only, NHWC inputs; run by LiteRT (CPU)",
        suffix=".tflite", emit=emit, load=load, options=OPTIONS, precision=precision,
        modules=("onnx", "onnxruntime", "onnxsim", "onnx2tf", "tensorflow", "ai_edge_litert"),
        tolerance=TOLERANCE, prepare="tflite-compat")]
