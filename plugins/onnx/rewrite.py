"""Small graph surgery on ONNX models: who produces and reads each tensor, a node's attribute,
a node list rewritten in topological order, initializers no node reads dropped."""
from __future__ import annotations

from typing import Any

import numpy as np


def index(graph: Any) -> tuple[dict[str, Any], dict[str, list[Any]], dict[str, np.ndarray]]:
    """Producers and consumers by tensor name, and the initializers as arrays."""
    from onnx import numpy_helper

    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return producers, consumers, {i.name: numpy_helper.to_array(i) for i in graph.initializer}


def replace(graph: Any, dropped: list, added: list) -> None:
    """``graph.node`` without ``dropped``, with ``added``, in topological order."""
    gone = {id(n) for n in dropped}
    pending = [n for n in graph.node if id(n) not in gone] + added
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise AssertionError("the rewrite left a cycle")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def attribute(node: Any, name: str, default: Any) -> Any:
    """``node``'s attribute ``name`` as a Python value (ints as a list), else ``default``."""
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def drop_unused_initializers(graph: Any) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
