"""Float islands in an int8 .tflite: the int8 elementwise ops LiteRT's XNNPACK delegate leaves to
LiteRT's own kernels are rewritten as DEQUANTIZE -> the float op -> QUANTIZE, which the delegate
takes, so the model stays one XNNPACK partition.

The delegate takes HARD_SWISH (and LOGISTIC, TANH, ...) in float only; an int8 one splits the
model into a partition before and after it, and runs on LiteRT's reference kernel. So do attention's
int8 SOFTMAX and BATCH_MATMUL of two activations. MobileNetV3-Small
int8 was 19 partitions around 18 HARD_SWISH ops and 4.1 ms; as float islands it is one partition
and 1.4 ms, 1 thread here. The result is also closer to the graph, which computes these ops in
float between its fake quants: the island is the graph's own arithmetic, the int8 kernel a
fixed-point approximation of it.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from .runner import packed, unpacked

# ops whose float form the XNNPACK delegate takes; one is rewritten only where the delegate leaves it out
FLOAT_FORMS = frozenset({"HARD_SWISH", "LOGISTIC", "TANH", "ELU", "GELU", "LEAKY_RELU", "SOFTMAX", "BATCH_MATMUL"})


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


def _rewrite(data: bytes, targets: set[int]) -> tuple[bytes, dict[int, str], list[int]]:
    """``data`` with the ops at ``targets`` (int8 output, int8 or other inputs) run in float: each int8
    input through a DEQUANTIZE, the output through a QUANTIZE onto the op's own int8 tensor (same grid).
    Returns the bytes, the ops rewritten (old index -> name) and each one's index in the new model."""
    from ai_edge_litert import schema_py_generated as schema

    model = unpacked(data)
    graph = model.subgraphs[0]
    int8, names = schema.TensorType.INT8, {v: k for k, v in vars(schema.BuiltinOperator).items() if k[0] != "_"}
    empty = len(model.buffers)
    model.buffers.append(schema.BufferT())

    def code(builtin: int) -> int:
        for i, c in enumerate(model.operatorCodes):
            if max(c.builtinCode, c.deprecatedBuiltinCode) == builtin:
                return i
        c = schema.OperatorCodeT()
        c.builtinCode, c.deprecatedBuiltinCode, c.version = builtin, min(builtin, 127), 1
        model.operatorCodes.append(c)
        return len(model.operatorCodes) - 1

    def convert(builtin: int, source: int, target: int) -> Any:
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = code(builtin), [source], [target]
        return op

    def float_twin(index: int) -> int:
        t, twin = graph.tensors[index], schema.TensorT()
        twin.shape, twin.shapeSignature, twin.type = t.shape, t.shapeSignature, schema.TensorType.FLOAT32
        twin.buffer, twin.name = empty, (t.name or b"") + b"_float"
        graph.tensors.append(twin)
        return len(graph.tensors) - 1

    rewritten, where, operators = {}, [], []
    for i, op in enumerate(graph.operators):
        if i not in targets or len(op.outputs) != 1 or graph.tensors[op.outputs[0]].type != int8:
            operators.append(op)
            continue
        inputs = [x for x in op.inputs if x >= 0 and graph.tensors[x].type == int8]
        twins = {x: float_twin(x) for x in dict.fromkeys(inputs)}
        operators += [convert(schema.BuiltinOperator.DEQUANTIZE, x, t) for x, t in twins.items()]
        target = op.outputs[0]
        op.inputs, op.outputs = [twins.get(x, x) for x in op.inputs], [float_twin(target)]
        where.append(len(operators))
        operators += [op, convert(schema.BuiltinOperator.QUANTIZE, op.outputs[0], target)]
        c = model.operatorCodes[op.opcodeIndex]
        rewritten[i] = names[max(c.builtinCode, c.deprecatedBuiltinCode)]
    graph.operators = operators
    return packed(model, len(data)), rewritten, where


def float_islands(data: bytes) -> tuple[bytes, Counter]:
    """``data`` with each int8 op of ``FLOAT_FORMS`` that the delegate leaves out run in float (``_rewrite``)
    where the delegate then takes it; the ops rewritten, by name. A model with none, or whose partitions the
    rewrite does not reduce, comes back as it was."""
    data = bytes(data)
    partitions, left = xnnpack_split(data)
    targets = {i for i, name in left.items() if name in FLOAT_FORMS}
    if not targets:
        return data, Counter()
    islands, rewritten, where = _rewrite(data, targets)
    after, still = xnnpack_split(islands)       # a float form this runtime's delegate refuses too: not rewritten
    taken = {i for i, at in zip(rewritten, where) if at not in still}
    if taken != set(rewritten):
        islands, rewritten, _ = _rewrite(data, taken)
        after = xnnpack_split(islands)[0]
    if not rewritten or after >= partitions:
        return data, Counter()
    return islands, Counter(rewritten.values())
