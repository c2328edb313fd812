"""The first calls after an idle pause, on this machine: why ``fastrnn bench``'s workers
warm up for ``fastrnn.bench.worker.WARMUP_S`` after their settle pause.

Each probe sleeps 0.2 s (the workers' ``SETTLE_S``), then times four calls in a row;
medians over 15 pauses, by position. The probes are NumPy's and Numba's own code, not
fastrnn's, on one BLAS thread (no thread pool to wake): what they lose on the first
calls is the machine's wake-up (a virtual CPU back from idle: frequency, caches), which
every engine timed after a pause pays alike, and fastrnn's frozen LSTM layers, which pay
it too.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 python bench/wake.py
"""

import time

import numba
import numpy as np

import fastrnn


@numba.njit
def _scaled_sum(a, n):
    s = 0.0
    for _ in range(n):
        for i in range(a.size):
            s += a[i] * 1.0001
    return s


def by_position(fn, pauses=15, calls=4, pause_s=0.2):
    """Median microseconds of the k-th call after a pause, k = 1..calls."""
    samples = [[] for _ in range(calls)]
    for _ in range(pauses):
        time.sleep(pause_s)
        for k in range(calls):
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return [float(np.median(s)) * 1e6 for s in samples]


def main():
    rng = np.random.default_rng(0)
    a = rng.random(16384).astype(np.float32)
    w = rng.random((256, 64)).astype(np.float32)
    x = rng.random((200, 64)).astype(np.float32)
    _scaled_sum(a, 1)
    probes = {"numpy matmul 200x64x256": lambda: x @ w.T,
              "numba loop over 64 KB, 10 times": lambda: _scaled_sum(a, 10)}
    for cell, (T, B, I, H) in (("lstm", (200, 1, 64, 64)), ("lstm", (50, 16, 128, 128))):
        m = fastrnn.make_layer(cell, I, H, backend="numba", seed=0).freeze()
        xs = rng.standard_normal((T, B, I)).astype(np.float32)
        m(xs)
        probes[f"fastrnn frozen {cell} {T}x{B}x{I}x{H}"] = lambda m=m, xs=xs: m(xs)
    for name, fn in probes.items():
        us = by_position(fn)
        print(f"{name}: " + ", ".join(f"call {k + 1} {v:.1f}" for k, v in enumerate(us))
              + " us after a 0.2 s pause", flush=True)


if __name__ == "__main__":
    main()
