"""Smoke tests: each training example runs with --quick on every CPU backend."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name, backend, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--quick",
                           "--backend", backend, *extra],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_char_lm_quick(backend):
    out = run_example("char_lm.py", backend)
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"final loss: \d+\.\d+ \(unigram baseline: \d+\.\d+\)", last), last


def test_sequence_classification_quick(backend):
    assert "test accuracy:" in run_example("sequence_classification.py", backend)


def test_adding_problem_quick(backend):
    out = run_example("adding_problem.py", backend)
    for name in ("RNN", "LSTM", "GRU"):
        assert re.search(rf"{name}: test MSE \d", out), out


def test_gradient_flow_quick(backend, tmp_path):
    png = tmp_path / "flow.png"
    out = run_example("gradient_flow.py", backend, "--out", str(png))
    assert "LSTM  trained" in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib is not installed: no plot to check")
    assert png.stat().st_size > 1000
