"""Packed time loops of the numba backend: LSTM, GRU (reset_after) and RNN, float32
forward.

Per step, the recurrent product ``h_{t-1} W_hh^T`` is computed by a register-blocked
micro-kernel from ``W_hh`` packed once per call (once for good where the weights cannot
change, a frozen module's: :func:`packed`), with no BLAS call inside the loop, then the
gates:

* ``W_hh`` is packed into panels, one per block of ``VW`` hidden units (``VW`` = the
  float32 vector width of the CPU Numba compiles for, :func:`._simd.vector_width`):
  panel ``u`` holds, for every input ``k``, the rows of every gate for the units
  ``[u VW, (u + 1) VW)`` side by side, ``NV = gates`` vectors (zeros past ``H``); the
  RNN's panels hold ``RNN_NV`` consecutive vectors of units instead.
  ``pack(w_hh, gates)`` below.
* a tile is ``MR`` batch rows by one panel: :func:`._simd.microkernel` keeps its
  ``MR x NV`` vector accumulators in registers over a block of ``KC`` inputs and
  writes them into gate-major scratch rows (gate stride ``Hp``, ``H`` padded to whole
  vectors); then one pointwise pass over the thread's units and every row (gates,
  state update, masking by ``lengths``, outputs), written so that LLVM vectorizes it,
  and in training one pass per gate that stores it into the cache for backward.
* every gate of a unit lies in one panel, so threads split the panels (hidden
  units) and never need another thread's gates: one barrier per step
  (:func:`._simd.arrive`, :func:`._simd.wait_all`), where ``h_t`` is complete. The threads are
  Python threads running the same nogil loop (``tid`` of ``nthreads``); each also
  computes its units' columns of the input projection (one BLAS GEMM on W_ih's rows of
  those units, :func:`_rows_by_thread`), a chunk of steps at a time, just before those
  steps. :func:`threads_for` decides the thread count, and
  runs the BLAS loops instead while another thread of the process is running.
* from 16 batch rows and a big enough step the loop is fused (:func:`_fused_for`): the
  micro-kernel projects each step's inputs too, from W_ih packed as W_hh is, just
  before the step's recurrent product, so there is no GEMM and no chunk buffer; and
  where the packed weights fit a share of a core's L2, the threads split the batch rows
  rather than the units (:func:`_rows_for`): each runs every step for its rows, and they
  never meet. Otherwise one thread runs the loop (:func:`_projection`): where its inputs
  are at most ``AHEAD_MAX_INPUTS`` times its hidden units or its projection is small
  (``PANELS_MAX_WORK``), the micro-kernel projects from W_ih's panels, on another core
  while the loop runs the steps (:func:`project_ahead`, a worker of :mod:`._hotpool`, into
  a ring, every chunk but the first, which the loop projects itself: an inference of
  ``AHEAD_MIN_WORK`` or more next to no running thread), else a
  chunk of steps at a time before them on the loop's thread (``PROJ_PANELS``), with the
  same bits; wider inputs are projected with a GEMM. :data:`PROJ_BLAS` and the other three
  name these ways for :func:`cell_thread`.

What it replaces: OpenBLAS packs ``W_hh`` anew at every call (it has no packed
API) and the pointwise pass ran on one core after a whole-batch GEMM
(docs/numba.md). The forward, inference and training; the backward of the cache it
leaves is :mod:`.packed_bptt`'s (or :mod:`.numba_cpu`'s BLAS loops).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import threading
import weakref

import numba
import numpy as np

from .._immutable import immutable
from . import _hotpool, _workspace
from ._cblas import blas_get_threads, gemm_for
from ._numba_math import FASTMATH, sigmoid, tanh
from ._simd import (FLAG_STRIDE, arrive, microkernel, split_k, store_release,
                    strided_microkernel, vector_width, wait_all, wait_for, wide_vectors)
from .numba_cpu import _mm, _single_threaded_blas, _slots

_jit = functools.partial(numba.njit, fastmath=FASTMATH, cache=True, nogil=True,
                         error_model="numpy")

#: float32 lanes per vector on this host (16 with AVX-512, else 8).
VW = vector_width()
#: Rows per tile, by gate count: MR * NV accumulators plus NV panel vectors and a
#: broadcast must fit the vector registers (32 with AVX-512, 16 with AVX2).
MR_BY_GATES = {4: 6, 3: 8} if VW == 16 else {4: 2, 3: 3}
MR_LSTM, MR_GRU = MR_BY_GATES[4], MR_BY_GATES[3]
#: Vectors of units per panel of the RNN (one gate): four, as the LSTM's gates, so that
#: it runs the LSTM's micro-kernel (one vector per panel would make the kernel wait on
#: loads: a broadcast and a panel load per FMA).
RNN_NV = 4
#: The RNN takes the packed loop from this hidden size on: at H = 32 (AVX-512) half of
#: its one panel is zeros, and it ran 0.92x of the BLAS loops at 1000x8x32x32 (1.11-1.19x
#: from H = 64 up; ``python bench/packed_ab.py --cells rnn_tanh``).
RNN_MIN_H = RNN_NV * VW // 2 + 1
#: The cell codes of :func:`cell_thread` (their gate counts).
RNN_TANH, RNN_RELU, GRU, LSTM = 1, -1, 3, 4
_MK_LSTM = microkernel(MR_LSTM, 4, VW)
_MK_GRU = microkernel(MR_GRU, 3, VW)
#: The LSTM's tile over operands read in place (:func:`._simd.strided_microkernel`): the
#: backward's weight gradients (:func:`.packed_bptt._weight_grads`).
_MK_STRIDED = strided_microkernel(MR_LSTM, RNN_NV, VW)


@_jit
def _tile_rows(gates):
    """Rows per tile of the micro-kernel: the GRU's, or the LSTM's (which the RNN runs)."""
    return MR_GRU if gates == 3 else MR_LSTM


@_jit
def _panel_units(gates):
    """Hidden units per panel: VW for the gated cells, RNN_NV VW for the RNN."""
    return VW if gates > 1 else RNN_NV * VW


@_jit
def _line_start(buf):
    """The first element of the float32 ``buf`` on a 64-byte boundary (its address read
    in compiled code: ``buf.ctypes.data`` from Python took 1.1 us)."""
    return (-buf.ctypes.data % 64) // 4


def aligned_empty(shape):
    """An uninitialized float32 array whose data starts on a 64-byte boundary (NumPy's
    start on 16): the micro-kernel's vector loads and stores then never split a cache
    line (about 5% of its speed)."""
    n = math.prod(shape)              # np.prod: 3 us of a 40 us call at B = 1
    buf = np.empty(n + 16, dtype=np.float32)
    start = _line_start(buf)
    return buf[start:start + n].reshape(shape)


def pack(w_hh, gates):
    """``W_hh`` (gates * H, K) into panels ``(ceil(H / VW), K, gates * VW)``:
    ``P[u, k, g VW + j] = W_hh[g H + u VW + j, k]``, zero past ``H``. One copy, straight
    into the aligned panels (a zero-padded temporary would copy ``W_hh`` twice a call).
    The RNN (one gate) gets panels of ``RNN_NV`` consecutive vectors of units instead,
    ``(ceil(H / (RNN_NV VW)), K, RNN_NV VW)``: ``P[u, k, j] = W_hh[u RNN_NV VW + j, k]``."""
    G, K = w_hh.shape
    if gates == 1:
        NR = _panel_units(1)
        U, full = -(-G // NR), G // NR
        panels = aligned_empty((U, K, NR))
        panels[:full] = w_hh[:full * NR].reshape(full, NR, K).transpose(0, 2, 1)
        if full < U:
            panels[full] = 0
            panels[full, :, :G - full * NR] = w_hh[full * NR:].T
        return panels
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


def pack_t(w):
    """``W^T`` packed as the RNN's panels, ``pack(W.T, 1)`` without the transpose: ``W``
    (K, N) into ``(ceil(N / NR), K, NR)`` with ``P[u, k, j] = W[k, u NR + j]`` (zero past
    N), ``NR = RNN_NV VW``: rows of ``NR`` contiguous values, copied as they are. The
    backward's product ``d_a W_hh`` (:mod:`.packed_bptt`) reads ``W_hh`` this way."""
    K, N = w.shape
    NR = _panel_units(1)
    U, full = -(-N // NR), N // NR
    panels = aligned_empty((U, K, NR))
    panels[:full] = w[:, :full * NR].reshape(K, full, NR).transpose(1, 0, 2)
    if full < U:
        panels[full] = 0
        panels[full, :, :N - full * NR] = w[:, full * NR:]
    return panels


#: The panels of weights that cannot change (:func:`immutable`): ``(id(w), gates)`` ->
#: ``(weak reference to w, panels)``; an entry goes with its array.
_packed = {}


def packed(w, gates):
    """``pack(w, gates)``, packed once for weights that cannot change (a frozen module's,
    :func:`.._immutable.immutable`) and kept while ``w`` lives, packed anew at every call
    otherwise (weights that the caller may change between calls). At 50x16x128x128 (LSTM,
    rows split) a frozen module's call took 1.127 ms against an eval-mode module's 1.237
    (``python bench/packed_ab.py --compare frozen``): the packing, and the other core's
    first reads of panels the caller had just written."""
    key = (id(w), gates)
    entry = _packed.get(key)
    if entry is not None and entry[0]() is w:   # kept, so immutable: it cannot become writeable
        return entry[1]
    if not immutable(w):
        return pack(w, gates)
    panels = pack(w, gates)     # (writeable, as the kernels' other panels: one compiled type)
    _packed[key] = (weakref.ref(w, lambda _, key=key: _packed.pop(key, None)), panels)
    return panels


def flags(nthreads):
    """Counters, one cache line each: the barrier's per-thread steps in a split loop; in a
    loop that projects ahead, the chunks projected (0) and the chunks done (1)."""
    return np.zeros(max(nthreads, 1) * FLAG_STRIDE, dtype=np.int64)


#: What the counters are set to when a thread of a loop fails: every wait is then over,
#: so that the other threads run out (over garbage) and the failure is raised, instead of
#: waiting forever for a thread that will not come.
RELEASE = 1 << 62


#: Inputs (k) per block of the recurrent product: a panel's block (KC x NV VW floats,
#: 32 KB for the LSTM on AVX-512) stays in L1 while every row block uses it.
KC = 128
#: Inputs per block where a product has ``KC_WIDE_ROWS`` rows or more: the block then
#: comes from L2 (128 KB at K = 512), but for enough tiles that the fewer loads and
#: stores of the output tiles between blocks pay.
KC_WIDE, KC_WIDE_ROWS = 512, 32


@_jit
def _next_block(u, k0, kb, K, NR, more, un):
    """Where the panel block after (panel ``u``, inputs from ``k0``) starts in the panels
    (elements), and its cache lines: the next block of ``u``, else the first of panel
    ``un`` where there is one (``more``), else none (0 lines)."""
    if k0 + kb < K:
        return (u * K + k0 + kb) * NR, min(kb, K - k0 - kb) * NR // 16
    if more:
        return un * K * NR, min(kb, K) * NR // 16
    return 0, 0


@_jit
def _prefetch_plan(prefetch, u, k0, kb, K, NR, tiles, more, un):
    """``(start, per)``: the block's ``tiles`` row tiles prefetch the next block
    (:func:`_next_block`) into L2, ``per`` lines each, the t-th from ``start + 16 per t``
    (the last one's may pass the block's end). A tile's loop prefetches one line a step, so
    at most its k steps (a short block before a long one leaves the rest to the hardware).
    ``(0, 0)`` where ``prefetch`` is False: products of fewer than ``KC_WIDE_ROWS`` rows,
    whose panels stay in L2 or L1, and which spent 13 us more a B = 1 GRU call on this
    arithmetic (session 11, the compiled loop timed alone as ``python bench/packed_parts.py
    --parts overhead`` times its ``cell_thread`` level, in a scratch script)."""
    if not prefetch:
        return 0, 0
    start, lines = _next_block(u, k0, kb, K, NR, more, un)
    return start, (lines + tiles - 1) // tiles


@_jit
def _recurrent(panels, hs, prev, a, PU, cv, u0, u1, backwards, r0, r1, add=False,
               by_batch=True):
    """The product hs[prev] W_hh^T for the units of panels [u0, u1) and the rows [r0, r1)
    into the scratch ``a`` (``add``: added to what ``a`` holds): panel ``u``'s vector ``v``
    at columns ``u PU + v cv`` (gated cells: PU = VW units per panel, gate stride cv = Hp;
    the RNN: PU = RNN_NV VW, cv = VW). ``backwards``: the
    panels from the last down, which the loops do at every other step. Where the
    panels outgrow the L1 cache (W_hh of the LSTM at H = 64 is 64 KB, L1 is 32-48 KB),
    each step then starts with the panels the last one ended with, still in L1, instead of
    the ones it evicted first: the product at B = 1, H = 64 took 388 ns a step instead of
    564 (``python bench/packed_parts.py --parts product``). A product of ``KC_WIDE_ROWS``
    rows or more prefetches the next panel block into L2 while its tiles run
    (:func:`_prefetch_plan`): where a thread's panels outgrow its L2 (4 MB at the LSTM's
    H = 512, fused) each block comes from L3 at every step, and the first tile over it
    waited on those loads (session 11, ``python bench/packed_parts.py --parts split``, thread
    0's products at 100x64x512x512: LSTM 152 -> 170-194 GFLOP/s a core, GRU 158 ->
    171-197; ``bench/results/2026-12-05-packed-split-prefetch-session11.txt``)."""
    _, B, K = hs.shape
    h0 = prev * B * K
    U, _, NR = panels.shape
    ldc = a.shape[1]
    lstm = NR == 4 * VW               # the LSTM's and the RNN's panels: 4 vectors
    MR = _tile_rows(4 if lstm else 3)
    # by the batch, not the tile (see _simd.split_k); never for a chunk of projections
    # (``by_batch`` False), whose rows are steps: any chunking then gives the same bits
    halves = by_batch and split_k(B, NR // VW, MR)
    kb = KC_WIDE if r1 - r0 >= KC_WIDE_ROWS else KC      # (the sums are the same either way:
    #                                    a block adds onto the tile it stored, exactly)
    # One loop nest per kernel, no branch inside: with the branch, the arrays became phi
    # copies, and whether Numba's reference-count pruning then removed their NRT
    # increfs and decrefs (atomic, per tile) depended on the compiling process's string
    # hash seed: 0.83-0.89x at LSTM 200x1x64x64 and 100x64x256x256 with them
    # (``python bench/hashseed.py``).
    prefetch = r1 - r0 >= KC_WIDE_ROWS    # the next block into L2 (_prefetch_plan)
    tiles = (r1 - r0 + MR - 1) // MR
    if lstm:
        for i in range(u0, u1):
            u = u0 + u1 - 1 - i if backwards else i
            for k0 in range(0, K, kb):
                kc = min(kb, K - k0)
                nxt, per = _prefetch_plan(prefetch, u, k0, kb, K, NR, tiles, i + 1 < u1,
                                          u0 + u1 - 2 - i if backwards else i + 1)
                for b0 in range(r0, r1, MR):
                    _MK_LSTM(min(MR, r1 - b0), hs, h0 + b0 * K + k0, K, panels,
                             (u * K + k0) * NR, kc, a, b0 * ldc + u * PU, ldc, cv,
                             add or k0 > 0, halves, nxt, per)
                    nxt += per * 16
    else:
        for i in range(u0, u1):
            u = u0 + u1 - 1 - i if backwards else i
            for k0 in range(0, K, kb):
                kc = min(kb, K - k0)
                nxt, per = _prefetch_plan(prefetch, u, k0, kb, K, NR, tiles, i + 1 < u1,
                                          u0 + u1 - 2 - i if backwards else i + 1)
                for b0 in range(r0, r1, MR):
                    _MK_GRU(min(MR, r1 - b0), hs, h0 + b0 * K + k0, K, panels,
                            (u * K + k0) * NR, kc, a, b0 * ldc + u * PU, ldc, cv,
                            add or k0 > 0, halves, nxt, per)
                    nxt += per * 16


# The pointwise passes. Inference runs one fused pass per step that stores only the
# states and the output. Training also keeps the activated gates for backward: stored
# from that pass, they made LLVM leave it scalar (17 ns per unit against 2.8 at B = 64,
# H = 512), and so did any pass that reads the gate array and stores into it. A pass per
# gate that stores only that gate, then a pass that reads them back for the states, ran at
# the fused pass's speed there but 3.95 against 2.74 ns per unit at B = 8, H = 32, and
# 3-6% slower end to end at 100x64x{256,512} (LSTM inference; session 6's A/Bs). So
# training runs the fused pass as inference does, then passes per gate that compute the
# gates again and store them (_lstm_gates, _gru_gates): the states come from one function
# in both modes, so eval and train forwards agree bitwise (tests/test_hardening.py), and
# training pays about 2.5 ns per unit more. Column indices are uint64: Numba wraps a
# signed index that it cannot prove non-negative (``j`` from ``range(n0, n1)``), and that
# select turns a loop into gathers and scatters, 7x slower. Whole arrays and a time index,
# not per-step row views: each view costs two reference-count calls, a few hundred ns a
# step at B = 1. Inactive rows' gate rows are not written (backward never reads them).

@_jit
def _xw_offsets(gates, n0, n1, xs):
    """Where a thread's projected inputs lie in the chunk: the thread with units [n0, n1)
    owns columns [gates n0, gates n1), gate by gate (:func:`_project`), so gate ``g`` of
    unit ``j`` is column ``X0 + g W + j`` with ``X0 = (gates - 1) n0``, ``W = n1 - n0``.
    With one thread (n0 = 0, n1 = H) that is the plain layout, column g H + j. ``xs``
    nonzero: the micro-kernel's projections (a fused loop's step, or a ``PROJ_PANELS``
    chunk), in the layout of the scratch ``a``
    (gate stride ``xs = Hp``): X0 = 0, W = xs."""
    if xs:
        return np.uint64(0), np.uint64(xs)
    return np.uint64((gates - 1) * n0), np.uint64(n1 - n0)


@_jit(inline="always")
def _carry(hs, prev, new, out, t, b, n0, n1):
    """An inactive row: its state carried from ``prev`` to ``new``, its output 0, for
    the units [n0, n1). Inlined (at Numba's level) into the pointwise blocks: a call to a
    function that takes arrays left the caller's reference counts in place, an atomic
    increment and decrement per array argument at every call (7 of each in
    ``_lstm_block``), about 110 ns of the LSTM's 300 ns pass at B = 1, H = 64 (``python
    bench/packed_parts.py --parts pointwise``, before and after: 4.78 -> 3.00 ns a unit)."""
    wide_vectors()
    for j in range(np.uint64(n0), np.uint64(n1)):
        hs[new, b, j] = hs[prev, b, j]
        out[t, b, j] = 0


@_jit
def _lstm_block(a, Hp, xw, tx, xs, bias, cs, hs, prev, new, out, t, lengths, n0, n1, r0, r1):
    """Units [n0, n1) of the rows [r0, r1), one fused pass from the pre-activations (``a``, gate
    stride Hp, plus ``xw[tx]`` in the thread's layout, :func:`_xw_offsets`, and the bias):
    reads cs[prev], hs[prev]; writes cs[new], hs[new], out[t]; inactive rows carry their
    state."""
    wide_vectors()
    H1, P1 = np.uint64(cs.shape[2]), np.uint64(Hp)
    H2, H3, P2, P3 = H1 + H1, H1 + H1 + H1, P1 + P1, P1 + P1 + P1
    X0, W = _xw_offsets(4, n0, n1, xs)
    X1, X2, X3 = X0 + W, X0 + W + W, X0 + W + W + W
    for b in range(r0, r1):
        if t < lengths[b]:
            for j in range(np.uint64(n0), np.uint64(n1)):
                i = sigmoid(a[b, j] + xw[tx, b, X0 + j] + bias[j])
                f = sigmoid(a[b, P1 + j] + xw[tx, b, X1 + j] + bias[H1 + j])
                g = tanh(a[b, P2 + j] + xw[tx, b, X2 + j] + bias[H2 + j])
                o = sigmoid(a[b, P3 + j] + xw[tx, b, X3 + j] + bias[H3 + j])
                c = f * cs[prev, b, j] + i * g
                cs[new, b, j] = c
                hv = o * tanh(c)
                hs[new, b, j] = hv
                out[t, b, j] = hv
        else:
            _carry(hs, prev, new, out, t, b, n0, n1)
            _carry(cs, prev, new, out, t, b, n0, n1)


@_jit(inline="always")
def _store_gate(a, Hp, xw, tx, xs, bias, gates, t, b, g, H, n0, n1, use_tanh):
    """gates[t, b, g H + j] = act(a[b, g Hp + j] + xw[tx, b, g W + X0 + j] + bias[g H + j])
    for the units j of [n0, n1) (:func:`_xw_offsets`): one gate of one row, the sigmoid or
    tanh. Inlined, as :func:`_carry` is: called, it left the reference counts of the
    caller's arrays in place (``_lstm_gates``, ``_gru_gates``), an atomic increment and
    decrement per array at every step."""
    wide_vectors()
    G1, P1 = np.uint64(g) * np.uint64(H), np.uint64(g) * np.uint64(Hp)
    X0, W = _xw_offsets(gates.shape[2] // H, n0, n1, xs)
    XG = X0 + np.uint64(g) * W
    if use_tanh:
        for j in range(np.uint64(n0), np.uint64(n1)):
            gates[t, b, G1 + j] = tanh(a[b, P1 + j] + xw[tx, b, XG + j] + bias[G1 + j])
    else:
        for j in range(np.uint64(n0), np.uint64(n1)):
            gates[t, b, G1 + j] = sigmoid(a[b, P1 + j] + xw[tx, b, XG + j] + bias[G1 + j])


@_jit
def _lstm_gates(a, Hp, xw, tx, xs, bias, t, lengths, n0, n1, r0, r1, gates):
    """Training: the gates i, f, g, o of the active rows into ``gates[t]``, a pass per
    gate, from the same expressions as _lstm_block."""
    H = gates.shape[2] // 4
    for b in range(r0, r1):
        if t < lengths[b]:
            for g in range(4):
                _store_gate(a, Hp, xw, tx, xs, bias, gates, t, b, g, H, n0, n1, g == 2)


@_jit
def _gru_block(a, Hp, xw, tx, xs, bias, b_hn, hs, prev, new, out, t, lengths, n0, n1, r0, r1):
    """reset_after, units [n0, n1) of every row: one fused pass (see _lstm_block)."""
    wide_vectors()
    H1, P1 = np.uint64(hs.shape[2]), np.uint64(Hp)
    H2, P2 = H1 + H1, P1 + P1
    X0, W = _xw_offsets(3, n0, n1, xs)
    X1, X2 = X0 + W, X0 + W + W
    for b in range(r0, r1):
        if t < lengths[b]:
            for j in range(np.uint64(n0), np.uint64(n1)):
                r = sigmoid(a[b, j] + xw[tx, b, X0 + j] + bias[j])
                z = sigmoid(a[b, P1 + j] + xw[tx, b, X1 + j] + bias[H1 + j])
                n = tanh(xw[tx, b, X2 + j] + bias[H2 + j] + r * (a[b, P2 + j] + b_hn[j]))
                hv = (1 - z) * n + z * hs[prev, b, j]
                hs[new, b, j] = hv
                out[t, b, j] = hv
        else:
            _carry(hs, prev, new, out, t, b, n0, n1)


@_jit
def _gru_gates(a, Hp, xw, tx, xs, bias, b_hn, t, lengths, n0, n1, r0, r1, gates, hns):
    """Training: r, z, n into ``gates[t]`` and hn = W_hn h + b_hn into ``hns[t]`` for the
    active rows, a pass per gate, from the same expressions as _gru_block."""
    wide_vectors()
    H = hns.shape[2]
    H2, P2 = np.uint64(2 * H), np.uint64(2 * Hp)
    X0, W = _xw_offsets(3, n0, n1, xs)
    X2 = X0 + W + W
    for b in range(r0, r1):
        if t < lengths[b]:
            # n first: with r and z's inlined passes before this loop, Numba's pruning
            # left the arrays' reference counts in place (four atomic pairs a row)
            for j in range(np.uint64(n0), np.uint64(n1)):
                r = sigmoid(a[b, j] + xw[tx, b, X0 + j] + bias[j])
                hn = a[b, P2 + j] + b_hn[j]
                hns[t, b, j] = hn
                gates[t, b, H2 + j] = tanh(xw[tx, b, X2 + j] + bias[H2 + j] + r * hn)
            _store_gate(a, Hp, xw, tx, xs, bias, gates, t, b, 0, H, n0, n1, False)
            _store_gate(a, Hp, xw, tx, xs, bias, gates, t, b, 1, H, n0, n1, False)


# ------------------------------------------------------------ the wrappers

#: Multiply-adds of one step's recurrent product (B * G * H) from which the loop is
#: split over threads (`python bench/packed_ab.py --compare threads`): below, one step
#: is too short for the barrier and the second thread's start to pay.
MIN_SPLIT_STEP_WORK = 3 << 20
#: Threads the packed loops split the hidden units over; None: the BLAS's thread count
#: where the work per step and idle cores allow (:func:`threads_for`). Set (tests, A/B
#: timings), it forces that split, or none with 1; a fused loop can then still split the
#: rows (:func:`run`; ``rows = False`` keeps one thread).
threads = None
#: Workers a loop may use of the packed loops' own pool (:mod:`._hotpool`; the calling
#: thread is one more). Every thread of a loop must run at once (they meet at every
#: step), and the pool is not shared with work that could hold a worker. One loop of the
#: process uses the pool at a time (:func:`._hotpool.pooled`): another such loop started
#: meanwhile, from another thread of the caller's, runs on its caller's thread alone:
#: two loops whose threads wait on each other could each hold part of the pool's workers
#: and wait forever for the rest, and two splits over the same cores would only take
#: turns on them.
POOL_WORKERS = max(3, (os.cpu_count() or 2) - 1)


#: False sends every call to numba_cpu's BLAS loops (for A/B timings:
#: ``python bench/packed_ab.py``).
enabled = True


def describe():
    """One line for ``fastrnn info``: the vector width chosen for this CPU, when the
    loops split over threads, and how the modes' switches are set."""
    isa = "AVX-512F" if VW == 16 else "no AVX-512F: AVX2 or older"
    state = "on" if enabled else "off (packed_numba.enabled)"
    how = {False: "off", None: "where it pays", True: "always"}
    return (f"{state} for float32 LSTM/GRU/RNN forwards; {VW}-lane vectors ({isa}), tiles of "
            f"{MR_LSTM} (LSTM) / {MR_GRU} (GRU) rows; split over threads by hidden units from "
            f"{MIN_SPLIT_STEP_WORK} multiply-adds per step while no other thread runs; "
            f"projection ahead on another core {how[ahead]}, from {AHEAD_MIN_WORK} "
            f"multiply-adds (packed_numba.ahead); fused "
            f"projection {how[fused]} (packed_numba.fused); one-thread projections from "
            f"W_ih's panels {how[panel_chunks]}: inputs at most {AHEAD_MAX_INPUTS} H, or up to "
            f"{PANELS_MAX_WORK} multiply-adds (packed_numba.panel_chunks); batch rows split "
            f"{how[rows]} (packed_numba.rows); "
            f"pool workers spin {_hotpool.spin_us:g} us after a job (FASTRNN_SPIN_US)")


def _blas_threads():
    """The BLAS's thread count (1 where it cannot be read)."""
    return blas_get_threads() if blas_get_threads else 1


#: The placeholder for W_ih's panels where no micro-kernel projects (an empty array of
#: the panels' compiled type, shared: nothing reads or writes it).
NO_PANELS = np.empty((0, 0, 0), dtype=np.float32)
#: ``/proc/loadavg``, kept open for :func:`_running_tasks` (None: not opened yet).
_loadavg_fd = None
_loadavg_lock = threading.Lock()


def _running_tasks():
    """The system's running tasks, the fourth field of ``/proc/loadavg``, read with
    ``pread`` from a descriptor kept open: each read at offset 0 shows the count anew, in
    1.7 us against 4.9 for opening, reading and closing the file at every call (a scratch
    ``timeit`` on a 2-core KVM guest), on the path of every B = 1 call that projects ahead.
    OSError, ValueError or IndexError where it cannot be read or parsed (not Linux; a
    descriptor closed behind this module's back, whose number may now be another file's):
    the descriptor is then forgotten, never closed (it may be someone else's now), and
    opened again at the next call."""
    global _loadavg_fd
    fd = _loadavg_fd
    if fd is None:
        with _loadavg_lock:        # one descriptor, whichever thread comes first
            if _loadavg_fd is None:
                _loadavg_fd = os.open("/proc/loadavg", os.O_RDONLY)   # (close-on-exec)
            fd = _loadavg_fd
    try:
        return int(os.pread(fd, 128, 0).split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        _loadavg_fd = None
        raise


def _other_threads_running():
    """Whether another thread of this process is running right now: state ``R`` in
    ``/proc/self/task/*/stat`` (Linux; elsewhere False). A BLAS or OpenMP pool spins for
    a while after each parallel call (OpenBLAS's for about 0.1 s): a split loop, whose
    threads meet at every step, then shares the cores with it and ran up to 4x slower
    than alone (docs/numba.md). First the count of running tasks of the whole system
    (:func:`_running_tasks`, 1.7 us on a 2-core KVM guest): where it is this thread and the
    loops' own workers awake (:func:`._hotpool.awake`), nothing else runs; else each
    thread's state, 15 us with four threads (``python bench/packed_parts.py --parts
    overhead``)."""
    try:
        ours = _hotpool.awake()        # before and after the read: the smaller count, so
        running = _running_tasks()     # that a worker woken meanwhile (by another caller)
        if running <= 1 + min(ours, _hotpool.awake()):   # hides nothing
            return False
    except (OSError, ValueError, IndexError):
        pass
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return False
    mine = {str(i) for i in _hotpool.thread_ids()} | {str(threading.get_native_id())}
    for tid in tids:
        if tid in mine:        # this thread, and the loops' own workers (spinning, perhaps)
            continue
        try:                 # os.open/read: Python's file objects took 26 us against 15 (a probe)
            fd = os.open(f"/proc/self/task/{tid}/stat", os.O_RDONLY)
            try:
                stat = os.read(fd, 128)  # pid (name of at most 15 bytes) state ...
            finally:
                os.close(fd)
        except OSError:                  # the thread has ended
            continue
        end = stat.rfind(b")")           # the state follows the name, which may hold spaces
        if stat[end + 2:end + 3] == b"R":
            return True
    return False


def threads_for(x, gates, H):
    """Threads of the packed loop for this forward, or 0: run numba_cpu's BLAS loops.

    0 where the loops are off, for float64, for one step (packing costs more than it
    saves), and for an RNN narrower than ``RNN_MIN_H``. Below ``MIN_SPLIT_STEP_WORK``,
    one thread. Above, the split, unless another thread of the process is running (a
    BLAS pool spinning after its last call, most often: a caller's NumPy product, or a
    backward on numba_cpu's BLAS loops; :mod:`.packed_bptt`'s keeps OpenBLAS's pool
    asleep): then the BLAS loops, whose GEMMs run on that same pool, measured fastest.
    ``threads`` set forces that many threads, without that check."""
    T, B, _ = x.shape
    if not enabled or x.dtype != np.float32 or T < 2 or (gates == 1 and H < RNN_MIN_H):
        return 0
    panels = -(-H // _panel_units(gates))
    if threads is not None:
        return max(1, min(threads, panels, POOL_WORKERS + 1))
    want = _blas_threads()
    if want <= 1 or not _splits_by_units(x, gates, H):
        return 1
    if _other_threads_running():
        return 0
    return max(1, min(want, panels, POOL_WORKERS + 1))


#: Floats of input projection computed ahead of the loop at a time (4 MB): the
#: projection runs in chunks of steps, each just before its steps, so that it stays in
#: the caches; the whole sequence's (52 MB at 100x64x2048) came from fresh pages at
#: every call (glibc maps blocks above 32 MB anew), 10-100 ms of page faults.
CHUNK_FLOATS = 1 << 20


@_jit
def _rnn_block(a, xw, tx, bias, hs, prev, new, out, t, lengths, n0, n1, r0, r1, relu):
    """The RNN, units [n0, n1) of every row, one pass (see _lstm_block); ``a`` holds the
    units in order. ReLU keeps NaN (``not v <= 0``), as numba_cpu's loop does."""
    wide_vectors()
    for b in range(r0, r1):
        if t < lengths[b]:
            for j in range(np.uint64(n0), np.uint64(n1)):
                v = a[b, j] + xw[tx, b, j] + bias[j]
                hv = (v if not v <= 0 else 0.0) if relu else tanh(v)
                hs[new, b, j] = hv
                out[t, b, j] = hv
        else:
            _carry(hs, prev, new, out, t, b, n0, n1)


@_jit
def _project(gemm, x2, w_proj, xw2, gates, n0, n1):
    """The thread's projected inputs: xw2[:, gates n0:gates n1] = x2 w_proj[gates n0:gates
    n1]^T, one GEMM, where ``w_proj`` holds W_ih's rows in the threads' order
    (:func:`_rows_by_thread`; W_ih itself with one thread)."""
    _mm(gemm, x2, False, w_proj[gates * n0:gates * n1], True, xw2[:, gates * n0:gates * n1],
        0.0)


@_jit
def _thread_units(U, PU, H, tid, nthreads):
    """Thread ``tid``'s panels [u0, u1) of U and its units [n0, n1) (PU units a panel)."""
    u0, u1 = U * tid // nthreads, U * (tid + 1) // nthreads
    return u0, u1, min(u0 * PU, H), min(u1 * PU, H)


def _rows_by_thread(w_ih, gates, U, PU, nthreads):
    """W_ih with its rows in the threads' order: thread after thread, each one's units
    gate by gate, so that each thread projects its inputs with one GEMM (four column
    slices of W_ih, one GEMM each, ran 13.4 against 12.3 ms at 100x64x256x256, 51.7
    against 48.8 ms at 512, the copy included; a scratch probe). W_ih itself with one
    thread or one gate, where that order is W_ih's."""
    if nthreads == 1 or gates == 1:
        return w_ih
    G, I = w_ih.shape
    H = G // gates
    w = w_ih.reshape(gates, H, I)
    parts = []
    for tid in range(nthreads):
        _, _, n0, n1 = _thread_units(U, PU, H, tid, nthreads)
        parts.append(w[:, n0:n1].reshape(-1, I))
    return np.concatenate(parts)


@_jit
def _layout(U, gates):
    """``(PU, Hp, cv)`` of a loop over ``U`` panels: units a panel, the padded hidden size
    (the gate stride of the scratch ``a``), and the columns between a panel's vectors in
    ``a`` (Hp for the gated cells, whose vectors are gates; VW for the RNN's)."""
    PU = _panel_units(gates)
    return PU, U * PU, U * PU if gates > 1 else VW


@_jit
def _project_chunk(panels_ih, x2, t0, steps, B, xc, PU, cv, u0, u1):
    """The projections of the ``steps`` steps from ``t0`` (rows of ``x2``) for the panels
    [u0, u1) of ``panels_ih`` (W_ih packed as W_hh), by the micro-kernel, into the chunk
    slot ``xc`` in the layout of the scratch ``a`` (``PU``, ``cv``: :func:`_layout`); its k
    loop never in halves, so that any chunking gives the same bits (``by_batch`` False)."""
    rows = x2[t0 * B:(t0 + steps) * B]
    _recurrent(panels_ih, rows.reshape(1, rows.shape[0], rows.shape[1]), 0,
               xc.reshape(xc.shape[0] * B, xc.shape[2]), PU, cv, u0, u1, False, 0,
               rows.shape[0], False, False)


@_jit
def project_ahead(panels_ih, x2, xw, T, reverse, flags, gates):
    """The projector of a one-thread loop (:func:`cell_thread` with ``PROJ_AHEAD``), on
    another core: the chunks' input projections, in the loop's order, by the micro-kernel
    from ``panels_ih`` (W_ih packed as W_hh) into the ring of ``xw.shape[0]`` slots (chunk
    ``c`` into slot ``c % slots``, in the layout of the loop's scratch ``a``). It publishes
    chunk ``c`` as ``flags[0] = c + 1`` and reuses a slot once the loop has published
    ``flags[FLAG_STRIDE]`` (chunks done) past its last chunk. It starts from the second
    chunk: the loop projects the first itself, so that it need not wait for this worker
    to start (a few microseconds of Python between its wake-up and this loop)."""
    S, Tc, B, _ = xw.shape
    U = panels_ih.shape[0]
    PU, _, cv = _layout(U, gates)
    c = 1
    for c0 in range(Tc, T, Tc):
        c1 = min(T, c0 + Tc)
        t0 = T - c1 if reverse else c0
        wait_for(flags, FLAG_STRIDE, c - S + 1)
        _project_chunk(panels_ih, x2, t0, c1 - c0, B, xw[c % S], PU, cv, 0, U)
        store_release(flags, 0, c + 1)
        c += 1


#: How a loop's input projections come (:func:`cell_thread`'s ``proj``): a GEMM per chunk
#: of steps on the loop's thread (BLAS); computed on another core while the loop runs
#: (AHEAD, :func:`project_ahead`); each step's by the micro-kernel from W_ih's panels, the
#: step before (FUSED); each chunk's by the micro-kernel from W_ih's panels, on the loop's
#: thread, before its steps (PANELS: small one-thread loops, :func:`_projection`).
PROJ_BLAS, PROJ_AHEAD, PROJ_FUSED, PROJ_PANELS = 0, 1, 2, 3


@_jit
def cell_thread(gemm, x2, w_proj, panels, cell, bias, b_hn, lengths, reverse, training, hs, cs,
                out, gates_out, hns, xw, a, flags, tid, nthreads, proj, by_rows, panels_ih, go,
                gen):
    """The time loop of ``cell``: an LSTM (``LSTM``; ``cs`` its cells, ``b_hn`` and ``hns``
    unused), a reset-after GRU (``GRU``; ``b_hn`` the n gate's recurrent bias, ``hns`` its
    cache of W_hn h + b_hn, ``cs`` unused) or an RNN (``RNN_TANH``, ``RNN_RELU``; ``hs``
    alone), thread ``tid`` of ``nthreads``: the panels (hidden units) ``[U tid /
    nthreads, U (tid + 1) / nthreads)`` of every step, and their
    columns of the input projection, a chunk of ``xw.shape[1]`` steps at a time (each
    thread projects and reads only its own units, so chunks need no barrier), as ``proj``
    (:data:`PROJ_BLAS`...) says. ``PROJ_PANELS`` (one thread): each chunk projected by the
    micro-kernel from ``panels_ih`` (W_ih packed as ``panels``) into ``xw``, in the layout
    of ``a``, before its steps. ``PROJ_FUSED``, a fused loop: each step's inputs
    are projected by the micro-kernel, for the thread's units and rows, into ``xw`` = one
    (1, 1, B, NR U) slot in the layout of ``a`` (no GEMM, no chunks): the first step's
    before the loop, each next step's at the end of the step before, after the thread
    has arrived at the step's barrier and before it waits there (only this thread reads
    and writes its units' or rows' part of the slot). With ``by_rows`` (fused only), the rows
    ``[B tid / nthreads, B (tid + 1) / nthreads)`` instead, every unit of them, and no
    barrier at all: rows never meet (the micro-kernel's sums do not depend on where a
    thread's rows start, :func:`._simd.split_k`, so the bits are the one-thread loop's).
    With ``PROJ_AHEAD`` (one thread), :func:`project_ahead` computes the chunks but the first
    on another core into the ring ``xw`` instead (the first as ``PROJ_PANELS`` does), and
    ``flags`` counts the chunks it and this loop have done (one thread only: the counters
    sit where the split's barrier keeps thread 1's step). ``hs``/``cs``
    are the state buffers of :func:`.numba_cpu._state_buffers` ((2, B, H) ping-pong in
    inference, (T + 1, B, H) in training); ``gates_out`` (and ``hns``) the cache in
    training (unused in inference); ``a`` the shared (B, gates Hp) scratch; ``w_proj``
    W_ih with its rows in the threads' order (:func:`_rows_by_thread`; W_ih itself with one
    thread, or where the micro-kernel projects)."""
    _hotpool.publish(go, gen)   # the pool's jobs start now, this thread off the GIL
    T, B, H = out.shape
    U = panels.shape[0]
    gates = abs(cell)
    PU, Hp, cv = _layout(U, gates)
    S, Tc = xw.shape[0], xw.shape[1]
    fused = proj == PROJ_FUSED
    ahead = proj == PROJ_AHEAD
    # the projections in the layout of ``a`` (gate stride Hp), from the micro-kernel
    xs = Hp if proj != PROJ_BLAS and gates > 1 else 0
    x3 = x2.reshape(T, B, x2.shape[1])
    if by_rows:
        u0, u1, n0, n1 = 0, U, 0, H
        r0, r1 = B * tid // nthreads, B * (tid + 1) // nthreads
    else:
        u0, u1, n0, n1 = _thread_units(U, PU, H, tid, nthreads)
        r0, r1 = 0, B
    r = 1 if reverse else 0
    split = nthreads > 1 and not by_rows          # a barrier per step
    if fused:                                     # the first step's projection
        _recurrent(panels_ih, x3, T - 1 if reverse else 0, xw[0, 0], PU, cv, u0, u1, False,
                   r0, r1)
    c = 0
    for c0 in range(0, T, Tc):
        c1 = min(T, c0 + Tc)
        t0 = T - c1 if reverse else c0        # the chunk's steps cover times [t0, t0 + c1 - c0)
        xc = xw[c % S]
        if ahead and c > 0:
            wait_for(flags, 0, c + 1)
        elif proj == PROJ_PANELS or ahead:    # (ahead: the first chunk, see project_ahead)
            _project_chunk(panels_ih, x2, t0, c1 - c0, B, xc, PU, cv, u0, u1)
        elif not fused:                # (fused: one step a chunk, projected the step before)
            _project(gemm, x2[t0 * B:(t0 + c1 - c0) * B], w_proj,
                     xc.reshape(Tc * B, xw.shape[3])[:(c1 - c0) * B], gates, n0, n1)
        for k in range(c0, c1):
            t = T - 1 - k if reverse else k
            prev, new = _slots(t, k, r, training)
            _recurrent(panels, hs, prev, a, PU, cv, u0, u1, k % 2 == 1, r0, r1)
            if gates == 1:
                _rnn_block(a, xc, t - t0, bias, hs, prev, new, out, t, lengths, n0, n1, r0,
                           r1, cell == RNN_RELU)
            elif gates == 4:
                _lstm_block(a, Hp, xc, t - t0, xs, bias, cs, hs, prev, new, out, t, lengths, n0, n1,
                            r0, r1)
                if training:
                    _lstm_gates(a, Hp, xc, t - t0, xs, bias, t, lengths, n0, n1, r0, r1, gates_out)
            else:
                _gru_block(a, Hp, xc, t - t0, xs, bias, b_hn, hs, prev, new, out, t, lengths, n0,
                           n1, r0, r1)
                if training:
                    _gru_gates(a, Hp, xc, t - t0, xs, bias, b_hn, t, lengths, n0, n1, r0, r1,
                               gates_out, hns)
            if split:                   # this thread's h_t is out: arrive at the barrier
                arrive(flags, tid, k + 1)
            if fused and k + 1 < T:     # the next step's projection, while the others finish
                # (into the one slot: this thread alone reads and writes its units or rows)
                _recurrent(panels_ih, x3, T - 2 - k if reverse else k + 1, xw[0, 0], PU, cv,
                           u0, u1, k % 2 == 0, r0, r1)
            if split:                   # then wait for every thread's
                wait_all(flags, nthreads, k + 1)
        if ahead:
            store_release(flags, FLAG_STRIDE, c + 1)
        c += 1


#: Chunks of a one-thread loop whose projection runs ahead on another core
#: (:func:`_projection`): about this many per call, so that the first, which the loop
#: projects itself before its steps, is short, and at least ``AHEAD_MIN_ROWS`` rows each (the micro-kernel's tiles
#: full). 64 against 16: LSTM 50x16x128x128 1.36 against 1.43 ms (session 13, scratch).
AHEAD_CHUNKS, AHEAD_MIN_ROWS = 64, 8
#: Multiply-adds of the input projection (T B G I) from which it runs ahead: below, the
#: projection saved less than the worker's start and the check for other running threads
#: cost (about 20 us a call; the RNN at 200x1x64x64, 0.8M: 0.81x of the loop projecting
#: its one chunk itself; ``python bench/packed_ab.py --compare ahead``).
AHEAD_MIN_WORK = 2 << 20
#: Slots of the ring the projector fills (it waits for the loop beyond): a few chunks
#: ahead are enough, and the ring stays in the caches.
AHEAD_SLOTS = 4
#: A one-thread loop projects with the micro-kernel (ahead, or a chunk at a time) where
#: its inputs are at most this many times its hidden units (the projection at most that
#: many times the recurrent product's work), or the projection has at most
#: ``PANELS_MAX_WORK`` multiply-adds: then the projector on one core keeps up with the
#: loop, or nearly. Wider inputs are projected by OpenBLAS's GEMM on its threads.
AHEAD_MAX_INPUTS = 2
#: Whether one-thread loops project ahead on another core: None (the default), where
#: :func:`_projection` finds that they can; True, always; False, never (tests, A/B
#: timings: ``python bench/packed_ab.py --compare ahead``).
ahead = None
#: Multiply-adds of the input projection (T B G I) up to which a one-thread loop projects
#: with the micro-kernel whatever its inputs: OpenBLAS's GEMM of a small projection (LSTM
#: 200x1x64x64: 200x64x256) runs far from its peak.
PANELS_MAX_WORK = 4 << 20
#: Whether one-thread loops project with the micro-kernel (:func:`_projection`): None
#: (the default), by the shapes; True, always; False, never (tests, A/B timings).
panel_chunks = None


def _projection(T, B, I, G, gates, training):
    """How a one-thread loop gets its input projection. By the shapes alone (so that the
    bits do not depend on anything else): from the micro-kernel, with W_ih packed as W_hh,
    where the inputs are at most ``AHEAD_MAX_INPUTS`` times the hidden units or the
    projection is small (``PANELS_MAX_WORK``; :data:`panel_chunks` forces it either way),
    else from OpenBLAS's GEMM. From the micro-kernel: ``"ahead"``, a worker computes the
    chunks but the first on another core while the loop runs the steps
    (:func:`project_ahead`), in an
    inference of ``AHEAD_MIN_WORK`` multiply-adds of projection or more, where the BLAS has
    two threads or more (the cores are there), the sequence makes two chunks or more, and
    no other thread runs (:func:`_other_threads_running`: a
    BLAS pool spinning after its last call would share the projector's core); else
    ``"panels"``, the loop computes each chunk before its steps (``PROJ_PANELS``). The two
    give the same bits: the projector's chunks are summed as the loop's (``by_batch``
    False in :func:`_recurrent`). A training forward takes ``"panels"``: its backward runs
    OpenBLAS's GEMMs next, beside the worker still spinning. From the GEMM: ``"blas"``,
    the loop computes each chunk before its steps on the BLAS's threads; ``"alone"``, on
    one, next to a running thread in an inference (so that the BLAS pool falls asleep).
    ``ahead`` True: always ``"ahead"``; False: never."""
    if ahead is True:
        return "ahead"
    H = G // gates
    kernel = panel_chunks if panel_chunks is not None else (
        I <= AHEAD_MAX_INPUTS * H or T * B * G * I <= PANELS_MAX_WORK)
    if kernel:
        if (ahead is None and not training and T * B * G * I >= AHEAD_MIN_WORK
                and _blas_threads() >= 2 and _ahead_chunk(T, B, G) < T
                and not _other_threads_running()):
            return "ahead"
        return "panels"
    if not training and _blas_threads() >= 2 and _other_threads_running():
        return "alone"
    return "blas"


try:
    _sched_getcpu = ctypes.CDLL(None, use_errno=True).sched_getcpu
except (OSError, AttributeError, TypeError):  # not glibc: the threads go where the OS puts them
    _sched_getcpu = None


def _current_cpu():
    """The CPU the calling thread runs on (None where unknown)."""
    if _sched_getcpu is None:
        return None
    cpu = _sched_getcpu()
    return cpu if cpu >= 0 else None


def _chunk_steps(T, B, G):
    """Steps per chunk of input projection: ``CHUNK_FLOATS`` floats (at least one step,
    at most T)."""
    return max(1, min(T, CHUNK_FLOATS // (B * G)))


def _ahead_chunk(T, B, G):
    """Steps per chunk of a loop that projects ahead: about ``T / AHEAD_CHUNKS``, at least
    ``AHEAD_MIN_ROWS`` rows, at most :func:`_chunk_steps`."""
    return min(_chunk_steps(T, B, G), max(-(-AHEAD_MIN_ROWS // B), -(-T // AHEAD_CHUNKS)))


def _run(nthreads, x, w_ih, panels, *args, by_rows=False, panels_ih=None):
    """``cell_thread(gemm, x2, w_proj, panels, *args, xw, a, flags, tid, nthreads,
    proj, by_rows, panels_ih)`` on ``nthreads`` threads, with the chunk and scratch
    buffers. Fused (``panels_ih`` given), the micro-kernel projects each step, split by
    hidden units or (``by_rows``) by batch rows. Otherwise, with
    one thread the projection comes from the micro-kernel a chunk at a time (small ones),
    or runs ahead on another core, or on the BLAS's threads, or on one
    (:func:`_projection`); with more, split by hidden units,
    each thread projects its share with a single-threaded BLAS (an idle BLAS
    pool would spin on the cores the loop needs). A loop that would use the pool while
    another thread's loop has it runs alone (:func:`._hotpool.pooled`). A thread that fails
    releases the others (``RELEASE``) and its error is raised here."""
    T, B, I = x.shape
    if by_rows:
        mode = "rows"
    elif nthreads == 1:
        mode = "fused" if panels_ih is not None else \
            _projection(T, B, I, w_ih.shape[0], abs(args[0]), args[5])
    else:
        mode = "split"
    if mode in ("blas", "alone", "fused", "panels"):
        return _loop(1, mode, x, w_ih, panels, panels_ih, *args)
    alone = "fused" if panels_ih is not None else "panels" if mode == "ahead" else "alone"
    return _hotpool.pooled(                # alone: with the chosen mode's bits
        lambda: _loop(nthreads, mode, x, w_ih, panels, panels_ih, *args),
        lambda: _loop(1, alone, x, w_ih, panels, panels_ih, *args))


def _projection_buffers(nthreads, mode, x, w_ih, panels, panels_ih, gates):
    """``(proj, xw, w_proj, panels_ih)`` of a loop in ``mode`` (:func:`_loop`'s): how its
    input projections come (``PROJ_*``), the buffer they go to, W_ih as the GEMMs read it,
    and W_ih's panels (an empty placeholder where the micro-kernel does not project).
    ``panels_ih`` given: a fused loop, one step's projection in the layout of ``a``."""
    T, B, I = x.shape
    U, _, NR = panels.shape
    G = w_ih.shape[0]
    if panels_ih is not None:
        return PROJ_FUSED, aligned_empty((1, 1, B, NR * U)), w_ih, panels_ih
    if mode in ("panels", "ahead"):   # a chunk (a ring of them, ahead) in the layout of ``a``
        Tc = _ahead_chunk(T, B, G) if mode == "ahead" else _chunk_steps(T, B, G)
        slots = min(-(-T // Tc), AHEAD_SLOTS) if mode == "ahead" else 1
        return (PROJ_AHEAD if mode == "ahead" else PROJ_PANELS,
                aligned_empty((slots, Tc, B, NR * U)), w_ih, packed(w_ih, gates))
    return (PROJ_BLAS,
            _workspace.empty((1, _chunk_steps(T, B, G), B, G), np.float32),
            _rows_by_thread(w_ih, gates, U, _panel_units(gates), nthreads),
            NO_PANELS)


def _loop(nthreads, mode, x, w_ih, panels, panels_ih, *args):
    """:func:`_run`'s loop, in the ``mode`` it chose ("blas", "alone", "ahead", "panels",
    "fused", "split", "rows"; the last two fused where ``panels_ih`` is given)."""
    T, B, I = x.shape
    U, _, NR = panels.shape
    cell, _, _, _, reverse, _ = args[:6]
    proj, xw, w_proj, panels_ih = _projection_buffers(nthreads, mode, x, w_ih, panels,
                                                      panels_ih, abs(cell))
    a = aligned_empty((B, NR * U))
    fl = flags(max(nthreads, 2))
    gemm = gemm_for(x.dtype)
    x2 = x.reshape(T * B, I)
    call = (gemm, x2, w_proj, panels) + args + (xw, a, fl)
    if mode in ("blas", "fused", "panels"):
        cell_thread(*call, 0, 1, proj, False, panels_ih, _hotpool.tickets, 0)
        return
    if mode == "alone":
        with _single_threaded_blas():
            cell_thread(*call, 0, 1, proj, False, panels_ih, _hotpool.tickets, 0)
        return
    if mode == "ahead":
        jobs = [(project_ahead, panels_ih, x2, xw, T, reverse, fl, abs(cell))]
    else:
        jobs = [(cell_thread, *call, tid, nthreads, proj, mode == "rows", panels_ih,
                 _hotpool.tickets, 0) for tid in range(1, nthreads)]

    def here(go, gen):
        cell_thread(*call, 0, nthreads, proj, mode == "rows", panels_ih, go, gen)

    # each thread's GEMMs on one BLAS thread; projections by the micro-kernel (ahead,
    # fused) call no BLAS
    with _single_threaded_blas() if proj == PROJ_BLAS else contextlib.nullcontext():
        with_pool(fl, jobs, here)


def with_pool(counters, jobs, here):
    """``here(go, gen)`` on the calling thread while each ``(fn, *args)`` of ``jobs`` runs on
    a worker of :mod:`._hotpool`, kept off the caller's CPU: the threads of one loop (this
    module's, and :mod:`.packed_bptt`'s). ``here`` passes ``go, gen`` to its compiled loop,
    which publishes them as it starts (:func:`._hotpool.publish`), so that the workers
    start while this thread holds no GIL; they are awake for a moment after their last
    job, so that calls that come back to back pay no thread wake-up (a round trip
    through a ``concurrent.futures`` pool took 47 us). A pool thread woken onto its
    caller's CPU, which the scheduler did after the pool had slept for 0.2 s, shared it
    with the caller for the whole call (GRU 50x16x128x128: 1.8 ms instead of 1.2, every
    call of a timing taken after a pause): hence ``_current_cpu``. If anything fails (a
    job, ``here``), the loop's ``counters`` are set to ``RELEASE``, so that the threads
    waiting on the failed one run out; every job is waited for, and the error raised."""
    def release():
        counters[:] = RELEASE

    _hotpool.run([functools.partial(*job) for job in jobs], here, _current_cpu(), release)


#: Whether fused loops split the batch rows over threads (:func:`cell_thread` with
#: ``by_rows``) rather than the hidden units: None (the default), where :func:`_rows_for`
#: finds that it pays; False, never; True, wherever a fused loop has two threads of
#: ``ROWS_MIN`` rows (tests, A/B timings). Its results are the one-thread loop's, bitwise
#: (``tests/test_packed.py``).
rows = None
#: Rows a thread of the rows split has at least.
ROWS_MIN = 8
#: Multiply-adds a thread of the rows split has at least per step (its rows times
#: ``G (I + H)``): with 8 rows each, the RNN at 50x16x128x128 (262K a thread) ran 0.87x
#: of one thread projecting on the BLAS's two, at 100x32x128x128 (524K) 1.28x.
ROWS_MIN_WORK = 3 << 17
#: Share of a core's L2 cache that the packed weights (W_ih and W_hh) may fill for the
#: rows split: each thread reads all of them at every step (the hidden-unit split reads
#: its share of them), and they must stay in its L2 with the step's rows.
ROWS_L2_SHARE = 0.75


@functools.lru_cache(maxsize=None)
def l2_bytes():
    """The L2 cache of a core, from Linux's sysfs (1 MB where it cannot be read)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(base)):
            with open(f"{base}/{index}/level") as f:
                if f.read().strip() != "2":
                    continue
            with open(f"{base}/{index}/size") as f:
                size = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
            return int(size.rstrip("KMB")) * scale
    except (OSError, ValueError):
        pass
    return 1 << 20


def _rows_fit(x, gates, H):
    """Threads the rows split would have by the shapes alone, or 0: ``ROWS_MIN`` rows and
    ``ROWS_MIN_WORK`` multiply-adds a step a thread for two threads or more, and the
    packed weights within ``ROWS_L2_SHARE`` of a core's L2."""
    T, B, I = x.shape
    n = min(_blas_threads(), B // ROWS_MIN,
            _step_work(x, gates, H) // ROWS_MIN_WORK, POOL_WORKERS + 1)
    G = gates * -(-H // _panel_units(gates)) * _panel_units(gates)
    return n if n >= 2 and 4 * G * (I + H) <= ROWS_L2_SHARE * l2_bytes() else 0


def _rows_for(x, gates, H, fused, fit=None, training=False):
    """Threads of the rows split for this forward, or 0 (no rows split): a fused inference
    whose shapes fit (:func:`_rows_fit`; ``fit``, where the caller has it already) while
    (as for the hidden-unit split) no other thread of the process runs; ``rows`` True: a
    fused loop, training too, with ``ROWS_MIN`` rows a thread for two threads or more,
    whatever else. A training forward is never split by rows otherwise: fused and split
    by rows, LSTM and GRU 50x16x128x128 training ran 0.96x and 0.92x (:func:`_fused_for`)."""
    if rows is False or not fused or (training and not rows):
        return 0
    if rows:
        n = min(_blas_threads(), x.shape[1] // ROWS_MIN, POOL_WORKERS + 1)
        return n if n >= 2 else 0
    n = _rows_fit(x, gates, H) if fit is None else fit
    return n if n and not _other_threads_running() else 0


def run(nthreads, cell, x, w_ih, w_hh, bias, b_hn, lengths, reverse, training, hs, cs, out,
        gates, hns):
    """The forward of ``cell`` (``LSTM``, ``GRU``, ``RNN_TANH``, ``RNN_RELU``) on
    ``nthreads`` threads (:func:`threads_for`), or split by rows (:func:`_rows_for`; an
    inference, or ``rows`` forced, unless ``threads`` forces a split by units), into the
    buffers numba_cpu's forward
    made for its BLAS loops (states, output and, in training, the gate cache it returns):
    the packed loop is the other time loop those forwards choose between, with the same
    arguments but ``W_hh`` (and, fused, ``W_ih``) packed here (see :func:`cell_thread`
    for the unused ones)."""
    n, H = abs(cell), w_hh.shape[1]
    # the rows split's fit by shape, once for both choices where the fused rule asks for it
    fit = _rows_fit(x, n, H) if not training and x.shape[1] >= FUSED_MIN_ROWS else None
    panels_ih = packed(w_ih, n) if _fused_for(x, n, H, training, fit) else None
    by_rows = _rows_for(x, n, H, panels_ih is not None, fit, training) \
        if nthreads == 1 or threads is None else 0
    _run(by_rows or nthreads, x, w_ih, packed(w_hh, n), cell, bias, b_hn, lengths, reverse,
         training, hs, cs, out, gates, hns, by_rows=by_rows > 0, panels_ih=panels_ih)


#: Whether the loops project each step's inputs with the micro-kernel, from W_ih packed
#: as W_hh is (:func:`cell_thread` with ``PROJ_FUSED``), instead of a BLAS GEMM per chunk
#: of steps: None (the default), a forward of ``FUSED_MIN_ROWS`` batch rows whose
#: shapes make it split (:func:`_fused_for`), unless ``ahead`` is True; True, always;
#: False, never. The choice depends on the shapes, the mode and the BLAS's thread count
#: alone, never on the threads a call gets or on other running threads, so that the bits
#: do not either.
fused = None
#: Batch rows from which the loops are fused: the micro-kernel's tiles are full there.
FUSED_MIN_ROWS = 16


def _splits_by_units(x, gates, H):
    """Whether the step is big enough for the hidden-unit split: ``MIN_SPLIT_STEP_WORK``
    multiply-adds of recurrent product (B G H)."""
    return x.shape[1] * gates * H * H >= MIN_SPLIT_STEP_WORK


def _step_work(x, gates, H):
    """Multiply-adds of one step of this forward: B G (I + H)."""
    T, B, I = x.shape
    return B * gates * H * (I + H)


def _fused_for(x, gates, H, training, fit=None):
    """Whether this forward's loop is fused (:data:`fused`): a forward with
    ``FUSED_MIN_ROWS`` rows whose shapes split it by hidden units (``MIN_SPLIT_STEP_WORK``),
    or an inference that splits by rows (:func:`_rows_fit`; ``fit``, where the caller has
    it already) or has a one-thread BLAS, unless ``ahead`` is True.
    A fused loop projects on its own threads: on one thread where the BLAS has two it
    gained nothing against one thread projecting on the BLAS's threads (the RNN at
    50x16x128x128, where neither split applies: 0.92x fused in the first A/B, 1.02x at the
    end; ``python bench/packed_ab.py --compare fused``). Next to another running thread the splits give
    way (:func:`threads_for`, :func:`_rows_for`) and a fused loop projects on one core,
    as an unfused inference does there (``"alone"``, :func:`_projection`). A training
    forward is fused where the hidden-unit split applies (the BLAS having two threads or
    more), and neither split by rows (:func:`_rows_for`) nor fused otherwise: fused and split by
    rows, LSTM and GRU 50x16x128x128 ran 0.96x and 0.92x, where fused at 100x64x256x256
    they ran 1.06x and 1.10x (session 10, ``python bench/packed_ab.py --mode training
    --compare HEAD`` on working trees with the rule edited, not kept as commits; with the
    buffers of
    :mod:`._workspace`; before that pool, a fused training forward's large blocks left
    glibc's threshold for mapping fresh pages lower, and the step then ran 0.82x at
    50x16x128x128)."""
    if fused is not None:
        return fused
    if ahead is True or x.shape[1] < FUSED_MIN_ROWS:
        return False
    if training:
        return _splits_by_units(x, gates, H) and _blas_threads() > 1
    return (_splits_by_units(x, gates, H) or (_rows_fit(x, gates, H) if fit is None else fit) > 0
            or _blas_threads() <= 1)
