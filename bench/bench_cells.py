"""One cell step, B=1, I=H=64, float32: fastrnn's cells against torch's (2 threads).

    pytest bench/bench_cells.py                         # pytest-benchmark table
    pytest bench/bench_cells.py --benchmark-disable     # run each once (a smoke test)
    python bench/bench_cells.py                         # interleaved medians, one table

Two modes per cell (RNNCell tanh, LSTMCell, GRUCell):

* ``inference``: one step in eval mode (torch: under ``no_grad``);
* ``training``: one step in train mode and its backward, parameter gradients
  accumulated (torch: the step with autograd, then ``backward`` of the new
  state with a fixed upstream gradient).

At B=1 a step is a (1, I) x (I, G) product and a few hundred scalar gate
operations: the time is per-call overhead, which is what this file measures.
"""

from __future__ import annotations

import statistics
import sys
import timeit
from pathlib import Path

import numpy as np
import pytest

try:
    import fastrnn
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fastrnn

B, I, H = 1, 64, 64
KINDS = ("rnn", "lstm", "gru")
IMPLS = ("numba", "numpy", "torch")
MODES = ("inference", "training")


def _torch():
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(2)
    return torch


def make_step(kind, impl, mode):
    """A zero-argument callable running one step (and its backward in training mode)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, I)).astype(np.float32)
    states = [rng.standard_normal((B, H)).astype(np.float32) for _ in range(2 if kind == "lstm"
                                                                            else 1)]
    d = rng.standard_normal((B, H)).astype(np.float32)
    training = mode == "training"
    if impl == "torch":
        torch = _torch()
        if torch is None:
            pytest.skip("torch is not installed")
        cell = {"rnn": torch.nn.RNNCell, "lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}[
            kind](I, H)
        xt, dt = torch.from_numpy(x), torch.from_numpy(d)
        hx = tuple(map(torch.from_numpy, states)) if kind == "lstm" else \
            torch.from_numpy(states[0])
        if not training:
            def step():
                with torch.no_grad():
                    return cell(xt, hx)
            return step

        def step():
            out = cell(xt, hx)
            (out[0] if kind == "lstm" else out).backward(dt)
        return step

    if impl not in fastrnn.backends.available():
        pytest.skip(f"backend {impl!r} is not available here")
    cls = {"rnn": fastrnn.RNNCell, "lstm": fastrnn.LSTMCell, "gru": fastrnn.GRUCell}[kind]
    cell = cls(I, H, backend=impl, seed=0).train(training)
    hx = tuple(states) if kind == "lstm" else states[0]
    cell(x, hx)      # compile / warm up
    cell.clear_tape()
    if not training:
        return lambda: cell(x, hx)

    def step():
        cell(x, hx)
        cell.backward(d)
    return step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_cell_step(benchmark, kind, impl, mode):
    benchmark.group = f"{kind} {mode} B={B} H={H}"
    benchmark(make_step(kind, impl, mode))


def main():
    """Interleaved medians of 7 rounds (the machine may be shared), in microseconds."""
    torch = _torch()
    impls = [i for i in IMPLS if (i == "torch" and torch) or i in fastrnn.backends.available()]
    print(f"one cell step, B={B}, I=H={H}, float32; torch threads: "
          f"{torch.get_num_threads() if torch else '-'}; median of 7 rounds, us per step")
    print(f"{'cell':<5} {'mode':<10} " + " ".join(f"{i:>8}" for i in impls))
    for kind in KINDS:
        for mode in MODES:
            steps = {impl: make_step(kind, impl, mode) for impl in impls}
            times = {impl: [] for impl in impls}
            for _ in range(7):
                for impl, step in steps.items():
                    n = 200 if mode == "training" else 1000
                    times[impl].append(timeit.timeit(step, number=n) / n * 1e6)
            print(f"{kind:<5} {mode:<10} " + " ".join(f"{statistics.median(times[i]):8.1f}"
                                                      for i in impls), flush=True)


if __name__ == "__main__":
    main()
