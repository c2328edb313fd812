"""pytest-benchmark suite: fastrnn layers against torch.nn on the CPU.

Grouped by cell, size and mode, one benchmark per contender (numpy reference,
numba, torch), same weights everywhere::

    pytest bench/bench_layers.py --benchmark-autosave        # record a run
    pytest bench/bench_layers.py --benchmark-compare         # against the last one
    pytest bench --benchmark-disable                         # smoke test (CI)

For side-by-side numbers with runs interleaved use ``fastrnn bench`` instead;
pytest-benchmark runs one contender after the other.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastrnn
from fastrnn import bench

CELLS = ("lstm", "gru", "rnn_tanh")
CONTENDERS = [b for b in ("numpy", "numba") if b in fastrnn.backends.available()] + ["torch"]
MAX_REFERENCE_WORK = 5e8   # T*B*I*H above which the numpy reference is not timed


def _runner(case, contender, mode):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((case.T, case.B, case.I)).astype(case.dtype)
    d_out = rng.standard_normal((case.T, case.B, case.H)).astype(case.dtype)
    if contender == "torch":
        torch = pytest.importorskip("torch")
        torch.set_num_threads(2)
        return bench.torch_runner(case, mode, x, d_out, bench.make_layer(case, "numpy").state_dict())
    return bench.fastrnn_runner(case, contender, mode, x, d_out)[0]


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("size", bench.FULL_GRID, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cell", CELLS)
def bench_layer(benchmark, cell, size, contender, mode):
    case = bench.Case(cell, *size)
    if contender == "numpy" and np.prod(size) > MAX_REFERENCE_WORK:
        pytest.skip("the reference is the oracle, not a contender, at this size")
    run = _runner(case, contender, mode)
    benchmark.group = f"{cell} {'x'.join(map(str, size))} {mode}"
    benchmark.extra_info.update(flops=case.flops(mode))
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
