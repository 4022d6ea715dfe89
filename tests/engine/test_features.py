"""One feature, one folder: deleting any feature under plugins/ (with the features that
declare they need it) leaves graphopt working, and ``-p no:NAME`` removes a pass everywhere,
inside named pipelines too."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import graphopt

ROOT = Path(__file__).resolve().parents[2]
MODEL = f"{ROOT / 'tests' / 'fixtures' / 'feature_model.py'}:SmallNet"

# feature folder (or module) -> the plugins (entry-point names) it registers
FEATURES = {
    "cleanup": ["cleanup"], "finetune": ["finetune"], "fp16": ["fp16"],
    "fuse": ["fuse", "fold-bn", "fold-affine", "merge-linear", "fuse-act"],
    "onnx": ["onnx"], "partition": ["partition", "backends"], "prune": ["prune"], "pte": ["pte"],
    "ptl": ["ptl"], "quantize": ["quantize"], "simplify": ["simplify"], "tflite": ["tflite"],
    "tflite_compat": ["tflite-compat"], "tune": ["tune"],
}
# what a kept feature declares it needs (pyproject's import-linter exceptions, emitters' prepare)
NEEDED_BY = {"fuse": ["quantize"], "onnx": ["tflite"], "partition": ["pte"], "tflite_compat": ["tflite", "prune", "quantize"]}

# Runs in a fresh interpreter: the deleted packages cannot be imported, their plugins are blocked.
SCRIPT = """
import importlib.abc, json, sys
gone = json.loads(sys.argv[1])

class Deleted(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if any(name == f"graphopt_plugins.{g}" or name.startswith(f"graphopt_plugins.{g}.") for g in gone):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, Deleted())
from graphopt.cli import main
for argv in json.loads(sys.argv[2]):
    code = main(argv)
    print(f"EXIT {code}", flush=True)
"""


def test_every_folder_under_plugins_is_a_listed_feature():
    found = {p.name for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").is_file()}
    found |= {p.stem for p in (ROOT / "plugins").glob("*.py") if p.stem != "__init__"}
    assert found == set(FEATURES)
    registry = graphopt.load_plugins()
    assert {p.name for p in registry.plugins} == {n for names in FEATURES.values() for n in names}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_deleting_a_feature_leaves_the_others_working(feature, tmp_path):
    gone = [feature, *NEEDED_BY.get(feature, [])]
    block = [arg for f in gone for name in FEATURES[f] for arg in ("-p", f"no:{name}")]
    fmt = "ptl" if "onnx" in gone else "onnx"
    commands = [["passes", "--json", *block],
                ["run", MODEL, "--input-shape", "1x3x16x16", "--emit", fmt, "--out", str(tmp_path / "out"),
                 "--json", *block]]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(gone), json.dumps(commands)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.stdout.count("EXIT 0") == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    passes_json, run_json = proc.stdout.split("EXIT 0")[:2]
    listing = json.loads(passes_json)
    names = {p["name"] for p in listing["passes"]} | {p["name"] for p in listing["pipelines"]}
    removed = {n for f in gone for n in FEATURES[f]}
    assert names and not names & removed
    report = json.loads(run_json)
    assert report["ok"] and [a["format"] for a in report["artifacts"]] == [fmt]
    ran = {r["name"] for r in report["passes"]}
    assert not ran & removed
    assert (tmp_path / "out" / f"SmallNet.{fmt}").is_file()


class BnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                                  nn.BatchNorm2d(8))

    def forward(self, x):
        return self.body(x).relu()


def _batchnorms(gm) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in gm.modules())


def test_blocking_fold_bn_keeps_every_batchnorm_in_the_default_pipeline():
    model, x = BnNet().eval(), torch.randn(1, 3, 8, 8)
    blocked = graphopt.load_plugins(blocked=["fold-bn"])
    text = blocked.default_pipeline()
    assert "fold-bn" not in text and "fuse" in text            # fuse still runs, without its fold-bn member
    run = graphopt.optimize(model, (x,), blocked)
    assert _batchnorms(run.graph.module) == 2
    assert [r.name for r in run.pipeline.records if r.group == "fuse"] == [
        "simplify", "fold-affine", "merge-linear", "fuse-act"]
    folded = graphopt.optimize(model, (x,), graphopt.load_plugins())   # the control: both folded
    assert _batchnorms(folded.graph.module) == 0
