"""graphopt's xnnpack partitions => ExecuTorch XNNPACK delegates, one per partition.

The graph is exported with each partition submodule's nodes annotated (``torch.fx.traceback
.annotate``, which survives torch.export and the edge decompositions; ``nn_module_stack`` does
not name fx submodules reliably). ``GraphoptPartitioner`` tags exactly those nodes and the
constants only they read; everything else runs on ExecuTorch's portable CPU kernels. Inside the
partitions a quantized graph is written as PT2E's convert writes it (``graphopt.quant.to_qdq``): int8
weights -> dequantize_per_channel, a q and one dq per user for every fake quant, which XNNPACK
lowers to int8 kernels; outside them fake quants are computed in float.
"""
from __future__ import annotations

import copy
import hashlib
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch import nn
from torch.nn.utils import parametrize

from graphopt import EmitError
from graphopt.emit import captured_output
from graphopt.errors import first_line
from graphopt.quant import is_fake_quant, to_qdq
from graphopt.testing.quantization import QTensor, check_grids, graph_qtensors

BACKEND = "xnnpack"
MARK = "graphopt.partition"
TAG = "delegation_tag"
PRECISION = "graphopt_precision"    # a constant method of the program: "fp32" or "int8"


def partitions(gm: fx.GraphModule) -> list[str]:
    """The submodules graphopt's ``partition(backend=xnnpack)`` pass made of ``gm``."""
    info = gm.meta.get("graphopt.partition")
    if info is None:
        raise EmitError("pte delegates graphopt's partitions: run partition(backend=xnnpack) first")
    if info.get("backend") != BACKEND:
        raise EmitError(f"pte delegates xnnpack partitions; the graph is partitioned for {info.get('backend')}")
    return list(info["partitions"])


class _Marked(nn.Module):
    """A partition submodule whose traced nodes carry ``meta["custom"][MARK] = name``."""

    def __init__(self, name: str, inner: nn.Module):
        super().__init__()
        self.name, self.inner = name, inner

    def forward(self, *args, **kwargs):
        with fx_traceback.annotate({MARK: self.name}):
            return self.inner(*args, **kwargs)


def _mark(node: fx.Node) -> str | None:
    return node.meta.get("custom", {}).get(MARK)


def _op(node: fx.Node) -> str:
    """``aten.convolution.default``, ``quantized_decomposed.dequantize_per_tensor.default``..."""
    return getattr(node.target, "__name__", str(node.target)) if node.op == "call_function" else node.op


def _is_qdq(node: fx.Node) -> bool:
    return _op(node).startswith("quantized_decomposed.")


def _fake_quant_in_float(x, scale: float, zero_point: int, qmin: int, qmax: int):
    """What ``torch.fake_quantize_per_tensor_affine`` computes, in ops the portable kernels have."""
    return (torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, qmin, qmax) - zero_point) * scale


def _cpu_in_float(gm: fx.GraphModule, names: list[str]) -> int:
    """In place, outside the partitions (what runs on the portable kernels, which cannot
    quantize): fake quants => the same rounding in float ops, fake-quant weights => their
    rounded float values. The ``partition`` pass copies every fake quant a partition reads
    into it, so no partition loses its q/dq. Returns how many fake quants it rewrote."""
    count = 0
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target not in names:
            for m in gm.get_submodule(n.target).modules():
                if parametrize.is_parametrized(m, "weight"):
                    parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        elif is_fake_quant(n):
            with gm.graph.inserting_before(n):
                n.replace_all_uses_with(gm.graph.call_function(_fake_quant_in_float, n.args))
            gm.graph.erase_node(n)
            count += 1
    gm.recompile()
    return count


def _partitioner(names: list[str]):
    """The ExecuTorch Partitioner for ``names`` (built lazily: executorch imports slowly)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    from executorch.exir.backend.canonical_partitioners.config_partitioner import format_target_name, is_constant_data
    from executorch.exir.backend.partitioner import DelegationSpec, Partitioner, PartitionResult
    from executorch.exir.backend.utils import tag_constant_data

    class GraphoptPartitioner(Partitioner):
        """Delegates graphopt's partitions to XNNPACK, one delegate each; decides nothing else."""

        def __init__(self):
            super().__init__()
            self.xnnpack = XnnpackPartitioner()   # only for the ops XNNPACK wants undecomposed
            self.delegation = DelegationSpec(XnnpackBackend.__name__, [])

        def ops_to_not_decompose(self, ep):
            ops, wanted = self.xnnpack.ops_to_not_decompose(ep)
            return ops, lambda n: _mark(n) is not None and wanted(n)

        def partition(self, ep):
            constant = {n for n in ep.graph.nodes if n.op == "placeholder" and is_constant_data(ep, n)}
            for n in ep.graph.nodes:
                if n.op != "call_function" or not _mark(n) or _op(n) == "getitem":
                    continue
                if not _is_qdq(n) and n.all_input_nodes and all(a in constant for a in n.all_input_nodes):
                    constant.add(n)   # e.g. a scalar's dtype cast: computed on the CPU, read by the delegate
                    n.meta["custom"] = {k: v for k, v in n.meta["custom"].items() if k != MARK}
                else:
                    n.meta[TAG] = _mark(n)
            for n in ep.graph.nodes:
                if _op(n) == "getitem" and TAG in n.args[0].meta:   # where the multi-output op goes
                    n.meta[TAG] = n.args[0].meta[TAG]
                elif TAG in n.meta and not _is_qdq(n):
                    self.accept(n, ep)
            tag_constant_data(ep)
            return PartitionResult(ep, {name: self.delegation for name in names})

        def accept(self, node, ep) -> None:
            """Check that XNNPACK takes ``node``, and let its config mark the q/dq nodes around it
            that its int8 kernel absorbs (XNNPACK's lowering reads those marks)."""
            config = self.xnnpack.target_partitioner_configs.get(format_target_name(_op(node)))
            if config is None or not config.check_constraints(node, ep):
                raise EmitError(f"graphopt partition {node.meta[TAG]} holds {node.name} ({_op(node)}), which "
                                f"ExecuTorch's XNNPACK delegate does not take{'' if config else ' (no such op)'}")
            config.get_partition(node, ep)

    return GraphoptPartitioner()


_WEIGHT = re.compile(r'"xnn_datatype_qcint8"[^{}]*"id_out": (\d+)\s*},\s*"quant_params_type": "PerChannelQuant",\s*'
                     r'"quant_params": {[^{}]*"scale_buffer_idx": (\d+)')
_GRID = re.compile(r'"xnn_datatype_qint8"[^{}]*"id_out": (\d+)\s*},\s*"quant_params_type": "PerTensorQuant",\s*'
                   r'"quant_params": {\s*"scale": ([-+\d.e]+),\s*"zero_point": (-?\d+)')


def _concat_on_its_grid(gm: fx.GraphModule, names: list[str]) -> int:
    """In place, inside the partitions: a concat whose output only a fake quant reads takes each input
    through a copy of that fake quant (a requantize in XNNPACK), since XNNPACK's int8 concatenate
    takes inputs on its output's grid only. Exact: a fake quant is elementwise and idempotent, so
    quantizing the inputs first gives the same numbers. Returns how many concats."""
    count = 0
    for sub in (gm.get_submodule(part) for part in names):
        for n in list(sub.graph.nodes):
            fq = next(iter(n.users)) if len(n.users) == 1 else None
            if n.target not in (torch.cat, torch.concat) or fq is None or not is_fake_quant(fq) or not n.args:
                continue
            with sub.graph.inserting_before(n):
                inputs = [x if is_fake_quant(x) and x.args[1:] == fq.args[1:] else
                          sub.graph.call_function(fq.target, (x, *fq.args[1:])) for x in n.args[0]]
            n.args = (inputs, *n.args[1:])   # dim stays where it was, in args or kwargs
            count += 1
        sub.recompile()
    return count


def _xnnpack_graph(processed: bytes, name: str = "") -> tuple[Counter, Counter, list[QTensor], list[tuple]]:
    """The XNNPACK graph inside a delegate's bytes: its node types, its values' datatypes
    (``xnn_datatype_qcint8``: per-channel int8 weights), the grids of its per-tensor int8 values
    (flatc prints them to 6 decimals) and, per int8 weight, ``(value id, the key its scales are
    stored under)``, read with the flatc executorch ships."""
    from importlib import resources

    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._flatbuffer import _flatc_decompile

    header = XNNHeader.from_bytes(processed[:XNNHeader.EXPECTED_LENGTH])
    schema = resources.files("executorch.backends.xnnpack.serialization").joinpath("schema.fbs")
    with tempfile.TemporaryDirectory() as tmp, resources.as_file(schema) as schema_path:
        data = Path(tmp) / "graph.bin"
        data.write_bytes(processed[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size])
        _flatc_decompile(tmp, str(schema_path), str(data), ["--raw-binary"])
        text = (Path(tmp) / "graph.json").read_text()   # flatc writes inf unquoted: not JSON
    keys = re.findall(r'"named_key": "([^"]*)"', text[text.index('"constant_data"'):])
    return (Counter(re.findall(r'"xnode_union_type": "(\w+)"', text)),
            Counter(re.findall(r'"datatype": "xnn_datatype_(\w+)"', text)),
            [QTensor(f"{i} of delegate {name}", (float(s),), (int(z),)) for i, s, z in _GRID.findall(text)],
            [(f"{i} of delegate {name}", keys[int(b)]) for i, b in _WEIGHT.findall(text)])


def _scale_key(w: QTensor) -> str:
    return "scale_" + hashlib.sha256(np.asarray(w.scale, np.float32).tobytes()).hexdigest()


def _check_quantization(gm: fx.GraphModule, names: list[str], grids: list[QTensor], weights: list[tuple],
                        name: str) -> dict:
    """The delegates' quantization against the graph's (``graphopt.testing.quantization``). Activations
    as grids (XNNPACK numbers its values its own way): each is one of the graph's, and each fake quant
    inside a partition is on one. Weights by content: ExecuTorch stores a weight's per-channel scales
    under ``scale_`` + the sha256 of their float32 bytes, so each delegate weight's key must be one a
    layer of the partitions gives, each such layer's found once (XNNPACK orders a partition's
    branches its own way, so positions do not pair)."""
    graph_acts, graph_weights = graph_qtensors(gm)
    acts = {t.name for part in names for t in graph_qtensors(gm.get_submodule(part))[0]}
    expected = [w for w in graph_weights if w.name.split(".")[0] in names]   # named <partition>.<layer>

    def fail(what: str) -> None:
        raise EmitError(f"the XNNPACK delegates of {name} do not hold the graph's quantization: {what}")

    keys = {_scale_key(w): w for w in expected}
    left = Counter(_scale_key(w) for w in expected)
    for value, key in weights:      # XNNPACK serializes a partition's branches in its own order: match by key
        if left[key] <= 0:
            fail(f"int8 weight (value {value}) has per-channel scales " + (
                "no layer of the graph's partitions has" if key not in keys else f"of {keys[key].name} once too often"))
        left[key] -= 1
    if missing := [keys[k].name for k, n in left.items() if n > 0]:
        fail(f"the int8 weights of {', '.join(missing)} are in no delegate")
    return {"activations": check_grids("int8 value", graph_acts, grids, atol=5e-7, fail=fail,
                                       optional=lambda g: g.name not in acts), "weights": len(weights)}


def _delegation(program, names: list[str], name: str) -> dict:
    """What ran where, checked: each partition is one delegate and no marked node or q/dq
    node was left to the portable kernels."""
    from executorch.exir.lowered_backend_module import get_lowered_submodules

    gm = program.graph_module
    nodes, values, delegated, grids, weights = Counter(), Counter(), [], [], []
    for label, lowered, _ in get_lowered_submodules(gm):
        # call_function nodes only: a placeholder carries the mark of the partition that made its value
        delegated.append({_mark(n) for n in lowered.original_module.graph.nodes if n.op == "call_function"} - {None})
        ops, dtypes, found, keys = _xnnpack_graph(lowered.processed_bytes, label)
        grids += found
        weights += keys
        nodes.update(ops)
        values.update(dtypes)
    cpu = [n for n in gm.graph.nodes
           if n.op == "call_function" and _op(n) not in ("getitem", "executorch_call_delegate")]
    for n in cpu:
        if _mark(n):
            raise EmitError(f"graphopt partition {_mark(n)} of {name} could not be delegated to XNNPACK: "
                            f"{n.name} ({_op(n)}) was left to the portable CPU kernels")
        if _is_qdq(n):
            raise EmitError(f"{name}: {n.name} ({_op(n)}) was left outside the XNNPACK delegates and "
                            f"ExecuTorch's portable kernels cannot (de)quantize")
    found = sorted(p for d in delegated for p in d)
    if found != sorted(names):
        raise EmitError(f"graphopt's xnnpack partitions of {name} ({', '.join(names)}) did not become one XNNPACK "
                        f"delegate each (delegated: {', '.join(found) or 'none'})")
    return {"grids": grids, "weights": weights, "partitions": len(names), "delegates": len(delegated),
            "xnnpack_ops": dict(sorted(nodes.items())),
            "xnnpack_values": dict(sorted(values.items())),
            "cpu_ops": dict(sorted(Counter(_op(n) for n in cpu).items()))}


def lower(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], name: str) -> tuple[bytes, dict]:
    """The .pte bytes of a partitioned ``gm`` and what runs where (``_delegation``), with its
    precision (also recorded in the program as ``PRECISION``), how many fake quants became int8
    q/dq (``int8_qdq``) and how many run in float on the CPU."""
    names = partitions(gm)
    graph, gm = gm, copy.deepcopy(gm)
    emulated = _cpu_in_float(gm, names)
    concats = _concat_on_its_grid(gm, names)
    gm, converted = to_qdq(gm, int8_weights=True, dq_per_user=True)
    precision = "int8" if converted or emulated else "fp32"
    for part in names:
        setattr(gm, part, _Marked(part, gm.get_submodule(part)))
    with captured_output():
        from executorch.exir import to_edge_transform_and_lower
        try:
            exported = torch.export.export(gm.eval(), tuple(example_inputs))
        except Exception as exc:
            raise EmitError(f"torch.export of {name} failed: {first_line(exc)}") from exc
        try:
            edge = to_edge_transform_and_lower(exported, partitioner=[_partitioner(names)],
                                               constant_methods={PRECISION: precision})
        except EmitError:
            raise
        except Exception as exc:
            raise EmitError(f"ExecuTorch could not delegate the xnnpack partitions of {name} to XNNPACK: "
                            f"{first_line(exc)}") from exc
        info = _delegation(edge.exported_program(), names, name)
        info["scales"] = _check_quantization(graph, names, info.pop("grids"), info.pop("weights"), name)
        try:
            data = edge.to_executorch().buffer
        except Exception as exc:
            raise EmitError(f"ExecuTorch could not serialize {name}: {first_line(exc)}") from exc
    return data, {**info, "precision": precision, "int8_qdq": converted, "fake_quants_on_cpu": emulated,
                  "concats_requantized": concats}
