"""docs/api.md's driver script runs as it is written."""
from __future__ import annotations

import ast
import re
import subprocess
import sys

from conftest import ROOT


def test_the_api_doc_example_runs(tmp_path):
    text = (ROOT / "docs" / "api.md").read_text()
    (block,) = re.findall(r"<!-- example -->\n```python\n(.*?)```", text, re.S)
    script = tmp_path / "example.py"
    script.write_text(block)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    timings = ast.literal_eval(done.stdout.strip().splitlines()[-1])   # the dict it prints: label -> median ms
    assert set(timings) == {"eager", "Sequential.onnx"} and all(v > 0 for v in timings.values())
