"""graphopt: take a PyTorch model to phones and edge devices. Capture with torch.fx, rewrite with a pipeline of verified
plugin passes, lower to ONNX, TorchScript-Lite, TFLite and ExecuTorch, and check every artifact in its own runtime."""
from __future__ import annotations

__version__ = "0.1.0"

from .capture import capture
from .emit import Artifact, Emitter
from .errors import CaptureError, EmitError, GraphoptError, PassError, PipelineError, PluginError, UsageError
from .graph import Graph
from .hookspecs import hookimpl
from .metrics import Metrics, Tolerance, compare
from .passes import Effect, Option, Pass, PassContext, PassResult
from .pipeline import NamedPipeline, Pipeline, parse_pipeline
from .plugins import Registry, load_plugins
from .passmanager import PassRecord, PipelineRun, run_pipeline
from .driver import RunResult, emit_one, optimize

__all__ = ["Artifact", "CaptureError", "Effect", "EmitError", "Emitter", "Graph", "GraphoptError", "Metrics",
           "NamedPipeline", "Option", "Pass", "PassContext", "PassError", "PassRecord", "PassResult", "Pipeline",
           "PipelineError", "PipelineRun", "PluginError", "Registry", "RunResult", "Tolerance", "UsageError", "capture",
           "compare", "emit_one", "hookimpl", "load_plugins", "optimize", "parse_pipeline", "run_pipeline"]
