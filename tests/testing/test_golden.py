import json
import shutil

import numpy as np
import pytest
import torch

from graphopt.cli import main
from graphopt.metrics import compare
from graphopt.testing.golden import GRAPH, GoldenCase, Manifest, check, record
from conftest import ROOT


@pytest.fixture
def golden_copy(tmp_path):
    """The project's golden folder, copied so tests may re-record or break it."""
    dst = tmp_path / "golden"
    shutil.copytree(ROOT / "golden", dst)
    manifest = Manifest.load(dst)
    manifest.root = str(ROOT)
    manifest.save()
    return dst


def test_project_goldens_check_in_the_graph_and_every_format(registry):
    manifest = Manifest.load(ROOT / "golden")
    assert {"tiny_resnet", "tiny_mobilenet", "mlp"} <= set(manifest.entries)
    formats = set()
    for entry in manifest.entries.values():
        rows = check(manifest, entry, registry)
        assert [r.format for r in rows] == [GRAPH, *(k for k in entry.tolerances if k != GRAPH)]
        formats |= {r.format for r in rows}
        assert all(r.ok for r in rows), [(r.format, r.problems) for r in rows]
        assert all(r.metrics.cosine > 0.9999 for r in rows)
    assert formats == {GRAPH, "onnx", "ptl", "tflite", "pte"}


def test_record_is_byte_reproducible(golden_copy):
    """Two recordings on this machine are identical byte for byte. The committed file was
    recorded on another CPU, whose kernels round the last bits differently: it is compared
    with a tolerance (the check below), never byte for byte."""
    manifest = Manifest.load(golden_copy)
    entry = manifest.entry("tiny_resnet")
    committed = GoldenCase.load(golden_copy / "tiny_resnet.npz")
    record(manifest, entry)
    first = (golden_copy / "tiny_resnet.npz").read_bytes()
    record(manifest, entry)
    assert (golden_copy / "tiny_resnet.npz").read_bytes() == first
    again = GoldenCase.load(golden_copy / "tiny_resnet.npz")
    assert all(torch.equal(again.inputs[k], v) for k, v in committed.inputs.items())   # seeded, not computed
    assert compare(committed.outputs, again.outputs).max_rel < 1e-5


def test_check_catches_a_changed_reference(golden_copy, registry):
    manifest = Manifest.load(golden_copy)
    path = golden_copy / "tiny_resnet.npz"
    case = GoldenCase.load(path)
    case.outputs[0] = case.outputs[0] * 1.01
    case.save(path)
    rows = check(manifest, manifest.entry("tiny_resnet"), registry)
    assert not any(r.ok for r in rows)
    assert "max relative error" in rows[0].problems[0]


def test_cli_golden_record_check_and_verify(capsys, golden_copy, tmp_path):
    assert main(["golden", "check", "mlp", "--dir", str(golden_copy), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and [c["format"] for c in result["checks"]] == ["graph", "onnx", "ptl"]
    out = tmp_path / "out"
    assert main(["run", str(ROOT / "tests/zoo/cnn.py") + ":mlp", "--input-shape", "4x16", "--out", str(out),
                 "--quiet"]) == 0
    assert main(["verify", str(out / "mlp.onnx"), "--golden", "mlp", "--golden-dir", str(golden_copy),
                 "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["ok"] and verdict["artifacts"][0]["format"] == "onnx"
    # a reference whose outputs moved: a real mismatch, exit 1
    case = GoldenCase.load(golden_copy / "mlp.npz")
    case.outputs[0] = case.outputs[0] + 0.1
    case.save(tmp_path / "moved.npz")
    assert main(["verify", str(out / "mlp.onnx"), "--reference", str(tmp_path / "moved.npz"), "--json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert not verdict["ok"] and "max relative error" in verdict["artifacts"][0]["problems"][0]
    # another model's inputs: one clear line, exit 2
    assert main(["verify", str(out / "mlp.onnx"), "--reference", str(golden_copy / "tiny_resnet.npz")]) == 2
    err = capsys.readouterr().err
    assert "cannot be checked against this reference" in err and err.count("\n") == 1


def test_cli_golden_add_a_model(capsys, golden_copy):
    code = main(["golden", "record", "tiny2", "--model", "tests/zoo/cnn.py:tiny_resnet", "--input-shape",
                 "1x3x32x32", "--dir", str(golden_copy), "--quiet"])
    assert code == 0
    entry = Manifest.load(golden_copy).entry("tiny2")
    assert entry.inputs == {"input_0": [1, 3, 32, 32]} and set(entry.tolerances) == {"graph", "onnx"}
    assert GoldenCase.load(golden_copy / "tiny2.npz").outputs[0].shape == (1, 10)


def test_unknown_golden_model_and_missing_file(capsys, golden_copy):
    assert main(["golden", "check", "nope", "--dir", str(golden_copy)]) == 2
    assert "no golden model 'nope'" in capsys.readouterr().err
    (golden_copy / "mlp.npz").unlink()
    assert main(["golden", "check", "mlp", "--dir", str(golden_copy)]) == 2
    assert "record it with `graphopt golden record`" in capsys.readouterr().err


def test_cli_golden_record_then_check_in_a_fresh_project(capsys, tmp_path, monkeypatch):
    """No golden/ yet: record creates the folder with the manifest and the npz inside it."""
    (tmp_path / "net.py").write_text("import torch.nn as nn\n\ndef build():\n"
                                     "    return nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))\n")
    monkeypatch.chdir(tmp_path)
    assert main(["golden", "record", "net", "--model", "net.py:build", "--input-shape", "2x6", "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "golden").iterdir()) == ["manifest.json", "net.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["golden", "net.py"]
    assert main(["golden", "check", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["checks"]
    assert [(r["model"], r["format"], r["verified"]) for r in rows] == [("net", "graph", True), ("net", "onnx", True)]


def test_golden_dir_that_is_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "golden").write_text("not a folder")
    code = main(["golden", "record", "net", "--model", "x.py:build", "--input-shape", "2x6",
                 "--dir", str(tmp_path / "golden")])
    assert code == 2 and "exists and is not a folder" in capsys.readouterr().err
    assert (tmp_path / "golden").read_text() == "not a folder"


CONV = '''import torch
import torch.nn as nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
'''
PRECISIONS = {"fp32": "cleanup", "fp16": "cleanup,fp16", "int8": "cleanup,quantize(prefer=size)"}


@pytest.mark.parametrize("fmt", ["onnx", "ptl", "tflite", "pte"])
def test_verify_golden_and_reference_agree_on_every_precision(fmt, capsys, tmp_path, monkeypatch):
    """The manifest (as `golden record --formats FMT` writes it) sets the fp32 tolerance of the
    format; an fp16 or int8 file is judged by the emitter's tolerance for the precision its file
    records, whichever way the reference is named."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conv.py").write_text(CONV)
    assert main(["golden", "record", "conv", "--model", "conv.py:build", "--input-shape", "1x3x12x12",
                 "--formats", fmt, "--quiet"]) == 0
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 3, 12, 12)).astype(np.float32))
    seen = {}
    for precision, pipeline in PRECISIONS.items():
        if fmt == "pte" and precision == "fp16":
            continue                                   # pte takes fp32 and int8 graphs only
        out = tmp_path / precision
        assert main(["run", "conv.py:build", "--input-shape", "1x3x12x12", "--pipeline", pipeline, "--calib",
                     str(calib), "--emit", fmt, "--out", str(out), "--quiet", "--json"]) == 0
        (artifact,) = json.loads(capsys.readouterr().out)["artifacts"]
        assert artifact["meta"].get("precision", "fp32") == precision
        verdicts = []
        for source in (["--golden", "conv"], ["--reference", "golden/conv.npz"]):
            code = main(["verify", artifact["path"], *source, "--json"])
            verdicts.append((code, json.loads(capsys.readouterr().out)["artifacts"][0]))
        (code_g, by_golden), (code_r, by_reference) = verdicts
        assert code_g == code_r == 0, (precision, by_golden["problems"], by_reference["problems"])
        assert by_golden == by_reference
        seen[precision] = by_reference["cosine"]
    assert seen["fp32"] > 0.9999 and seen["int8"] < seen["fp32"]     # the int8 file really is int8
