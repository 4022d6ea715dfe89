import time

import pluggy
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import Effect, Option, Pass, PassError, PassResult, Registry


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y)) + y
        return self.fc(y.mean((2, 3)))


def _perturb_conv2(gm, ctx):
    gm.conv2.weight.data.mul_(1.0 + ctx.options["eps"])
    return PassResult(gm, True, {"scaled": 1})


def _relu_to_sigmoid(gm, ctx):
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.relu:
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(torch.sigmoid, node.args)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            break
    return PassResult(gm, True)


def _halve_output(gm, ctx):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        half = gm.graph.call_function(torch.mul, (out.args[0], 0.5))
    out.args = (half,)
    return PassResult(gm, True)


def _raise(gm, ctx):
    raise RuntimeError("kaboom")


def _noop(gm, ctx):
    ctx.explain("looked at everything, changed nothing")
    return PassResult(gm, False, {"seen": len(gm.graph.nodes)})


REG = Registry(pluggy.PluginManager("graphopt"), passes={p.name: p for p in [
    Pass("noop", "nothing", _noop),
    Pass("perturb", "scale conv2 weights", _perturb_conv2, options=(Option("eps", float, 0.01, "scale - 1"),)),
    Pass("relu-to-sigmoid", "wrong on purpose", _relu_to_sigmoid),
    Pass("halve", "structural, oracle agrees", _halve_output, Effect.STRUCTURAL,
         oracle=lambda before, after, ctx: [o * 0.5 for o in graphopt.Graph(before, ctx.example_inputs).run()]),
    Pass("halve-bad-oracle", "structural, oracle disagrees", _halve_output, Effect.STRUCTURAL,
         oracle=lambda before, after, ctx: graphopt.Graph(before, ctx.example_inputs).run()),
    Pass("perturb-strict", "scale conv2 weights, judged at 1e-9", _perturb_conv2,
         options=(Option("eps", float, 0.01, "scale - 1"),), tolerance=graphopt.Tolerance(max_rel=1e-9)),
    Pass("boom", "raises", _raise),
    Pass("needs-calib", "needs data", _noop, needs=("calibration",)),
]})


@pytest.fixture
def graph():
    return graphopt.capture(Small(), torch.randn(2, 3, 8, 8))


def test_verify_each_names_pass_history_and_first_diverging_node(graph):
    with pytest.raises(PassError) as info:
        graphopt.run_pipeline(graph, "noop,perturb", REG)
    err = info.value
    assert err.pass_name == "perturb" and err.before == ("noop",)
    assert "pass perturb (after noop) changed the outputs beyond its exact tolerance" in str(err)
    assert err.node.startswith("`conv2` (call_module Conv2d)")
    assert "the graph before perturb was kept" in str(err)


def test_divergence_through_a_new_node_names_it(graph):
    with pytest.raises(PassError) as info:
        graphopt.run_pipeline(graph, "relu-to-sigmoid", REG)
    assert "as the first pass" in str(info.value)
    assert "fed by new node(s) sigmoid" in info.value.node


def test_tiny_change_within_tolerance_passes(graph):
    run = graphopt.run_pipeline(graph, "perturb(eps=1e-9)", REG)
    assert run.records[0].verified and run.records[0].modified


def test_a_pass_may_ask_for_a_tighter_tolerance_than_its_effect(graph):
    assert graphopt.run_pipeline(graph, "perturb(eps=1e-6)", REG).records[0].verified
    with pytest.raises(PassError, match="perturb-strict .* beyond its exact tolerance"):
        graphopt.run_pipeline(graph, "perturb-strict(eps=1e-6)", REG)


def test_failed_pass_leaves_the_input_graph_untouched(graph):
    code, weight = graph.module.code, graph.module.conv2.weight.clone()
    with pytest.raises(PassError):
        graphopt.run_pipeline(graph, "relu-to-sigmoid", REG)
    with pytest.raises(PassError):
        graphopt.run_pipeline(graph, "perturb", REG)
    assert graph.module.code == code
    assert torch.equal(graph.module.conv2.weight, weight)


def test_pass_exception_names_pass_and_predecessors(graph):
    with pytest.raises(PassError, match=r"pass boom \(after noop, noop\) failed: RuntimeError: kaboom"):
        graphopt.run_pipeline(graph, "noop,noop,boom", REG)


def test_structural_pass_is_judged_by_its_oracle(graph):
    run = graphopt.run_pipeline(graph, "halve", REG)
    torch.testing.assert_close(run.graph.run()[0], graph.run()[0] * 0.5)
    assert run.records[0].cosine == pytest.approx(1.0)
    assert run.records[0].max_abs_err > 0
    with pytest.raises(PassError, match="halve-bad-oracle.*structural tolerance"):
        graphopt.run_pipeline(graph, "halve-bad-oracle", REG)


def test_no_verify_lets_a_wrong_pass_through_but_says_so(graph):
    run = graphopt.run_pipeline(graph, "perturb", REG, verify=False)
    assert not run.records[0].verified
    assert run.records[0].max_abs_err > 0


def test_instrumentation_records(graph):
    seen, irs = [], []
    start = time.perf_counter()
    run = graphopt.run_pipeline(graph, "noop,perturb(eps=0)", REG, on_pass=seen.append,
                                print_ir_after=["perturb"], on_ir=lambda n, c: irs.append((n, c)))
    elapsed = time.perf_counter() - start
    first, second = run.records
    assert [r.name for r in seen] == ["noop", "perturb(eps=0)"]
    assert first.stats == {"seen": len(graph.module.graph.nodes)}
    assert first.explanations == ["looked at everything, changed nothing"]
    assert not first.modified and second.modified
    assert first.nodes == 7
    assert first.params == sum(p.numel() for p in Small().parameters())
    assert first.macs == graph.stats()["macs"] > 0
    assert first.bytes == 4 * first.params
    assert first.max_abs_err == 0 and first.cosine == pytest.approx(1.0)
    assert 0 < first.seconds and first.seconds + second.seconds < elapsed   # each pass timed, within the run
    assert [n for n, _ in irs] == ["perturb"] and "def forward" in irs[0][1]
    assert run.pipeline == "noop,perturb(eps=0)"


def test_needs_are_checked_before_anything_runs(graph):
    with pytest.raises(PassError, match="pass needs-calib needs calibration, which was not given"):
        graphopt.run_pipeline(graph, "noop,needs-calib", REG)
    run = graphopt.run_pipeline(graph, "needs-calib", REG, data={"calibration": [1]})
    assert run.records[0].verified


def test_exact_pass_on_an_fp16_graph_is_judged_at_fp16_tolerance():
    graph = graphopt.capture(Small(), torch.randn(2, 3, 8, 8))
    graph.module.half()
    graph = graphopt.Graph(graph.module, tuple(t.half() for t in graph.example_inputs))
    run = graphopt.run_pipeline(graph, "perturb(eps=1e-4)", REG)    # 1e-4 > exact, < fp16
    assert run.records[0].verified
    with pytest.raises(PassError, match="exact tolerance"):
        graphopt.run_pipeline(graph, "perturb(eps=0.05)", REG)
