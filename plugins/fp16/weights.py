"""fp16(mode=weights): module calls => their traced forward inlined; float32 get_attr tensors => fp16, upcast at use."""
from __future__ import annotations

import torch
import torch.fx as fx

from graphopt import PassContext, PassResult
from graphopt.errors import first_line

from .plan import attribute, tensor_problem


def _inline(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Replace the call of a module by the ops of its forward (torch.fx's trace of it), which
    read its parameters and buffers through get_attr (same state_dict names); or say why not."""
    module = gm.get_submodule(node.target)
    try:
        sub = fx.symbolic_trace(module)
    except Exception as exc:
        return f"torch.fx cannot trace its forward ({first_line(exc)})"
    (result,) = [n.args[0] for n in sub.graph.nodes if n.op == "output"]
    if not isinstance(result, fx.Node):
        return "it returns more than one value"
    args, env = list(node.args), {}
    with gm.graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op == "placeholder":   # positional, keyword, else the parameter's default
                env[n] = args.pop(0) if args else node.kwargs.get(n.target, *n.args)
            elif n.op != "output":
                env[n] = gm.graph.node_copy(n, env.__getitem__)
                if n.op in ("get_attr", "call_module"):
                    env[n].target = f"{node.target}.{n.target}"
    node.replace_all_uses_with(env[result])
    gm.graph.erase_node(node)
    return None


def _modules(gm: fx.GraphModule, ctx: PassContext, stats: dict) -> None:
    """Calls of modules with floating weights => their inlined forward (when the weights fit
    fp16), again for the module calls an inlined forward makes (a fused layer's BatchNorm)."""
    seen: set[fx.Node] = set()
    while todo := [n for n in gm.graph.nodes if n.op == "call_module" and n not in seen]:
        for node in todo:
            seen.add(node)
            module = gm.get_submodule(node.target)
            weights = dict(module.named_parameters())
            if not any(p.is_floating_point() for p in weights.values()):
                continue
            why = next((f"{name}: {problem}" for name, p in weights.items()
                        if (problem := tensor_problem(p, ctx.options))), None) or _inline(gm, node)
            if why:
                ctx.explain(f"{node.name}: {type(module).__name__} weights stay fp32, {why}")
                stats["fp32_tensors"] += len(weights)
            else:
                ctx.explain(f"{node.name}: {type(module).__name__} inlined, its weights stored fp16 and "
                            f"upcast to fp32 at use")


def _upcast(graph: fx.Graph, read: fx.Node) -> fx.Node:
    """``read.to(torch.float32)`` right after ``read``, the get_attr of an fp16 tensor."""
    read.meta["graphopt.precision"] = "fp16"
    with graph.inserting_after(read):
        up = graph.call_method("to", (read, torch.float32))
    up.meta["graphopt.precision"] = "fp32"
    return up


def _attributes(gm: fx.GraphModule, ctx: PassContext, stats: dict) -> None:
    """float32 tensors read by get_attr (and by no module still called) => fp16, upcast at use."""
    called = {id(t) for n in gm.graph.nodes if n.op == "call_module"
              for t in (*gm.get_submodule(n.target).parameters(), *gm.get_submodule(n.target).buffers())}
    halved: set[int] = set()
    for node in list(gm.graph.nodes):
        tensor = attribute(gm, node.target) if node.op == "get_attr" else None
        if not isinstance(tensor, torch.Tensor) or id(tensor) in called or \
                (tensor.dtype != torch.float32 and id(tensor) not in halved):
            continue
        why = None if id(tensor) in halved else tensor_problem(tensor, ctx.options)
        if why:
            ctx.explain(f"{node.name}: stays fp32, {why}")
            stats["fp32_tensors"] += 1
            called.add(id(tensor))   # its other readers must read fp32 too
            continue
        if id(tensor) not in halved:
            tensor.data = tensor.data.half()
            halved.add(id(tensor))
            stats["fp16_tensors"] += 1
        up = _upcast(gm.graph, node)
        node.replace_all_uses_with(up, delete_user_cb=lambda user: user is not up)


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    stats = {"fp16_tensors": 0, "fp32_tensors": 0}
    if not ctx.options["keep_io_types"]:
        ctx.explain("keep_io_types=false has no effect with mode=weights: inputs, outputs and compute stay fp32")
    _modules(gm, ctx, stats)
    _attributes(gm, ctx, stats)
    gm.delete_all_unused_submodules()
    return PassResult(gm, stats["fp16_tensors"] > 0, stats)
