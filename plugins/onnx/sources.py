"""Where each ONNX node came from (option ``source_map``). The torchscript exporter, run verbose, writes into each
node's doc_string the Python stack that made it; one frame is a line of the GraphModule's generated ``forward``, which
fx's line map turns into the fx node, whose ``meta["source"]`` (set at capture) is the user's own line."""
from __future__ import annotations

import linecache
import os
from typing import Any

import torch.fx as fx

FX_NODE, SOURCE = "graphopt.fx_node", "graphopt.source"


def _fx_node(doc: str, gm: fx.GraphModule, nodes: list[fx.Node]) -> fx.Node | None:
    """The node of ``gm`` whose line of ``forward`` the stack ``doc`` passes through (a frame reads
    ``<filename>(<line>): forward``), or None."""
    prefix = gm.forward.__code__.co_filename + "("
    index = getattr(gm, "_lineno_map", None) or {}      # generated line -> node position (fx's own error map)
    for frame in doc.splitlines():
        if frame.startswith(prefix) and frame.endswith("): forward"):
            line = int(frame[len(prefix):-len("): forward")])
            at = index.get(line - getattr(gm, "_prologue_start", 0))
            return nodes[at] if at is not None and at < len(nodes) else None
    return None


def record_origins(model: Any, gm: fx.GraphModule) -> None:
    """Give each node of ``model`` that ``gm`` made the metadata_props ``graphopt.fx_node`` (the fx node's name) and,
    when capture knew it, ``graphopt.source`` (``path:line``); clear every doc_string."""
    nodes = list(gm.graph.nodes)
    for node in model.graph.node:
        origin = _fx_node(node.doc_string, gm, nodes)
        node.doc_string = ""
        for key, value in ((FX_NODE, origin and origin.name), (SOURCE, origin and origin.meta.get("source"))):
            if value:
                node.metadata_props.add(key=key, value=value)


def origin(node: Any) -> str | None:
    """``fx node `relu_3` (model.py:42 `x = torch.relu(x)`)`` for an ONNX node ``record_origins`` named, else None."""
    props = {p.key: p.value for p in node.metadata_props}
    if FX_NODE not in props:
        return None
    path, _, line = props.get(SOURCE, "").rpartition(":")
    code = linecache.getline(path, int(line)).strip() if line.isdigit() else ""
    where = f"{os.path.basename(path)}:{line}" + (f" `{code}`" if code else "") if path else ""
    return f"fx node `{props[FX_NODE]}`" + (f" ({where})" if where else "")
