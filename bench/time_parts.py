"""Where an inference forward of the numba backend spends its time, per part: the whole
kernel, the input projection (one GEMM), the recurrent GEMMs alone (T per-step products
h @ W^T in a compiled loop, W^T as the time loops pass it), and the rest (the pointwise
passes and the loop), in ms and in ns per (step, row, unit).

    python bench/time_parts.py [--cells lstm gru] [--sizes 100x64x512x512 1000x8x32x32]

Medians of 7. Unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE first where they are set.
It measures the BLAS loops (numba_cpu's): float32 LSTM and GRU forwards would otherwise
run the packed loops (fastrnn/backends/packed_numba.py), whose parts these are not, so they
are switched off for the run.
"""

import argparse

import numpy as np

from fastrnn.backends import gate_count, numba_cpu, packed_numba, state_count
from fastrnn.bench.worker import time_runs

packed_numba.enabled = False


@numba_cpu._jit
def _recurrent_gemms(gemm, h, w_t, out, T):
    for _ in range(T):
        numba_cpu._mm(gemm, h, False, w_t, False, out, 0.0)


def median_ms(fn, repeats=7):
    return float(np.median(time_runs(fn, repeats, None, warmup=1))) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", nargs="+", default=["lstm", "gru"])
    p.add_argument("--sizes", nargs="+", default=["100x64x512x512", "100x64x256x256",
                                                  "50x16x128x128", "1000x8x32x32"])
    args = p.parse_args()
    rng = np.random.default_rng(0)
    gemm = numba_cpu.gemm_for(np.float32)
    for cell in args.cells:
        for size in args.sizes:
            T, B, I, H = (int(v) for v in size.split("x"))
            G = gate_count(cell) * H
            x = rng.standard_normal((T, B, I)).astype(np.float32)
            w_ih = (0.05 * rng.standard_normal((G, I))).astype(np.float32)
            w_hh = (0.05 * rng.standard_normal((G, H))).astype(np.float32)
            b = np.zeros(G, np.float32)
            states = [np.zeros((B, H), np.float32)] * state_count(cell)
            fwd = getattr(numba_cpu, f"{cell}_forward")
            total = median_ms(lambda: fwd(x, *states, w_ih, w_hh, b, b, training=False))
            proj = median_ms(lambda: numba_cpu._project(x, w_ih))
            w_t = np.ascontiguousarray(w_hh.T)
            h, out = np.zeros((B, H), np.float32), np.empty((B, G), np.float32)
            rec = median_ms(lambda: _recurrent_gemms(gemm, h, w_t, out, T))
            rest = total - proj - rec
            print(f"{cell:<8} {size:<15} total {total:8.2f} ms  projection {proj:7.2f}  "
                  f"recurrent GEMMs {rec:7.2f}  rest {rest:7.2f} "
                  f"({rest * 1e6 / (T * B * H):.1f} ns per unit and step)", flush=True)


if __name__ == "__main__":
    main()
