"""An ONNX model run in onnxruntime on one thread, with the operators its optimizer left (what
the rewrites in plugins/onnx are judged by)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def run_model(model: onnx.ModelProto, x: np.ndarray, folder: Path | None = None) -> tuple[np.ndarray, list[str]]:
    """``model``'s first output on ``x`` (input ``x``), and with ``folder`` the op types of the graph
    onnxruntime optimized it into (written there)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if folder is not None:
        so.optimized_model_filepath = str(folder / "optimized.onnx")
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node] if folder else []
    return session.run(None, {"x": x})[0], ops
