"""The training examples: each runs with --quick on every CPU backend, and, on the
default backend, learns what the README says it learns, against the baseline the
example prints itself."""

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import require

ROOT = Path(__file__).resolve().parents[1]


def run_example(name, backend, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name),
                           "--backend", backend, *extra],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def number(pattern, text):
    match = re.search(pattern, text)
    assert match, (pattern, text)
    return float(match.group(1))


def test_char_lm_quick(backend):
    out = run_example("char_lm.py", backend, "--quick")
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"final loss: \d+\.\d+ \(unigram baseline: \d+\.\d+\)", last), last


def test_char_lm_beats_the_unigram_baseline():
    out = run_example("char_lm.py", "auto", "--steps", "150", "--hidden", "64")
    loss = number(r"final loss: (\d+\.\d+)", out)
    baseline = number(r"unigram baseline: (\d+\.\d+)", out)
    assert loss < 0.85 * baseline, out


def test_sequence_classification_quick(backend):
    assert "test accuracy:" in run_example("sequence_classification.py", backend, "--quick")


def test_sequence_classification_beats_chance():
    out = run_example("sequence_classification.py", "auto", "--steps", "300")
    accuracy = number(r"test accuracy: (\d\.\d+)", out)
    chance = number(r"chance: (\d\.\d+)", out)
    assert accuracy > chance + 0.3, out


def test_adding_problem_quick(backend):
    out = run_example("adding_problem.py", backend, "--quick")
    for name in ("RNN", "LSTM", "GRU"):
        assert re.search(rf"{name}: test MSE \d", out), out


def test_adding_problem_gated_cells_learn_and_the_rnn_does_not():
    """The README's claim, at lag 20 (shorter than the example's 50, to keep CI short):
    the LSTM and the GRU get far below the baseline MSE the example prints, the
    vanilla RNN does not."""
    out = run_example("adding_problem.py", "auto", "--steps", "600", "--lag", "20")
    baseline = number(r"gives MSE (\d\.\d+)", out)
    mse = {name: number(rf"{name}: test MSE (\d\.\d+)", out) for name in ("RNN", "LSTM", "GRU")}
    assert mse["LSTM"] < 0.1 * baseline and mse["GRU"] < 0.1 * baseline, out
    assert mse["RNN"] > 0.5 * baseline, out


def test_gradient_flow_quick(backend, tmp_path):
    png = tmp_path / "flow.png"
    out = run_example("gradient_flow.py", backend, "--quick", "--out", str(png))
    assert "LSTM  trained" in out
    require("matplotlib")
    assert png.stat().st_size > 1000
