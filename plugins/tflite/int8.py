"""int8 TFLite from a quantized graph, with graphopt's scales: every fake quant => a
quantized_decomposed q/dq pair (int8), every WeightFakeQuant => per-channel q/dq, then
litert-torch (torch.export -> LiteRT converter in STATIC, strict QDQ mode) => int8 kernels.
No quantizer or calibration of litert-torch runs: offline and deterministic.

onnx2tf's path cannot carry given scales (TF's converter calibrates its own), hence this
route. It uses one private hook of litert-torch (its converter config), so the extra pins
litert-torch==0.10.0.
"""
from __future__ import annotations

import contextlib
import operator
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import fx

import graphopt
from graphopt import Artifact, EmitError
from graphopt.emit import captured_output, to_channels_first, to_channels_last, write_atomic
from graphopt.errors import first_line
from graphopt.quant import to_qdq as qdq_form
from graphopt.rewrite import calls
from graphopt.testing.quantization import QTensor, check_grids, check_qtensors, graph_qtensors

from .islands import float_islands
from .runner import builtin_operators, record, with_metadata

_TORCH_LAYOUTS = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}


def to_qdq(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
           channels_last: bool = True) -> tuple[fx.GraphModule, dict[str, torch.Tensor], dict]:
    """A copy of ``gm`` with int8 q/dq pairs for its fake quants, returning a dict of outputs
    (output_0, ...); its sample inputs by name; and the I/O description {"inputs"/"outputs":
    [{name, layout}]}. ``channels_last``: 3-5-D inputs and outputs channels-last (NHWC)."""
    with torch.no_grad():
        ranks = [t.dim() for t in torch.utils._pytree.tree_flatten(gm(*example_inputs))[0]]
    gm, _ = qdq_form(gm)
    g = gm.graph
    _inline_scalars(gm)

    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    samples, io = {}, {"inputs": [], "outputs": []}
    for n, t in zip(placeholders, example_inputs):
        layout = "torch"
        if channels_last and 3 <= t.dim() <= 5:
            layout = "channels_last"
            t = to_channels_last(t).contiguous()
            with g.inserting_after(n):
                back = g.call_function(to_channels_first, (n,))
            n.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        samples[n.target] = t      # keyword name of the forward argument (``input`` where fx named the node input_1)
        io["inputs"].append({"name": n.target, "shape": list(t.shape), "layout": layout})

    output = next(n for n in g.nodes if n.op == "output")
    flat = torch.utils._pytree.tree_flatten(output.args[0])[0]
    outs = {}
    for i, v in enumerate(flat):
        layout = "torch"
        if channels_last and 3 <= ranks[i] <= 5:
            layout = "channels_last"
            with g.inserting_before(output):
                v = g.call_function(to_channels_last, (v,))
        outs[f"output_{i}"] = v
        io["outputs"].append({"name": f"output_{i}", "layout": layout})
    output.args = (outs,)   # a dict: litert-torch names the signature's outputs by its keys
    g.eliminate_dead_code()
    gm.recompile()
    return gm.eval(), samples, io


def _inline_scalars(gm: fx.GraphModule) -> None:
    """In place: 0-d float constants (tflite-compat's operands for onnx2tf) => Python numbers.
    litert-torch's layout pass broadcasts a 0-d tensor operand of a channel-reduced (N, 1, H, W)
    tensor as if it were NCHW beside NHWC (ConvNeXt's LayerNorm2d: ``var + eps``)."""
    for node in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        value = operator.attrgetter(node.target)(gm)
        if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point() and all(
                calls(u, _ARITHMETIC, ("add", "sub", "mul", "div")) and len(u.args) == 2 and not u.kwargs
                and (u.op == "call_function" or u.args[0] is not node) for u in node.users):
            for user in list(node.users):
                user.args = tuple(value.item() if a is node else a for a in user.args)
            gm.graph.erase_node(node)


_ARITHMETIC = (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div)


@contextlib.contextmanager
def _static_strict_qdq():
    """litert-torch sets the LiteRT converter's qdq_conversion_mode=STATIC only when given a PT2E
    quantizer, and never strict_qdq_mode. STATIC turns q/dq pairs into int8 ops with their scales;
    strict keeps float inputs/outputs behind QUANTIZE/DEQUANTIZE (else the boundary q/dq are
    folded into int8 I/O) and keeps ops without q/dq in float."""
    from litert_torch._convert import litert_converter

    api = litert_converter.converter_api_ext
    original = api.ConvertToTFLConfig

    def config():
        c = original()
        c.qdq_conversion_mode, c.strict_qdq_mode = "STATIC", True
        return c

    api.ConvertToTFLConfig = config
    try:
        yield
    finally:
        api.ConvertToTFLConfig = original


def _int8_io(data: bytes) -> bytes:
    """The model with its float inputs' QUANTIZE and float outputs' DEQUANTIZE ops removed, so it
    takes and returns the int8 tensors (TF's own flatbuffer rewrite, used by TFLiteConverter for
    inference_input_type=tf.int8); it raises if an input or output is not quantized."""
    import tensorflow as tf
    from tensorflow.lite.python.util import modify_model_io_type

    return bytes(modify_model_io_type(data, tf.int8, tf.int8))


def convert(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], int8_io: bool = False,
            channels_last: bool = True, fp16: bool = False, islands: bool = False) -> tuple[bytes, dict]:
    """The int8 .tflite of the fake-quant ``gm``: float inputs and outputs (QUANTIZE/DEQUANTIZE
    inside) or, for ``int8_io``, int8 ones carrying the scale and zero point of the fake quants
    right after the inputs and right before the outputs; and the I/O description of ``to_qdq``, with
    ``islands``: the int8 ops made float islands (``islands.float_islands``), by name.
    An fp32 ``gm`` gives an fp32 file, or with ``fp16`` one of float16 weights (litert-torch's
    fp16 recipe: each weight stored in half and dequantized in the file, as TF's converter does)."""
    module, samples, io = to_qdq(gm, example_inputs, channels_last)
    with captured_output():   # litert-torch's progress lines, absl logs
        import litert_torch
        from litert_torch.generative.quantize.quant_recipes import full_fp16_recipe

        def run() -> bytes:
            with _static_strict_qdq():
                return litert_torch.convert(module, sample_kwargs=samples,
                                            quant_config=full_fp16_recipe() if fp16 else None).model_content()
        try:
            data = run()
        except Exception as exc:   # retried without its layout pass; if that fails too, its first error
            with _without_layout_pass():
                try:
                    data = run()
                except Exception:
                    raise exc from None
            io["layout_pass"] = f"skipped: it failed ({first_line(exc)})"
        if islands:
            data, io["float_islands"] = float_islands(data)
        if int8_io:
            data = _int8_io(data)
    return bytes(data), io


@contextlib.contextmanager
def _without_layout_pass():
    """litert-torch without its OptimizeLayoutTransposesPass (which moves NCHW ops to NHWC to drop
    transposes): on some q/dq graphs it leaves mismatched shapes (ConvNeXt-T: an add of (1, 96, 56, 56)
    and (1, 56, 56, 96)). The file then keeps a TRANSPOSE around each layout-sensitive op."""
    from litert_torch import fx_infra
    from litert_torch._convert import fx_passes

    class Skipped(fx_infra.ExportedProgramPassBase):
        def call(self, exported_program):
            return fx_infra.ExportedProgramPassResult(exported_program, False)

    original, fx_passes.OptimizeLayoutTransposesPass = fx_passes.OptimizeLayoutTransposesPass, Skipped
    try:
        yield
    finally:
        fx_passes.OptimizeLayoutTransposesPass = original


_SAME_GRID = {"MAX_POOL_2D", "RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS", "PAD", "PADV2", "GATHER",
              "SLICE", "STRIDED_SLICE", "SPACE_TO_DEPTH", "DEPTH_TO_SPACE", "SPLIT", "SPLIT_V"}
_WEIGHTED = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D"}   # weights: input 1


def file_qtensors(data: bytes) -> tuple[list[QTensor], list[QTensor]]:
    """The int8 grids of a .tflite in operator order: activations (each op's int8 outputs, but for
    ops whose output keeps their input's grid), weights (the int8 weight input of each conv and
    fully-connected op)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    acts, weights = [], []

    def grid(i: int, op: dict) -> QTensor | None:
        t = tensors[i]
        q = t["quantization_parameters"]
        if t["dtype"].__name__ != "int8" or not len(q["scales"]):
            return None
        return QTensor(f"{t['name'].rsplit('/', 1)[-1]} ({op['op_name']} {op['index']})",
                       tuple(q["scales"].astype("float64").tolist()), tuple(q["zero_points"].tolist()))

    for op in interpreter._get_ops_details():
        i = op["inputs"][1] if op["op_name"] in _WEIGHTED else -1
        weights += [w] if i >= 0 and (w := grid(i, op)) is not None else []
        if op["op_name"] not in _SAME_GRID:
            acts += [g for i in op["outputs"] if (g := grid(i, op)) is not None]
    return acts, weights


def scale_check(data: bytes, gm: fx.GraphModule) -> dict:
    """The .tflite's int8 grids against the graph's (``graphopt.testing.quantization``): weights position
    by position; activations as grids, since the converter reorders branches; each of the file's
    grids must be the graph's, not each of the graph's in the file: the converter writes a conv
    that feeds a concat straight onto the concat's grid. A mismatch is an EmitError naming the tensor."""
    acts, weights = file_qtensors(data)
    graph_acts, graph_weights = graph_qtensors(gm)

    def fail(what: str) -> None:
        raise EmitError(f"the int8 TFLite model does not hold the graph's quantization: {what}")

    return {"activations": check_grids("int8 tensor", graph_acts, acts, optional=lambda grid: True, fail=fail),
            "weights": check_qtensors("int8 weight", graph_weights, weights, fail=fail)}


def emit(graph: graphopt.Graph, opts: dict, out_dir: Path, fp16: bool = False) -> Artifact:
    """``graph`` => a .tflite through litert-torch (``convert``): a quantized graph => ``<name>_int8.tflite``
    with int8 kernels holding the graph's own scales; an fp32 one => ``<name>.tflite``, or with ``fp16``
    ``<name>_fp16.tflite`` (the route the emitter takes where onnx2tf cannot). ``opts`` are the tflite
    emitter's."""
    from ai_edge_litert.interpreter import Interpreter

    int8 = graph.precision == "int8"
    precision = "int8" if int8 else "fp16" if fp16 else "fp32"
    try:
        with captured_output():
            import litert_torch
    except ImportError as exc:
        raise EmitError(f"{'int8 TFLite' if int8 else 'the litert-torch route'} needs litert-torch: "
                        f"{first_line(exc)}; pip install 'graphopt[tflite]'") from exc
    try:
        data, io = convert(graph.module, graph.example_inputs, opts["int8_io"], not opts["keep_nchw"], fp16,
                           int8 and opts["float_islands"])
    except Exception as exc:
        raise EmitError(f"litert-torch could not convert {'the quantized ' if int8 else ''}{graph.name}: "
                        f"{first_line(exc)}") from exc
    ops = builtin_operators(data, f"the {precision} TFLite model of {graph.name}")
    signature = Interpreter(model_content=data).get_signature_runner()
    specs = {}
    for kind, details in (("inputs", signature.get_input_details()), ("outputs", signature.get_output_details())):
        specs[kind] = []
        for value in io[kind]:
            d = details[value["name"]]
            rank = len(d["shape"])
            layout = _TORCH_LAYOUTS.get(rank, "torch")
            if value["layout"] == "channels_last":
                layout = layout.replace("C", "") + "C"
            dtype = np.dtype(d["dtype"]).name
            specs[kind].append({"name": value["name"], "shape": [int(x) for x in d["shape"]], "dtype": dtype,
                                "layout": layout,
                                "quantization": [float(d["quantization"][0]), int(d["quantization"][1])]
                                if dtype == "int8" else None})
    info = record(graph, precision=precision, **specs)
    suffix = f"_int8{'' if opts['float_islands'] else '_only'}{'_io' if opts['int8_io'] else ''}" if int8 else \
        "_fp16" if fp16 else ""
    target = Path(out_dir) / f"{graph.name}{suffix}.tflite"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, with_metadata(data, info))
    meta = {"precision": precision, "op_types": dict(sorted(ops.items())), **specs,
            "converter": f"litert-torch {litert_torch.__version__}{' (STATIC, strict QDQ)' if int8 else ''}"
                         f"{' (fp16 recipe)' if fp16 else ''}"}
    meta |= {"layout_pass": io["layout_pass"]} if "layout_pass" in io else {}
    meta |= {"float_islands": dict(sorted(io["float_islands"].items()))} if io.get("float_islands") else {}
    return Artifact("tflite", target, meta | ({"int8_io": opts["int8_io"], "scales": scale_check(data, graph.module)}
                                              if int8 else {}))
