"""fold-affine: a per-channel constant added to, subtracted from, multiplied with or dividing a
Conv / ConvTranspose / Linear output folds into its weights, or stays with a reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from zoo.fold import module_types, optimize


def _functions(gm) -> list[str]:
    return [getattr(n.target, "__name__", n.target) for n in gm.graph.nodes
            if n.op in ("call_function", "call_method")]


class Affine(nn.Module):
    """``expr(layer(x), self)`` with ``scale`` and ``shift`` tensors of the given shape."""

    def __init__(self, layer: nn.Module, shape: tuple[int, ...], expr):
        super().__init__()
        torch.manual_seed(0)
        self.layer, self.expr = layer, expr
        self.scale = nn.Parameter(torch.rand(shape) + 0.5)
        self.register_buffer("shift", torch.randn(shape))

    def forward(self, x):
        return self.expr(self.layer(x), self)


CASES = {  # name: (layer, constant shape, expression, input shape, number of folds)
    "conv*scale+shift": (lambda: nn.Conv2d(3, 4, 3), (1, 4, 1, 1), lambda y, m: y * m.scale + m.shift,
                         (2, 3, 6, 6), 2),
    "linear+c": (lambda: nn.Linear(5, 4), (4,), lambda y, m: y + m.shift, (3, 5), 1),
    "number-linear": (lambda: nn.Linear(5, 4, bias=False), (4,), lambda y, m: 0.5 - y, (3, 5), 1),
    "number*conv1d/scale": (lambda: nn.Conv1d(3, 4, 1), (4, 1), lambda y, m: torch.div(2.0 * y, m.scale),
                            (2, 3, 7), 2),
    "shift-convt": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (6, 1, 1),
                    lambda y, m: (y - m.shift).mul(m.scale), (1, 4, 3, 3), 2),
    "conv3d*scalar-tensor": (lambda: nn.Conv3d(2, 3, 2), (), lambda y, m: y * m.scale, (1, 2, 4, 4, 4), 1),
}


@pytest.mark.parametrize("case", CASES)
def test_folds_into_the_layer(case, registry):
    make, shape, expr, x_shape, folds = CASES[case]
    layer = make()
    run = optimize(Affine(layer, shape, expr).eval(), (torch.randn(x_shape),), "fold-affine", registry)
    gm = run.graph.module
    assert module_types(gm) == [type(layer).__name__] and _functions(gm) == []
    assert not hasattr(gm, "scale") and not hasattr(gm, "shift")   # the constants went into the weights
    (record,) = run.records
    assert record.stats == {"folded": folds, "rejected": 0} and record.verified
    assert all(line.split(": ", 1)[1].startswith("folded ") for line in record.explanations)


def test_explains_each_fold_of_a_chain(registry):
    model = Affine(nn.Conv2d(3, 4, 3), (1, 4, 1, 1), lambda y, m: y * m.scale + m.shift).eval()
    run = optimize(model, (torch.randn(1, 3, 5, 5),), "fold-affine", registry)
    assert run.records[0].explanations == ["mul: folded layer * scale into Conv2d layer",
                                           "add: folded layer + shift into Conv2d layer"]


class InputScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(5, 4)

    def forward(self, x):
        return self.layer(x) * x.mean()


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.register_buffer("scale", torch.rand(1, 3, 1, 1) + 0.5)

    def forward(self, x):
        y = self.conv(x)
        return y * self.scale + y


@pytest.mark.parametrize("model, x_shape, reason", [
    (Residual(), (1, 3, 5, 5), ["mul: kept, conv's output is also used by add",
                                "add: kept, conv's output is also used by mul"]),
    (Affine(nn.Conv2d(3, 4, 3), (1, 1, 4, 4), lambda y, m: y * m.scale), (1, 3, 6, 6),
     "mul: kept, scale of shape (1, 1, 4, 4) varies along dims [2, 3] of layer's output (1, 4, 4, 4), "
     "not only along its channels (dim 1)"),
    (Affine(nn.Conv2d(3, 4, 3), (4,), lambda y, m: y * m.scale), (1, 3, 6, 6),
     "mul: kept, scale of shape (4,) varies along dims [3] of layer's output (1, 4, 4, 4), "
     "not only along its channels (dim 1)"),
    (Affine(nn.Linear(5, 4), (3, 4), lambda y, m: y + m.shift), (1, 5),
     "add: kept, it broadcasts layer's output from (1, 4) to (3, 4)"),
    (InputScaled(), (2, 5), "mul: kept, its other operand mean depends on the input"),
    (Affine(nn.Linear(5, 4), (4,), lambda y, m: m.shift / y), (2, 5), "div: kept, it divides by layer's output"),
    (Affine(nn.Linear(5, 4), (4,), lambda y, m: y / (m.scale * 2)), (2, 5),
     "truediv: kept, its other operand mul is computed, not stored (simplify folds it into a buffer)"),
    (Affine(nn.Linear(5, 4), (4,), lambda y, m: y + m.shift.double()), (2, 5),
     "add: kept, the constant makes the output float64"),
], ids=["output-used-twice", "per-pixel", "wrong-axis", "broadcast", "input", "divided-by", "computed", "dtype"])
def test_rejects_with_reason(model, x_shape, reason, registry):
    reasons = reason if isinstance(reason, list) else [reason]
    run = optimize(model.eval(), (torch.randn(x_shape),), "fold-affine", registry)
    (record,) = run.records
    assert record.explanations == reasons and not record.modified
    assert record.stats == {"folded": 0, "rejected": len(reasons)}


def test_division_by_a_zero_constant_is_kept(registry):
    model = Affine(nn.Linear(5, 4), (4,), lambda y, m: y / m.shift).eval()
    model.shift[1] = 0.0   # capture refuses a model whose outputs are not finite: trace it here
    graph = graphopt.Graph(torch.fx.symbolic_trace(model), (torch.randn(2, 5),))
    ctx = graphopt.PassContext(options={}, graph=graph)
    result = registry.passes["fold-affine"].run(graph.module, ctx)
    assert ctx.explanations == ["truediv: kept, shift holds zeros: it would divide by zero"]
    assert not result.modified


def test_a_fused_layer_keeps_its_constant(registry):
    """After fuse-act the conv applies a ReLU: a scale after it must not go into its weights."""
    model = Affine(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (1, 4, 1, 1), lambda y, m: y * m.scale)
    run = optimize(model.eval(), (torch.randn(1, 3, 5, 5),), "fuse-act,fold-affine", registry)
    (line,) = run.records[1].explanations
    assert line.startswith("mul: kept, ") and line.endswith("(FusedConv2d) computes more than a layer: "
                                                            "it has its own forward")
