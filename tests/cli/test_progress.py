"""Feedback while a run works: each pass as it starts and ends, counted bars for calibration and
emission in a terminal, plain lines on stderr elsewhere, nothing under --quiet, clean --json."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from graphopt.cli import main
from conftest import TESTS

MODEL = f"{TESTS / 'zoo' / 'cnn.py'}:tiny_resnet"
PIPELINE = "cleanup,fold-bn,fuse,quantize(prefer=size)"


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    return path


def _argv(calib, out, *extra):
    return ["run", MODEL, "--input-shape", "1x3x32x32", "--pipeline", PIPELINE, "--calib", str(calib),
            "--emit", "onnx,ptl", "--out", str(out), *extra]


def test_a_run_off_a_terminal_prints_plain_progress_lines_to_stderr(capsys, calib, tmp_path):
    assert main(_argv(calib, tmp_path / "a", "--json")) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] is True                       # stdout holds the JSON only
    lines = err.splitlines()
    for wanted in ("graphopt: capturing with torch.fx", "graphopt: pass cleanup (1/8)",
                   "graphopt: pass quantize(prefer=size) (8/8)", "graphopt: emitting onnx (1/2)",
                   "graphopt: emitting ptl (2/2)", "graphopt: verifying ptl in its runtime"):
        assert wanted in lines, (wanted, lines)
    calibrating = [s for s in lines if s.startswith("graphopt: calibrating")]
    assert calibrating and calibrating[-1].endswith("(4/4)")
    ended = [s for s in lines if s.startswith("  fold-bn: ")]
    assert ended and ", changed, " in ended[0] and " nodes, " in ended[0] and ended[0].endswith(" MACs")
    assert "\x1b[" not in err


def test_quiet_prints_nothing(capsys, calib, tmp_path):
    assert main(_argv(calib, tmp_path / "q", "--quiet")) == 0
    assert capsys.readouterr() == ("", "")


def test_a_terminal_gets_counted_bars(calib, tmp_path):
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "graphopt.cli", *_argv(calib, tmp_path / "t")], stdin=slave,
                            stdout=slave, stderr=slave, env={**os.environ, "TERM": "xterm", "COLUMNS": "120"})
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:          # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    screen = b"".join(chunks).decode(errors="replace")
    bars = [s for s in screen.replace("\r", "\n").split("\n") if "\u2501" in s]   # rich's bar glyph
    assert any("calibrating" in s and "4/4" in s for s in bars), screen[-2000:]
    assert any("emitting onnx" in s and "1/2" in s for s in bars)
    assert any("pass quantize(prefer=size)" in s and "8/8" in s for s in bars)
    verifying = [s for s in bars if "verifying" in s]      # a step without a count shows none (not "0/2")
    assert verifying and not any("/2" in s for s in verifying), verifying
    assert "  fuse-act: " in screen                            # each pass's end stays above the bar
