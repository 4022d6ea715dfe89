import json
import subprocess
import sys
import time

import pytest

from graphopt.cli import main
from conftest import TESTS

MODEL = f"{TESTS / 'zoo' / 'cnn.py'}:tiny_resnet"
SHAPE = "1x3x32x32"



def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def sentinel(tmp_path):
    """An output folder that already holds the user's work."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny_resnet.onnx").write_bytes(b"the user's previous artifact")
    return out


def _unchanged(out):
    assert sorted(p.name for p in out.iterdir()) == ["tiny_resnet.onnx"]
    assert (out / "tiny_resnet.onnx").read_bytes() == b"the user's previous artifact"


@pytest.mark.parametrize("argv, message", [
    (["run", "no_colon_here", "--input-shape", SHAPE], "bad model spec 'no_colon_here'"),
    (["run", "missing.py:build", "--input-shape", SHAPE], "model file missing.py does not exist"),
    (["run", f"{TESTS / 'zoo' / 'cnn.py'}:nope", "--input-shape", SHAPE], "has no 'nope'; callables there:"),
    (["run", "json:dumps", "--input-shape", SHAPE], "calling json:dumps failed"),
    (["run", MODEL, "--input-shape", "1x3x32"], "fails on inputs of shape 1x3x32"),
    (["run", MODEL, "--input-shape", "1by3"], "bad input shape '1by3'"),
    (["run", MODEL, "--input-shape", SHAPE, "--pipeline", "cleanup,,fold-bn"], "bad pipeline"),
    (["run", MODEL, "--input-shape", SHAPE, "--pipeline", "fold-nb"], "did you mean fold-bn"),
    (["run", MODEL, "--input-shape", SHAPE, "--pipeline", "fold-bn(x=1)"], "valid options: none"),
    (["run", MODEL, "--input-shape", SHAPE, "--emit", "onnx,coreml"], "unknown format 'coreml'"),
    (["run", MODEL, "--input-shape", SHAPE, "--weights", "nope.pt"], "weights file nope.pt does not exist"),
    (["run", MODEL], "the following arguments are required: --input-shape"),
    (["run", MODEL, "--input-shape", SHAPE, "-p", "fold-bn"], "-p takes no:NAME"),
    (["run", MODEL, "--input-shape", SHAPE, "--print-ir-after", "fusee"], "--print-ir-after fusee: no such pass; did "
                                                                          "you mean fuse"),
    (["run", MODEL, "--input-shape", SHAPE, "--pipeline", "cleanup,fold-bn", "--explain", "prune"],
     "--explain prune: the pipeline does not run it (cleanup,fold-bn)"),
    (["run", MODEL, "--input-shape", SHAPE, "--pipeline", "cleanup", "--print-ir-after", "fold-bn"],
     "--print-ir-after fold-bn: the pipeline does not run it (cleanup)"),
    (["run", MODEL, "--input-shape", SHAPE, "--target", "xnnpak"], "did you mean xnnpack?"),
    (["run", MODEL, "--input-shape", SHAPE, "--name", "../up"], "--name: takes a file name without folders"),
    (["run", MODEL, "--input-shape", SHAPE, "--pipeline", "cleanup,fp16", "--emit", "onnx,pte"],
     "--emit pte takes fp32 and int8 graphs, and the pipeline makes an fp16 one (fp16): leave fp16 out for pte"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(capsys, sentinel, argv, message):
    code, out, err = run_cli(capsys, *argv, "--out", str(sentinel)) if argv[0] == "run" else \
        run_cli(capsys, *argv)
    assert code == 2
    *progress, error = err.splitlines()          # progress lines of the work that ran, then the error
    assert error.startswith("graphopt: error: ") and message in error, err
    assert all(p.startswith(("graphopt: ", "  ")) and "error" not in p for p in progress) and "Traceback" not in err
    _unchanged(sentinel)


def test_unwritable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--out", str(blocker / "sub"))
    assert code == 2 and "is not a writable directory" in err
    code, _, err = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--out", str(blocker))
    assert code == 2 and "exists and is not a directory" in err
    assert blocker.read_text() == "x"


def test_wrong_weights_file(capsys, tmp_path, sentinel):
    import torch
    bad = tmp_path / "w.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    code, _, err = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--weights", str(bad),
                           "--out", str(sentinel))
    assert code == 2 and f"cannot load weights {bad}" in err
    _unchanged(sentinel)


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(Exception) as info:
        main(["run", "missing.py:x", "--input-shape", SHAPE, "--debug"])
    assert "missing.py does not exist" in str(info.value)


def test_run_writes_verified_onnx_and_report(capsys, tmp_path):
    out, report = tmp_path / "out", tmp_path / "report.json"
    code, stdout, _ = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--pipeline", "cleanup,fold-bn",
                              "--emit", "onnx", "--out", str(out), "--report", str(report),
                              "--explain", "fold-bn", "--print-ir-after", "fold-bn")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["tiny_resnet.onnx"]
    r = json.loads(report.read_text())
    assert r["version"] == 1 and r["ok"] is True and r["pipeline"] == "cleanup,fold-bn"
    assert [p["name"] for p in r["passes"]] == ["cleanup", "fold-bn"]
    for p in r["passes"]:
        assert set(p) >= {"name", "seconds", "modified", "nodes", "params", "macs", "bytes",
                          "max_abs_err", "cosine"}
    assert r["passes"][1]["nodes"] < r["model"]["nodes"]
    assert r["passes"][1]["stats"]["folded"] > 0
    (art,) = r["artifacts"]
    assert art["format"] == "onnx" and art["verified"] and art["bytes"] == (out / "tiny_resnet.onnx").stat().st_size
    assert art["max_abs_err"] < 1e-3 and art["cosine"] > 0.9999
    assert "IR after fold-bn" in stdout and "def forward" in stdout
    assert "folded BatchNorm2d into Conv2d" in stdout


def test_json_and_quiet(capsys, tmp_path):
    code, stdout, err = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--out", str(tmp_path / "o"), "--json")
    assert code == 0 and json.loads(stdout)["ok"] is True
    code, stdout, err = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--out", str(tmp_path / "o"), "--quiet")
    assert code == 0 and stdout == "" and err == ""


def test_unverified_artifact_installs_nothing(capsys, tmp_path, sentinel):
    plugin = tmp_path / "bad_emitter.py"
    plugin.write_text('''
import graphopt
from graphopt import Artifact, Emitter

def _emit(graph, options, out_dir):
    path = out_dir / f"{graph.name}.onnx"
    path.write_bytes(b"wrong")
    GRAPHS[path.name] = graph
    return Artifact("bad", path)

def _load(artifact):
    graph = GRAPHS[artifact.path.name]
    return lambda inputs: [o + 1.0 for o in graph.run(inputs)]

GRAPHS = {}

@graphopt.hookimpl
def graphopt_register_emitters():
    return [Emitter("bad", "off by one on purpose", ".onnx", _emit, _load)]
''')
    report = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--emit", "bad", "--out", str(sentinel),
                           "--plugin", str(plugin), "--report", str(report), "--quiet")
    assert code == 1 and "nothing was written" in err
    _unchanged(sentinel)
    r = json.loads(report.read_text())
    assert r["ok"] is False and r["artifacts"][0]["verified"] is False
    assert "max relative error" in r["artifacts"][0]["problems"][0]


def test_passes_and_emitters_listings(capsys):
    code, out, _ = run_cli(capsys, "passes", "--json")
    listing = json.loads(out)
    names = {p["name"]: p for p in listing["passes"]}
    assert {"cleanup", "fold-bn"} <= set(names) and names["fold-bn"]["effect"] == "exact"
    assert listing["default_pipeline"].startswith("cleanup,fold-bn")
    code, out, _ = run_cli(capsys, "passes")
    assert code == 0 and "fold-bn" in out and "default pipeline" in out
    code, out, _ = run_cli(capsys, "emitters", "--json")
    onnx = next(e for e in json.loads(out)["emitters"] if e["format"] == "onnx")
    assert onnx["available"] and {o["name"] for o in onnx["options"]} >= {"opset", "dynamic_batch"}


@pytest.mark.parametrize("builder", ["resnet18", "mobilenet_v2"])
def test_full_size_models_run_end_to_end(tmp_path, builder):
    """The 224x224 ResNet-18- and MobileNetV2-style models, through the real console script,
    into every format (fp32 within 1e-4 of the output scale, fp16 within 1e-2)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", "run", f"{TESTS / 'zoo' / 'cnn.py'}:{builder}",
                           "--input-shape", "1x3x224x224", "--out", str(tmp_path), "--json",
                           "--emit", "onnx,ptl,tflite,tflite(precision=fp16)"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["passes"][-1]["macs"] == report["model"]["macs"]
    arts = {a["path"].rsplit("/", 1)[-1]: a for a in report["artifacts"]}
    assert set(arts) == {f"{builder}.onnx", f"{builder}.ptl", f"{builder}.tflite", f"{builder}_fp16.tflite"}
    for name, art in arts.items():
        assert art["verified"], (name, art["problems"])
    fp32, fp16 = arts[f"{builder}.tflite"], arts[f"{builder}_fp16.tflite"]
    assert fp16["bytes"] < 0.55 * fp32["bytes"]
    assert fp32["meta"]["inputs"][0]["layout"] == "NHWC"
    print(f"{builder}: graphopt run took {seconds:.1f} s")


def test_ir_and_explanations_asked_for_show_under_quiet_and_json(capsys, tmp_path):
    asked = ["--pipeline", "cleanup,fold-bn", "--print-ir-after", "fold-bn", "--explain", "fold-bn"]
    code, stdout, err = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--out", str(tmp_path / "q"), "--quiet",
                                *asked)
    assert code == 0 and "IR after fold-bn" in stdout and "def forward" in stdout and "folded BatchNorm2d" in stdout
    assert "passes" not in stdout          # the rest stays quiet
    code, stdout, err = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--out", str(tmp_path / "j"), "--json",
                                *asked)
    assert code == 0 and json.loads(stdout)["ok"] is True
    assert "IR after fold-bn" in err and "folded BatchNorm2d" in err


def test_explain_names_a_pass_an_emitter_prepares_with(capsys, tmp_path):
    pytest.importorskip("executorch")
    code, stdout, _ = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--out", str(tmp_path / "o"),
                              "--pipeline", "cleanup,fold-bn", "--emit", "pte", "--explain", "partition")
    assert code == 0 and "explain partition(backend=xnnpack) (preparing pte)" in stdout


def test_name_sets_the_artifacts_base_name(capsys, tmp_path):
    code, _, _ = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--out", str(tmp_path), "--name", "edge",
                         "--emit", "onnx", "--quiet")
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["edge.onnx"]


def test_a_failed_run_leaves_a_report_and_the_explanations_asked_for(capsys, tmp_path):
    plugin = tmp_path / "breaks.py"
    plugin.write_text((TESTS / "fixtures" / "breaks_plugin.py").read_text())
    report = tmp_path / "r.json"
    argv = ["run", MODEL, "--input-shape", SHAPE, "--out", str(tmp_path / "o"), "--plugin", str(plugin),
            "--pipeline", "cleanup,fold-bn,breaks", "--explain", "fold-bn", "--report", str(report)]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 2 and "pass breaks (after cleanup, fold-bn) changed the outputs" in err
    assert "explain fold-bn" in stdout and "folded BatchNorm2d" in stdout
    r = json.loads(report.read_text())
    assert r["ok"] is False and r["failed_pass"] == "breaks" and r["error"] in err
    assert [p["name"] for p in r["passes"]] == ["cleanup", "fold-bn"] and r["passes"][1]["stats"]["folded"] > 0
    assert r["artifacts"] == [] and r["model"]["spec"] == MODEL
    code, stdout, err = run_cli(capsys, *argv[:-2], "--json")
    assert code == 2 and json.loads(stdout)["ok"] is False and "explain fold-bn" in err


def test_weights_errors_keep_what_the_user_needs_to_act(capsys, tmp_path, sentinel):
    import torch

    from zoo.cnn import tiny_resnet
    state = tiny_resnet().state_dict()
    cases = {
        "keys.pt": ({**{k: v for k, v in state.items() if k != "fc.bias"}, "head.weight": torch.zeros(1)},
                    "1 missing (fc.bias); 1 unexpected (head.weight)"),
        "shape.pt": ({**state, "fc.weight": torch.zeros(3, state["fc.weight"].shape[1])},
                     f"fc.weight is 3x{state['fc.weight'].shape[1]} in the file, "
                     f"{'x'.join(map(str, state['fc.weight'].shape))} in the model"),
        "whole.pt": (tiny_resnet(), "is not a plain state_dict"),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        code, _, err = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--weights", str(tmp_path / name),
                               "--out", str(sentinel))
        assert code == 2 and message in err and "\x1b[" not in err and err.count("\n") == 1, err
    _unchanged(sentinel)


def test_a_runtime_error_is_kept_whole(capsys, tmp_path):
    assert main(["run", MODEL, "--input-shape", SHAPE, "--out", str(tmp_path), "--quiet"]) == 0
    code, _, err = run_cli(capsys, "bench", str(tmp_path / "tiny_resnet.onnx"), "--input-shape", "1x3x16x16")
    assert code == 2 and "index: 2 Got: 16 Expected: 32" in err and err.count("\n") == 1


PROBE = '''
import graphopt
from graphopt import Effect, Pass, PassResult


def _run(gm, ctx):
    ctx.explain(f"example sum {float(ctx.example_inputs[0].sum()):.1f}")
    return PassResult(gm, False, {})


@graphopt.hookimpl
def graphopt_register_passes():
    return [Pass("probe", "says what the example input sums to", _run, Effect.EXACT)]
'''


def test_example_takes_the_example_inputs_from_the_users_data(capsys, tmp_path):
    import numpy as np

    plugin, data = tmp_path / "probe.py", tmp_path / "data.npz"
    plugin.write_text(PROBE)
    np.savez(data, x=np.stack([np.full((3, 32, 32), 0.5, np.float32), np.zeros((3, 32, 32), np.float32)]))
    argv = ["run", MODEL, "--input-shape", SHAPE, "--plugin", str(plugin), "--pipeline", "probe", "--emit", "",
            "--explain", "probe"]
    code, stdout, _ = run_cli(capsys, *argv, "--example", str(data))
    assert code == 0 and "example sum 1536.0" in stdout           # 3*32*32 halves: the file's first sample
    code, stdout, _ = run_cli(capsys, *argv)
    assert code == 0 and "example sum 1536.0" not in stdout and "example sum " in stdout   # seeded Gaussian
    code, _, err = run_cli(capsys, *argv, "--example", str(tmp_path / "missing.npz"))
    assert code == 2 and err.startswith("graphopt: error: --example: calibration data ") and "does not exist" in err
