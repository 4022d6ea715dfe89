import json

from graphopt.cli import main
from graphopt.cli.demo import DEMO_PIPELINE


def test_demo_trains_caches_emits_and_scores_every_format(capsys, tmp_path, monkeypatch, registry):
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (tmp_path / "cache" / "digits_net-v1.pt").is_file()
    # the report shows the pipeline as it ran: the named pipeline fuse expanded into its members
    assert report["ok"] and report["pipeline"] == DEMO_PIPELINE.replace(
        ",fuse,", ",simplify,fold-bn,fold-affine,merge-linear,fuse-act,")
    assert [p["group"] for p in report["passes"]].count("fuse") == 5
    rows = {r["format"]: r for r in report["demo"]["formats"]}
    # pruned, fine-tuned and quantized: one int8 artifact per format, under half the graph's bytes
    assert set(rows) == {"pytorch", "fx graph", "onnx int8", "ptl int8", "tflite int8", "pte int8"}
    for fmt in ("onnx int8", "ptl int8", "tflite int8", "pte int8"):
        assert rows[fmt]["bytes"] < 0.6 * rows["fx graph"]["bytes"], fmt
    assert report["demo"]["held_out"] == 450
    # pruned to half its channels and fine-tuned: within 1.5 points of the unpruned model;
    # int8 in every format within 1 point of that (here: within one digit of 450)
    assert abs(rows["fx graph"]["accuracy"] - rows["pytorch"]["accuracy"]) <= 0.015
    for fmt, row in rows.items():
        assert row["verified"], fmt
        assert row["accuracy"] >= 0.95, fmt
        if fmt != "pytorch":
            assert abs(row["accuracy"] - rows["fx graph"]["accuracy"]) <= 1 / 450, fmt
    quantize = report["passes"][-1]
    assert quantize["name"].startswith("quantize") and quantize["stats"]["int8_layers"] == 4
    assert all(a["meta"]["precision"] == "int8" for a in report["artifacts"])
    prune = next(p for p in report["passes"] if p["name"].startswith("prune"))
    assert prune["stats"]["channels_removed"] == 8 + 16 + 32 and prune["params"] < report["model"]["params"] / 3
    for art in report["artifacts"]:
        assert (out / art["path"].split("/")[-1]).stat().st_size == art["bytes"]
    assert json.loads((out / "report.json").read_text())["ok"]
    # the pipeline really changed the graph: pruned, BatchNorm folded, dropout removed
    assert report["passes"][-1]["nodes"] < report["model"]["nodes"]
    # second run: cached weights, same artifacts byte for byte
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".json"}
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".json"} == first
