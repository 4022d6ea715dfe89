import json

import numpy as np
import pytest
import torch

from graphopt import UsageError
from graphopt.cli.bench import Subject, accuracy, bench, load_eval, markdown
from graphopt.cli import main
from conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n"


def _subjects():
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        exact = lambda xs: [lin(xs[0])]
        off = lambda xs: [lin(xs[0]) + 0.5]
    return lin, [Subject("ref", "torch", exact), Subject("off", "torch", off, baseline="ref")]


def test_rows_carry_errors_percentiles_and_speedups():
    lin, subjects = _subjects()
    x = torch.randn(2, 4)
    with torch.no_grad():
        reference = [lin(x)]
    rows = bench(subjects, [x], reference=reference, threads=1, runs=7, warmup=1)
    ref, off = rows
    assert (ref.label, off.label) == ("ref", "off") and ref.runs == 7 and ref.threads == 1
    for r in rows:
        assert 0 < r.p10_ms <= r.median_ms <= r.p90_ms
    assert ref.max_abs_err == 0 and ref.speedup is None
    assert off.max_abs_err == pytest.approx(0.5, abs=1e-6)
    assert off.speedup == pytest.approx(ref.median_ms / off.median_ms)
    assert "| off | torch | - |" in markdown(rows)


def test_accuracy_pads_the_last_chunk_to_the_static_batch():
    seen = []

    def runner(xs):
        seen.append(xs[0].shape[0])
        return [xs[0]]   # logits are the inputs themselves
    x = torch.eye(3)[[0, 1, 2, 0, 1]]
    y = torch.tensor([0, 1, 2, 1, 1])
    assert accuracy(runner, [x], y, batch=2) == pytest.approx(4 / 5)
    assert seen == [2, 2, 2]


def test_load_eval_checks_its_file(tmp_path):
    path = tmp_path / "e.npz"
    np.savez(path, x=np.zeros((3, 4), np.float32), y=np.arange(3))
    x, y = load_eval(path, ["input"])
    assert x[0].shape == (3, 4) and y.tolist() == [0, 1, 2]
    np.savez(path, x=np.zeros((3, 4), np.float32))
    with pytest.raises(UsageError, match="no 'y' array"):
        load_eval(path, ["input"])
    np.savez(path, a=np.zeros((3, 4), np.float32), y=np.arange(2))
    with pytest.raises(UsageError, match="lacks b"):
        load_eval(path, ["a", "b"])


def test_run_bench_adds_side_by_side_baselines(capsys, tmp_path):
    out = tmp_path / "out"
    data = tmp_path / "eval.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32), y=np.arange(5) % 4)
    code = main(["run", f"{ROOT / 'tests/zoo/cnn.py'}:mlp", "--input-shape", "1x16", "--out", str(out),
                 "--bench", "--runs", "3", "--eval", str(data), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["label"]: r for r in report["bench"]}
    assert set(rows) == {"eager (unoptimized)", "fx graph (optimized)", "mlp.onnx (unoptimized)", "mlp.onnx"}
    onnx, unoptimized = rows["mlp.onnx"], rows["mlp.onnx (unoptimized)"]
    assert onnx["baseline"] == "mlp.onnx (unoptimized)"
    assert onnx["speedup"] == pytest.approx(unoptimized["median_ms"] / onnx["median_ms"], rel=1e-3)
    assert rows["mlp.onnx (unoptimized)"]["baseline"] == "eager (unoptimized)"
    assert all(0 <= r["accuracy"] <= 1 for r in rows.values())
    assert len({r["accuracy"] for r in rows.values()}) == 1   # same function, same predictions
    assert rows["mlp.onnx"]["max_rel_err"] < 1e-4
    assert (out / "bench.png").read_bytes().startswith(PNG)
    assert json.loads((out / "bench.json").read_text())[0]["label"] == "eager (unoptimized)"


def test_bench_command_on_artifacts(capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["run", f"{ROOT / 'tests/zoo/cnn.py'}:mlp", "--input-shape", "4x16", "--out", str(out), "--quiet"]) == 0
    plot, save = tmp_path / "b.png", tmp_path / "b.json"
    code = main(["bench", str(out / "mlp.onnx"), "--golden", "mlp", "--golden-dir", str(ROOT / "golden"),
                 "--runs", "3", "--plot", str(plot), "--save", str(save), "--json"])
    assert code == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["format"] == "onnx" and row["bytes"] == (out / "mlp.onnx").stat().st_size
    assert row["max_rel_err"] < 1e-4 and row["median_ms"] > 0
    assert plot.read_bytes().startswith(PNG) and json.loads(save.read_text()) == [row]


@pytest.mark.parametrize("argv, message", [
    (["bench", "missing.onnx", "--input-shape", "1x4"], "artifact missing.onnx does not exist"),
    (["bench", "README.md", "--input-shape", "1x4"], "no emitter reads .md files"),
    (["bench", "README.md", "--input-shape", "1x4", "--runs", "0"], "positive number"),
])
def test_bench_bad_input(capsys, monkeypatch, argv, message):
    monkeypatch.chdir(ROOT)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_eval_data_of_the_wrong_shape_is_one_line(capsys, tmp_path):
    data = tmp_path / "eval.npz"
    np.savez(data, x=np.zeros((5, 3, 16), np.float32), y=np.zeros(5))
    code = main(["run", f"{ROOT / 'tests/zoo/cnn.py'}:mlp", "--input-shape", "1x16", "--out", str(tmp_path / "o"),
                 "--bench", "--runs", "1", "--eval", str(data)])
    assert code == 2 and "eval data does not fit" in capsys.readouterr().err


def test_run_bench_sets_the_speed_up_beside_the_mac_reduction(capsys, tmp_path):
    out = tmp_path / "out"
    code = main(["run", f"{ROOT / 'tests/zoo/cnn.py'}:tiny_resnet", "--input-shape", "1x3x32x32", "--out", str(out),
                 "--pipeline", "cleanup,prune(ratio=0.5),fold-bn,fuse", "--emit", "onnx", "--bench", "--runs", "3",
                 "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    summary, rows = report["bench_macs"], {r["label"]: r for r in report["bench"]}
    before, after = summary["macs"]
    assert before == report["model"]["macs"] and after == report["passes"][-1]["macs"] and before / after > 2.5
    assert summary["reduction"] == pytest.approx(before / after)
    assert summary["speedups"] == {"tiny_resnet.onnx": rows["tiny_resnet.onnx"]["speedup"]}
    assert summary["share"]["tiny_resnet.onnx"] == pytest.approx(rows["tiny_resnet.onnx"]["speedup"] / (before / after))
    assert main(["run", f"{ROOT / 'tests/zoo/cnn.py'}:tiny_resnet", "--input-shape", "1x3x32x32", "--out",
                 str(tmp_path / "text"), "--pipeline", "cleanup,prune(ratio=0.5)", "--emit", "onnx", "--bench",
                 "--runs", "2"]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("MACs "))
    assert f"({before / after:.2f}x fewer)" in line and "tiny_resnet.onnx" in line and "of it)" in line


def test_two_artifacts_of_one_name_are_timed_and_checked_apart(capsys, tmp_path):
    """a/mlp.onnx and b/mlp.onnx (the same architecture, other weights): rows of their own."""
    other = tmp_path / "other.py"
    other.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom zoo import cnn\n\n\n"
                     "def mlp():\n    return cnn.mlp(seed=7)\n")
    for folder, spec in (("a", f"{ROOT / 'tests/zoo/cnn.py'}:mlp"), ("b", f"{other}:mlp")):
        assert main(["run", spec, "--input-shape", "1x16", "--out", str(tmp_path / folder), "--quiet"]) == 0
    code = main(["bench", str(tmp_path / "a" / "mlp.onnx"), str(tmp_path / "b" / "mlp.onnx"), "--input-shape", "1x16",
                 "--runs", "3", "--plot", str(tmp_path / "p.png"), "--save", str(tmp_path / "s.json"), "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in rows] == ["a/mlp.onnx", "b/mlp.onnx"] and rows[1]["baseline"] == "a/mlp.onnx"
    assert rows[0]["max_rel_err"] == 0 and rows[1]["max_rel_err"] > 0.01   # errors vs the first artifact
    assert main(["bench", str(tmp_path / "a" / "mlp.onnx"), str(tmp_path / "a" / "mlp.onnx"), "--input-shape",
                 "1x16"]) == 2
    assert "is given twice" in capsys.readouterr().err


@pytest.mark.parametrize("flag, what", [("--plot", "the plot"), ("--save", "the results")])
def test_bench_into_a_missing_folder_names_what_and_where(capsys, tmp_path, flag, what):
    assert main(["run", f"{ROOT / 'tests/zoo/cnn.py'}:mlp", "--input-shape", "1x16", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 0
    code = main(["bench", str(tmp_path / "o" / "mlp.onnx"), "--input-shape", "1x16", flag,
                 str(tmp_path / "nowhere" / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot write {what} to" in err and f"directory {tmp_path / 'nowhere'} does not exist" in err
