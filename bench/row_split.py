"""The measurements behind docs/numba.md, "Threads": the numba time loops on the calling
thread (OpenBLAS's threads inside each GEMM, the default) against the batch rows split
over threads (``numba_cpu.row_threads = None``), and the GEMM rates that explain it.

    python bench/row_split.py [--cells lstm gru rnn_tanh]

Both variants run interleaved in this process, medians. Unset OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE first where they are set (they force older kernels).
"""

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

import fastrnn
from fastrnn.backends import numba_cpu
from fastrnn.bench import FULL_GRID
from fastrnn.bench.machine import gemm_rate


def loop_gemm_rate(M, N, K, repeats, stored=False):
    """GFLOP/s of the per-step product h @ W^T through numba_cpu._mm: from W^T
    transposed once (row-major (K, N), as the time loops now pass it), or with
    ``stored`` from W (N, K) as the weights are stored (trans_b, as they did before)."""
    rng = np.random.default_rng(0)
    h = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    w_t = np.ascontiguousarray(w.T)
    out = np.empty((M, N), np.float32)
    gemm = numba_cpu.gemm_for(np.float32)

    def call():
        if stored:
            numba_cpu._mm(gemm, h, False, w, True, out, 0.0)
        else:
            numba_cpu._mm(gemm, h, False, w_t, False, out, 0.0)
    call()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * M * N * K / best / 1e9


def median_ms(samples):
    return float(np.median(samples)) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", nargs="+", default=["lstm"])
    args = p.parse_args()

    print("GEMM GFLOP/s (M x N x K), best of several: numpy's (M, K) @ (K, N), and the "
          "per-step h @ W^T as the loops call it")
    with threadpool_limits(1):
        print("  1 thread : 1024^3 %.0f | 32x2048x512 %.0f | 8x512x128 %.0f" % (
            gemm_rate(1024, 1024, 1024), gemm_rate(32, 2048, 512, repeats=20),
            gemm_rate(8, 512, 128, repeats=50)))
        for label, stored in (("W^T, as the loops call it", False), ("W as stored", True)):
            print("  1 thread, h @ W^T from %s: 32x2048x512 %.0f | 16x512x128 %.0f | "
                  "8x128x32 %.0f" % (label, loop_gemm_rate(32, 2048, 512, 20, stored),
                                     loop_gemm_rate(16, 512, 128, 50, stored),
                                     loop_gemm_rate(8, 128, 32, 200, stored)))
    print("  all      : 1024^3 %.0f | 64x2048x512 %.0f | 16x512x128 %.0f" % (
        gemm_rate(1024, 1024, 1024), gemm_rate(64, 2048, 512, repeats=20),
        gemm_rate(16, 512, 128, repeats=50)))

    print("time loop on one thread / rows split, ms (inference, training)")
    for cell in args.cells:
        for T, B, I, H in FULL_GRID:
            m = fastrnn.make_layer(cell, I, H, seed=0)
            x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
            d = np.ones((T, B, H), np.float32)
            repeats = 5 if H >= 512 else (9 if H >= 256 else 31)
            result = {}
            for mode in ("inference", "training"):
                m.train(mode == "training")
                run = (lambda: m(x)) if mode == "inference" else (lambda: (m(x), m.backward(d)))
                samples = {1: [], None: []}
                for setting in samples:       # warm-up, both ways
                    numba_cpu.row_threads = setting
                    run()
                for _ in range(repeats):
                    for setting in samples:
                        numba_cpu.row_threads = setting
                        t0 = time.perf_counter()
                        run()
                        samples[setting].append(time.perf_counter() - t0)
                result[mode] = (median_ms(samples[1]), median_ms(samples[None]))
            numba_cpu.row_threads = 1
            print(f"  {cell:<8} {T}x{B}x{I}x{H:<4} inference {result['inference'][0]:8.2f} / "
                  f"{result['inference'][1]:8.2f}   training {result['training'][0]:8.2f} / "
                  f"{result['training'][1]:8.2f}")


if __name__ == "__main__":
    main()
