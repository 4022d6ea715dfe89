"""Move partitions into submodules and back: each partition's nodes become an fx.GraphModule
called by one ``call_module`` node named after its backend (``xnnpack_0``); ``inline`` undoes it.
The parent graph is rebuilt in a topological order that keeps the original order where it can."""
from __future__ import annotations

import heapq
import operator
from typing import Sequence

import torch.fx as fx
import torch.nn as nn

META = "graphopt.partition"


def _unit_order(gm: fx.GraphModule, owner: dict[fx.Node, int]) -> list:
    """Nodes outside partitions and partition ids, in a topological order of the graph with
    each partition contracted to one vertex; ties broken by position in the original graph."""
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    unit = {n: ("p", owner[n]) if n in owner else ("n", n) for n in gm.graph.nodes}
    first: dict = {}
    for n in gm.graph.nodes:
        first.setdefault(unit[n], position[n])
    deps: dict = {u: set() for u in first}
    for n in gm.graph.nodes:
        for a in n.all_input_nodes:
            if unit[a] != unit[n]:
                deps[unit[n]].add(unit[a])
    users: dict = {u: [] for u in first}
    for u, ds in deps.items():
        for d in ds:
            users[d].append(u)
    index = {u: i for i, u in enumerate(first)}
    waiting = {u: len(ds) for u, ds in deps.items()}
    ready = [(first[u], index[u], u) for u in first if not waiting[u]]
    heapq.heapify(ready)
    order = []
    while ready:
        *_, u = heapq.heappop(ready)
        order.append(u)
        for v in users[u]:
            waiting[v] -= 1
            if not waiting[v]:
                heapq.heappush(ready, (first[v], index[v], v))
    if len(order) != len(first):
        raise ValueError("the partitions make a cycle")   # the grouping refuses such merges
    return order


def _submodule(gm: fx.GraphModule, nodes: Sequence[fx.Node], class_name: str
               ) -> tuple[fx.GraphModule, list[fx.Node], list[fx.Node]]:
    """The partition as a GraphModule, the outside values it reads and the values it gives back."""
    inside = set(nodes)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    reads: list[fx.Node] = []

    def value(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op == "get_attr":          # parameters travel with the partition that reads them
                env[a] = sub.node_copy(a)
            else:
                reads.append(a)
                env[a] = sub.placeholder(a.name)
                env[a].meta = dict(a.meta)
        return env[a]

    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                value(a)
        env[n] = sub.node_copy(n, lambda a: env[a])
    gives = [n for n in nodes if any(u not in inside for u in n.users)]
    sub.output(env[gives[0]] if len(gives) == 1 else tuple(env[n] for n in gives))
    return fx.GraphModule(gm, sub, class_name=class_name), reads, gives


def extract(gm: fx.GraphModule, partitions: Sequence[Sequence[fx.Node]], prefix: str,
            class_name: str) -> tuple[fx.GraphModule, list[str]]:
    """A new GraphModule with partition ``i`` moved into submodule ``f"{prefix}_{i}"`` (added
    to ``gm`` too); returns it and the submodule names."""
    owner = {n: i for i, nodes in enumerate(partitions) for n in nodes}
    names = [f"{prefix}_{i}" for i in range(len(partitions))]
    built = {i: _submodule(gm, partitions[i], class_name) for i in range(len(partitions))}
    for i, (sub, _, _) in built.items():
        gm.add_submodule(names[i], sub)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for kind, item in _unit_order(gm, owner):
        if kind == "n":
            env[item] = graph.node_copy(item, lambda a: env[a])
            continue
        sub, reads, gives = built[item]
        call = graph.call_module(names[item], tuple(env[a] for a in reads))
        if len(gives) == 1:
            env[gives[0]] = call
            call.meta = dict(gives[0].meta)
        else:
            for k, n in enumerate(gives):
                env[n] = graph.call_function(operator.getitem, (call, k))
                env[n].meta = dict(n.meta)
    for n in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:   # read inside partitions now
        graph.erase_node(n)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)   # copies only what the new graph reads
    new.meta = dict(getattr(gm, "meta", {}))
    return new, names


def _set_attr(root: nn.Module, target: str, value) -> None:
    *path, last = target.split(".")
    module = root
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    if isinstance(value, nn.Module):
        module.add_module(last, value)
    elif not hasattr(module, last):
        setattr(module, last, value)


def inline(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with the submodules a previous ``partition`` made put back inline (itself when
    it has none)."""
    names = set(getattr(gm, "meta", {}).get(META, {}).get("partitions", ()))
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in names]
    if not calls:
        return gm
    graph = fx.Graph()
    env: dict[fx.Node, object] = {}
    for n in gm.graph.nodes:
        if n not in calls:
            if n.op == "call_function" and n.target is operator.getitem and n.args[0] in calls:
                env[n] = env[n.args[0]][n.args[1]]
            else:
                env[n] = graph.node_copy(n, lambda a: env[a])
            continue
        sub = gm.get_submodule(n.target)
        inner: dict[fx.Node, object] = {}
        args = iter(n.args)
        for m in sub.graph.nodes:
            if m.op == "placeholder":
                inner[m] = env[next(args)]
            elif m.op == "output":
                env[n] = fx.node.map_arg(m.args[0], lambda a: inner[a])
            else:
                if m.op in ("get_attr", "call_module"):
                    _set_attr(gm, m.target, operator.attrgetter(m.target)(sub))
                inner[m] = graph.node_copy(m, lambda a: inner[a])
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta = {k: v for k, v in getattr(gm, "meta", {}).items() if k != META}
    for name in names:
        if hasattr(new, name):
            delattr(new, name)
    return new
