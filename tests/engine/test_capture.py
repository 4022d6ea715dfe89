import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt import CaptureError


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fx cannot trace this
            return x * 2
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.body = nn.Sequential(nn.ReLU(), Gate())
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.body(self.bn(self.conv(x)))).mean((2, 3))


def test_capture_records_shapes_dtypes_and_macs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    graph = graphopt.capture(model, torch.randn(2, 3, 6, 6))
    nodes = {n.name: n for n in graph.module.graph.nodes}
    assert nodes["_0"].meta["graphopt.shape"] == (2, 8, 6, 6)
    assert nodes["_0"].meta["graphopt.dtype"] == "float32"
    assert nodes["_0"].meta["graphopt.macs"] == 2 * 8 * 6 * 6 * 3 * 9
    assert nodes["_3"].meta["graphopt.macs"] == 2 * 5 * 288
    assert graph.stats()["macs"] == 2 * 8 * 36 * 27 + 2 * 5 * 288
    assert graph.input_names == ["input_1"]
    assert torch.equal(graph.run()[0], model.eval()(graph.example_inputs[0]))


def test_capture_never_mutates_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout())
    model.train()
    before = copy.deepcopy(model.state_dict())
    graph = graphopt.capture(model, torch.randn(1, 3, 8, 8))
    graph.module.get_submodule("0").weight.data.zero_()
    assert model.training, "capture must not switch the caller's model to eval"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not graph.module.training


def test_untraceable_model_names_module_and_source_line():
    with pytest.raises(CaptureError) as info:
        graphopt.capture(Net(), torch.randn(1, 3, 8, 8))
    msg = str(info.value)
    assert "module `body.1` (Gate)" in msg
    assert "test_capture.py" in msg and "if x.sum() > 0:" in msg
    assert "--leaf-module body.1 (in Python leaf_modules=[Gate] or ['body.1'])" in msg   # the CLI's words first
    assert "in Python, fix the control-flow value with concrete_args" in msg
    assert "\n" not in msg


def test_leaf_modules_make_it_traceable_by_type_or_name():
    x = torch.randn(1, 3, 8, 8)
    for leaf in (Gate, "body.1"):
        graph = graphopt.capture(Net(), x, leaf_modules=[leaf])
        targets = [n.target for n in graph.module.graph.nodes if n.op == "call_module"]
        assert "body.1" in targets
        assert not any(n.op == "call_function" and "gt" in str(n.target) for n in graph.module.graph.nodes)


def test_leaf_module_graph_matches_eager():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = graphopt.capture(net, x, leaf_modules=[Gate])
    torch.testing.assert_close(graph.run()[0], net(x), rtol=0, atol=0)


def test_wrong_input_shape_is_a_capture_error():
    with pytest.raises(CaptureError, match=r"fails on inputs of shape 1x5x8x8.*--input-shape"):
        graphopt.capture(nn.Conv2d(3, 4, 3), torch.randn(1, 5, 8, 8))


def test_non_module_and_bad_inputs_are_rejected():
    with pytest.raises(CaptureError, match="expected a torch.nn.Module"):
        graphopt.capture(lambda x: x, torch.randn(1))
    with pytest.raises(CaptureError, match="example_inputs"):
        graphopt.capture(nn.ReLU(), [])


def test_multiple_inputs_and_dict_outputs():
    class Two(nn.Module):
        def forward(self, a, b):
            return {"sum": a + b, "prod": (a * b, a - b)}
    graph = graphopt.capture(Two(), (torch.ones(2), torch.full((2,), 3.0)))
    outs = graph.run()
    assert [o.tolist() for o in outs] == [[4.0, 4.0], [3.0, 3.0], [-2.0, -2.0]]
    assert graph.input_names == ["a", "b"]


def test_a_random_model_is_refused_with_the_reason():
    class Noisy(nn.Module):
        def forward(self, x):
            return nn.functional.dropout(x, 0.5)   # training=True by default: random in eval too
    with pytest.raises(CaptureError, match=r"different outputs on the same inputs.*random ops: dropout"):
        graphopt.capture(Noisy(), torch.ones(64))


class Attention(nn.Module):
    """nn.MultiheadAttention, F.scaled_dot_product_attention, bmm, matmul and einsum."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        heads = x.view(1, 10, 4, 8).transpose(1, 2)
        sdpa = F.scaled_dot_product_attention(heads, heads, heads).transpose(1, 2).reshape(1, 10, 32)
        scores = torch.bmm(x, x.transpose(1, 2))
        return self.mha(x, x, x)[0] + sdpa + scores @ x + torch.einsum("bij,bjk->bik", scores, x)


def test_macs_of_attention_match_hand_counts():
    """Tokens s=10, width e=32, heads h=4 of d=8: a (s x k) @ (k x n) product is s*k*n MACs."""
    graph = graphopt.capture(Attention(), torch.randn(1, 10, 32))
    macs = {n.name: n.meta["graphopt.macs"] for n in graph.module.graph.nodes}
    s, e, h, d = 10, 32, 4, 8
    assert macs["scaled_dot_product_attention"] == h * (s * d * s + s * s * d)      # q@k^T and p@v
    assert macs["mha"] == 4 * s * e * e + h * (s * d * s + s * s * d)             # q, k, v, out + attention
    assert macs["bmm"] == macs["matmul"] == macs["einsum"] == s * e * s
