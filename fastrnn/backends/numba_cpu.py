"""The Numba CPU backend: fused forward and BPTT kernels.

Same contract as :mod:`fastrnn.backends` (notation ``T, B, I, H, G``, the
masking rule, the ``T + 1`` state buffers). Per layer and direction:

* forward: one GEMM for the input projection of every step, then one
  compiled time loop: per step the recurrent GEMM (BLAS through
  NumPy's CBLAS, see :mod:`._cblas`) and one fused pointwise pass that applies the gates, updates
  the state, masks by ``lengths`` and writes the cache. Nothing allocates
  inside the loop.
* backward: one compiled time loop (per step a fused pointwise pass and the
  recurrent GEMM), then whole-sequence GEMMs for ``d_x``, ``d_w_ih`` and
  ``d_w_hh``.

float32 activations use the vectorizable approximations of
:mod:`._numba_math` (error below 8 ulp); float64 uses libm.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import os
import threading

import numba
import numpy as np

from .._immutable import immutable_copy
from . import CELLS, KERNEL_OPTIONS, _workspace, gate_count, state_count
from ._cblas import (NO_TRANS, SGEMM, TRANS, blas_get_threads, blas_set_threads, gemm_call_ilp64,
                     gemm_call_lp64, gemm_for)
from ._numba_math import FASTMATH, sigmoid, tanh
from ._simd import wide_vectors

xp = np

_jit = functools.partial(numba.njit, fastmath=FASTMATH, cache=True, nogil=True,
                         error_model="numpy")


def unavailable_reason():
    # numba itself is a dependency: without it this module fails to import, and the
    # registry reports the ImportError.
    if SGEMM is None:
        return "no CBLAS sgemm/dgemm found in NumPy's or SciPy's BLAS"
    return None


# ----------------------------------------------------------------- helpers

def _full_lengths(lengths, T, B):
    if lengths is None:
        full = np.empty(B, dtype=np.int64)      # (np.full: 0.8 us, twice this)
        full.fill(T)
        return full
    return lengths.astype(np.int64, copy=False)


@_jit
def _mm(gemm, a, trans_a, b, trans_b, out, beta):
    """out = op(a) @ op(b) + beta * out through NumPy's CBLAS (see :mod:`._cblas`).

    ``op`` transposes when its flag is set. Rows must be contiguous; any row
    stride is allowed, so column blocks of a wider array need no copy.
    """
    M, N = out.shape
    K = a.shape[0] if trans_a else a.shape[1]
    if M == 0 or N == 0:
        return
    if K == 0:
        for i in range(M):
            for j in range(N):
                out[i, j] = out[i, j] * beta if beta != 0 else 0
        return
    if M <= _SMALL or K <= _SMALL:
        _mm_small(a, trans_a, b, trans_b, out, beta)
        return
    size = a.itemsize
    lda = max(a.strides[0] // size, a.shape[1], 1)
    ldb = max(b.strides[0] // size, b.shape[1], 1)
    ldc = max(out.strides[0] // size, N, 1)
    addr, ilp64 = gemm
    op_a = TRANS if trans_a else NO_TRANS
    op_b = TRANS if trans_b else NO_TRANS
    if ilp64:
        gemm_call_ilp64(addr, out, op_a, op_b, M, N, K, 1.0, a.ctypes.data, lda,
                        b.ctypes.data, ldb, beta, out.ctypes.data, ldc)
    else:
        gemm_call_lp64(addr, out, op_a, op_b, M, N, K, 1.0, a.ctypes.data, lda,
                       b.ctypes.data, ldb, beta, out.ctypes.data, ldc)


#: With this few rows (batch size, or T*B for the whole-sequence products) or
#: this short an inner dimension, a compiled loop beats the BLAS call, whose
#: overhead dominates a matrix-vector or outer product.
_SMALL = 2
#: Transposing W_hh once (a copy of G * H values) pays off from this many steps: with
#: the small-row loop (B <= _SMALL), and from fewer with OpenBLAS, whose per-step
#: product h @ W^T runs 1.2-3.5x faster single-threaded from W^T stored row-major than
#: from W (`python bench/row_split.py`, "per-step GEMM").
_TRANSPOSE_FROM_T = 16
_TRANSPOSE_FROM_T_BLAS = 4


@_jit
def _mm_small(a, trans_a, b, trans_b, out, beta):
    """out = op(a) @ op(b) + beta * out as plain loops, contiguous innermost."""
    M, N = out.shape
    K = a.shape[0] if trans_a else a.shape[1]
    for i in range(M):
        for j in range(N):
            out[i, j] = out[i, j] * beta if beta != 0 else 0
    if trans_b:          # out[i, j] += sum_k op(a)[i, k] * b[j, k]
        for i in range(M):
            for j in range(N):
                acc = out[i, j]
                for k in range(K):
                    acc += (a[k, i] if trans_a else a[i, k]) * b[j, k]
                out[i, j] = acc
    else:                # out[i, :] += op(a)[i, k] * b[k, :], eight k at a time: one
        # load and store of out[i, :] per eight rows of b (1.6-3x faster at one row)
        for i in range(M):
            o = out[i]
            k = 0
            while k + 8 <= K:
                a0, a1, a2, a3 = _at(a, trans_a, i, k), _at(a, trans_a, i, k + 1), \
                    _at(a, trans_a, i, k + 2), _at(a, trans_a, i, k + 3)
                a4, a5, a6, a7 = _at(a, trans_a, i, k + 4), _at(a, trans_a, i, k + 5), \
                    _at(a, trans_a, i, k + 6), _at(a, trans_a, i, k + 7)
                b0, b1, b2, b3, b4, b5, b6, b7 = b[k], b[k + 1], b[k + 2], b[k + 3], \
                    b[k + 4], b[k + 5], b[k + 6], b[k + 7]
                for j in range(N):
                    o[j] += (a0 * b0[j] + a1 * b1[j] + a2 * b2[j] + a3 * b3[j]) + \
                        (a4 * b4[j] + a5 * b5[j] + a6 * b6[j] + a7 * b7[j])
                k += 8
            while k < K:
                aik = _at(a, trans_a, i, k)
                bk = b[k]
                for j in range(N):
                    o[j] += aik * bk[j]
                k += 1


@_jit
def _at(a, trans_a, i, k):
    """op(a)[i, k]."""
    return a[k, i] if trans_a else a[i, k]


def _recurrent_weight(w, B, T):
    """(w, transpose flag) for the per-step product h @ w^T. Both the small-row loop
    and OpenBLAS read w^T fastest in rows, so for long enough sequences it is
    transposed once."""
    if T >= (_TRANSPOSE_FROM_T if B <= _SMALL else _TRANSPOSE_FROM_T_BLAS):
        return np.ascontiguousarray(w.T), False
    return w, True


def _project(x, w_ih):
    """x W_ih^T for every step: one GEMM, (T, B, G). The time loops add the biases.

    ``x`` and ``w_ih`` must have contiguous rows: the kernel wrappers pass
    them through :func:`_c`."""
    T, B, I = x.shape
    xw = _workspace.empty((T, B, w_ih.shape[0]), dtype=x.dtype)
    _mm(gemm_for(x.dtype), x.reshape(T * B, I), False, w_ih, True, xw.reshape(T * B, -1), 0.0)
    return xw


def _c(*arrays):
    """C-contiguous versions (no copy when they already are): the GEMMs and the
    compiled loops index rows as contiguous memory."""
    return tuple(np.ascontiguousarray(a) for a in arrays)


def _bias(b_ih, b_hh, G, dtype):
    """b_ih + b_hh, or zeros without biases: added inside the fused pointwise pass."""
    return np.zeros(G, dtype) if b_ih is None else b_ih + b_hh


def _state_buffers(T, B, H, dtype, training, reverse, *inits):
    """(T+1, B, H) buffers in training (time order, offset r), (2, B, H) ping-pong else
    (each as wide as its initial state: the LSTM's projected h is narrower than c)."""
    bufs = []
    for init in inits:
        buf = _workspace.empty((T + 1 if training else 2, B, init.shape[-1]), dtype=dtype)
        buf[int(reverse) * T if training else 0] = init
        bufs.append(buf)
    return bufs


def _final(buf, T, training, reverse):
    return buf[(1 - int(reverse)) * T if training else T % 2].copy()


@_jit
def _column_sums(a, out):
    for j in range(out.shape[0]):
        out[j] = 0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[j] += a[i, j]


@_jit
def _bias_grads(d_a_x, d_a_h, d_b_ih, d_b_hh):
    """The biases' gradients, the column sums of the gates' gradients by the input and by
    the recurrent products: one pass where both are the same memory with the same layout
    (the LSTM, the RNN and the reset-before GRU; the reset-after GRU's differ in the n
    gate), copied to the other bias. A pass took 2.4 ms over one thread's 6400x1024 block
    of the LSTM's at 100x64x512x512 (a scratch timing, session 11)."""
    _column_sums(d_a_x, d_b_ih)
    if (d_a_h.ctypes.data == d_a_x.ctypes.data and d_a_h.shape == d_a_x.shape
            and d_a_h.strides == d_a_x.strides):
        d_b_hh[:] = d_b_ih
    else:
        _column_sums(d_a_h, d_b_hh)


@_jit
def _param_grads_kernel(gemm, d_a_x, d_a_h, x, h_prev, w_ih, d_x, d_w_ih, d_w_hh, d_b_ih,
                        d_b_hh, has_bias, rows_hh):
    _mm(gemm, d_a_x, False, w_ih, False, d_x, 0.0)
    _mm(gemm, d_a_x, True, x, False, d_w_ih, 0.0)
    _mm(gemm, d_a_h[:, :rows_hh], True, h_prev, False, d_w_hh[:rows_hh], 0.0)
    if has_bias:
        _bias_grads(d_a_x, d_a_h, d_b_ih, d_b_hh)


def _param_grads(d_a_x, d_a_h, x, h_prev, w_ih, has_bias, rows_hh=None):
    """Whole-sequence GEMMs: d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh (see reference).

    One compiled call: at T = 1 (cells) the per-call overhead is what counts.
    Only the first ``rows_hh`` rows of ``d_w_hh`` are formed (all by default):
    the reset-before GRU's n rows see ``r * h``, not ``h``, and are its caller's.
    """
    T, B, I = x.shape
    G, H = d_a_x.shape[2], h_prev.shape[2]
    dtype = x.dtype
    d_x = _workspace.empty((T, B, I), dtype)
    d_w_ih, d_w_hh = np.empty((G, I), dtype), np.empty((G, H), dtype)
    d_b_ih, d_b_hh = np.empty(G if has_bias else 0, dtype), np.empty(G if has_bias else 0, dtype)
    _param_grads_kernel(gemm_for(dtype), d_a_x.reshape(T * B, G), d_a_h.reshape(T * B, G),
                        x.reshape(T * B, I), h_prev.reshape(T * B, H), w_ih,
                        d_x.reshape(T * B, I), d_w_ih, d_w_hh, d_b_ih, d_b_hh, has_bias,
                        G if rows_hh is None else rows_hh)
    if not has_bias:
        return d_x, d_w_ih, d_w_hh, None, None
    return d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh


# -------------------------------------------------- threads over batch rows

# Batch rows are independent in a time loop, forward and backward: split across
# T threads, each runs the whole loop over its own rows, with single-threaded
# GEMMs, and nothing meets until the end. One multi-threaded GEMM per step
# instead makes the threads meet twice per step and runs the fused pointwise
# pass on one core. The loops release the GIL (nogil), so plain Python threads
# run them in parallel.

#: Rows per thread below which a loop is not split.
MIN_ROWS_PER_THREAD = 4
#: Multiply-adds of the recurrent GEMMs (T * B * G * H) below which a loop is
#: not split: handing work to a thread costs tens of microseconds.
MIN_SPLIT_WORK = 1 << 21
#: Threads a loop may use: 1 (the default) runs every loop on the calling thread
#: with OpenBLAS's own threads inside each GEMM; None means the BLAS's thread count.
#: The split measured slower at every point of the benchmark grid on this
#: project's 2-core machine (docs/numba.md): single-threaded OpenBLAS GEMMs with
#: few rows spend most of their time packing W_hh, and each thread packs it anew.
row_threads = 1

_pool = None
_pool_lock = threading.Lock()
_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved = None


def _threads_for(B, work):
    if blas_set_threads is None:       # another BLAS: its threads cannot be set to 1
        return 1
    threads = row_threads if row_threads is not None else \
        (_blas_saved if _blas_users else blas_get_threads())
    return max(1, min(threads, B // MIN_ROWS_PER_THREAD, 1 if work < MIN_SPLIT_WORK else B))


@contextlib.contextmanager
def _single_threaded_blas():
    """OpenBLAS single-threaded while split loops run (process-wide: its thread count
    is one global), restored when the last of them ends."""
    global _blas_users, _blas_saved
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved = blas_get_threads()
            blas_set_threads(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                blas_set_threads(_blas_saved)


def _executor():
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="fastrnn")
        return _pool


def _over_rows(loop, B, work, *args):
    """Run ``loop(*args, b0, b1)`` over the batch rows [0, B), split over threads."""
    P = _threads_for(B, work)
    if P == 1:
        loop(*args, 0, B)
        return
    bounds = [B * i // P for i in range(P + 1)]
    with _single_threaded_blas():
        pool = _executor()
        futures = [pool.submit(loop, *args, bounds[i], bounds[i + 1]) for i in range(1, P)]
        try:
            loop(*args, 0, bounds[1])
        finally:
            for f in futures:
                f.result()


# Index of the state before / after step t (k-th step processed): time order with
# offset r in training, ping-pong in inference.
@_jit
def _slots(t, k, r, training):
    if training:
        return t + r, t + 1 - r
    return k & 1, (k + 1) & 1


# Row helpers of the fused passes (1-D slices: contiguous, vectorizable).

@_jit
def _copy_row(src, dst):
    for j in range(src.shape[0]):
        dst[j] = src[j]


@_jit
def _carry_row(h_prev, h_new, out_row):
    """An inactive step: the state is carried, the output is 0."""
    for j in range(h_prev.shape[0]):
        h_new[j] = h_prev[j]
        out_row[j] = 0


@_jit
def _zero_row(row):
    for j in range(row.shape[0]):
        row[j] = 0


@_jit
def _add_row(src, dst):
    for j in range(src.shape[0]):
        dst[j] += src[j]


# ------------------------------------------------------------- vanilla RNN

@_jit
def _rnn_forward_loop(gemm, xw, bias, w_hh, trans_w, lengths, reverse, training, relu, hs, out,
                      b0, b1):
    wide_vectors()
    T, B, H = xw.shape
    r = 1 if reverse else 0
    a = np.empty((B, H), dtype=xw.dtype)
    for k in range(T):
        t = T - 1 - k if reverse else k
        prev, new = _slots(t, k, r, training)
        h_prev, h_new = hs[prev], hs[new]
        _mm(gemm, h_prev[b0:b1], False, w_hh, trans_w, a[b0:b1], 0.0)
        for b in range(b0, b1):
            if t < lengths[b]:
                for j in range(H):
                    v = a[b, j] + xw[t, b, j] + bias[j]
                    hv = (v if not v <= 0 else 0.0) if relu else tanh(v)  # NaN stays NaN
                    h_new[b, j] = hv
                    out[t, b, j] = hv
            else:
                _carry_row(h_prev[b], h_new[b], out[t, b])


@_jit
def _rnn_backward_loop(gemm, d_out, d_h, w_hh, lengths, reverse, relu, hs, d_a, b0, b1):
    wide_vectors()
    T, B, H = d_out.shape
    r = 1 if reverse else 0
    tmp = np.empty((B, H), dtype=d_out.dtype)
    for k in range(T):
        t = k if reverse else T - 1 - k
        h_new = hs[t + 1 - r]
        for b in range(b0, b1):
            if t < lengths[b]:
                for j in range(H):
                    dh = d_out[t, b, j] + d_h[b, j]
                    hv = h_new[b, j]
                    if relu:
                        d_a[t, b, j] = dh if hv > 0 else 0.0
                    else:
                        d_a[t, b, j] = dh * (1 - hv * hv)
            else:
                _zero_row(d_a[t, b])
        _mm(gemm, d_a[t][b0:b1], False, w_hh, False, tmp[b0:b1], 0.0)
        for b in range(b0, b1):
            if t < lengths[b]:
                _copy_row(tmp[b], d_h[b])


def _rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training, relu):
    x, w_ih, w_hh = _c(x, w_ih, w_hh)
    T, B, _ = x.shape
    H = h0.shape[1]
    bias = _bias(b_ih, b_hh, w_ih.shape[0], x.dtype)
    (hs,) = _state_buffers(T, B, H, x.dtype, training, reverse, h0)
    out = _workspace.empty((T, B, H), dtype=x.dtype)
    full = _full_lengths(lengths, T, B)
    nthreads = packed_numba.threads_for(x, 1, H)
    if nthreads:
        unused = np.empty((0, 0, 0), dtype=x.dtype)
        packed_numba.run(nthreads, packed_numba.RNN_RELU if relu else packed_numba.RNN_TANH,
                         x, w_ih, w_hh, bias, bias, full, reverse, training, hs, hs, out,
                         unused, unused)
    else:
        _over_rows(_rnn_forward_loop, B, T * B * H * H,
                   gemm_for(x.dtype), _project(x, w_ih), bias, *_recurrent_weight(w_hh, B, T),
                   full, reverse, training, relu, hs, out)
    cache = None
    if training:
        cache = (x, hs, w_ih, w_hh, b_ih is not None, full, reverse, relu)
    return out, _final(hs, T, training, reverse), cache


def _rnn_backward(d_out, d_h_n, cache):
    if type(cache) is zoneout_numba.Cache:
        return zoneout_numba.rnn_backward(d_out, d_h_n, cache)
    x, hs, w_ih, w_hh, has_bias, full, reverse, relu = cache
    T, B, _ = x.shape
    r = int(reverse)
    d_a = _workspace.empty((T, B, w_hh.shape[0]), dtype=x.dtype)
    nthreads = packed_bptt.threads_for(x, 1, w_hh.shape[1])
    if nthreads:
        grads = packed_bptt.run(nthreads, packed_numba.RNN_RELU if relu else
                                packed_numba.RNN_TANH, x, w_ih, w_hh, has_bias,
                                np.ascontiguousarray(d_out), d_h_n, None, full, reverse, hs, hs,
                                hs, hs, d_a, d_a)
        return grads[:2] + grads[3:]
    d_h = d_h_n.astype(x.dtype, copy=True)
    _over_rows(_rnn_backward_loop, B, T * B * w_hh.size,
               gemm_for(x.dtype), np.ascontiguousarray(d_out), d_h, w_hh, full, reverse,
               relu, hs, d_a)
    grads = _param_grads(d_a, d_a, x, hs[r:T + r], w_ih, has_bias)
    return (grads[0], d_h) + grads[1:]


def rnn_tanh_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True,
                     zoneout_h=None):
    """Elman RNN, tanh: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh); zoneout
    by :mod:`.zoneout_numba`."""
    if zoneout_h is not None:
        return zoneout_numba.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                                         training, False, zoneout_h)
    return _rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training, False)


def rnn_relu_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True,
                     zoneout_h=None):
    """Elman RNN, ReLU: h_t = max(0, W_ih x_t + b_ih + W_hh h_{t-1} + b_hh); zoneout
    by :mod:`.zoneout_numba`."""
    if zoneout_h is not None:
        return zoneout_numba.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                                         training, True, zoneout_h)
    return _rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training, True)


rnn_tanh_backward = rnn_relu_backward = _rnn_backward


# -------------------------------------------------------------------- LSTM

# The fused pointwise passes work on one batch row at a time, on 1-D slices,
# and store to as few arrays as possible: every extra output array adds
# run-time alias checks, and past a handful LLVM stops vectorizing the loop
# (`python bench/micro.py`: 4 ns per LSTM element vectorized, 19 ns scalar).

@_jit
def _lstm_row(a, x, bias, c_prev, c_new, h_new, H):
    """One row: pre-activations a (4H,) in, gates after activation back into a
    (in training ``a`` is the cache row; in inference, scratch), new c and h out."""
    wide_vectors()
    for j in range(H):
        i = sigmoid(a[j] + x[j] + bias[j])
        f = sigmoid(a[H + j] + x[H + j] + bias[H + j])
        g = tanh(a[2 * H + j] + x[2 * H + j] + bias[2 * H + j])
        o = sigmoid(a[3 * H + j] + x[3 * H + j] + bias[3 * H + j])
        c = f * c_prev[j] + i * g
        c_new[j] = c
        h_new[j] = o * tanh(c)
        a[j] = i
        a[H + j] = f
        a[2 * H + j] = g
        a[3 * H + j] = o


@_jit
def _lstm_infer_block(a, x, bias, c_prev, c_new, h_new, out, b0, b1):
    """Inference, every row of [b0, b1) active: one pass over the block, nothing
    stored but the states and the output. Twice as fast as the row pass at H = 32
    (1.3x at H = 512): no call and no alias checks per row, no gates written back."""
    wide_vectors()
    H = c_prev.shape[1]
    for b in range(b0, b1):
        for j in range(H):
            i = sigmoid(a[b, j] + x[b, j] + bias[j])
            f = sigmoid(a[b, H + j] + x[b, H + j] + bias[H + j])
            g = tanh(a[b, 2 * H + j] + x[b, 2 * H + j] + bias[2 * H + j])
            o = sigmoid(a[b, 3 * H + j] + x[b, 3 * H + j] + bias[3 * H + j])
            c = f * c_prev[b, j] + i * g
            c_new[b, j] = c
            hv = o * tanh(c)
            h_new[b, j] = hv
            out[b, j] = hv


@_jit
def _lstm_train_block(a, x, bias, c_prev, c_new, h_new, out, gates, b0, b1):
    """Training, every row of [b0, b1) active: as _lstm_infer_block, the gates after
    activation stored into ``gates`` (this step's cache rows, not ``a``)."""
    wide_vectors()
    H = c_prev.shape[1]
    for b in range(b0, b1):
        for j in range(H):
            i = sigmoid(a[b, j] + x[b, j] + bias[j])
            f = sigmoid(a[b, H + j] + x[b, H + j] + bias[H + j])
            g = tanh(a[b, 2 * H + j] + x[b, 2 * H + j] + bias[2 * H + j])
            o = sigmoid(a[b, 3 * H + j] + x[b, 3 * H + j] + bias[3 * H + j])
            c = f * c_prev[b, j] + i * g
            c_new[b, j] = c
            hv = o * tanh(c)
            h_new[b, j] = hv
            out[b, j] = hv
            gates[b, j] = i
            gates[b, H + j] = f
            gates[b, 2 * H + j] = g
            gates[b, 3 * H + j] = o


@_jit
def _min_length(lengths, b0, b1):
    low = lengths[b0] if b1 > b0 else 0
    for b in range(b0, b1):
        low = min(low, lengths[b])
    return low


@_jit
def _lstm_forward_loop(gemm, xw, bias, w_hh, trans_w, lengths, reverse, training, hs, cs, out,
                       gates, b0, b1):
    T, B, G = xw.shape
    H = G // 4
    r = 1 if reverse else 0
    scratch = np.empty((B, G), dtype=xw.dtype)
    all_active = _min_length(lengths, b0, b1)   # steps t < this have every row active
    for k in range(T):
        t = T - 1 - k if reverse else k
        prev, new = _slots(t, k, r, training)
        h_prev, c_prev, h_new, c_new = hs[prev], cs[prev], hs[new], cs[new]
        if t < all_active:
            _mm(gemm, h_prev[b0:b1], False, w_hh, trans_w, scratch[b0:b1], 0.0)
            if training:
                _lstm_train_block(scratch, xw[t], bias, c_prev, c_new, h_new, out[t], gates[t],
                                  b0, b1)
            else:
                _lstm_infer_block(scratch, xw[t], bias, c_prev, c_new, h_new, out[t], b0, b1)
            continue
        # In training the recurrent GEMM writes straight into this step's cache rows.
        a = gates[t] if training else scratch
        _mm(gemm, h_prev[b0:b1], False, w_hh, trans_w, a[b0:b1], 0.0)
        for b in range(b0, b1):
            if t < lengths[b]:
                _lstm_row(a[b], xw[t, b], bias, c_prev[b], c_new[b], h_new[b], H)
                _copy_row(h_new[b], out[t, b])
            else:
                _carry_row(h_prev[b], h_new[b], out[t, b])
                _copy_row(c_prev[b], c_new[b])


@_jit
def _lstm_backward_row(g, c_prev, c_new, d_out, d_h, d_c, d_a, H):
    """One row, a pass per stored array (see _lstm_backward_block)."""
    wide_vectors()
    for j in range(H):
        o = g[3 * H + j]
        tc = tanh(c_new[j])   # tanh of a cached state, cheaper to redo than to store
        d_a[3 * H + j] = (d_out[j] + d_h[j]) * tc * o * (1 - o)
    for j in range(H):        # d_c holds dc, the gradient before the forget gate
        tc = tanh(c_new[j])
        d_c[j] = d_c[j] + (d_out[j] + d_h[j]) * g[3 * H + j] * (1 - tc * tc)
    for j in range(H):
        i = g[j]
        d_a[j] = d_c[j] * g[2 * H + j] * i * (1 - i)
    for j in range(H):
        f = g[H + j]
        d_a[H + j] = d_c[j] * c_prev[j] * f * (1 - f)
    for j in range(H):
        gg = g[2 * H + j]
        d_a[2 * H + j] = d_c[j] * g[j] * (1 - gg * gg)
    for j in range(H):
        d_c[j] = d_c[j] * g[H + j]


# The backward passes store one array each. As one fused pass (d_a's four gates and d_c),
# LLVM left the LSTM's scalar: 8.8 ns per unit at B = 64, H = 512, against 2.35 for these
# passes (GRU: 4.2 against 1.4; scratch probes on cache-resident rows; end to end 1.06-1.10x
# on small training steps, docs/numba.md). The forward's passes had the same cause
# (docs/numba.md). d_c first becomes dc, the gradient before the forget gate, in place,
# so that the gate passes read it from there rather than from d_a at another offset
# (which stayed scalar too).

@_jit
def _lstm_backward_block(g, c_prev, c_new, d_out, d_h, d_c, d_a, b0, b1):
    """_lstm_backward_row over every row of [b0, b1), all active."""
    wide_vectors()
    H = c_prev.shape[1]
    for b in range(b0, b1):
        for j in range(H):
            o = g[b, 3 * H + j]
            d_a[b, 3 * H + j] = (d_out[b, j] + d_h[b, j]) * tanh(c_new[b, j]) * o * (1 - o)
        for j in range(H):
            tc = tanh(c_new[b, j])
            d_c[b, j] = d_c[b, j] + (d_out[b, j] + d_h[b, j]) * g[b, 3 * H + j] * (1 - tc * tc)
        for j in range(H):
            i = g[b, j]
            d_a[b, j] = d_c[b, j] * g[b, 2 * H + j] * i * (1 - i)
        for j in range(H):
            f = g[b, H + j]
            d_a[b, H + j] = d_c[b, j] * c_prev[b, j] * f * (1 - f)
        for j in range(H):
            gg = g[b, 2 * H + j]
            d_a[b, 2 * H + j] = d_c[b, j] * g[b, j] * (1 - gg * gg)
        for j in range(H):
            d_c[b, j] = d_c[b, j] * g[b, H + j]


@_jit
def _lstm_backward_loop(gemm, d_out, d_h, d_c, w_hh, lengths, reverse, cs, gates, d_a, b0, b1):
    T, B, H = d_out.shape
    r = 1 if reverse else 0
    tmp = np.empty((B, H), dtype=d_out.dtype)
    all_active = _min_length(lengths, b0, b1)
    for k in range(T):
        t = k if reverse else T - 1 - k
        c_prev, c_new = cs[t + r], cs[t + 1 - r]
        if t < all_active:
            _lstm_backward_block(gates[t], c_prev, c_new, d_out[t], d_h, d_c, d_a[t], b0, b1)
            # every row active: the GEMM writes the new d_h in place (read above)
            _mm(gemm, d_a[t][b0:b1], False, w_hh, False, d_h[b0:b1], 0.0)
            continue
        for b in range(b0, b1):
            if t < lengths[b]:
                _lstm_backward_row(gates[t, b], c_prev[b], c_new[b], d_out[t, b], d_h[b], d_c[b],
                                   d_a[t, b], H)
            else:
                _zero_row(d_a[t, b])
        _mm(gemm, d_a[t][b0:b1], False, w_hh, False, tmp[b0:b1], 0.0)
        for b in range(b0, b1):
            if t < lengths[b]:
                _copy_row(tmp[b], d_h[b])


@_jit
def _lstmp_forward_loop(gemm, xw, bias, w_hh, trans_w, w_hr, trans_r, lengths, reverse,
                        training, hs, cs, out, gates, ms, b0, b1):
    """With the projection (proj_size): per step the recurrent GEMM, the fused row
    pass into m = o * tanh(c), then h = m W_hr^T, a second GEMM."""
    T, B, G = xw.shape
    H = G // 4
    r = 1 if reverse else 0
    scratch = np.empty((B, G), dtype=xw.dtype)
    m_scratch = np.empty((B, H), dtype=xw.dtype)
    for k in range(T):
        t = T - 1 - k if reverse else k
        prev, new = _slots(t, k, r, training)
        h_prev, c_prev, h_new, c_new = hs[prev], cs[prev], hs[new], cs[new]
        a = gates[t] if training else scratch
        m = ms[t] if training else m_scratch
        _mm(gemm, h_prev[b0:b1], False, w_hh, trans_w, a[b0:b1], 0.0)
        for b in range(b0, b1):
            if t < lengths[b]:
                _lstm_row(a[b], xw[t, b], bias, c_prev[b], c_new[b], m[b], H)
            else:
                _copy_row(c_prev[b], c_new[b])
                _zero_row(m[b])
        _mm(gemm, m[b0:b1], False, w_hr, trans_r, h_new[b0:b1], 0.0)
        for b in range(b0, b1):
            if t < lengths[b]:
                _copy_row(h_new[b], out[t, b])
            else:
                _carry_row(h_prev[b], h_new[b], out[t, b])


@_jit
def _lstmp_backward_loop(gemm, d_out, d_h, d_c, w_hh, w_hr, lengths, reverse, cs, gates, d_a,
                         d_hp, b0, b1):
    """Backward of the projected LSTM: d_hp[t] = dL/dh_t (kept for d_w_hr), the
    gradient of m is d_hp[t] W_hr, then the LSTM row pass and the recurrent GEMM."""
    T, B, P = d_out.shape
    H = cs.shape[2]
    r = 1 if reverse else 0
    tmp = np.empty((B, P), dtype=d_out.dtype)
    d_m = np.empty((B, H), dtype=d_out.dtype)
    zeros = np.zeros(H, dtype=d_out.dtype)
    for k in range(T):
        t = k if reverse else T - 1 - k
        c_prev, c_new = cs[t + r], cs[t + 1 - r]
        for b in range(b0, b1):
            if t < lengths[b]:
                for j in range(P):
                    d_hp[t, b, j] = d_out[t, b, j] + d_h[b, j]
            else:
                _zero_row(d_hp[t, b])
        _mm(gemm, d_hp[t][b0:b1], False, w_hr, False, d_m[b0:b1], 0.0)
        for b in range(b0, b1):
            if t < lengths[b]:
                _lstm_backward_row(gates[t, b], c_prev[b], c_new[b], d_m[b], zeros, d_c[b],
                                   d_a[t, b], H)
            else:
                _zero_row(d_a[t, b])
        _mm(gemm, d_a[t][b0:b1], False, w_hh, False, tmp[b0:b1], 0.0)
        for b in range(b0, b1):
            if t < lengths[b]:
                _copy_row(tmp[b], d_h[b])


def lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True,
                 w_hr=None, zoneout_h=None, zoneout_c=None):
    """LSTM (gates i, f, g, o), with ``w_hr`` the projected LSTM: see
    :func:`fastrnn.backends.reference.lstm_forward`; zoneout by :mod:`.zoneout_numba`
    (not with ``w_hr``)."""
    if zoneout_h is not None or zoneout_c is not None:
        if w_hr is not None:
            raise NotImplementedError("zoneout together with w_hr (proj_size): the numba "
                                      "backend has no kernels for both; use backend='numpy'")
        return zoneout_numba.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                                          training, zoneout_h, zoneout_c)
    x, w_ih, w_hh = _c(x, w_ih, w_hh)
    T, B, _ = x.shape
    H = c0.shape[1]
    bias = _bias(b_ih, b_hh, w_ih.shape[0], x.dtype)
    hs, cs = _state_buffers(T, B, H, x.dtype, training, reverse, h0, c0)
    out = _workspace.empty((T, B, h0.shape[1]), dtype=x.dtype)
    gates = _workspace.empty((T, B, 4 * H) if training else (0, 0, 0), dtype=x.dtype)
    full = _full_lengths(lengths, T, B)
    ms = None
    nthreads = packed_numba.threads_for(x, 4, H) if w_hr is None else 0
    if nthreads:
        packed_numba.run(nthreads, packed_numba.LSTM, x, w_ih, w_hh, bias, bias, full, reverse,
                         training, hs, cs, out, gates, gates)
    elif w_hr is None:
        _over_rows(_lstm_forward_loop, B, T * B * w_hh.size,
                   gemm_for(x.dtype), _project(x, w_ih), bias, *_recurrent_weight(w_hh, B, T),
                   full, reverse, training, hs, cs, out, gates)
    else:
        (w_hr,) = _c(w_hr)
        ms = _workspace.empty((T, B, H) if training else (0, 0, 0), dtype=x.dtype)
        _over_rows(_lstmp_forward_loop, B, T * B * (w_hh.size + w_hr.size),
                   gemm_for(x.dtype), _project(x, w_ih), bias, *_recurrent_weight(w_hh, B, T),
                   *_recurrent_weight(w_hr, B, T), full, reverse, training, hs, cs, out, gates,
                   ms)
    cache = None
    if training:
        cache = (x, hs, cs, gates, w_ih, w_hh, b_ih is not None, full, reverse, w_hr, ms)
    return out, _final(hs, T, training, reverse), _final(cs, T, training, reverse), cache


def lstm_backward(d_out, d_h_n, d_c_n, cache):
    """Backward of :func:`lstm_forward` (``d_w_hr`` last, with the projection)."""
    if type(cache) is zoneout_numba.Cache:
        return zoneout_numba.lstm_backward(d_out, d_h_n, d_c_n, cache)
    x, hs, cs, gates, w_ih, w_hh, has_bias, full, reverse, w_hr, ms = cache
    T, B, _ = x.shape
    r = int(reverse)
    d_a = _workspace.empty((T, B, w_hh.shape[0]), dtype=x.dtype)
    d_out = np.ascontiguousarray(d_out)
    nthreads = packed_bptt.threads_for(x, 4, w_hh.shape[1]) if w_hr is None else 0
    if nthreads:
        return packed_bptt.run(nthreads, packed_numba.LSTM, x, w_ih, w_hh, has_bias, d_out,
                               d_h_n, d_c_n, full, reverse, hs, cs, gates, gates, d_a, d_a)
    d_h = d_h_n.astype(x.dtype, copy=True)
    d_c = d_c_n.astype(x.dtype, copy=True)
    if w_hr is None:
        _over_rows(_lstm_backward_loop, B, T * B * w_hh.size,
                   gemm_for(x.dtype), d_out, d_h, d_c, w_hh, full, reverse, cs, gates, d_a)
    else:
        d_hp = _workspace.empty(d_out.shape, dtype=x.dtype)
        _over_rows(_lstmp_backward_loop, B, T * B * (w_hh.size + w_hr.size),
                   gemm_for(x.dtype), d_out, d_h, d_c, w_hh, w_hr, full, reverse, cs, gates,
                   d_a, d_hp)
    grads = _param_grads(d_a, d_a, x, hs[r:T + r], w_ih, has_bias)
    result = (grads[0], d_h, d_c) + grads[1:]
    if w_hr is None:
        return result
    H, P = cs.shape[2], w_hr.shape[0]
    d_w_hr = np.empty((P, H), dtype=x.dtype)
    _mm(gemm_for(x.dtype), d_hp.reshape(T * B, P), True, ms.reshape(T * B, H), False, d_w_hr,
        0.0)
    return result + (d_w_hr,)


# --------------------------------------------------------------------- GRU

@_jit
def _gru_row(a, x, bias, b_hn, h_prev, h_new, hn_out, H):
    """reset_after, one row: a = h W_hh^T (3H,) in; r, z, n back into a and
    hn = W_hn h + b_hn into hn_out (cache rows in training, scratch in
    inference); the new h out."""
    wide_vectors()
    for j in range(H):
        r = sigmoid(a[j] + x[j] + bias[j])
        z = sigmoid(a[H + j] + x[H + j] + bias[H + j])
        hn = a[2 * H + j] + b_hn[j]
        n = tanh(x[2 * H + j] + bias[2 * H + j] + r * hn)
        h_new[j] = (1 - z) * n + z * h_prev[j]
        a[j] = r
        a[H + j] = z
        a[2 * H + j] = n
        hn_out[j] = hn


@_jit
def _gru_infer_block(a, x, bias, b_hn, h_prev, h_new, out, b0, b1):
    """reset_after, inference, every row of [b0, b1) active (see _lstm_infer_block)."""
    wide_vectors()
    H = h_prev.shape[1]
    for b in range(b0, b1):
        for j in range(H):
            r = sigmoid(a[b, j] + x[b, j] + bias[j])
            z = sigmoid(a[b, H + j] + x[b, H + j] + bias[H + j])
            n = tanh(x[b, 2 * H + j] + bias[2 * H + j] + r * (a[b, 2 * H + j] + b_hn[j]))
            hv = (1 - z) * n + z * h_prev[b, j]
            h_new[b, j] = hv
            out[b, j] = hv


@_jit
def _gru_train_block(a, x, bias, b_hn, h_prev, h_new, out, gates, hns, b0, b1):
    """reset_after, training, every row of [b0, b1) active: as _gru_infer_block, with r, z,
    n and hn = W_hn h + b_hn stored into this step's cache rows (not into ``a``)."""
    wide_vectors()
    H = h_prev.shape[1]
    for b in range(b0, b1):
        for j in range(H):
            r = sigmoid(a[b, j] + x[b, j] + bias[j])
            z = sigmoid(a[b, H + j] + x[b, H + j] + bias[H + j])
            hn = a[b, 2 * H + j] + b_hn[j]
            n = tanh(x[b, 2 * H + j] + bias[2 * H + j] + r * hn)
            hv = (1 - z) * n + z * h_prev[b, j]
            h_new[b, j] = hv
            out[b, j] = hv
            gates[b, j] = r
            gates[b, H + j] = z
            gates[b, 2 * H + j] = n
            hns[b, j] = hn


@_jit
def _gru_forward_loop(gemm, xw, bias, w_hh, trans_w, b_hn, lengths, reverse, training, hs, out,
                      gates, hns, b0, b1):
    """reset_after=True: per step one GEMM h W_hh^T, then the gates."""
    T, B, G = xw.shape
    H = G // 3
    r_ = 1 if reverse else 0
    scratch = np.empty((B, G), dtype=xw.dtype)
    scratch_hn = np.empty((B, H), dtype=xw.dtype)
    all_active = _min_length(lengths, b0, b1)
    for k in range(T):
        t = T - 1 - k if reverse else k
        prev, new = _slots(t, k, r_, training)
        h_prev, h_new = hs[prev], hs[new]
        if t < all_active:
            _mm(gemm, h_prev[b0:b1], False, w_hh, trans_w, scratch[b0:b1], 0.0)
            if training:
                _gru_train_block(scratch, xw[t], bias, b_hn, h_prev, h_new, out[t], gates[t],
                                 hns[t], b0, b1)
            else:
                _gru_infer_block(scratch, xw[t], bias, b_hn, h_prev, h_new, out[t], b0, b1)
            continue
        a, hn = (gates[t], hns[t]) if training else (scratch, scratch_hn)
        _mm(gemm, h_prev[b0:b1], False, w_hh, trans_w, a[b0:b1], 0.0)
        for b in range(b0, b1):
            if t < lengths[b]:
                _gru_row(a[b], xw[t, b], bias, b_hn, h_prev[b], h_new[b], hn[b], H)
                _copy_row(h_new[b], out[t, b])
            else:
                _carry_row(h_prev[b], h_new[b], out[t, b])


@_jit
def _gru_forward_loop_reset_before(gemm, xw, bias, w_hrz, w_hn, trans_w, lengths, reverse, training,
                                   hs, out, gates, b0, b1):
    """reset_after=False: GEMM for r, z; then (r * h) W_hn^T for n."""
    T, B, G = xw.shape
    H = G // 3
    r_ = 1 if reverse else 0
    a_rz = np.empty((B, 2 * H), dtype=xw.dtype)
    rh = np.empty((B, H), dtype=xw.dtype)
    a_n = np.empty((B, H), dtype=xw.dtype)
    zs = np.empty((B, H), dtype=xw.dtype)
    for k in range(T):
        t = T - 1 - k if reverse else k
        prev, new = _slots(t, k, r_, training)
        h_prev, h_new = hs[prev], hs[new]
        _mm(gemm, h_prev[b0:b1], False, w_hrz, trans_w, a_rz[b0:b1], 0.0)
        for b in range(b0, b1):
            for j in range(H):
                r = sigmoid(a_rz[b, j] + xw[t, b, j] + bias[j])
                zs[b, j] = sigmoid(a_rz[b, H + j] + xw[t, b, H + j] + bias[H + j])
                rh[b, j] = r * h_prev[b, j]
                if training:
                    gates[t, b, j] = r
                    gates[t, b, H + j] = zs[b, j]
        _mm(gemm, rh[b0:b1], False, w_hn, trans_w, a_n[b0:b1], 0.0)
        for b in range(b0, b1):
            if t < lengths[b]:
                for j in range(H):
                    n = tanh(xw[t, b, 2 * H + j] + bias[2 * H + j] + a_n[b, j])
                    z = zs[b, j]
                    h = (1 - z) * n + z * h_prev[b, j]
                    h_new[b, j] = h
                    out[t, b, j] = h
                    if training:
                        gates[t, b, 2 * H + j] = n
            else:
                _carry_row(h_prev[b], h_new[b], out[t, b])


@_jit
def _gru_backward_row(g, hn, h_prev, d_out, d_h, d_ax, d_ah, H):
    """reset_after, one row, a pass per stored array (see _lstm_backward_block); d_h
    becomes its direct part dh * z (the GEMM adds the rest), last: every pass reads it."""
    wide_vectors()
    for j in range(H):
        z, n = g[H + j], g[2 * H + j]
        d_ax[2 * H + j] = (d_out[j] + d_h[j]) * (1 - z) * (1 - n * n)
    for j in range(H):
        d_ah[2 * H + j] = d_ax[2 * H + j] * g[j]
    for j in range(H):
        z, n = g[H + j], g[2 * H + j]
        d_ax[H + j] = (d_out[j] + d_h[j]) * (h_prev[j] - n) * z * (1 - z)
    for j in range(H):
        d_ah[H + j] = d_ax[H + j]
    for j in range(H):
        r, z, n = g[j], g[H + j], g[2 * H + j]
        d_ax[j] = (d_out[j] + d_h[j]) * (1 - z) * (1 - n * n) * hn[j] * r * (1 - r)
    for j in range(H):
        d_ah[j] = d_ax[j]
    for j in range(H):
        d_h[j] = (d_out[j] + d_h[j]) * g[H + j]


@_jit
def _gru_backward_block(g, hn, h_prev, d_out, d_h, d_ax, d_ah, b0, b1):
    """_gru_backward_row over every row of [b0, b1), all active."""
    wide_vectors()
    H = h_prev.shape[1]
    for b in range(b0, b1):
        for j in range(H):
            z, n = g[b, H + j], g[b, 2 * H + j]
            d_ax[b, 2 * H + j] = (d_out[b, j] + d_h[b, j]) * (1 - z) * (1 - n * n)
        for j in range(H):
            d_ah[b, 2 * H + j] = d_ax[b, 2 * H + j] * g[b, j]
        for j in range(H):
            z, n = g[b, H + j], g[b, 2 * H + j]
            d_ax[b, H + j] = (d_out[b, j] + d_h[b, j]) * (h_prev[b, j] - n) * z * (1 - z)
        for j in range(H):
            d_ah[b, H + j] = d_ax[b, H + j]
        for j in range(H):
            r, z, n = g[b, j], g[b, H + j], g[b, 2 * H + j]
            d_an = (d_out[b, j] + d_h[b, j]) * (1 - z) * (1 - n * n)
            d_ax[b, j] = d_an * hn[b, j] * r * (1 - r)
        for j in range(H):
            d_ah[b, j] = d_ax[b, j]
        for j in range(H):
            d_h[b, j] = (d_out[b, j] + d_h[b, j]) * g[b, H + j]


@_jit
def _gru_backward_loop(gemm, d_out, d_h, w_hh, lengths, reverse, hs, gates, hns, d_a_x, d_a_h,
                       b0, b1):
    T, B, H = d_out.shape
    rv = 1 if reverse else 0
    tmp = np.empty((B, H), dtype=d_out.dtype)
    all_active = _min_length(lengths, b0, b1)
    for k in range(T):
        t = k if reverse else T - 1 - k
        h_prev = hs[t + rv]
        if t < all_active:
            _gru_backward_block(gates[t], hns[t], h_prev, d_out[t], d_h, d_a_x[t], d_a_h[t],
                                b0, b1)
            # every row active: the GEMM adds its part to d_h in place (beta = 1)
            _mm(gemm, d_a_h[t][b0:b1], False, w_hh, False, d_h[b0:b1], 1.0)
            continue
        for b in range(b0, b1):
            if t < lengths[b]:
                _gru_backward_row(gates[t, b], hns[t, b], h_prev[b], d_out[t, b], d_h[b],
                                  d_a_x[t, b], d_a_h[t, b], H)
            else:
                _zero_row(d_a_x[t, b])
                _zero_row(d_a_h[t, b])
        _mm(gemm, d_a_h[t][b0:b1], False, w_hh, False, tmp[b0:b1], 0.0)
        for b in range(b0, b1):
            if t < lengths[b]:
                _add_row(tmp[b], d_h[b])


@_jit
def _gru_backward_loop_reset_before(gemm, d_out, d_h, w_hrz, w_hn, lengths, reverse, hs, gates,
                                    d_a, b0, b1):
    T, B, H = d_out.shape
    rv = 1 if reverse else 0
    d_an = np.empty((B, H), dtype=d_out.dtype)
    d_arz = np.empty((B, 2 * H), dtype=d_out.dtype)
    d_rh = np.empty((B, H), dtype=d_out.dtype)
    tmp = np.empty((B, H), dtype=d_out.dtype)
    direct = np.empty((B, H), dtype=d_out.dtype)
    for k in range(T):
        t = k if reverse else T - 1 - k
        h_prev = hs[t + rv]
        for b in range(b0, b1):
            active = t < lengths[b]
            for j in range(H):
                z, n = gates[t, b, H + j], gates[t, b, 2 * H + j]
                dh = d_out[t, b, j] + d_h[b, j]
                if active:
                    d_an[b, j] = dh * (1 - z) * (1 - n * n)
                    d_arz[b, H + j] = dh * (h_prev[b, j] - n) * z * (1 - z)
                else:  # padded: d_out there is ignored, even when not finite
                    d_an[b, j] = 0
                    d_arz[b, H + j] = 0
                direct[b, j] = dh * z
        _mm(gemm, d_an[b0:b1], False, w_hn, False, d_rh[b0:b1], 0.0)
        for b in range(b0, b1):
            active = t < lengths[b]
            for j in range(H):
                r = gates[t, b, j]
                d_arz[b, j] = d_rh[b, j] * h_prev[b, j] * r * (1 - r) if active else 0.0
                direct[b, j] += d_rh[b, j] * r
        _mm(gemm, d_arz[b0:b1], False, w_hrz, False, tmp[b0:b1], 0.0)
        for b in range(b0, b1):
            for j in range(2 * H):
                d_a[t, b, j] = d_arz[b, j]
            for j in range(H):
                d_a[t, b, 2 * H + j] = d_an[b, j]
            if t < lengths[b]:
                for j in range(H):
                    d_h[b, j] = direct[b, j] + tmp[b, j]


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True,
                reset_after=True, zoneout_h=None):
    """GRU (gates r, z, n): see :func:`fastrnn.backends.reference.gru_forward`; zoneout
    by :mod:`.zoneout_numba` (with ``reset_after=True`` only)."""
    if zoneout_h is not None:
        if not reset_after:
            raise NotImplementedError("zoneout together with reset_after=False: the numba "
                                      "backend has no kernels for both; use backend='numpy'")
        return zoneout_numba.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                                         training, zoneout_h)
    x, w_ih, w_hh = _c(x, w_ih, w_hh)
    T, B, _ = x.shape
    H = h0.shape[1]
    (hs,) = _state_buffers(T, B, H, x.dtype, training, reverse, h0)
    out = _workspace.empty((T, B, H), dtype=x.dtype)
    gates = _workspace.empty((T, B, 3 * H) if training else (0, 0, 0), dtype=x.dtype)
    full = _full_lengths(lengths, T, B)
    hns = None
    if reset_after:
        bias, b_hn = _gru_biases(b_ih, b_hh, H, x.dtype)
        hns = _workspace.empty((T, B, H) if training else (0, 0, 0), dtype=x.dtype)
        nthreads = packed_numba.threads_for(x, 3, H)
        if nthreads:
            packed_numba.run(nthreads, packed_numba.GRU, x, w_ih, w_hh, bias, b_hn, full,
                             reverse, training, hs, hs, out, gates, hns)
        else:
            _over_rows(_gru_forward_loop, B, T * B * w_hh.size,
                       gemm_for(x.dtype), _project(x, w_ih), bias,
                       *_recurrent_weight(w_hh, B, T), b_hn, full, reverse, training, hs, out,
                       gates, hns)
    else:
        xw = _project(x, w_ih)
        bias = _bias(b_ih, b_hh, 3 * H, x.dtype)
        w_hrz, trans_w = _recurrent_weight(w_hh[:2 * H], B, T)
        w_hn, _ = _recurrent_weight(w_hh[2 * H:], B, T)
        _over_rows(_gru_forward_loop_reset_before, B, T * B * w_hh.size,
                   gemm_for(x.dtype), xw, bias, w_hrz, w_hn, trans_w, full,
                   reverse, training, hs, out, gates)
    cache = None
    if training:
        cache = (x, hs, gates, hns, w_ih, w_hh, b_ih is not None, full, reverse, reset_after)
    return out, _final(hs, T, training, reverse), cache


def _gru_biases(b_ih, b_hh, H, dtype):
    """reset_after: ``(bias, b_hn)``, the summed biases of r and z with b_ih's n part,
    and b_hh's n part apart, which stays inside ``r * (W_hn h + b_hn)``."""
    bias = _bias(b_ih, b_hh, 3 * H, dtype)
    bias[2 * H:] = 0 if b_ih is None else b_ih[2 * H:]
    b_hn = np.zeros(H, dtype) if b_hh is None else np.ascontiguousarray(b_hh[2 * H:])
    return bias, b_hn


def gru_backward(d_out, d_h_n, cache):
    """Backward of :func:`gru_forward`."""
    if type(cache) is zoneout_numba.Cache:
        return zoneout_numba.gru_backward(d_out, d_h_n, cache)
    x, hs, gates, hns, w_ih, w_hh, has_bias, full, reverse, reset_after = cache
    T, B, _ = x.shape
    H = hs.shape[2]
    rv = int(reverse)
    d_out = np.ascontiguousarray(d_out)
    h_prev = hs[rv:T + rv]
    nthreads = packed_bptt.threads_for(x, 3, H) if reset_after else 0
    if nthreads:
        grads = packed_bptt.run(nthreads, packed_numba.GRU, x, w_ih, w_hh, has_bias, d_out,
                                d_h_n, None, full, reverse, hs, hs, gates, hns,
                                _workspace.empty((T, B, 3 * H), dtype=x.dtype),
                                _workspace.empty((T, B, 3 * H), dtype=x.dtype))
        return grads[:2] + grads[3:]
    d_h = d_h_n.astype(x.dtype, copy=True)
    if reset_after:
        d_a_x = _workspace.empty((T, B, 3 * H), dtype=x.dtype)
        d_a_h = _workspace.empty((T, B, 3 * H), dtype=x.dtype)
        _over_rows(_gru_backward_loop, B, T * B * w_hh.size,
                   gemm_for(x.dtype), d_out, d_h, w_hh, full, reverse, hs, gates, hns,
                   d_a_x, d_a_h)
        grads = _param_grads(d_a_x, d_a_h, x, h_prev, w_ih, has_bias)
    else:
        d_a = _workspace.empty((T, B, 3 * H), dtype=x.dtype)
        _over_rows(_gru_backward_loop_reset_before, B, T * B * w_hh.size,
                   gemm_for(x.dtype), d_out, d_h, w_hh[:2 * H], w_hh[2 * H:],
                   full, reverse, hs, gates, d_a)
        grads = _param_grads(d_a, d_a, x, h_prev, w_ih, has_bias, rows_hh=2 * H)
        # n's recurrent GEMM input is r * h_{t-1}.
        rh = (gates[:, :, :H] * h_prev).reshape(T * B, H)
        _mm(gemm_for(x.dtype), d_a.reshape(T * B, 3 * H)[:, 2 * H:], True, rh, False,
            grads[2][2 * H:], 0.0)
    return (grads[0], d_h) + grads[1:]


# The zoneout and packed loops reuse this module's helpers: imported once they are defined.
from . import packed_bptt, packed_numba, zoneout_numba  # noqa: E402

# ------------------------------------------------------------------ warm-up

def warmup(dtypes=(np.float32, np.float64), cells=None):
    """Compile (or load from Numba's cache) the kernels for ``dtypes`` now.

    Numba compiles on first use; the compiled code is cached on disk
    (``cache=True``; ``NUMBA_CACHE_DIR`` moves the cache), so later processes
    only load it. Calling this at start-up moves that cost out of the first
    real call, a frozen module's too (its read-only weights are other types to Numba).
    """
    cells = cells or tuple(CELLS)
    rng = np.random.default_rng(0)
    # float32 also at one panel's width: the packed loops' (the RNN's forward, every
    # backward: packed_bptt) start there
    widths = {np.dtype(np.float32): (2, packed_numba._panel_units(1))}
    for dtype, cell in itertools.product(dtypes, cells):
        for H in widths.get(np.dtype(dtype), (2,)):
            _warm_cell(cell, dtype, H, rng)


def _warm_cell(cell, dtype, H, rng):
    """:func:`warmup` for one cell, dtype and hidden size."""
    x = rng.standard_normal((2, 2, 3)).astype(dtype)
    lengths = np.array([2, 1])
    G = gate_count(cell) * H
    w_ih, w_hh = np.ones((G, 3), dtype), np.ones((G, H), dtype) / H
    b = np.ones(G, dtype)
    states = (np.zeros((2, H), dtype),) * state_count(cell)
    fwd, bwd = globals()[f"{cell}_forward"], globals()[f"{cell}_backward"]
    # every combination of the kind's boolean kernel options
    names = tuple(KERNEL_OPTIONS.get(cell, {}))
    for values in itertools.product((True, False), repeat=len(names)):
        options = dict(zip(names, values))
        for training in (True, False):
            for reverse in (False, True):
                res = fwd(x, *states, w_ih, w_hh, b, b, lengths=lengths,
                          reverse=reverse, training=training, **options)
                if training:
                    bwd(res[0], *res[1:-1], res[-1])
                else:   # a frozen module's weights: read-only arrays, other types
                    fwd(x, *states, *map(immutable_copy, (w_ih, w_hh, b, b)),
                        lengths=lengths, reverse=reverse, training=False, **options)

