import copy
import json
import time

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from conftest import TESTS
from fixtures.finetune_train import loss, sgd
from zoo.cnn import mlp

import graphopt
from graphopt import PassError
from graphopt.cli import main

TRAIN = f"{TESTS / 'fixtures' / 'finetune_train.py'}:sgd"
MODEL = f"{TESTS / 'zoo' / 'cnn.py'}:mlp"


@pytest.fixture
def graph():
    return graphopt.capture(mlp(), (torch.randn(2, 16, generator=torch.Generator().manual_seed(0)),))


def _weights(gm: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in gm.state_dict().items()}


def test_finetune_retrains_the_weights_and_lowers_the_loss(graph, registry):
    before, loss_before = _weights(graph.module), loss(graph.module)
    def slow_sgd(module, *, epochs):
        time.sleep(0.05)
        return sgd(module, epochs=epochs)
    run = graphopt.run_pipeline(graph, "finetune(epochs=2)", registry, data={"train": slow_sgd})
    gm = run.graph.module
    (record,) = run.records
    assert record.verified and record.modified
    assert record.stats["epochs"] == 2 and 0.05 <= record.stats["seconds"] <= record.seconds   # the training, timed
    assert record.max_abs_err > 0 and record.cosine < 1.0          # vs the reference, as for any pass
    assert not any(m.training for m in gm.modules())              # back in eval mode
    assert not torch.equal(gm.get_submodule("0").weight, before["0.weight"])
    assert not torch.equal(gm.get_submodule("1").running_mean, before["1.running_mean"])  # BN trained too
    assert loss(gm) < 0.5 * loss_before, (loss_before, loss(gm))   # 2.40 -> 0.56 here
    assert all(torch.equal(v, before[k]) for k, v in graph.module.state_dict().items())  # input untouched


def test_a_graph_with_folded_batchnorm_still_trains(graph, registry):
    calls = []

    def train(module, *, epochs):
        calls.append((module.training, epochs))
        sgd(module, epochs=epochs)

    loss_before = loss(graph.module)
    run = graphopt.run_pipeline(graph, "cleanup,fold-bn,finetune(epochs=3),fuse", registry, data={"train": train})
    assert calls == [(True, 3)]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in run.graph.module.modules())
    assert all(r.verified for r in run.records) and run.records[2].modified
    assert loss(run.graph.module) < 0.5 * loss_before


def test_a_returned_graph_module_is_kept_and_anything_else_is_an_error(graph, registry):
    def retrain_a_copy(module, *, epochs):
        trained = copy.deepcopy(module)
        sgd(trained, epochs=epochs)
        return trained

    run = graphopt.run_pipeline(graph, "finetune", registry, data={"train": retrain_a_copy})
    assert run.records[0].modified and loss(run.graph.module) < loss(graph.module)

    def returns_a_layer(module, *, epochs):
        return nn.Linear(16, 4)

    with pytest.raises(PassError, match=r"pass finetune \(as the first pass\) failed: training function "
                                        r".*returns_a_layer returned a Linear; train the module in place"):
        graphopt.run_pipeline(graph, "finetune", registry, data={"train": returns_a_layer})


def test_changed_output_shapes_are_rejected(graph, registry):
    with pytest.raises(PassError, match=r"could not be verified: output shape \(2, 3\) differs from "
                                        r"the reference \(2, 4\)"):
        graphopt.run_pipeline(graph, "finetune", registry,
                              data={"train": lambda m, epochs: fx.symbolic_trace(nn.Linear(16, 3))})


def test_nan_weights_fail_the_pass_and_keep_the_graph_before_it(graph, registry):
    before = _weights(graph.module)

    def diverge(module, *, epochs):
        with torch.no_grad():
            module.get_submodule("4").weight.fill_(float("nan"))

    seen = []
    with pytest.raises(PassError) as info:
        graphopt.run_pipeline(graph, "cleanup,finetune", registry, data={"train": diverge}, on_pass=seen.append)
    err = info.value
    assert err.pass_name == "finetune" and err.before == ("cleanup",)
    assert str(err).startswith("pass finetune (after cleanup) changed the outputs beyond its trained "
                               "tolerance (NaN or Inf in the outputs)")
    assert err.node.startswith("`_4` (call_module Linear): NaN or Inf in the outputs")
    assert str(err).endswith("the graph before finetune was kept")
    assert [r.name for r in seen] == ["cleanup"]
    assert all(torch.equal(v, before[k]) for k, v in graph.module.state_dict().items())


def test_an_error_in_the_training_function_names_it(graph, registry):
    def explode(module, *, epochs):
        raise ValueError("lr too high")

    with pytest.raises(PassError) as info:
        graphopt.run_pipeline(graph, "cleanup,finetune", registry, data={"train": explode})
    assert str(info.value) == ("pass finetune (after cleanup) failed: training function "
                               "test_an_error_in_the_training_function_names_it.<locals>.explode raised "
                               "ValueError: lr too high; the graph before finetune was kept")
    with pytest.raises(PassError, match="epochs must be at least 1, got 0"):
        graphopt.run_pipeline(graph, "finetune(epochs=0)", registry, data={"train": sgd})


def test_missing_train_function(graph, registry):
    with pytest.raises(PassError, match=r"^pass finetune \(after cleanup\) failed: finetune needs a training "
                                        r"function \(--train FILE.py:FN\), or distill=true"):
        graphopt.run_pipeline(graph, "cleanup,finetune", registry)
    with pytest.raises(PassError, match=r"finetune\(distill=true\) needs unlabeled inputs: pass --train-data"):
        graphopt.run_pipeline(graph, "cleanup,finetune(distill=true)", registry)


def test_finetune_is_not_in_the_default_pipeline(registry):
    spec = registry.passes["finetune"]
    assert spec.effect is graphopt.Effect.TRAINED and spec.needs == () and spec.oracle is None
    assert "finetune" not in registry.default_pipeline()
    assert registry.owner["pass:finetune"] == "finetune"


def test_optimize_threads_the_training_function(registry):
    model = mlp()
    result = graphopt.optimize(model, (torch.randn(2, 16),), registry, data={"train": sgd},
                               pipeline="cleanup,fold-bn,finetune(epochs=2),fuse")
    assert result.ok and [p["name"] for p in result.report["passes"]][2] == "finetune(epochs=2)"
    assert loss(result.graph.module) < 0.5 * loss(model)


def test_cli_train_end_to_end(capsys, tmp_path):
    out = tmp_path / "out"
    code = main(["run", MODEL, "--input-shape", "2x16", "--pipeline", "cleanup,finetune(epochs=2),fold-bn",
                 "--train", TRAIN, "--emit", "onnx", "--out", str(out), "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(stdout)
    finetune = report["passes"][1]
    assert report["ok"] and finetune["name"] == "finetune(epochs=2)" and finetune["verified"]
    assert finetune["modified"] and finetune["stats"]["epochs"] == 2 and finetune["max_abs_err"] > 0
    assert (out / "mlp.onnx").is_file() and report["artifacts"][0]["verified"]


@pytest.mark.parametrize("train, message", [
    ("no_colon_here", "bad training function spec 'no_colon_here': write path/to/file.py:callable"),
    ("missing.py:sgd", "training function file missing.py does not exist"),
    (f"{TESTS / 'fixtures' / 'finetune_train.py'}:nope", "has no 'nope'; callables there:"),
    (f"{TESTS / 'fixtures' / 'finetune_train.py'}:not_a_function", "is not callable (it is int); name a "
                                                                   "function fn(module, *, epochs)"),
    (None, "finetune needs --train FILE.py:FN, or finetune(distill=true) with --train-data INPUTS.npz"),
])
def test_cli_bad_train_is_one_line_exit_2(capsys, tmp_path, train, message):
    out = tmp_path / "out"
    argv = ["run", MODEL, "--input-shape", "2x16", "--pipeline", "cleanup,finetune", "--out", str(out)]
    code = main(argv + (["--train", train] if train else []))
    _, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("graphopt: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def _pruned_student(registry):
    """A CNN pruned to half its channels, and held-out inputs to compare it with the original on."""
    from zoo.cnn import SmallConvNet

    torch.manual_seed(0)
    graph = graphopt.capture(SmallConvNet(), (torch.randn(4, 3, 16, 16),))
    data = {"train_inputs": [(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)),)
                             for i in range(32)]}
    held_out = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(99))
    return graph, data, held_out


def _agreement(graph, gm, held_out):
    with torch.no_grad():
        teacher, student = graph.module(held_out), gm(held_out)
    return float((teacher.argmax(1) == student.argmax(1)).float().mean()), \
        float(torch.nn.functional.cosine_similarity(teacher, student).mean())


def test_distill_recovers_a_pruned_model_on_unlabeled_inputs(registry):
    graph, data, held_out = _pruned_student(registry)
    pruned = graphopt.run_pipeline(graph, "prune(ratio=0.5)", registry).graph
    recovered = graphopt.run_pipeline(graph, "prune(ratio=0.5),finetune(distill=true,epochs=20,lr=0.003)", registry,
                                      data=data)
    top1_before, cos_before = _agreement(graph, pruned.module, held_out)
    top1_after, cos_after = _agreement(graph, recovered.graph.module, held_out)
    record = recovered.records[-1]
    assert record.verified and record.modified and record.stats["distill_loss"] >= 0
    # the distance to the original shrinks by far more than half (0.968 -> 0.998 cosine here)
    assert 1 - cos_after < 0.25 * (1 - cos_before) and top1_after >= top1_before, (cos_before, cos_after)
    again = graphopt.run_pipeline(graph, "prune(ratio=0.5),finetune(distill=true,epochs=20,lr=0.003)", registry,
                                  data=data)
    assert all(torch.equal(a, b) for a, b in zip(recovered.graph.module.state_dict().values(),
                                                 again.graph.module.state_dict().values()))   # seeded


def test_cli_distill_takes_train_data(capsys, tmp_path):
    import numpy as np

    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32))
    out = tmp_path / "out"
    code = main(["run", MODEL, "--input-shape", "2x16", "--pipeline", "cleanup,prune(ratio=0.5),"
                 "finetune(distill=true,epochs=3)", "--train-data", str(inputs), "--emit", "onnx", "--out", str(out),
                 "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    finetune = json.loads(stdout)["passes"][2]
    assert finetune["name"] == "finetune(distill=true,epochs=3)" and finetune["modified"] and finetune["verified"]
