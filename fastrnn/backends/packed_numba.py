"""Packed time loops of the numba backend: LSTM and GRU (reset_after), float32
inference.

Per step, the recurrent product ``h_{t-1} W_hh^T`` is computed by a register-blocked
micro-kernel from ``W_hh`` packed once per call, with no BLAS call inside the loop,
then the gates:

* ``W_hh`` is packed into panels, one per block of ``VW`` hidden units (``VW`` = the
  float32 vector width of the CPU Numba compiles for, :func:`._simd.vector_width`):
  panel ``u`` holds, for every input ``k``, the rows of every gate for the units
  ``[u VW, (u + 1) VW)`` side by side, ``NV = gates`` vectors (zeros past ``H``).
  ``pack(w_hh, gates)`` below.
* a tile is ``MR`` batch rows by one panel: :func:`._simd.microkernel` keeps its
  ``MR x NV`` vector accumulators in registers over a block of ``KC`` inputs and
  writes them into gate-major scratch rows (gate stride ``Hp``, ``H`` padded to whole
  vectors); then one pointwise pass over the thread's units and every row (gates,
  state update, masking by ``lengths``, outputs), written so that LLVM vectorizes it.
* every gate of a unit lies in one panel, so threads split the panels (hidden
  units) and never need another thread's gates: one barrier per step
  (:func:`._simd.spin_barrier`), where ``h_t`` is complete. The threads are
  Python threads running the same nogil loop (``tid`` of ``nthreads``); each also
  computes its units' columns of the input projection (BLAS), a chunk of steps at a
  time, just before those steps.

What it replaces: OpenBLAS packs ``W_hh`` anew at every call (it has no packed
API) and the pointwise pass ran on one core after a whole-batch GEMM
(docs/numba.md). Inference only: training keeps :mod:`.numba_cpu`'s loops
(:func:`eligible` says why).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading

import numba
import numpy as np

from ._cblas import blas_get_threads, gemm_for
from ._numba_math import FASTMATH, sigmoid, tanh
from ._simd import FLAG_STRIDE, microkernel, spin_barrier, vector_width
from .numba_cpu import (_bias, _c, _final, _full_lengths, _mm, _single_threaded_blas,
                        _state_buffers)

_jit = functools.partial(numba.njit, fastmath=FASTMATH, cache=True, nogil=True,
                         error_model="numpy")

#: float32 lanes per vector on this host (16 with AVX-512, else 8).
VW = vector_width()
#: Rows per tile, by gate count: MR * NV accumulators plus NV panel vectors and a
#: broadcast must fit the vector registers (32 with AVX-512, 16 with AVX2).
MR_BY_GATES = {4: 6, 3: 8} if VW == 16 else {4: 2, 3: 3}
MR_LSTM, MR_GRU = MR_BY_GATES[4], MR_BY_GATES[3]
_MK_LSTM = microkernel(MR_LSTM, 4, VW)
_MK_GRU = microkernel(MR_GRU, 3, VW)


def aligned_empty(shape):
    """An uninitialized float32 array whose data starts on a 64-byte boundary (NumPy's
    start on 16): the micro-kernel's vector loads and stores then never split a cache
    line (about 5% of its speed)."""
    n = int(np.prod(shape))
    buf = np.empty(n + 16, dtype=np.float32)
    start = (-buf.ctypes.data % 64) // 4
    return buf[start:start + n].reshape(shape)


def pack(w_hh, gates):
    """``W_hh`` (gates * H, K) into panels ``(ceil(H / VW), K, gates * VW)``:
    ``P[u, k, g VW + j] = W_hh[g H + u VW + j, k]``, zero past ``H``. One copy, straight
    into the aligned panels (a zero-padded temporary would copy ``W_hh`` twice a call)."""
    G, K = w_hh.shape
    H = G // gates
    U, full = -(-H // VW), H // VW
    panels = aligned_empty((U, K, gates * VW))
    view = panels.reshape(U, K, gates, VW)
    w = w_hh.reshape(gates, H, K)
    view[:full] = w[:, :full * VW].reshape(gates, full, VW, K).transpose(1, 3, 0, 2)
    if full < U:                      # the last panel: its units past H are zeros
        view[full] = 0
        view[full, :, :, :H - full * VW] = w[:, full * VW:].transpose(2, 0, 1)
    return panels


def flags(nthreads):
    """The barrier's per-thread step counters, one cache line each."""
    return np.zeros(max(nthreads, 1) * FLAG_STRIDE, dtype=np.int64)


#: Inputs (k) per block of the recurrent product: a panel's block (KC x NV VW floats,
#: 32 KB for the LSTM on AVX-512) stays in L1 while every row block uses it.
KC = 128


@_jit
def _recurrent(panels, hs, prev, a, Hp, u0, u1):
    """a[b, g Hp + n] = (hs[prev] W_hh^T)[b, g H + n] for the units of panels [u0, u1)."""
    _, B, K = hs.shape
    h0 = prev * B * K
    U, _, NR = panels.shape
    ldc = a.shape[1]
    lstm = NR == 4 * VW
    MR = MR_LSTM if lstm else MR_GRU
    for u in range(u0, u1):
        for k0 in range(0, K, KC):
            kc = min(KC, K - k0)
            for b0 in range(0, B, MR):
                mr = min(MR, B - b0)
                if lstm:
                    _MK_LSTM(mr, hs, h0 + b0 * K + k0, K, panels, (u * K + k0) * NR, kc, a,
                             b0 * ldc + u * VW, ldc, Hp, k0 > 0)
                else:
                    _MK_GRU(mr, hs, h0 + b0 * K + k0, K, panels, (u * K + k0) * NR, kc, a,
                            b0 * ldc + u * VW, ldc, Hp, k0 > 0)


@_jit
def _lstm_block(a, Hp, xw, tx, bias, cs, hs, prev, new, out, t, lengths, n0, n1):
    """Inference: units [n0, n1) of every row; inactive rows carry their state. Reads
    xw[tx], cs[prev], hs[prev]; writes cs[new], hs[new], out[t].

    Whole arrays and a time index, not per-step row views: each view costs two
    reference-count calls, a few hundred ns a step at B = 1. Column indices are
    uint64: Numba wraps a signed index that it cannot prove non-negative (``j`` from
    ``range(n0, n1)``), and that select turns the loop into gathers and scatters, 7x
    slower than the vectorized loop (2.8 ns per element)."""
    H1, P1 = np.uint64(cs.shape[2]), np.uint64(Hp)
    H2, H3, P2, P3 = H1 + H1, H1 + H1 + H1, P1 + P1, P1 + P1 + P1
    for b in range(a.shape[0]):
        if t < lengths[b]:
            for j in range(np.uint64(n0), np.uint64(n1)):
                i = sigmoid(a[b, j] + xw[tx, b, j] + bias[j])
                f = sigmoid(a[b, P1 + j] + xw[tx, b, H1 + j] + bias[H1 + j])
                g = tanh(a[b, P2 + j] + xw[tx, b, H2 + j] + bias[H2 + j])
                o = sigmoid(a[b, P3 + j] + xw[tx, b, H3 + j] + bias[H3 + j])
                c = f * cs[prev, b, j] + i * g
                cs[new, b, j] = c
                hv = o * tanh(c)
                hs[new, b, j] = hv
                out[t, b, j] = hv
        else:
            for j in range(np.uint64(n0), np.uint64(n1)):
                hs[new, b, j] = hs[prev, b, j]
                cs[new, b, j] = cs[prev, b, j]
                out[t, b, j] = 0


@_jit
def _gru_block(a, Hp, xw, tx, bias, b_hn, hs, prev, new, out, t, lengths, n0, n1):
    """reset_after, inference: units [n0, n1) of every row (see _lstm_block)."""
    H1, P1 = np.uint64(hs.shape[2]), np.uint64(Hp)
    H2, P2 = H1 + H1, P1 + P1
    for b in range(a.shape[0]):
        if t < lengths[b]:
            for j in range(np.uint64(n0), np.uint64(n1)):
                r = sigmoid(a[b, j] + xw[tx, b, j] + bias[j])
                z = sigmoid(a[b, P1 + j] + xw[tx, b, H1 + j] + bias[H1 + j])
                n = tanh(xw[tx, b, H2 + j] + bias[H2 + j] + r * (a[b, P2 + j] + b_hn[j]))
                hv = (1 - z) * n + z * hs[prev, b, j]
                hs[new, b, j] = hv
                out[t, b, j] = hv
        else:
            for j in range(np.uint64(n0), np.uint64(n1)):
                hs[new, b, j] = hs[prev, b, j]
                out[t, b, j] = 0


# ------------------------------------------------------------ the wrappers

#: Multiply-adds of one step's recurrent product (B * G * H) from which the loop is
#: split over threads (`python bench/packed_ab.py --compare threads`): below, one step
#: is too short for the barrier and the second thread's start to pay.
MIN_SPLIT_STEP_WORK = 3 << 20
#: Threads the packed loops may use; None: the BLAS's thread count.
threads = None


#: False sends every call to numba_cpu's BLAS loops (for A/B timings:
#: ``python bench/packed_ab.py``).
enabled = True


def eligible(x, T, training):
    """The packed loops run float32 inference of two steps or more (one step: the
    packing costs more than it saves). Training keeps numba_cpu's loops: its forward
    stores the gates for backward (four more stores per element into the cache, and
    every form tried left LLVM's pass scalar), and a packed backward (d_a W_hh by column
    panels) measured 0.55-0.9x of the BLAS one; see docs/numba.md."""
    return enabled and not training and x.dtype == np.float32 and T >= 2


#: Workers of the packed loops' own pool (the calling thread is one more). Every
#: thread of a loop must run at once (they meet at every step), so a loop never
#: asks for more, and the pool is not shared with work that could hold a worker.
POOL_WORKERS = max(3, (os.cpu_count() or 2) - 1)
_pool = None
_pool_lock = threading.Lock()


def _executor():
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=POOL_WORKERS,
                                                          thread_name_prefix="fastrnn-packed")
        return _pool


def describe():
    """One line for ``fastrnn info``: the vector width chosen for this CPU and when the
    loops split over threads."""
    isa = "AVX-512F" if VW == 16 else "no AVX-512F: AVX2 or older"
    state = "on" if enabled else "off (packed_numba.enabled)"
    return (f"{state} for float32 LSTM/GRU inference; {VW}-lane vectors ({isa}), tiles of "
            f"{MR_LSTM} (LSTM) / {MR_GRU} (GRU) rows; split over threads by hidden units from "
            f"{MIN_SPLIT_STEP_WORK} multiply-adds per step")


def _thread_count(B, G, H):
    want = threads if threads is not None else (blas_get_threads() if blas_get_threads else 1)
    if B * G * H < MIN_SPLIT_STEP_WORK:
        return 1
    return max(1, min(want, -(-H // VW), POOL_WORKERS + 1))


#: Floats of input projection computed ahead of the loop at a time (4 MB): the
#: projection runs in chunks of steps, each just before its steps, so that it stays in
#: the caches; the whole sequence's (52 MB at 100x64x2048) came from fresh pages at
#: every call (glibc maps blocks above 32 MB anew), 10-100 ms of page faults.
CHUNK_FLOATS = 1 << 20


@_jit
def _project(gemm, x2, w_ih, xw2, gates, H, n0, n1):
    """xw2[:, g H + n] = (x2 W_ih^T)[:, g H + n] for the units n in [n0, n1); all of
    them in one GEMM when the range is every unit."""
    if n0 == 0 and n1 == H:
        _mm(gemm, x2, False, w_ih, True, xw2, 0.0)
        return
    for g in range(gates):
        _mm(gemm, x2, False, w_ih[g * H + n0:g * H + n1], True, xw2[:, g * H + n0:g * H + n1],
            0.0)


@_jit
def cell_thread(gemm, x2, w_ih, panels, bias, b_hn, lengths, reverse, hs, cs, out, xw, a, flags,
                tid, nthreads):
    """The inference loop of an LSTM (4 gates per panel; ``cs`` its cells, ``b_hn``
    unused) or a reset-after GRU (3; ``b_hn`` the n gate's recurrent bias, ``cs``
    unused), thread ``tid`` of ``nthreads``: the panels (hidden units) ``[U tid /
    nthreads, U (tid + 1) / nthreads)`` of every step, and their columns of the input
    projection, a chunk of ``xw.shape[0]`` steps at a time (each thread projects and
    reads only its own units, so chunks need no barrier). ``hs``/``cs`` are (2, B, H)
    ping-pong buffers, ``a`` the shared (B, gates Hp) scratch."""
    T, B, H = out.shape
    U, _, NR = panels.shape
    gates = NR // VW
    Hp, Tc = U * VW, xw.shape[0]
    u0, u1 = U * tid // nthreads, U * (tid + 1) // nthreads
    n0, n1 = min(u0 * VW, H), min(u1 * VW, H)
    xw2 = xw.reshape(Tc * B, xw.shape[2])
    for c0 in range(0, T, Tc):
        c1 = min(T, c0 + Tc)
        t0 = T - c1 if reverse else c0        # the chunk's steps cover times [t0, t0 + c1 - c0)
        _project(gemm, x2[t0 * B:(t0 + c1 - c0) * B], w_ih, xw2[:(c1 - c0) * B], gates, H, n0,
                 n1)
        for k in range(c0, c1):
            t = T - 1 - k if reverse else k
            prev, new = k & 1, (k + 1) & 1
            _recurrent(panels, hs, prev, a, Hp, u0, u1)
            if gates == 4:
                _lstm_block(a, Hp, xw, t - t0, bias, cs, hs, prev, new, out, t, lengths, n0, n1)
            else:
                _gru_block(a, Hp, xw, t - t0, bias, b_hn, hs, prev, new, out, t, lengths, n0,
                           n1)
            if nthreads > 1:
                spin_barrier(flags, tid, nthreads, k + 1)


def _run(nthreads, x, w_ih, panels, *args):
    """``cell_thread(gemm, x2, w_ih, panels, *args, xw, a, flags, tid, nthreads)`` on
    ``nthreads`` threads, with the chunk and scratch buffers. With one thread the
    projection GEMMs use the BLAS's threads; with more, each thread projects its own
    units with a single-threaded BLAS (an idle BLAS pool would spin on the cores the
    loop needs)."""
    T, B, I = x.shape
    U, _, NR = panels.shape
    G = w_ih.shape[0]
    xw = np.empty((max(1, min(T, CHUNK_FLOATS // (B * G))), B, G), dtype=np.float32)
    a = aligned_empty((B, NR * U))
    fl = flags(nthreads)
    call = (gemm_for(x.dtype), x.reshape(T * B, I), w_ih, panels) + args + (xw, a, fl)
    if nthreads == 1:
        cell_thread(*call, 0, 1)
        return
    with _single_threaded_blas():
        pool = _executor()
        futures = [pool.submit(cell_thread, *call, tid, nthreads) for tid in range(1, nthreads)]
        try:
            cell_thread(*call, 0, nthreads)
        finally:
            for f in futures:
                f.result()


def lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    """:func:`.numba_cpu.lstm_forward` in inference (no projection, no zoneout) through
    the packed loop: the same outputs, no cache."""
    x, w_ih, w_hh = _c(x, w_ih, w_hh)
    T, B, _ = x.shape
    H = c0.shape[1]
    bias = _bias(b_ih, b_hh, 4 * H, x.dtype)
    hs, cs = _state_buffers(T, B, H, x.dtype, False, reverse, h0, c0)
    out = np.empty((T, B, H), dtype=x.dtype)
    _run(_thread_count(B, 4 * H, H), x, w_ih, pack(w_hh, 4), bias, bias,
         _full_lengths(lengths, T, B), reverse, hs, cs, out)
    return out, _final(hs, T, False, reverse), _final(cs, T, False, reverse), None


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    """:func:`.numba_cpu.gru_forward` in inference (reset_after, no zoneout) through the
    packed loop: the same outputs, no cache."""
    x, w_ih, w_hh = _c(x, w_ih, w_hh)
    T, B, _ = x.shape
    H = h0.shape[1]
    bias = _bias(b_ih, b_hh, 3 * H, x.dtype)
    bias[2 * H:] = 0 if b_ih is None else b_ih[2 * H:]  # b_hn stays inside r * (.)
    b_hn = np.zeros(H, x.dtype) if b_hh is None else np.ascontiguousarray(b_hh[2 * H:])
    (hs,) = _state_buffers(T, B, H, x.dtype, False, reverse, h0)
    out = np.empty((T, B, H), dtype=x.dtype)
    _run(_thread_count(B, 3 * H, H), x, w_ih, pack(w_hh, 3), bias, b_hn,
         _full_lengths(lengths, T, B), reverse, hs, hs, out)
    return out, _final(hs, T, False, reverse), None
