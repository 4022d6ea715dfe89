"""simplify: constant subgraphs folded into buffers, no-op arithmetic and copies removed,
permutes and reshapes that cancel removed, reshape chains collapsed; the rest stays, with a reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from zoo.fold import optimize


def _ops(gm) -> list[str]:
    return [getattr(n.target, "__name__", n.target) for n in gm.graph.nodes
            if n.op in ("call_function", "call_method", "call_module")]


class Fn(nn.Module):
    """``fn(x, self)`` with a weight, a scale and a (2, 3, 4, 4) buffer of ones."""

    def __init__(self, fn):
        super().__init__()
        torch.manual_seed(0)
        self.fn = fn
        self.weight = nn.Parameter(torch.randn(16, 16))
        self.scale = nn.Parameter(torch.rand(16) + 0.5)
        self.register_buffer("ones", torch.ones(2, 3, 4, 4))

    def forward(self, x):
        return self.fn(x, self)


def _simplify(fn, shape=(2, 3, 4, 4), registry=None):
    run = optimize(Fn(fn).eval(), (torch.randn(shape),), "simplify", registry)
    return run.graph.module, run.records[0]


def test_constant_subgraph_becomes_one_buffer(registry):
    gm, record = _simplify(lambda x, m: x @ (F.normalize(m.weight) * m.scale + 1).t(), (2, 16), registry)
    assert _ops(gm) == ["matmul"]
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] == ["folded_constants.t"]
    assert not hasattr(gm, "weight") and not hasattr(gm, "scale"), "what only the constant read is gone"
    assert record.explanations == ["t: computed once from constants: buffer folded_constants.t of shape (16, 16)"]
    assert record.stats["constant"] == 1 and record.params == 0 and record.bytes >= 16 * 16 * 4


def test_a_constant_of_ones_folds_then_goes(registry):
    gm, record = _simplify(lambda x, m: x * (m.scale / m.scale), (2, 16), registry)
    assert _ops(gm) == [] and not hasattr(gm, "folded_constants")
    assert record.explanations == ["truediv: computed once from constants: buffer folded_constants.truediv "
                                   "of shape (16,)", "mul: * folded_constants_truediv removed: the identity"]


def test_constant_number_becomes_a_literal(registry):
    gm, record = _simplify(lambda x, m: x.view(m.weight.size(0), -1), (2, 8, 2), registry)
    assert _ops(gm) == ["view"] and list(gm.graph.nodes)[1].args[1:] == (16, -1)
    assert record.explanations == ["size: computed once from constants: the literal 16"]


class Kept(nn.Module):
    def __init__(self):
        super().__init__()
        self.small, self.row = nn.Parameter(torch.ones(4)), nn.Parameter(torch.arange(32.0))

    def forward(self, x):
        big = self.row.repeat(64, 32, 1)               # 256 KiB from 128 bytes: cheaper to make
        fresh = self.small * 2
        fresh.add_(x.sum())                             # written in place each call
        return x + big, fresh, x + torch.rand_like(self.row)   # random: a new value each call


def test_constants_that_must_stay(registry):
    graph = graphopt.Graph(torch.fx.symbolic_trace(Kept()), (torch.randn(1, 64, 32, 32),))
    ctx = graphopt.PassContext(options={}, graph=graph)
    result = registry.passes["simplify"].run(graph.module, ctx)
    assert ctx.explanations == [
        "rand_like: kept, call_function rand_like gives a new value each call",
        "repeat: kept, its value would store 262144 bytes, more than the 128 bytes it is computed from "
        "(and than 65536)",
        "mul: kept, add_ may write it in place, so it must be fresh each call",
    ]
    assert not result.modified


@pytest.mark.parametrize("fn", [
    lambda x, m: x * 1, lambda x, m: 1.0 * x, lambda x, m: x / 1, lambda x, m: x + 0, lambda x, m: 0 + x,
    lambda x, m: x - 0, lambda x, m: x * m.ones, lambda x, m: torch.mul(x, 1),
    lambda x, m: x.contiguous(), lambda x, m: x.clone(), lambda x, m: x.detach(), lambda x, m: torch.clone(x),
    lambda x, m: x.to(torch.float32), lambda x, m: x.float(),
    lambda x, m: x.permute(0, 2, 3, 1).permute(0, 3, 1, 2), lambda x, m: x.transpose(1, 2).transpose(2, 1),
    lambda x, m: x.transpose(-1, 1).permute(0, 3, 2, 1),
    lambda x, m: x.reshape(2, 48).view(2, 3, 4, 4), lambda x, m: x.flatten(1).reshape(2, 3, 4, 4),
    lambda x, m: x.unsqueeze(0).view(2, 3, 4, 4),
], ids=["x*1", "1*x", "x/1", "x+0", "0+x", "x-0", "x*ones", "mul(x,1)", "contiguous", "clone", "detach",
        "torch.clone", "to-own-dtype", "float", "permute-inverse", "transpose-twice", "transpose-permute",
        "reshape-back", "flatten-back", "unsqueeze-back"])
def test_no_ops_are_removed(fn, registry):
    gm, record = _simplify(fn, registry=registry)
    assert _ops(gm) == [] and record.modified
    assert record.stats["rejected"] == 0 and len(record.explanations) == 1


@pytest.mark.parametrize("fn, ops, reason", [
    (lambda x, m: x[0] * m.ones, ["getitem", "mul"], "mul: kept, it broadcasts getitem from (3, 4, 4) to (2, 3, 4, 4)"),
    (lambda x, m: x.long() * 1.0, ["long", "mul"], ["mul: kept, it makes long float32 (from int64)",
                                                     "long: kept, it converts float32 to int64"]),
    (lambda x, m: x.to(torch.float64), ["to"], "to: kept, it converts float32 to float64"),
    (lambda x, m: x.to("cpu"), ["to"], "to: kept, it converts to cpu, not to a dtype"),
    (lambda x, m: x.permute(0, 2, 3, 1).contiguous(), ["permute", "contiguous"],
     "contiguous: kept, permute is not contiguous (for the example inputs)"),
    (lambda x, m: x.permute(0, 2, 3, 1).permute(0, 2, 3, 1), ["permute", "permute"],
     "permute_1: kept, it does not undo permute: together they order the dims [0, 3, 1, 2]"),
], ids=["x*1-broadcast", "promotes", "to-other-dtype", "to-device", "not-contiguous",
        "permute-not-inverse"])
def test_what_changes_something_stays(fn, ops, reason, registry):
    gm, record = _simplify(fn, registry=registry)
    assert _ops(gm) == ops and not record.modified
    assert record.explanations == (reason if isinstance(reason, list) else [reason])


class Copies(nn.Module):
    def forward(self, x):
        y = x.clone()
        y.relu_()                       # the clone keeps x intact
        return x + y, x.detach() * 1


def test_a_clone_written_in_place_stays(registry):
    graph = graphopt.Graph(torch.fx.symbolic_trace(Copies()), (torch.randn(2, 3),))
    run = graphopt.run_pipeline(graph, "simplify", registry)
    assert _ops(run.graph.module) == ["clone", "relu_", "add"]
    assert run.records[0].explanations == [
        "mul: * 1 removed: the identity",
        "clone: kept, relu_ may write in place, so the copy must stay",
        "detach: detach removed: redundant",
    ]


def test_reshape_chains(registry):
    gm, record = _simplify(lambda x, m: x.view(6, 16).reshape(2, 3, 16).view(2, 48), registry=registry)
    assert _ops(gm) == ["reshape"] and list(gm.graph.nodes)[1].args[1:] == (2, 48)
    # a pair that does not give back the input's shape stays a reshape
    gm, record = _simplify(lambda x, m: x.view(2, 12, 4).view(4, 6, 4), registry=registry)
    assert _ops(gm) == ["reshape"] and list(gm.graph.nodes)[1].args[1:] == (4, 6, 4)
    # back to the input's shape through -1: that holds for this batch only, so one reshape stays
    gm, record = _simplify(lambda x, m: x.view(6, -1).view(2, 3, 4, -1), registry=registry)
    assert _ops(gm) == ["reshape"]
    assert record.explanations == ["view_1: view and it => one reshape to (2, 3, 4, 4)"]
    # transpose then reshape to the input's shape moves data: both stay
    gm, record = _simplify(lambda x, m: x.transpose(2, 3).reshape(2, 3, 4, 4), registry=registry)
    assert _ops(gm) == ["transpose", "reshape"] and record.explanations == []


def test_a_reshape_of_a_shared_reshape_stays(registry):
    gm, record = _simplify(lambda x, m: (lambda y: (y.view(4, 24), y.sum()))(x.view(6, 16)), registry=registry)
    assert _ops(gm) == ["view", "view", "sum"]
    assert record.explanations == ["view_1: kept, view is also used by sum_1: one reshape would save nothing"]
