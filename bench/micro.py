"""Micro-measurements behind the numba backend's design (README, "The numba backend").

    python bench/micro.py

1. float32 activations: the vectorizable tanh/sigmoid against libm's math.tanh.
2. The fused LSTM pass: row-wise with three outputs (as in the backend) against
   one that also stores five cache arrays inside the loop (too many for LLVM's
   vectorizer).
3. The recurrent GEMM shapes through NumPy's BLAS (what the kernels call) and
   through SciPy's (what Numba's np.dot calls).
4. A prange over the batch rows right after a BLAS call, against the serial pass.
5. The cost of a compiled call that takes the BLAS function as a ctypes object
   against one that takes its address (what the kernels do).
6. The cost of the kernel contract's checks (fastrnn/backends/contract.py): a checked
   kernel call against the raw one, at T = 1 (where the checks weigh most).
"""

import math

import numba
import numpy as np
from numba import prange

from fastrnn.backends import numba_cpu as nb
from fastrnn.backends._numba_math import FASTMATH, sigmoid, tanh
from fastrnn.bench.worker import time_runs

jit = numba.njit(fastmath=FASTMATH, error_model="numpy")


def best(f, n=50):
    return min(time_runs(f, n, None, warmup=1))


@jit
def _tanh_fast(a, out):
    for j in range(a.size):
        out[j] = tanh(a[j])


@jit
def _sigmoid_fast(a, out):
    for j in range(a.size):
        out[j] = sigmoid(a[j])


@jit
def _tanh_libm(a, out):
    for j in range(a.size):
        out[j] = math.tanh(a[j])


@jit
def _rows_three_outputs(a, xw, bias, c_prev, c_new, h_new, H):
    for b in range(a.shape[0]):
        nb._lstm_row(a[b], xw[b], bias, c_prev[b], c_new[b], h_new[b], H)


@jit
def _rows_many_outputs(a, xw, bias, c_prev, c_new, h_new, out, gates, tanh_c, H):
    for b in range(a.shape[0]):
        for j in range(H):
            i = sigmoid(a[b, j] + xw[b, j] + bias[j])
            f = sigmoid(a[b, H + j] + xw[b, H + j] + bias[H + j])
            g = tanh(a[b, 2 * H + j] + xw[b, 2 * H + j] + bias[2 * H + j])
            o = sigmoid(a[b, 3 * H + j] + xw[b, 3 * H + j] + bias[3 * H + j])
            c = f * c_prev[b, j] + i * g
            tc = tanh(c)
            c_new[b, j] = c
            h_new[b, j] = o * tc
            out[b, j] = o * tc
            gates[b, j], gates[b, H + j], gates[b, 2 * H + j], gates[b, 3 * H + j] = i, f, g, o
            tanh_c[b, j] = tc


@numba.njit(fastmath=FASTMATH, error_model="numpy", parallel=True)
def _rows_parallel(a, xw, bias, c_prev, c_new, h_new, H):
    for b in prange(a.shape[0]):
        nb._lstm_row(a[b], xw[b], bias, c_prev[b], c_new[b], h_new[b], H)


@numba.njit
def _takes(gemm, a):
    return a.shape[0]


@numba.njit
def _scipy_dot(h, w_t, out):
    np.dot(h, w_t, out)


def main():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(1 << 16) * 5).astype(np.float32)
    out = np.empty_like(a)
    print("1. float32 activations, ns per element")
    for name, f in (("tanh (fastrnn)", _tanh_fast), ("sigmoid (fastrnn)", _sigmoid_fast),
                    ("math.tanh (libm)", _tanh_libm)):
        print(f"   {name:<18} {best(lambda: f(a, out)) / a.size * 1e9:6.2f}")

    B, H = 64, 512
    a0 = rng.standard_normal((B, 4 * H)).astype(np.float32)
    xw = rng.standard_normal((B, 4 * H)).astype(np.float32)
    bias = np.zeros(4 * H, np.float32)
    c_prev = rng.standard_normal((B, H)).astype(np.float32)
    c_new, h_new, o = (np.empty((B, H), np.float32) for _ in range(3))
    gates, tanh_c = np.empty((B, 4 * H), np.float32), np.empty((B, H), np.float32)
    print(f"2. fused LSTM pass, B={B}, H={H}, ns per element")
    t3 = best(lambda: _rows_three_outputs(a0.copy(), xw, bias, c_prev, c_new, h_new, H))
    t8 = best(lambda: _rows_many_outputs(a0.copy(), xw, bias, c_prev, c_new, h_new, o, gates,
                                         tanh_c, H))
    print(f"   row-wise, three outputs   {t3 / (B * H) * 1e9:6.2f}")
    print(f"   five more outputs         {t8 / (B * H) * 1e9:6.2f}")

    print("3. recurrent GEMM h (B x H) @ W^T (H x 4H), GFLOP/s")
    for B_, H_ in ((64, 512), (64, 256), (16, 128)):
        h = rng.standard_normal((B_, H_)).astype(np.float32)
        w = rng.standard_normal((4 * H_, H_)).astype(np.float32)
        res = np.empty((B_, 4 * H_), np.float32)
        flops = 2 * B_ * H_ * 4 * H_
        g = nb.gemm_for(np.float32)
        t_np = best(lambda: nb._mm(g, h, False, w, True, res, 0.0), 30)
        t_sp = best(lambda: _scipy_dot(h, w.T, res), 30)
        print(f"   B={B_:<3} H={H_:<4} NumPy's BLAS {flops / t_np / 1e9:6.1f}   "
              f"SciPy's BLAS {flops / t_sp / 1e9:6.1f}")

    print(f"4. one step = recurrent GEMM + LSTM pass, B={B}, H={H}, us")
    w = rng.standard_normal((4 * H, H)).astype(np.float32)
    for name, f in (("serial", _rows_three_outputs), ("prange", _rows_parallel)):
        def step():
            np.matmul(h_new, w.T)
            f(a0.copy(), xw, bias, c_prev, c_new, h_new, H)
        print(f"   {name:<7} {best(step, 30) * 1e6:8.1f}")
    print(f"   (threading layer: {numba.threading_layer()})")

    print("5. a compiled call taking the BLAS function, us per call")
    from fastrnn.backends._cblas import SGEMM
    small = np.ones((1, 4), np.float32)
    address = nb.gemm_for(np.float32)
    print(f"   ctypes object  {best(lambda: _takes(SGEMM, small), 2000) * 1e6:6.2f}")
    print(f"   address        {best(lambda: _takes(address, small), 2000) * 1e6:6.2f}")

    print("6. kernel contract checks, us per call (LSTM, T=1, B=4, I=H=16)")
    from fastrnn import backends
    checked, _ = backends.get("numba").kernels("lstm")
    raw, _ = backends.get("numba").raw_kernels("lstm")
    x1 = rng.standard_normal((1, 4, 16)).astype(np.float32)
    s1 = np.zeros((4, 16), np.float32)
    w1 = [rng.standard_normal(shape).astype(np.float32) for shape in ((64, 16), (64, 16))]
    b1 = [np.zeros(64, np.float32)] * 2
    t_raw = best(lambda: raw(x1, s1, s1, *w1, *b1, training=False), 2000)
    t_chk = best(lambda: checked(x1, s1, s1, *w1, *b1, training=False), 2000)
    print(f"   raw {t_raw * 1e6:6.2f}   checked {t_chk * 1e6:6.2f}   "
          f"checks {(t_chk - t_raw) * 1e6:6.2f}")


if __name__ == "__main__":
    main()
