"""int8 TFLite from a quantized graph (litert-torch route): int8 kernels, graphopt's own
scales in the file, verified in LiteRT; float or int8 inputs and outputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import graphopt
from graphopt.driver import optimize
import graphopt_plugins.tflite as tflite_emitter
from graphopt.quant import activation_qparams, is_fake_quant, weight_quant
from zoo.cnn import tiny_mobilenet_v3

pytest.importorskip("litert_torch")

PIPELINE = "cleanup,fold-bn,fuse,quantize(prefer=size)"


@pytest.fixture(scope="module")
def emitted(registry, tmp_path_factory):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calib = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i + 1)) for i in range(6)]
    return optimize(tiny_mobilenet_v3(), (x,), registry, pipeline=PIPELINE,
                    formats="tflite,tflite(int8_io=true),tflite(float_islands=false)",
                    out_dir=tmp_path_factory.mktemp("int8"), data={"calibration": calib})


def test_int8_tflite_verifies_with_int8_kernels(emitted):
    assert emitted.ok
    float_io, int8_io, int8_kernels = emitted.artifacts
    for check in (float_io, int8_io, int8_kernels):
        meta = check.artifact.meta
        assert meta["precision"] == tflite_emitter.precision(check.artifact.path) == "int8" and check.verified
        assert check.vs_graph.cosine > 0.999
        ops = meta["op_types"]
        assert ops["CONV_2D"] >= 10 and ops["DEPTHWISE_CONV_2D"] == 3 and "HARD_SWISH" in ops
    assert float_io.artifact.meta["op_types"]["QUANTIZE"] >= 1
    assert int8_io.artifact.path.name.endswith("_int8_io.tflite")


def test_hardswish_runs_as_a_float_island_inside_one_xnnpack_partition(emitted):
    """LiteRT's XNNPACK delegate takes HARD_SWISH in float only: as int8 kernels, each splits the model;
    as DEQUANTIZE -> float HARD_SWISH -> QUANTIZE onto the same int8 tensor the model is one partition."""
    from ai_edge_litert.interpreter import Interpreter
    from graphopt_plugins.tflite.islands import xnnpack_split

    islands, _, int8_kernels = (c.artifact for c in emitted.artifacts)
    hardswish = islands.meta["op_types"]["HARD_SWISH"]
    assert hardswish >= 4 and int8_kernels.meta["op_types"]["HARD_SWISH"] == hardswish
    split = xnnpack_split(int8_kernels.path.read_bytes())
    assert split[0] > 1 and set(split[1].values()) == {"HARD_SWISH"}
    assert islands.meta["float_islands"] == {"HARD_SWISH": len(split[1])} and "float_islands" not in int8_kernels.meta
    assert xnnpack_split(islands.path.read_bytes()) == (1, {})

    def hardswish_inputs(path):
        interpreter = Interpreter(model_path=str(path))
        tensors, ops = {t["index"]: t for t in interpreter.get_tensor_details()}, interpreter._get_ops_details()
        consumers = {i: o["op_name"] for o in ops for i in o["inputs"]}
        return [(tensors[o["inputs"][0]]["dtype"], consumers.get(o["outputs"][0])) for o in ops
                if o["op_name"] == "HARD_SWISH"]

    assert sum(dtype == np.int8 for dtype, _ in hardswish_inputs(int8_kernels.path)) == len(split[1])
    after = hardswish_inputs(islands.path)
    assert all(dtype == np.float32 for dtype, _ in after)
    assert sum(consumer == "QUANTIZE" for _, consumer in after) >= len(split[1])


def test_attention_softmax_and_matmuls_run_as_float_islands(registry, tmp_path):
    """A ViT's int8 attention: SOFTMAX and the BATCH_MATMULs of two activations are int8 ops the delegate
    leaves out, splitting the model; as float islands it is one partition, verified against the graph."""
    from graphopt_plugins.tflite.islands import xnnpack_split
    from zoo import TRANSFORMER_ZOO

    build, shape = TRANSFORMER_ZOO["vit_tiny"]
    calib = [torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    run = optimize(build(), (torch.randn(*shape),), registry, pipeline=PIPELINE, formats="tflite",
                   out_dir=tmp_path, data={"calibration": calib})
    (check,) = run.artifacts
    assert check.verified and check.vs_graph.cosine > 0.999
    islands = check.artifact.meta["float_islands"]
    assert islands["SOFTMAX"] >= 1 and islands["BATCH_MATMUL"] >= 1 and set(islands) == {"SOFTMAX", "BATCH_MATMUL"}
    assert xnnpack_split(check.artifact.path.read_bytes()) == (1, {})


def test_int8_tflite_holds_the_graphs_scales(emitted):
    from ai_edge_litert.interpreter import Interpreter

    check = emitted.artifacts[0]
    assert check.artifact.meta["scales"]["weights"] == sum(1 for m in emitted.graph.module.modules()
                                                           if weight_quant(m) is not None)
    ours = {activation_qparams(n).scale for n in emitted.graph.module.graph.nodes if is_fake_quant(n)}
    tensors = Interpreter(model_path=str(check.artifact.path)).get_tensor_details()
    int8 = [t for t in tensors if t["dtype"] == np.int8 and len(t["quantization_parameters"]["scales"]) == 1]
    assert int8 and all(float(t["quantization_parameters"]["scales"][0]) in {np.float32(s) for s in ours}
                        for t in int8)
    weights = [t for t in tensors if t["dtype"] == np.int8 and len(t["quantization_parameters"]["scales"]) > 1]
    assert len(weights) >= 14


def test_int8_io_takes_and_returns_int8(emitted):
    from ai_edge_litert.interpreter import Interpreter

    check = emitted.artifacts[1]
    runner = Interpreter(model_path=str(check.artifact.path)).get_signature_runner()
    assert all(d["dtype"] == np.int8 for d in runner.get_input_details().values())
    assert all(d["dtype"] == np.int8 for d in runner.get_output_details().values())
    first = next(n for n in emitted.graph.module.graph.nodes if is_fake_quant(n))
    q = activation_qparams(first)
    spec = check.artifact.meta["inputs"][0]
    assert spec["quantization"] == [pytest.approx(q.scale), q.zero_point - 128]   # uint8 zp in int8 terms


def test_where_the_layout_pass_of_litert_torch_fails_the_file_is_made_without_it(emitted, tmp_path, monkeypatch):
    """litert-torch's layout pass breaks some q/dq graphs (ConvNeXt-T); the emitter converts again
    without it (a TRANSPOSE beside each layout-sensitive op) and says so."""
    from litert_torch import fx_infra
    from litert_torch._convert import fx_passes

    class Broken(fx_infra.ExportedProgramPassBase):
        def call(self, exported_program):
            raise RuntimeError("Attempting to broadcast a dimension of length 96 at -1!")

    monkeypatch.setattr(fx_passes, "OptimizeLayoutTransposesPass", Broken)
    graph = emitted.graph
    artifact = tflite_emitter.emit(graph, {}, tmp_path)
    assert artifact.meta["layout_pass"] == \
        "skipped: it failed (Attempting to broadcast a dimension of length 96 at -1!)"
    with_pass = emitted.artifacts[0].artifact.meta["op_types"]
    assert artifact.meta["op_types"].get("TRANSPOSE", 0) > with_pass.get("TRANSPOSE", 0)
    outputs = tflite_emitter.load(artifact, threads=1)(list(graph.example_inputs))
    assert graphopt.compare(graph.run(), outputs).cosine > 0.999
    assert artifact.meta["scales"]["weights"] == emitted.artifacts[0].artifact.meta["scales"]["weights"]
    assert fx_passes.OptimizeLayoutTransposesPass is Broken      # put back after the retry, not left out
