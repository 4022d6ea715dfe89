"""Float islands in an int8 .tflite: the int8 elementwise ops LiteRT's XNNPACK delegate leaves to
LiteRT's own kernels are rewritten as DEQUANTIZE -> the float op -> QUANTIZE, which the delegate
takes, so the model stays one XNNPACK partition.

The delegate takes HARD_SWISH (and LOGISTIC, TANH, ...) in float only; an int8 one splits the
model into a partition before and after it, and runs on LiteRT's reference kernel. MobileNetV3-Small
int8 was 19 partitions around 18 HARD_SWISH ops and 4.1 ms; as float islands it is one partition
and 1.4 ms, 1 thread here. The result is also closer to the graph, which computes these ops in
float between its fake quants: the island is the graph's own arithmetic, the int8 kernel a
fixed-point approximation of it.
"""
from __future__ import annotations

from collections import Counter

from .runner import packed, unpacked

# unary ops whose float form the XNNPACK delegate takes; one is rewritten only where the delegate leaves it out
UNARY = frozenset({"HARD_SWISH", "LOGISTIC", "TANH", "ELU", "GELU", "LEAKY_RELU"})


def xnnpack_split(data: bytes) -> tuple[int, dict[int, str]]:
    """How LiteRT's default XNNPACK delegate splits the model in ``data``: its partitions, and the ops
    (index in the main subgraph -> name) it leaves to LiteRT's kernels, i.e. those whose outputs reach
    a partition or the graph's outputs without coming out of a partition."""
    from ai_edge_litert.interpreter import Interpreter

    from graphopt.emit import captured_output

    with captured_output():
        it = Interpreter(model_content=data, num_threads=1)
        it.allocate_tensors()
    ops = it._get_ops_details()
    partitions = [o for o in ops if o["op_name"] == "DELEGATE"]
    produced = {t for p in partitions for t in p["outputs"]}
    needed = {t for p in partitions for t in p["inputs"]} | {d["index"] for d in it.get_output_details()}
    left: dict[int, str] = {}
    grew = True
    while grew:
        grew = False
        for o in ops:
            outs = set(o["outputs"])
            if o["op_name"] != "DELEGATE" and o["index"] not in left and not outs & produced and outs & needed:
                left[o["index"]] = o["op_name"]
                needed |= set(o["inputs"])
                grew = True
    return len(partitions), left


def float_islands(data: bytes) -> tuple[bytes, Counter]:
    """``data`` with each int8 op of ``UNARY`` that the delegate leaves out run in float between a
    DEQUANTIZE and a QUANTIZE onto its own int8 output tensor (same grid); the ops rewritten, by name.
    A model with none, or whose partitions the rewrite does not reduce, comes back as it was."""
    from ai_edge_litert import schema_py_generated as schema

    data = bytes(data)
    partitions, left = xnnpack_split(data)
    targets = {i for i, name in left.items() if name in UNARY}
    if not targets:
        return data, Counter()
    model = unpacked(data)
    graph = model.subgraphs[0]

    def code(builtin: int) -> int:
        for i, c in enumerate(model.operatorCodes):
            if max(c.builtinCode, c.deprecatedBuiltinCode) == builtin:
                return i
        c = schema.OperatorCodeT()
        c.builtinCode, c.deprecatedBuiltinCode, c.version = builtin, min(builtin, 127), 1
        model.operatorCodes.append(c)
        return len(model.operatorCodes) - 1

    def float_twin(index: int) -> int:
        t, twin = graph.tensors[index], schema.TensorT()
        twin.shape, twin.shapeSignature, twin.type = t.shape, t.shapeSignature, schema.TensorType.FLOAT32
        twin.buffer, twin.name = empty, (t.name or b"") + b"_float"
        graph.tensors.append(twin)
        return len(graph.tensors) - 1

    int8 = schema.TensorType.INT8
    empty = len(model.buffers)
    model.buffers.append(schema.BufferT())
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    rewritten, operators = Counter(), []
    for i, op in enumerate(graph.operators):
        if i not in targets or len(op.inputs) != 1 or len(op.outputs) != 1 or \
                {graph.tensors[op.inputs[0]].type, graph.tensors[op.outputs[0]].type} != {int8}:
            operators.append(op)
            continue
        source, target = op.inputs[0], op.outputs[0]
        op.inputs, op.outputs = [float_twin(source)], [float_twin(target)]
        dequantize, quantize = schema.OperatorT(), schema.OperatorT()
        dequantize.opcodeIndex, dequantize.inputs, dequantize.outputs = \
            code(schema.BuiltinOperator.DEQUANTIZE), [source], op.inputs
        quantize.opcodeIndex, quantize.inputs, quantize.outputs = \
            code(schema.BuiltinOperator.QUANTIZE), op.outputs, [target]
        operators += [dequantize, op, quantize]
        c = model.operatorCodes[op.opcodeIndex]
        rewritten[names[max(c.builtinCode, c.deprecatedBuiltinCode)]] += 1
    graph.operators = operators
    islands = packed(model, len(data))
    # kept where the delegate then takes them: fewer partitions (a runtime whose delegate refuses the float op too)
    return (islands, rewritten) if xnnpack_split(islands)[0] < partitions else (data, Counter())
