import json

import pytest

from graphopt import driver
from graphopt.cli import main
from conftest import TESTS

MODEL = f"{TESTS / 'zoo' / 'cnn.py'}:tiny_resnet"
SHAPE = "1x3x32x32"
PICTURES = ["partition.dot", "partition.png", "partition.svg"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_target_prints_placement_then_writes_pictures(capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--target", "xnnpack", "--emit", "",
                             "--out", str(out_dir))
    assert code == 0, err
    assert out.index("placement on xnnpack (min_size=1)") < out.index("placement summary") < out.index("passes")
    for cell in ("stem", "conv2d", "float32", "xnnpack_0", "estimated time"):
        assert cell in out
    assert "partition(backend=xnnpack)" in out          # appended to the default pipeline
    assert sorted(p.name for p in out_dir.iterdir()) == PICTURES
    assert all((out_dir / name).stat().st_size > 0 for name in PICTURES)
    assert 'subgraph "cluster_xnnpack_0"' in (out_dir / "partition.dot").read_text()


def test_placement_is_printed_before_anything_is_emitted(capsys, tmp_path, monkeypatch):
    def emit_all(*args, **kwargs):
        print("EMITTING")
        return []
    monkeypatch.setattr(driver, "emit_all", emit_all)
    code, out, err = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--target", "tflite-gpu",
                             "--pipeline", "cleanup", "--emit", "onnx", "--out", str(tmp_path))
    assert code == 0, err
    assert out.index("placement on tflite-gpu") < out.index("placement summary") < out.index("EMITTING")


def test_partition_item_in_the_pipeline_is_used_and_json_stays_pure(capsys, tmp_path):
    code, out, err = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--target", "int8-npu",
                             "--pipeline", "cleanup,partition(min_size=2)", "--emit", "", "--out", str(tmp_path),
                             "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["pipeline"] == "cleanup,partition(min_size=2,backend=int8-npu)"
    stats = report["passes"][-1]["stats"]
    assert stats["backend"] == "int8-npu" and stats["min_size"] == 2
    assert {n["placement"] for n in stats["nodes"]} == {"cpu"}      # float32 model on an int8-only NPU
    assert sorted(p.name for p in tmp_path.iterdir()) == PICTURES


@pytest.mark.parametrize("argv, message", [
    (["--target", "nope"], "unknown backend 'nope' for --target; known: cpu, int8-npu, tflite-gpu, xnnpack"),
    (["--target", "xnnpack", "--pipeline", "partition(backend=int8-npu)"],
     "--target xnnpack disagrees with partition(backend=int8-npu) in the pipeline"),
])
def test_bad_target_is_one_line_before_any_work(capsys, tmp_path, argv, message):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # a model file that does not exist: the target is checked before the model is loaded
    code, out, err = run_cli(capsys, "run", str(tmp_path / "missing.py:build"), "--input-shape", SHAPE,
                             "--out", str(out_dir), *argv)
    assert code == 2
    assert err.startswith("graphopt: error: ") and message in err, err
    assert err.count("\n") == 1 and out == ""
    assert list(out_dir.iterdir()) == []


def test_backends_lists_the_registered_backends(capsys):
    code, out, _ = run_cli(capsys, "backends")
    assert code == 0
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│")}
    assert set(rows) >= {"cpu", "int8-npu", "tflite-gpu", "xnnpack"}
    assert "float32" in rows["xnnpack"] and "all" in rows["cpu"] and "backends" in rows["xnnpack"]

    code, out, _ = run_cli(capsys, "backends", "--json")
    assert code == 0
    by_name = {b["name"]: b for b in json.loads(out)["backends"]}
    assert by_name["int8-npu"]["dtypes"] == ["int8"] and "conv2d" in by_name["xnnpack"]["ops"]
    assert by_name["cpu"]["fallback"] and by_name["xnnpack"]["plugin"] == "backends"
    assert 0 < by_name["xnnpack"]["cost"] < by_name["cpu"]["cost"] == 1.0
