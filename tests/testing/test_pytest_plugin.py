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
