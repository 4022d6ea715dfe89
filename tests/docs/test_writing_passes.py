"""docs/writing-passes.md works as written: its files, extracted from the page, install as a
package (offline, into a private folder) whose pass graphopt discovers through its entry point;
the tutorial's `graphopt run` command succeeds, and the tutorial's own test passes."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "writing-passes.md"
BLOCK = re.compile(r"^```[a-z]*\n(.*?)^```$", re.S | re.M)
FILE = re.compile(r"# file: (\S+)\n")


def tutorial_files(text: str) -> dict[str, str]:
    """``{path: content}`` of every code block whose first line is ``# file: PATH``."""
    files = {}
    for block in BLOCK.findall(text):
        m = FILE.match(block)
        if m:
            files[m.group(1)] = block
    return files


def shell_lines(text: str, prefix: str) -> list[str]:
    """The commands starting with ``prefix`` in the page's sh blocks."""
    return [line.split("  #")[0].strip() for block in re.findall(r"^```sh\n(.*?)^```$", text, re.S | re.M)
            for line in block.splitlines() if line.startswith(prefix)]


def run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{shlex.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_the_tutorial_package_installs_runs_and_passes_its_own_test(tmp_path):
    text = PAGE.read_text()
    files = tutorial_files(text)
    package = "graphopt-hardtanh"
    assert {f"{package}/pyproject.toml", f"{package}/graphopt_hardtanh.py", f"{package}/model.py",
            f"{package}/tests/test_hardtanh_to_relu6.py"} <= set(files)
    for path, content in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(content)

    site = tmp_path / "site"
    env = dict(os.environ, PYTHONPATH=str(site))
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
         "--target", str(site), str(tmp_path / package)], tmp_path, env)

    listing = run([sys.executable, "-m", "graphopt.cli", "passes", "--json"], tmp_path, env)
    rows = {p["name"]: p for p in json.loads(listing.stdout)["passes"]}
    assert rows["hardtanh-to-relu6"]["plugin"] == "hardtanh"
    assert rows["hardtanh-to-relu6"]["effect"] == "exact"
    blocked = run([sys.executable, "-m", "graphopt.cli", "passes", "--json", "-p", "no:hardtanh"], tmp_path, env)
    assert "hardtanh-to-relu6" not in blocked.stdout

    (command,) = shell_lines(text, "graphopt run ")
    args = shlex.split(command)[1:] + ["--report", "report.json", "--quiet"]
    run([sys.executable, "-m", "graphopt.cli", *args], tmp_path / package, env)
    report = json.loads((tmp_path / package / "report.json").read_text())
    (record,) = [p for p in report["passes"] if p["name"] == "hardtanh-to-relu6"]
    assert report["ok"] and record["stats"] == {"relu6": 1, "rejected": 1}
    assert "hardtanh: kept, bounds (-1, 1), not (0, 6)" in record["explanations"]

    tests = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], tmp_path / package, env)
    assert re.search(r"\b1 passed\b", tests.stdout), tests.stdout
