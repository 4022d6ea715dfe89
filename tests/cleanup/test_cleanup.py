"""cleanup: eval-mode dropout and nn.Identity removed, then dead nodes, submodules and attributes."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from zoo.fold import module_types, optimize



def _ops(gm: torch.fx.GraphModule) -> list[str]:
    """Every computing node as ``Type`` (modules) or the function/method name, in graph order."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.append(type(gm.get_submodule(n.target)).__name__)
        elif n.op in ("call_function", "call_method"):
            out.append(getattr(n.target, "__name__", n.target))
    return out


class Dropouts(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop, self.drop1d, self.alpha = nn.Dropout(0.5), nn.Dropout1d(0.3), nn.AlphaDropout(0.2)
        self.ident = nn.Identity()

    def forward(self, x):
        x = self.drop(self.fc(x))
        x = F.dropout(x, 0.4, training=self.training)   # traced as training=False
        x = torch.dropout(x, 0.1, False)
        x = self.ident(self.alpha(torch.relu(x)))
        return self.drop1d(x.unsqueeze(-1)).squeeze(-1)


def test_removes_dropout_and_identity(registry):
    run = optimize(Dropouts(), (torch.randn(3, 4),), "cleanup", registry)
    gm = run.graph.module
    assert _ops(gm) == ["Linear", "relu", "unsqueeze", "squeeze"]
    assert {name for name, _ in gm.named_modules()} == {"", "fc"}
    (record,) = run.records
    assert record.stats == {"dropout": 5, "identity": 1, "dead": 0} and record.modified
    assert record.explanations == [
        "drop (Dropout): removed, the identity in eval mode",
        "dropout (call_function dropout): removed, the identity in eval mode",
        "dropout_1 (call_function dropout): removed, the identity in eval mode",
        "alpha (AlphaDropout): removed, the identity in eval mode",
        "ident (Identity): removed, the identity in eval mode",
        "drop1d (Dropout1d): removed, the identity in eval mode",
    ]


class RandomDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.5) + 1   # training defaults to True: random, not the identity


def test_keeps_dropout_that_is_random(registry):
    # capture refuses random models, so build the graph by hand to test the pass's own check
    graph = graphopt.Graph(torch.fx.symbolic_trace(RandomDropout()), (torch.ones(2, 8),))
    ctx = graphopt.PassContext(options={}, graph=graph)
    result = registry.passes["cleanup"].run(graph.module, ctx)
    assert _ops(result.graph_module) == ["dropout", "add"] and not result.modified
    assert ctx.explanations == ["dropout (call_function dropout): kept, it is called with "
                                "training=True: it is random, not the identity"]


def test_keeps_dropout_module_in_training_mode(registry):
    graph = graphopt.capture(nn.Sequential(nn.Linear(2, 2), nn.Dropout()), torch.ones(1, 2))
    graph.module.get_submodule("1").train()
    ctx = graphopt.PassContext(options={}, graph=graph)
    result = registry.passes["cleanup"].run(graph.module, ctx)
    assert module_types(result.graph_module) == ["Linear", "Dropout"]
    assert ctx.explanations == ["_1 (Dropout): kept, the module is in training mode: it is random, "
                                "not the identity"]


class DeadBranch(nn.Module):
    """``head``, ``scale`` and ``aux`` feed only a value that is never returned."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 3), nn.Linear(3, 2)
        self.aux = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        self.scale = nn.Parameter(torch.full((2,), 2.0))
        self.register_buffer("offset", torch.ones(3))

    def forward(self, x):
        y = self.body(x)
        unused = self.aux(self.head(y) * self.scale)   # noqa: F841 (dead on purpose)
        return torch.sigmoid(y + self.offset)


def test_removes_dead_nodes_submodules_and_attributes(registry):
    model = DeadBranch()
    graph = graphopt.capture(model, torch.randn(2, 4))
    params_before = graph.stats()["params"]
    run = optimize(model, (torch.randn(2, 4),), "cleanup", registry)
    gm = run.graph.module
    assert _ops(gm) == ["Linear", "add", "sigmoid"]
    assert {name for name, _ in gm.named_modules()} == {"", "body"}
    assert set(gm.state_dict()) == {"body.weight", "body.bias", "offset"}
    assert params_before - run.graph.stats()["params"] == (3 * 2 + 2) + 2 + (2 * 3 + 3)
    (record,) = run.records
    assert record.stats == {"dropout": 0, "identity": 0, "dead": 5}
    assert record.explanations == [f"{label}: removed, its result is unused" for label in (
        "aux_1 (ReLU)", "aux_0 (Linear)", "mul (call_function mul)", "scale (get_attr scale)",
        "head (Linear)")]


class InPlace(nn.Module):
    """Unused results of in-place ops still change ``y``: they must stay."""

    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = x * 2
        y.add_(1)
        torch.relu_(y - 3)
        F.relu(y, inplace=True)
        self.relu(y)
        y.neg()   # really dead
        return y


def test_keeps_in_place_ops_with_unused_results(registry):
    run = optimize(InPlace(), (torch.randn(3, 5),), "cleanup", registry)
    assert _ops(run.graph.module) == ["mul", "add_", "sub", "relu_", "relu", "ReLU"]
    assert run.records[0].stats == {"dropout": 0, "identity": 0, "dead": 1}


def test_nothing_to_remove_is_unmodified(registry):
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    run = optimize(model, (torch.randn(2, 3),), "cleanup", registry)
    (record,) = run.records
    assert not record.modified and record.explanations == [] and record.verified
    assert record.stats == {"dropout": 0, "identity": 0, "dead": 0}


def test_registered_as_an_exact_default_pass(registry):
    spec = registry.passes["cleanup"]
    assert registry.owner["pass:cleanup"] == "cleanup"
    assert spec.effect is graphopt.Effect.EXACT and spec.default_order == 10 and spec.options == ()
