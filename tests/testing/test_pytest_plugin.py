"""The ``golden`` fixture as a user's own suite sees it: run in a separate pytest session."""

USER_TESTS = '''
import torch
import torch.nn as nn
import graphopt

SEED = {seed}

def build():
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))

def test_eager_model(golden):
    golden.check("small", build(), [torch.randn(5, 4, generator=torch.Generator().manual_seed(1))])

def test_optimized_graph_and_onnx(golden, tmp_path):
    graph = graphopt.capture(build(), golden.inputs("small"))
    golden.check("small", graph)
    emitter = graphopt.load_plugins().emitters["onnx"]
    artifact = emitter.emit(graph, {{o.name: o.default for o in emitter.options}}, tmp_path)
    metrics = golden.check("small", artifact)
    assert metrics.cosine > 0.9999
'''


def test_missing_golden_fails_then_update_records_then_passes(pytester):
    pytester.makepyfile(test_user=USER_TESTS.format(seed=0))
    first = pytester.runpytest("-p", "no:cacheprovider")
    first.assert_outcomes(failed=2)
    first.stdout.fnmatch_lines(["*no golden outputs for 'small'*run pytest --update-golden*"])

    pytester.makepyfile(test_user=USER_TESTS.format(seed=0).replace(
        "def test_optimized", "def _later_test_optimized"))
    recorded = pytester.runpytest("--update-golden", "-p", "no:cacheprovider")
    recorded.assert_outcomes(passed=1)
    assert (pytester.path / "golden" / "small.npz").is_file()

    pytester.makepyfile(test_user=USER_TESTS.format(seed=0))
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_changed_model_fails_with_metrics(pytester):
    pytester.makepyfile(test_user=USER_TESTS.format(seed=0))
    pytester.runpytest("--update-golden", "-k", "eager", "-p", "no:cacheprovider").assert_outcomes(passed=1)
    pytester.makepyfile(test_user=USER_TESTS.format(seed=1))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*outputs of 'small' differ from the reference*max rel*cosine*"])


def test_golden_dir_is_configurable(pytester):
    pytester.makeini("[pytest]\ngraphopt_golden_dir = refs/golden\n")
    pytester.makepyfile(test_user=USER_TESTS.format(seed=0))
    pytester.runpytest("--update-golden", "-k", "eager", "-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert (pytester.path / "refs" / "golden" / "small.npz").is_file()


FLOWS = '''
import torch
import torch.nn as nn
import graphopt

X = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))

def build(scale=1.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[2].weight.mul_(scale)
    return model

def test_reference_then_a_perturbed_graph(golden):
    golden.check("net", build(), [X])
    golden.check("net", graphopt.capture(build({scale}), X))      # must not overwrite the reference

def test_graph_alone(golden):
    golden.check("alone", graphopt.capture(build(), X), [X])

def test_graph_with_its_reference(golden):
    golden.check("named", graphopt.capture(build(), X), [X], reference=build())

def test_graph_recorded_on_purpose(golden):
    golden.check("explicit", graphopt.capture(build(), X), [X], record=True)

def test_changed_inputs(golden):
    golden.check("net", build(), [{inputs}])
'''


def _flows(pytester, scale="1.0", inputs="X"):
    pytester.makepyfile(test_flows=FLOWS.format(scale=scale, inputs=inputs))


def test_update_golden_records_the_reference_never_an_optimized_graph(pytester):
    _flows(pytester, scale="1.5")
    result = pytester.runpytest("--update-golden", "-p", "no:cacheprovider")
    # the perturbed graph is checked against the reference just recorded, not recorded over it
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(["*golden.check(\"net\", graphopt.capture(build(1.5), X))*",
                                 "E       AssertionError: outputs of 'net' differ from the reference*",
                                 "golden.check('alone', Graph) does not record: goldens hold the reference "
                                 "model's outputs; pass reference=MODEL*"])
    from graphopt.testing.golden import GoldenCase
    import torch
    import torch.nn as nn
    stored = GoldenCase.load(pytester.path / "golden" / "net.npz")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    assert torch.equal(stored.outputs[0], model(*stored.inputs.values()).detach())
    assert not (pytester.path / "golden" / "alone.npz").exists()
    assert {p.name for p in (pytester.path / "golden").iterdir()} == {"net.npz", "named.npz", "explicit.npz"}


def test_a_normal_run_after_recording_passes_and_a_perturbed_model_fails_helpfully(pytester):
    _flows(pytester)
    pytester.runpytest("--update-golden", "-k", "reference or purpose or its_reference",
                       "-p", "no:cacheprovider").assert_outcomes(passed=3)
    pytester.runpytest("-k", "not alone", "-p", "no:cacheprovider").assert_outcomes(passed=4)
    _flows(pytester, scale="1.5")
    result = pytester.runpytest("-k", "perturbed", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*outputs of 'net' differ from the reference: max relative error * > 1e-05; worst: output 0 of 1 "
        "(max abs *cosine*; if the change is intended, re-record: pytest --update-golden "
        "test_flows.py::test_reference_then_a_perturbed_graph"])
    assert "pytest_plugin.py" not in result.stdout.str()          # graphopt's frames are hidden
    assert "golden.check(\"net\", graphopt.capture(build(1.5), X))" in result.stdout.str()   # the user's line


def test_inputs_that_differ_from_the_recorded_ones_fail(pytester):
    _flows(pytester)
    pytester.runpytest("--update-golden", "-k", "perturbed", "-p", "no:cacheprovider").assert_outcomes(passed=1)
    _flows(pytester, inputs="X[:2]")
    result = pytester.runpytest("-k", "changed_inputs", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*inputs given to golden.check('net') differ from the recorded ones "
                                 "(given 2x4, recorded 5x4)*pytest --update-golden*"])
    _flows(pytester, inputs="X * 2")                                      # same shape, other values
    pytester.runpytest("-k", "changed_inputs", "-p", "no:cacheprovider").assert_outcomes(failed=1)
    _flows(pytester)
    pytester.runpytest("-k", "changed_inputs", "-p", "no:cacheprovider").assert_outcomes(passed=1)
