"""graphopt tune: the search space read off the registry, a study end to end (front, choice, verified artifacts,
a reproducible command), resuming a killed study from SQLite, Ray giving the same trials as the local executor,
and bad input as one line with exit code 2."""
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

import graphopt
from graphopt.cli import main
from graphopt_plugins.tune import study as studies
from graphopt_plugins.tune.budget import meets, parse_budget
from graphopt_plugins.tune.space import build_space, default_points, suggest_pipeline
from conftest import TESTS

MODEL = f"{TESTS / 'zoo' / 'cnn.py'}:SmallConvNet"
PLUGIN = str(TESTS / "fixtures" / "split_linear_plugin.py")
BASE = ["tune", MODEL, "--input-shape", "1x3x16x16", "--format", "onnx", "--runs", "5", "--plugin", PLUGIN]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """An 8-trial study (6 at the defaults, 2 sampled), trials asked two at a time, run here."""
    out = tmp_path_factory.mktemp("local")
    code = main([*BASE, "--trials", "8", "--parallel", "2", "--out", str(out), "--quiet", "--budget", "size=20KB"])
    return code, out, json.loads((out / "tune.json").read_text())


class Answers:
    """A stand-in for an Optuna trial: each suggest returns the answer given for its name, else the first value."""

    def __init__(self, **answers):
        self.answers, self.asked = answers, []

    def suggest_categorical(self, name, values):
        self.asked.append(name)
        return self.answers.get(name, values[0])

    def suggest_int(self, name, low, high, step=1):
        self.asked.append(name)
        return self.answers.get(name, low)

    def suggest_float(self, name, low, high, step=None):
        self.asked.append(name)
        return self.answers.get(name, low)


def test_budgets_parse_into_base_units_and_bad_ones_say_why():
    assert parse_budget("latency=5ms, size=2MB,macs=300M") == {"latency": 5.0, "size": 2e6, "macs": 3e8}
    assert parse_budget("size<=1.5MiB") == {"size": 1.5 * 2 ** 20} and parse_budget(None) == {}
    assert meets({"latency_ms": 4, "bytes": 2e6, "macs": 1}, parse_budget("latency=5ms,size=2MB"))
    assert not meets({"latency_ms": 6, "bytes": 1, "macs": 1}, parse_budget("latency=5ms"))
    for text, message in [("speed=5ms", "no such budget"), ("size=2", "unit '(none)' is not one of B, KB, MB"),
                          ("latency=5", "unit '(none)'"), ("size=two", "takes NAME=VALUE items"),
                          ("size=1MB,size=2MB", "gives size twice"), ("macs=3X", "unit 'X' is not one of k, M, G")]:
        with pytest.raises(graphopt.UsageError, match=re.escape(message)):
            parse_budget(text)


def test_the_space_comes_from_the_registry_a_third_party_pass_included():
    registry = graphopt.load_plugins([PLUGIN])
    space = build_space(registry, registry.emitters["pte"], {"calibration", "train_inputs"},
                        {"finetune": {"distill": True}})
    assert [p.name for p in space.optional] == ["prune", "finetune", "split-linear"]   # by effect
    assert [p.name for p in space.precision] == ["quantize"]            # pte takes no fp16 graphs
    assert [p.name for p in build_space(registry, registry.emitters["onnx"], {"calibration"}).precision] == \
        ["fp16", "quantize"]
    assert "split-linear: chunks in [1, 2, 4]" in space.describe()
    trial = Answers(**{"use.prune": True, "prune.ratio": 0.3, "use.finetune": True, "finetune.epochs": 4,
                       "use.split-linear": True, "split-linear.chunks": 2, "precision": "quantize",
                       "quantize.target_cosine": 0.996})
    assert suggest_pipeline(trial, space, registry) == (
        "cleanup,prune(criterion=l1,ratio=0.3,round_to=1),finetune(distill=true,epochs=4),fuse,"
        "split-linear(chunks=2),quantize(prefer=speed,target_cosine=0.996)")
    # finetune is only asked about after a pass that changed the function
    trial = Answers(**{"use.prune": False})
    assert suggest_pipeline(trial, space, registry) == "cleanup,fuse" and "use.finetune" not in trial.asked
    onnx = build_space(registry, registry.emitters["onnx"], {"train_inputs"})
    assert onnx.skipped == {"quantize": "needs calibration"}
    # the search starts at the authors' defaults: each precision step alone, then with every optional pass on
    assert default_points(space)[:2] == [
        {"use.prune": False, "use.finetune": False, "use.split-linear": False, "precision": "fp32"},
        {"use.prune": False, "use.finetune": False, "use.split-linear": False, "precision": "quantize",
         "quantize.prefer": "speed", "quantize.target_cosine": 0.996},
    ] and default_points(space)[3] == {
        "use.prune": True, "prune.ratio": 0.5, "prune.criterion": "l1", "prune.round_to": 1, "use.finetune": True,
        "finetune.epochs": 1, "use.split-linear": True, "split-linear.chunks": 2, "precision": "quantize",
        "quantize.prefer": "speed", "quantize.target_cosine": 0.996} and len(default_points(space)) == 4


def test_a_study_reports_its_front_and_ships_the_chosen_point(local, capsys):
    code, out, report = local
    assert code == 0 and report["ok"] and len(report["trials"]) == 8
    done = [t for t in report["trials"] if t["state"] == "complete"]
    assert done and all(t["pipeline"].startswith("cleanup") and t["latency_ms"] > 0 and t["bytes"] > 0
                        and 0 <= t["quality"] <= 1 for t in done)
    assert any("split-linear" in t["pipeline"] for t in report["trials"])   # the third-party pass was searched
    assert [t["pipeline"] for t in report["trials"][:4]] == [   # the defaults first
        "cleanup,fuse", "cleanup,fuse,fp16", "cleanup,fuse,quantize(prefer=speed,target_cosine=0.996)",
        "cleanup,prune(criterion=l1,ratio=0.5,round_to=1),finetune(distill=true,epochs=1),fuse,"
        "split-linear(chunks=2)"]
    front = [t for t in done if t["trial"] in report["front"]]
    for p in front:   # nothing beats a front point on all three
        assert not any(q["latency_ms"] <= p["latency_ms"] and q["bytes"] <= p["bytes"] and q["quality"] >= p["quality"]
                       and (q["latency_ms"], q["bytes"], q["quality"]) != (p["latency_ms"], p["bytes"], p["quality"])
                       for q in done)
    chosen = next(t for t in done if t["trial"] == report["chosen"])
    assert chosen["bytes"] <= 20e3 and chosen["quality"] == max(t["quality"] for t in done if t["bytes"] <= 20e3)
    assert (out / "pipeline.txt").read_text().strip() == chosen["pipeline"] == report["pipeline"]
    (artifact,) = report["artifacts"]
    assert artifact["verified"] and os.path.getsize(artifact["path"]) == chosen["bytes"]
    assert (out / "front.png").stat().st_size > 10_000 and "| trial |" in (out / "front.md").read_text()
    # the printed command builds the same file again
    again = tmp = out / "again"
    argv = report["command"].replace(f'"$(cat {out / "pipeline.txt"})"', chosen["pipeline"]).split()[1:]
    argv[argv.index("OUT")] = str(tmp)
    code, _, err = run_cli(capsys, *argv, "--quiet")
    assert code == 0, err
    assert (again / os.path.basename(artifact["path"])).read_bytes() == open(artifact["path"], "rb").read()


def _loopback() -> bool:
    """Whether this machine can talk to itself over TCP (Ray's processes do; ``unshare -n`` takes it away)."""
    import socket

    with socket.socket() as server, socket.socket() as client:
        try:
            server.bind(("127.0.0.1", 0))
            server.listen()
            client.connect(server.getsockname())
            return True
        except OSError:
            return False


def test_ray_runs_the_same_trials_as_the_local_executor(local, tmp_path):
    if not _loopback():
        if os.environ.get("GRAPHOPT_CI"):
            pytest.fail("Ray needs the loopback network, which is down")
        pytest.skip("Ray needs the loopback network, which is down (unshare -n without ip link set lo up)")
    _, _, report = local
    out = tmp_path / "ray"
    code = main([*BASE, "--trials", "8", "--parallel", "2", "--out", str(out), "--quiet", "--budget", "size=20KB",
                 "--executor", "ray"])
    ray_report = json.loads((out / "tune.json").read_text())
    assert code == 0

    def deterministic(r):
        return [(t["trial"], t["pipeline"], t.get("bytes"), t.get("macs"), t.get("quality"), t.get("error"))
                for t in r["trials"]]
    assert deterministic(ray_report) == deterministic(report)    # latencies are measured, so they may differ
    quality = {t["trial"]: t.get("quality") for t in report["trials"]}   # equal quality: the faster one, measured
    assert quality[ray_report["chosen"]] == quality[report["chosen"]]


def _complete(db) -> int:
    """Complete trials in the study file (0 while Optuna has made the file but not yet its tables)."""
    with sqlite3.connect(db) as c:
        try:
            return c.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def test_a_killed_study_resumes_from_its_sqlite_file(capsys, tmp_path):
    db, out = tmp_path / "study.db", tmp_path / "out"
    argv = [*BASE, "--trials", "5", "--out", str(out), "--study", str(db), "--seed", "3"]
    proc = subprocess.Popen([sys.executable, "-m", "graphopt.cli", *argv, "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while (not db.exists() or _complete(db) < 2) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(db) as c:
        before = c.execute("select number, state from trials where state != 'WAITING' order by number").fetchall()
    assert 2 <= _complete(db) < 5, before
    code, _, err = run_cli(capsys, *argv, "--quiet")
    assert code == 0, err
    report = json.loads((out / "tune.json").read_text())
    assert len(report["trials"]) == 5
    assert [t["trial"] for t in report["trials"][:len(before)]] == [n for n, _ in before]
    for number, state in before:
        if state == "RUNNING":   # the trial the kill cut short
            assert report["trials"][number]["error"].startswith("interrupted")


def test_an_evaluation_function_that_raises_stops_the_study_and_keeps_it(capsys, tmp_path):
    evals = tmp_path / "evals.py"
    evals.write_text("calls = []\n\ndef flaky(runner):\n    calls.append(1)\n"
                     "    if len(calls) > 2:\n        raise ValueError('no labels for batch 3')\n    return 0.5\n")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *BASE, "--trials", "4", "--out", str(out), "--eval", f"{evals}:flaky", "--quiet")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"graphopt: error: evaluation function {evals}:flaky raised ValueError: no labels for "
                          f"batch 3 (trial 1: ")
    assert "the study keeps its 2 trials" in err
    with sqlite3.connect(out / "tune.db") as c:
        assert c.execute("select state from trials where state != 'WAITING' order by number").fetchall() == [
            ("COMPLETE",), ("FAIL",)]


@pytest.mark.parametrize("argv, message", [
    (["--budget", "size=tiny"], "--budget takes NAME=VALUE items"),
    (["--format", "onnxx"], "did you mean onnx"),
    (["--format", "onnx,ptl"], "--format takes one format, got 'onnx,ptl'"),
    (["--address", "10.0.0.1:6379"], "--address needs --executor ray"),
    (["--quality", "0.9", "--max-drop", "0.01"], "give --quality or --max-drop, not both"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, message):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, *BASE, "--out", str(out), *argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_a_quality_floor_picks_the_fastest_point_that_reaches_it(local):
    _, _, report = local
    done = [t for t in report["trials"] if t["state"] == "complete"]
    floor = sorted(t["quality"] for t in done)[len(done) // 2]
    chosen = studies.choose(report["trials"], {}, floor)
    assert chosen["quality"] >= floor
    assert chosen["latency_ms"] == min(t["latency_ms"] for t in done if t["quality"] >= floor)
    best = studies.choose(report["trials"], {}, None)
    assert best["quality"] == max(t["quality"] for t in done)


def test_no_trial_meeting_the_budget_exits_2_and_keeps_the_front(capsys, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *BASE, "--trials", "2", "--out", str(out), "--budget", "size=100B", "--quiet")
    assert code == 2 and err.count("\n") == 1
    assert "no trial met the budget (size <= 0.0001 MB); the smallest was " in err
    report = json.loads((out / "tune.json").read_text())
    assert report["ok"] is False and report["chosen"] is None and len(report["trials"]) == 2
    assert (out / "front.md").is_file() and (out / "tune.db").is_file() and not (out / "pipeline.txt").exists()


def test_data_npz_is_split_into_training_and_held_out_inputs(capsys, tmp_path):
    data = tmp_path / "inputs.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((80, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *BASE, "--trials", "1", "--out", str(out), "--data", str(data),
                           "--held-out", "16", "--quiet")
    assert code == 0, err
    with np.load(out / "train_inputs.npz") as saved:
        assert saved["x"].shape == (64, 3, 16, 16)          # the 16 held out are not trained on
        assert np.array_equal(saved["x"], np.load(data)["x"][:64])
    code, _, err = run_cli(capsys, *BASE, "--trials", "1", "--out", str(tmp_path / "o2"), "--data", str(data),
                           "--held-out", "80")
    assert code == 2 and "--data has 80 samples; tune holds out 80" in err
