"""Packed backward time loops (BPTT) of the numba backend: LSTM, GRU (reset_after) and
RNN, float32, the backward of :mod:`.packed_numba`'s forwards (same cache, same buffers).

Per step, from the last: a pointwise pass over the thread's hidden units gives the
gates' gradients ``d_a[t]`` from ``d_h`` (and the LSTM's ``d_c``) and leaves in ``d_h``
its direct part (the GRU's ``dh * z``; zero for the LSTM and the RNN, whose ``h_{t-1}``
reaches ``h_t`` only through the product); then the product ``d_h += d_a[t] W_hh`` for
the thread's units, by :mod:`.packed_numba`'s micro-kernel from ``W_hh^T`` packed as the
RNN's panels (``RNN_NV`` vectors of hidden units each, every gate's rows along ``k``).
Rows past their length get ``d_a[t] = 0`` and keep ``d_h`` (and ``d_c``): the product adds
zero to them.

The threads split the panels (hidden units). A unit's gates need only its own ``d_h``
and ``d_c``, but the product for a unit reads every gate of ``d_a[t]``: one barrier per
step, between the pointwise pass and the product. The weights' and inputs' gradients then
come from whole-sequence products, also on these threads (:func:`_grads`): after the last
barrier, each thread forms its share of the rows of ``d_W_ih``, ``d_W_hh`` and ``d_x``
(the last step's barrier is that barrier: every ``d_a`` is final there), by the
micro-kernels where the inputs and hidden units are whole panels (``d_x`` from ``W_ih``
packed, :func:`_input_grads`; the weights' reading ``d_a`` and the inputs in place,
:func:`_weight_grads`), else by OpenBLAS's GEMMs on one BLAS thread each, so that
OpenBLAS's own pool stays asleep for the next forward. The biases'
gradients are summed by the passes, each thread its units', row by row as it writes them.

What it replaces: :mod:`.numba_cpu`'s backward loops, whose per-step GEMM OpenBLAS
packed anew at every step (W_hh is 4 MB at the LSTM's H = 512), with the pointwise pass
on one core, and whose weight GEMMs left OpenBLAS's pool spinning into the next
forward, which then ran the BLAS loops (``python bench/packed_ab.py --mode training``).
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from . import _hotpool, _workspace
from . import packed_numba as pk
from ._cblas import gemm_for
from ._numba_math import FASTMATH, tanh
from ._simd import arrive, vector_width, wait_all, wide_vectors
from .numba_cpu import _mm, _single_threaded_blas

_jit = functools.partial(numba.njit, fastmath=FASTMATH, cache=True, nogil=True,
                         error_model="numpy")

#: Whether float32 backwards of the cells the packed forward runs take these loops:
#: False sends them to numba_cpu's BLAS loops (for A/B timings).
enabled = True
#: Whether a split backward computes ``d_x`` with the micro-kernel (where the inputs are
#: whole panels of units) rather than OpenBLAS's GEMM, and ``d_W_ih`` and ``d_W_hh`` with
#: the strided micro-kernel (:func:`_weight_grads`, where the inputs, the hidden units, are
#: whole panels): where the host has AVX-512. With AVX2's tiles (2 rows, 8 accumulators)
#: the kernels ran at 97 (d_x) and 41-56 (d_W) GFLOP/s a core against OpenBLAS's AVX2
#: kernels' 84-106, the backward 0.95-0.99x (d_x) and 0.70-0.79x (d_W) (Numba compiling
#: for Haswell on a Zen 4 host, OpenBLAS on its Haswell kernels: ``python
#: bench/packed_parts.py --parts dx dw`` under that setting,
#: ``bench/results/2026-12-06-packed-parts-dw-dx-avx2-session16.txt``). Set for A/B timings.
micro_input_grads = micro_weight_grads = vector_width() == 16


def threads_for(x, gates, H):
    """Threads of the packed backward, or 0 (numba_cpu's loops): as the forward's
    (:func:`.packed_numba.threads_for`: the split where the step is big enough and no
    other thread of the process runs), at most one per panel of W_hh^T (the RNN's
    panels), and 0 below one panel's units, where part of it would be zeros (scratch
    probes of a training step's backward with the rule off, session 10: LSTM 1000x8x32x32
    4.43 ms against 3.61, GRU 100x16x48x48 1.53 against 1.41)."""
    if not enabled or H < pk._panel_units(1):
        return 0
    n = pk.threads_for(x, gates, H)
    return min(n, -(-H // pk._panel_units(1))) if n else 0


@_jit(inline="always")
def _sum_gates(d_b, d_a, t, b, gates, H, n0, n1):
    """``d_b[g H + j] += d_a[t, b, g H + j]`` for the ``gates`` gates and the units j of
    [n0, n1): the biases' gradients, summed as the passes leave each row of ``d_a`` in L1
    (a pass over the whole of ``d_a`` afterwards read it from memory again: 1.4-3.1 ms a
    thread at the LSTM's 100x64x256x256, 4.3-4.4 at 512, where the sums add 0.1-0.7 ms to
    the passes: ``python bench/packed_parts.py --parts bwdpass``). Inlined, as
    ``packed_numba._carry``."""
    wide_vectors()
    for g in range(gates):
        G0 = np.uint64(g) * np.uint64(H)
        for j in range(np.uint64(n0), np.uint64(n1)):
            d_b[G0 + j] += d_a[t, b, G0 + j]


@_jit
def _rnn_units(hs, t, r, d_out, d_h, d_a, d_b, lengths, relu, n0, n1):
    """The RNN's pass for the units [n0, n1) of every row (``d_b``: the bias gradient's
    sums, or empty)."""
    wide_vectors()
    for b in range(d_out.shape[1]):
        if t < lengths[b]:
            if relu:
                for j in range(np.uint64(n0), np.uint64(n1)):
                    d_a[t, b, j] = d_out[t, b, j] + d_h[b, j] if hs[t + 1 - r, b, j] > 0 \
                        else 0.0
            else:
                for j in range(np.uint64(n0), np.uint64(n1)):
                    hv = hs[t + 1 - r, b, j]
                    d_a[t, b, j] = (d_out[t, b, j] + d_h[b, j]) * (1 - hv * hv)
            for j in range(np.uint64(n0), np.uint64(n1)):
                d_h[b, j] = 0
            if d_b.shape[0] > 0:
                _sum_gates(d_b, d_a, t, b, 1, d_out.shape[2], n0, n1)
        else:
            for j in range(np.uint64(n0), np.uint64(n1)):
                d_a[t, b, j] = 0


@_jit
def _lstm_units(gates, cs, t, r, d_out, d_h, d_c, d_a, d_b, lengths, n0, n1):
    """The LSTM's pass for the units [n0, n1) of every row: a pass per stored array, as
    numba_cpu's ``_lstm_backward_block`` (which says why), ``d_c`` becoming the gradient
    before the forget gate first; ``d_b`` the bias gradient's sums (or empty)."""
    wide_vectors()
    H1 = np.uint64(d_c.shape[1])
    H2, H3 = H1 + H1, H1 + H1 + H1
    cp, cn = t + r, t + 1 - r
    for b in range(d_out.shape[1]):
        if t < lengths[b]:
            for j in range(np.uint64(n0), np.uint64(n1)):
                o = gates[t, b, H3 + j]
                d_a[t, b, H3 + j] = (d_out[t, b, j] + d_h[b, j]) * tanh(cs[cn, b, j]) * o * (1 - o)
            for j in range(np.uint64(n0), np.uint64(n1)):
                tc = tanh(cs[cn, b, j])
                d_c[b, j] = d_c[b, j] + (d_out[t, b, j] + d_h[b, j]) * gates[t, b, H3 + j] \
                    * (1 - tc * tc)
            for j in range(np.uint64(n0), np.uint64(n1)):
                i = gates[t, b, j]
                d_a[t, b, j] = d_c[b, j] * gates[t, b, H2 + j] * i * (1 - i)
            for j in range(np.uint64(n0), np.uint64(n1)):
                f = gates[t, b, H1 + j]
                d_a[t, b, H1 + j] = d_c[b, j] * cs[cp, b, j] * f * (1 - f)
            for j in range(np.uint64(n0), np.uint64(n1)):
                gg = gates[t, b, H2 + j]
                d_a[t, b, H2 + j] = d_c[b, j] * gates[t, b, j] * (1 - gg * gg)
            for j in range(np.uint64(n0), np.uint64(n1)):
                d_c[b, j] = d_c[b, j] * gates[t, b, H1 + j]
            for j in range(np.uint64(n0), np.uint64(n1)):
                d_h[b, j] = 0
            if d_b.shape[0] > 0:
                _sum_gates(d_b, d_a, t, b, 4, H1, n0, n1)
        else:
            for g in range(4):
                G0 = np.uint64(g) * H1
                for j in range(np.uint64(n0), np.uint64(n1)):
                    d_a[t, b, G0 + j] = 0


@_jit
def _gru_units(gates, hns, hs, t, r, d_out, d_h, d_ax, d_ah, d_bx, d_bh, lengths, n0, n1):
    """The reset-after GRU's pass for the units [n0, n1) of every row (numba_cpu's
    ``_gru_backward_block``): ``d_h`` becomes its direct part ``dh * z``, last; ``d_bx``
    and ``d_bh`` the biases' gradients' sums (or empty)."""
    wide_vectors()
    H1 = np.uint64(hns.shape[2])
    H2 = H1 + H1
    hp = t + r
    for b in range(d_out.shape[1]):
        if t < lengths[b]:
            for j in range(np.uint64(n0), np.uint64(n1)):
                z, n = gates[t, b, H1 + j], gates[t, b, H2 + j]
                d_ax[t, b, H2 + j] = (d_out[t, b, j] + d_h[b, j]) * (1 - z) * (1 - n * n)
            for j in range(np.uint64(n0), np.uint64(n1)):
                d_ah[t, b, H2 + j] = d_ax[t, b, H2 + j] * gates[t, b, j]
            for j in range(np.uint64(n0), np.uint64(n1)):
                z, n = gates[t, b, H1 + j], gates[t, b, H2 + j]
                d_ax[t, b, H1 + j] = (d_out[t, b, j] + d_h[b, j]) * (hs[hp, b, j] - n) * z \
                    * (1 - z)
            for j in range(np.uint64(n0), np.uint64(n1)):
                d_ah[t, b, H1 + j] = d_ax[t, b, H1 + j]
            for j in range(np.uint64(n0), np.uint64(n1)):
                rg, z, n = gates[t, b, j], gates[t, b, H1 + j], gates[t, b, H2 + j]
                d_an = (d_out[t, b, j] + d_h[b, j]) * (1 - z) * (1 - n * n)
                d_ax[t, b, j] = d_an * hns[t, b, j] * rg * (1 - rg)
            for j in range(np.uint64(n0), np.uint64(n1)):
                d_ah[t, b, j] = d_ax[t, b, j]
            for j in range(np.uint64(n0), np.uint64(n1)):
                d_h[b, j] = (d_out[t, b, j] + d_h[b, j]) * gates[t, b, H1 + j]
            if d_bx.shape[0] > 0:     # (written out: two inlined calls kept the arrays'
                for g in range(3):     # reference counts, tests/test_packed.py)
                    G0 = np.uint64(g) * H1
                    for j in range(np.uint64(n0), np.uint64(n1)):
                        d_bx[G0 + j] += d_ax[t, b, G0 + j]
                        d_bh[G0 + j] += d_ah[t, b, G0 + j]
        else:
            for g in range(3):
                G0 = np.uint64(g) * H1
                for j in range(np.uint64(n0), np.uint64(n1)):
                    d_ax[t, b, G0 + j] = 0
                    d_ah[t, b, G0 + j] = 0


#: Rows of ``d_x`` per call of the micro-kernel (:func:`_input_grads`): the rows' block of
#: ``d_a`` (256 KB at G = 1024) stays in L2 while every panel of ``W_ih`` passes over it.
DX_ROWS = 64


@_jit
def _input_grads(panels, d_a, d_x, r0, r1):
    """``d_x[r0:r1] = d_a[r0:r1] W_ih`` by the micro-kernel, ``panels`` being ``W_ih``
    packed as ``W_hh`` is for the step's product (:func:`.packed_numba.pack_t`), in blocks
    of ``DX_ROWS`` rows."""
    TB, G = d_a.shape
    a3 = d_a.reshape(1, TB, G)
    U = panels.shape[0]
    PU, _, cv = pk._layout(U, 1)                  # (the RNN's panels)
    for c in range(r0, r1, DX_ROWS):
        pk._recurrent(panels, a3, 0, d_x, PU, cv, 0, U, False, c, min(r1, c + DX_ROWS))


#: Rows of ``d_a`` and ``x`` (steps times batch rows) per block of :func:`_weight_grads`:
#: the block of ``x``'s panel (32 KB with AVX-512, 16 with AVX2) and of ``d_a``'s columns
#: stay in L2 while every tile of rows passes over them (scratch timings, session 16: 128
#: and 256 best of 32-1024).
DW_ROWS = 128


@_jit
def _weight_grads(d_a, x, d_w, c0, c1):
    """``d_w[c0:c1] = d_a[:, c0:c1]^T x`` by the strided micro-kernel, where ``x``'s
    columns are whole panels (``RNN_NV VW`` each): rows of ``d_w`` (gates) are the
    kernel's rows, read down ``d_a``'s columns, and ``x``'s rows its panel, read where
    they lie; no transposed or packed copy of either. The sums run over blocks of
    ``DW_ROWS`` rows in order, every element's the same whichever thread has it. At the
    LSTM's 100x64x256x256 (both matrices, two threads) 32.4 ms (207 GFLOP/s) against
    OpenBLAS's 36.4 on one thread each, the backward 1.05x; 1.03x at 512
    (``python bench/packed_parts.py --parts dw``,
    ``bench/results/2026-12-06-packed-parts-dw-session16.txt``)."""
    R, G = d_a.shape
    N = x.shape[1]
    NR = pk._panel_units(1)
    MR = pk.MR_LSTM
    for k0 in range(0, R, DW_ROWS):
        kn = min(DW_ROWS, R - k0)
        for g0 in range(c0, c1, MR):
            for u in range(N // NR):
                pk._MK_STRIDED(min(MR, c1 - g0), d_a, k0 * G + g0, 1, G,
                               x, k0 * N + u * NR, N, kn, d_w, g0 * N + u * NR, N, pk.VW,
                               k0 > 0)


@_jit
def _grads(gemm, d_ax, d_ah, x2, h2, w_ih, panels_ih, d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh,
           has_bias, micro_w, tid, nthreads):
    """The thread's share of the whole-sequence products (numba_cpu's ``_param_grads``):
    the rows ``[G tid / nthreads, G (tid + 1) / nthreads)`` of ``d_w_ih`` and ``d_w_hh``
    (and of ``d_b_hh``, a copy of ``d_b_ih`` where one array holds both gate gradients:
    the passes summed the biases' gradients), and its share of the rows of ``d_x`` (from
    ``panels_ih``, ``W_ih`` packed for the micro-kernel, where given: a split backward
    whose inputs are whole panels of units; else OpenBLAS's GEMM), and with ``micro_w``
    the weights' by :func:`_weight_grads` where their inputs are whole panels. Every
    column of ``d_ax`` and ``d_ah`` is final once the threads have passed the last step's
    barrier (the last product writes ``d_h`` alone)."""
    G, R = d_w_ih.shape[0], x2.shape[0]
    c0, c1 = G * tid // nthreads, G * (tid + 1) // nthreads
    r0, r1 = R * tid // nthreads, R * (tid + 1) // nthreads
    NR = pk._panel_units(1)
    if micro_w and x2.shape[1] % NR == 0:
        _weight_grads(d_ax, x2, d_w_ih, c0, c1)
    else:
        _mm(gemm, d_ax[:, c0:c1], True, x2, False, d_w_ih[c0:c1], 0.0)
    if micro_w and h2.shape[1] % NR == 0:
        _weight_grads(d_ah, h2, d_w_hh, c0, c1)
    else:
        _mm(gemm, d_ah[:, c0:c1], True, h2, False, d_w_hh[c0:c1], 0.0)
    if panels_ih.shape[0] > 0:        # the micro-kernel (faster: packed_parts.py --parts dx)
        _input_grads(panels_ih, d_ax, d_x, r0, r1)
    else:
        _mm(gemm, d_ax[r0:r1], False, w_ih, False, d_x[r0:r1], 0.0)
    if has_bias and d_ah.ctypes.data == d_ax.ctypes.data:   # one array: one sum (the passes')
        d_b_hh[c0:c1] = d_b_ih[c0:c1]


@_jit
def bptt_thread(gemm, cell, panels, d_out, d_h, d_c, lengths, reverse, hs, cs, gates, hns,
                d_ax, d_ah, x, w_ih, panels_ih, d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh, has_bias,
                micro_w, flags, tid, nthreads, go, gen):
    """The backward of ``cell`` (:data:`.packed_numba.LSTM`, ``GRU``, ``RNN_TANH``,
    ``RNN_RELU``), thread ``tid`` of ``nthreads``: the panels ``[U tid / nthreads,
    U (tid + 1) / nthreads)`` of ``panels`` (W_hh^T packed as the RNN's panels) and their
    units, every step, then :func:`_grads`. ``d_h`` is (B, U PU), PU units a panel: the gradient of the
    last state in, of the first out (columns past H unused); ``d_c`` likewise, the LSTM's
    (B, H). ``d_ax`` and ``d_ah`` are the gates' gradients by the input and the recurrent
    products (one array but for the GRU's n gate); ``hs``, ``cs``, ``gates``, ``hns``
    the forward's cache (numba_cpu's buffers)."""
    _hotpool.publish(go, gen)   # the pool's jobs start now, this thread off the GIL
    T, B, H = d_out.shape
    U = panels.shape[0]
    PU = pk._panel_units(1)
    u0, u1, n0, n1 = pk._thread_units(U, PU, H, tid, nthreads)
    r = 1 if reverse else 0
    gates_n = abs(cell)
    for k in range(T):
        t = k if reverse else T - 1 - k
        if gates_n == 4:
            _lstm_units(gates, cs, t, r, d_out, d_h, d_c, d_ax, d_b_ih, lengths, n0, n1)
        elif gates_n == 3:
            _gru_units(gates, hns, hs, t, r, d_out, d_h, d_ax, d_ah, d_b_ih, d_b_hh, lengths,
                       n0, n1)
        else:
            _rnn_units(hs, t, r, d_out, d_h, d_ax, d_b_ih, lengths, cell == pk.RNN_RELU, n0,
                       n1)
        if nthreads > 1:              # every unit's d_a[t] is out
            arrive(flags, tid, k + 1)
            wait_all(flags, nthreads, k + 1)
        pk._recurrent(panels, d_ah, t, d_h, PU, pk.VW, u0, u1, k % 2 == 1, 0, B, True)
    TB = T * B
    _grads(gemm, d_ax.reshape(TB, d_ax.shape[2]), d_ah.reshape(TB, d_ah.shape[2]),
           x.reshape(TB, x.shape[2]), hs[r:T + r].reshape(TB, hs.shape[2]), w_ih, panels_ih,
           d_x.reshape(TB, x.shape[2]), d_w_ih, d_w_hh, d_b_ih, d_b_hh, has_bias, micro_w, tid,
           nthreads)


def run(nthreads, cell, x, w_ih, w_hh, has_bias, d_out, d_h_n, d_c_n, lengths, reverse, hs,
        cs, gates, hns, d_ax, d_ah):
    """The backward of ``cell`` on ``nthreads`` threads (:func:`threads_for`) into the
    gates' gradients ``d_ax``/``d_ah`` (one array but for the GRU), from the forward's
    cache: ``(d_x, d_h0, d_c0, d_w_ih, d_w_hh, d_b_ih, d_b_hh)`` (``d_c0`` None but for
    the LSTM, the biases' None without them). A loop that would use the packed loops' pool
    while another thread's loop has it runs on its caller's thread alone."""
    T, B, I = x.shape
    H = w_hh.shape[1]
    G = w_hh.shape[0]
    panels = pk.pack_t(w_hh)
    Hp = panels.shape[0] * pk._panel_units(1)
    d_h = pk.aligned_empty((B, Hp))
    d_h[:, H:] = 0
    d_h[:, :H] = d_h_n
    d_c = d_c_n.astype(np.float32, copy=True) if d_c_n is not None else \
        np.empty((B, 0), np.float32)
    dtype = np.float32
    d_x = _workspace.empty((T, B, I), dtype)
    d_w_ih, d_w_hh = np.empty((G, I), dtype), np.empty((G, H), dtype)
    d_b_ih = np.zeros(G if has_bias else 0, dtype)      # (summed by the passes)
    d_b_hh = np.zeros(G if has_bias else 0, dtype)
    fl = pk.flags(max(nthreads, 2))
    head = (gemm_for(x.dtype), cell, panels, d_out, d_h, d_c, lengths, reverse, hs, cs, gates,
            hns, d_ax, d_ah, x, w_ih)
    tail = (d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh, has_bias)

    def alone():                      # (the GEMMs on the BLAS's threads)
        bptt_thread(*head, pk.NO_PANELS, *tail, False, fl, 0, 1, _hotpool.tickets, 0)

    def split():
        # d_x by the micro-kernel (``python bench/packed_parts.py --parts dx``) where the
        # inputs are whole panels of units; its last bits differ from the GEMM's, which a
        # one-thread backward uses
        micro = micro_input_grads and I % pk._panel_units(1) == 0
        call = head + (pk.pack_t(w_ih) if micro else pk.NO_PANELS,) + tail + (
            micro_weight_grads, fl)
        with _single_threaded_blas():
            pk.with_pool(fl, ((bptt_thread, *call, tid, nthreads, _hotpool.tickets, 0)
                              for tid in range(1, nthreads)),
                         lambda go, gen: bptt_thread(*call, 0, nthreads, go, gen))

    if nthreads == 1:
        alone()
    else:
        _hotpool.pooled(split, alone)
    return (d_x, d_h[:, :H].copy(), d_c if d_c_n is not None else None, d_w_ih, d_w_hh,
            d_b_ih if has_bias else None, d_b_hh if has_bias else None)
