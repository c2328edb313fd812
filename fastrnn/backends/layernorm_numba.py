"""Numba kernels of the layer-normalised LSTM and GRU: the norms fused into the time loop.

Same signatures, equations and masking as :mod:`.layernorm_reference` (its
docstring states them); the BLAS calls, state buffers and helpers are those of
:mod:`.numba_cpu`. Per layer and direction:

* forward: one GEMM ``W_ih x`` for every step, then one compiled time loop: per
  step the recurrent GEMM ``W_hh h`` into a (B, G) block, then per sequence one
  row pass: the statistics of its ``W_ih x`` and ``W_hh h`` rows (two
  reductions each over the G values the GEMMs just wrote), one pointwise pass
  that normalises both, applies gains, biases and the gates and forms ``c_t``,
  and for the LSTM the statistics of ``c_t`` and the pass that forms ``h_t``.
  Every pass reads one row of at most G values, still in L1; no array is
  swept once more per step. In training the normalised rows are written in
  place of the GEMM outputs: they are the cache.
* backward: one compiled time loop: per step and sequence the gate gradients,
  the cell norm's backward (LSTM), the gains' and biases' sums and both gate
  norms' backward in row passes, then the recurrent GEMM; after the loop the
  whole-sequence GEMMs for ``d_x``, ``d_w_ih`` and ``d_w_hh``.

Row statistics accumulate in float64 for both dtypes.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from . import _workspace
from ._cblas import gemm_for
from ._numba_math import FASTMATH, sigmoid, tanh
from .layernorm_reference import EPS, _weight_grads
from .numba_cpu import (_c, _carry_row, _copy_row, _final, _full_lengths, _mm, _project,
                        _recurrent_weight, _slots, _state_buffers, _zero_row)

xp = np

_jit = functools.partial(numba.njit, fastmath=FASTMATH, cache=True, nogil=True,
                         error_model="numpy")

#: Slots of the per-row statistics (T, B, 6): mean and rstd of W_ih x, of W_hh h, of c.
_STATS = 6


@_jit
def _moments(row, st, slot):
    """Mean and 1/sqrt(var + EPS) of ``row`` into ``st[slot]``, ``st[slot + 1]``."""
    n = row.shape[0]
    s = 0.0
    for j in range(n):
        s += row[j]
    mean = s / n
    v = 0.0
    for j in range(n):
        d = row[j] - mean
        v += d * d
    st[slot] = mean
    st[slot + 1] = 1.0 / np.sqrt(v / n + EPS)


@_jit
def _norm_backward_sums(d_a, gamma, vhat, G):
    """mean(d_vhat) and mean(d_vhat * vhat) with d_vhat = gamma * d_a."""
    s1 = 0.0
    s2 = 0.0
    for k in range(G):
        dv = d_a[k] * gamma[k]
        s1 += dv
        s2 += dv * vhat[k]
    return s1 / G, s2 / G


@_jit
def _accumulate(d_a, vhat, d_gamma, d_beta, G):
    for k in range(G):
        d_gamma[k] += d_a[k] * vhat[k]
        d_beta[k] += d_a[k]


# -------------------------------------------------------------------- LSTM

@_jit
def _ln_lstm_row(xw, hw, g_ih, g_hh, bias, g_c, b_c, c_prev, c_new, h_new, a, st, H):
    """One sequence, one step. ``xw``, ``hw``: W_ih x and W_hh h (4H,), normalised in
    place; gates after activation into ``a``; statistics into ``st`` (6,)."""
    _moments(xw, st, 0)
    _moments(hw, st, 2)
    mx, rx, mh, rh = st[0], st[1], st[2], st[3]
    for k in range(4 * H):
        xn = (xw[k] - mx) * rx
        hn = (hw[k] - mh) * rh
        xw[k] = xn
        hw[k] = hn
        a[k] = g_ih[k] * xn + g_hh[k] * hn + bias[k]
    for j in range(H):
        i = sigmoid(a[j])
        f = sigmoid(a[H + j])
        g = tanh(a[2 * H + j])
        a[j] = i
        a[H + j] = f
        a[2 * H + j] = g
        a[3 * H + j] = sigmoid(a[3 * H + j])
        c_new[j] = f * c_prev[j] + i * g
    _moments(c_new, st, 4)
    mc, rc = st[4], st[5]
    for j in range(H):
        h_new[j] = a[3 * H + j] * tanh(g_c[j] * ((c_new[j] - mc) * rc) + b_c[j])


@_jit
def _ln_lstm_forward_loop(gemm, xw, w_hh, trans_w, g_ih, g_hh, bias, g_c, b_c, lengths, reverse,
                          training, hs, cs, out, gates, hhat, stats):
    T, B, G = xw.shape
    H = G // 4
    r = 1 if reverse else 0
    scratch_a = np.empty((B, G), dtype=xw.dtype)
    scratch_hw = np.empty((B, G), dtype=xw.dtype)
    scratch_st = np.empty((B, _STATS), dtype=xw.dtype)
    for k in range(T):
        t = T - 1 - k if reverse else k
        prev, new = _slots(t, k, r, training)
        h_prev, c_prev, h_new, c_new = hs[prev], cs[prev], hs[new], cs[new]
        if training:   # the GEMM writes straight into this step's cache rows
            a, hw, st = gates[t], hhat[t], stats[t]
        else:
            a, hw, st = scratch_a, scratch_hw, scratch_st
        _mm(gemm, h_prev, False, w_hh, trans_w, hw, 0.0)
        for b in range(B):
            if t < lengths[b]:
                _ln_lstm_row(xw[t, b], hw[b], g_ih, g_hh, bias, g_c, b_c, c_prev[b], c_new[b],
                             h_new[b], a[b], st[b], H)
                _copy_row(h_new[b], out[t, b])
            else:
                _carry_row(h_prev[b], h_new[b], out[t, b])
                _copy_row(c_prev[b], c_new[b])


@_jit
def _ln_lstm_backward_row(a, xhat, hhat, st, c_prev, c_new, g_ih, g_hh, g_c, b_c, d_out, d_h,
                          d_c, d_xw, d_hw, d_chat, acc, H):
    """One sequence, one step: d_c becomes d_c_{t-1}; d_xw, d_hw (4H,) the gradients of
    W_ih x and W_hh h; the gains' and shifts' sums added to ``acc`` (5, 4H)."""
    G = 4 * H
    mc, rc = st[4], st[5]
    s1 = 0.0
    s2 = 0.0
    for j in range(H):
        o = a[3 * H + j]
        ch = (c_new[j] - mc) * rc
        ty = tanh(g_c[j] * ch + b_c[j])
        dh = d_out[j] + d_h[j]
        dy = dh * o * (1 - ty * ty)
        acc[3, j] += dy * ch
        acc[4, j] += dy
        dch = dy * g_c[j]
        d_chat[j] = dch
        s1 += dch
        s2 += dch * ch
        d_hw[3 * H + j] = dh * ty * o * (1 - o)    # d_hw holds d_a until the last pass
    m1, m2 = s1 / H, s2 / H
    for j in range(H):
        i, f, g = a[j], a[H + j], a[2 * H + j]
        ch = (c_new[j] - mc) * rc
        dc = d_c[j] + rc * (d_chat[j] - m1 - ch * m2)
        d_hw[j] = dc * g * i * (1 - i)
        d_hw[H + j] = dc * c_prev[j] * f * (1 - f)
        d_hw[2 * H + j] = dc * i * (1 - g * g)
        d_c[j] = dc * f
    _accumulate(d_hw, xhat, acc[0], acc[2], G)
    for k in range(G):
        acc[1, k] += d_hw[k] * hhat[k]
    mx1, mx2 = _norm_backward_sums(d_hw, g_ih, xhat, G)
    mh1, mh2 = _norm_backward_sums(d_hw, g_hh, hhat, G)
    rx, rh = st[1], st[3]
    for k in range(G):
        da = d_hw[k]
        d_xw[k] = rx * (da * g_ih[k] - mx1 - xhat[k] * mx2)
        d_hw[k] = rh * (da * g_hh[k] - mh1 - hhat[k] * mh2)


@_jit
def _ln_lstm_backward_loop(gemm, d_out, d_h, d_c, w_hh, g_ih, g_hh, g_c, b_c, lengths, reverse,
                           cs, gates, xhat, hhat, stats, d_xw, d_hw, acc):
    T, B, H = d_out.shape
    r = 1 if reverse else 0
    tmp = np.empty((B, H), dtype=d_out.dtype)
    d_chat = np.empty(H, dtype=d_out.dtype)
    for k in range(T):
        t = k if reverse else T - 1 - k
        c_prev, c_new = cs[t + r], cs[t + 1 - r]
        for b in range(B):
            if t < lengths[b]:
                _ln_lstm_backward_row(gates[t, b], xhat[t, b], hhat[t, b], stats[t, b],
                                      c_prev[b], c_new[b], g_ih, g_hh, g_c, b_c, d_out[t, b],
                                      d_h[b], d_c[b], d_xw[t, b], d_hw[t, b], d_chat, acc, H)
            else:
                _zero_row(d_xw[t, b])
                _zero_row(d_hw[t, b])
        _mm(gemm, d_hw[t], False, w_hh, False, tmp, 0.0)
        for b in range(B):
            if t < lengths[b]:
                _copy_row(tmp[b], d_h[b])


def _zeros_if_none(a, n, dtype):
    return np.zeros(n, dtype) if a is None else np.ascontiguousarray(a)


def layernorm_lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, gamma_ih, gamma_hh, gamma_c,
                           beta_c, lengths=None, reverse=False, training=True):
    """Layer-normalised LSTM: see :func:`.layernorm_reference.layernorm_lstm_forward`."""
    x, w_ih, w_hh, gamma_ih, gamma_hh, gamma_c = _c(x, w_ih, w_hh, gamma_ih, gamma_hh, gamma_c)
    T, B, _ = x.shape
    H = h0.shape[1]
    G = 4 * H
    xw = _project(x, w_ih)   # normalised in place by the loop: in training, x-hat
    bias = np.zeros(G, x.dtype) if b_ih is None else b_ih + b_hh
    b_c = _zeros_if_none(beta_c, H, x.dtype)
    hs, cs = _state_buffers(T, B, H, x.dtype, training, reverse, h0, c0)
    out = _workspace.empty((T, B, H), dtype=x.dtype)
    cache_shape = (T, B, G) if training else (0, 0, 0)
    gates, hhat = np.empty(cache_shape, x.dtype), np.empty(cache_shape, x.dtype)
    stats = _workspace.empty((T, B, _STATS) if training else (0, 0, 0), x.dtype)
    full = _full_lengths(lengths, T, B)
    _ln_lstm_forward_loop(gemm_for(x.dtype), xw, *_recurrent_weight(w_hh, B, T), gamma_ih,
                          gamma_hh, bias, gamma_c, b_c, full, reverse, training, hs, cs, out,
                          gates, hhat, stats)
    cache = None
    if training:
        cache = (x, hs, cs, gates, xw, hhat, stats, w_ih, w_hh, gamma_ih, gamma_hh, gamma_c, b_c,
                 b_ih is not None, full, reverse)
    return out, _final(hs, T, training, reverse), _final(cs, T, training, reverse), cache


def layernorm_lstm_backward(d_out, d_h_n, d_c_n, cache):
    """Backward of :func:`layernorm_lstm_forward`."""
    (x, hs, cs, gates, xhat, hhat, stats, w_ih, w_hh, gamma_ih, gamma_hh, gamma_c, b_c, has_bias,
     full, reverse) = cache
    T, B, _ = x.shape
    H = hs.shape[2]
    G = 4 * H
    r = int(reverse)
    d_xw = _workspace.empty((T, B, G), x.dtype)
    d_hw = _workspace.empty((T, B, G), x.dtype)
    acc = np.zeros((5, G), x.dtype)
    d_h = d_h_n.astype(x.dtype, copy=True)
    d_c = d_c_n.astype(x.dtype, copy=True)
    _ln_lstm_backward_loop(gemm_for(x.dtype), np.ascontiguousarray(d_out), d_h, d_c, w_hh,
                           gamma_ih, gamma_hh, gamma_c, b_c, full, reverse, cs, gates, xhat,
                           hhat, stats, d_xw, d_hw, acc)
    d_x, d_w_ih, d_w_hh = _weight_grads(d_xw, d_hw, x, hs[r:T + r], w_ih)
    d_b = acc[2] if has_bias else None
    return (d_x, d_h, d_c, d_w_ih, d_w_hh, d_b, None if d_b is None else d_b.copy(),
            acc[0], acc[1], acc[3, :H].copy(), acc[4, :H].copy() if has_bias else None)


# --------------------------------------------------------------------- GRU

@_jit
def _ln_gru_row(xw, hw, g_ih, g_hh, b_ih, b_hh, h_prev, h_new, a, st, H):
    """One sequence, one step. ``xw``, ``hw``: W_ih x and W_hh h (3H,), normalised in
    place; r, z, n into ``a``; statistics into ``st``."""
    _moments(xw, st, 0)
    _moments(hw, st, 2)
    mx, rx, mh, rh = st[0], st[1], st[2], st[3]
    for k in range(3 * H):
        xw[k] = (xw[k] - mx) * rx
        hw[k] = (hw[k] - mh) * rh
    for j in range(H):
        r = sigmoid(g_ih[j] * xw[j] + b_ih[j] + g_hh[j] * hw[j] + b_hh[j])
        z = sigmoid(g_ih[H + j] * xw[H + j] + b_ih[H + j] + g_hh[H + j] * hw[H + j]
                    + b_hh[H + j])
        u_n = g_hh[2 * H + j] * hw[2 * H + j] + b_hh[2 * H + j]
        n = tanh(g_ih[2 * H + j] * xw[2 * H + j] + b_ih[2 * H + j] + r * u_n)
        h_new[j] = (1 - z) * n + z * h_prev[j]
        a[j] = r
        a[H + j] = z
        a[2 * H + j] = n


@_jit
def _ln_gru_forward_loop(gemm, xw, w_hh, trans_w, g_ih, g_hh, b_ih, b_hh, lengths, reverse,
                         training, hs, out, gates, hhat, stats):
    T, B, G = xw.shape
    H = G // 3
    r = 1 if reverse else 0
    scratch_a = np.empty((B, G), dtype=xw.dtype)
    scratch_hw = np.empty((B, G), dtype=xw.dtype)
    scratch_st = np.empty((B, _STATS), dtype=xw.dtype)
    for k in range(T):
        t = T - 1 - k if reverse else k
        prev, new = _slots(t, k, r, training)
        h_prev, h_new = hs[prev], hs[new]
        if training:
            a, hw, st = gates[t], hhat[t], stats[t]
        else:
            a, hw, st = scratch_a, scratch_hw, scratch_st
        _mm(gemm, h_prev, False, w_hh, trans_w, hw, 0.0)
        for b in range(B):
            if t < lengths[b]:
                _ln_gru_row(xw[t, b], hw[b], g_ih, g_hh, b_ih, b_hh, h_prev[b], h_new[b], a[b],
                            st[b], H)
                _copy_row(h_new[b], out[t, b])
            else:
                _carry_row(h_prev[b], h_new[b], out[t, b])


@_jit
def _ln_gru_backward_row(a, xhat, hhat, st, h_prev, g_ih, g_hh, b_hh, d_out, d_h, d_xw, d_hw,
                         acc, H):
    """One sequence, one step: d_h becomes its direct part dh * z (the GEMM adds the
    rest); d_xw, d_hw (3H,) the gradients of W_ih x and W_hh h; sums into ``acc`` (4, 3H)."""
    G = 3 * H
    for j in range(H):
        r, z, n = a[j], a[H + j], a[2 * H + j]
        u_n = g_hh[2 * H + j] * hhat[2 * H + j] + b_hh[2 * H + j]
        dh = d_out[j] + d_h[j]
        d_an = dh * (1 - z) * (1 - n * n)
        d_az = dh * (h_prev[j] - n) * z * (1 - z)
        d_ar = d_an * u_n * r * (1 - r)
        d_xw[j] = d_ar       # d_xw, d_hw hold the gradients of the normed rows until the end
        d_xw[H + j] = d_az
        d_xw[2 * H + j] = d_an
        d_hw[j] = d_ar
        d_hw[H + j] = d_az
        d_hw[2 * H + j] = d_an * r
        d_h[j] = dh * z
    _accumulate(d_xw, xhat, acc[0], acc[2], G)
    _accumulate(d_hw, hhat, acc[1], acc[3], G)
    mx1, mx2 = _norm_backward_sums(d_xw, g_ih, xhat, G)
    mh1, mh2 = _norm_backward_sums(d_hw, g_hh, hhat, G)
    rx, rh = st[1], st[3]
    for k in range(G):
        d_xw[k] = rx * (d_xw[k] * g_ih[k] - mx1 - xhat[k] * mx2)
        d_hw[k] = rh * (d_hw[k] * g_hh[k] - mh1 - hhat[k] * mh2)


@_jit
def _ln_gru_backward_loop(gemm, d_out, d_h, w_hh, g_ih, g_hh, b_hh, lengths, reverse, hs, gates,
                          xhat, hhat, stats, d_xw, d_hw, acc):
    T, B, H = d_out.shape
    rv = 1 if reverse else 0
    tmp = np.empty((B, H), dtype=d_out.dtype)
    for k in range(T):
        t = k if reverse else T - 1 - k
        h_prev = hs[t + rv]
        for b in range(B):
            if t < lengths[b]:
                _ln_gru_backward_row(gates[t, b], xhat[t, b], hhat[t, b], stats[t, b],
                                     h_prev[b], g_ih, g_hh, b_hh, d_out[t, b], d_h[b],
                                     d_xw[t, b], d_hw[t, b], acc, H)
            else:
                _zero_row(d_xw[t, b])
                _zero_row(d_hw[t, b])
        _mm(gemm, d_hw[t], False, w_hh, False, tmp, 0.0)
        for b in range(B):
            if t < lengths[b]:
                for j in range(H):
                    d_h[b, j] += tmp[b, j]


def layernorm_gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, gamma_ih, gamma_hh, lengths=None,
                          reverse=False, training=True):
    """Layer-normalised GRU: see :func:`.layernorm_reference.layernorm_gru_forward`."""
    x, w_ih, w_hh, gamma_ih, gamma_hh = _c(x, w_ih, w_hh, gamma_ih, gamma_hh)
    T, B, _ = x.shape
    H = h0.shape[1]
    G = 3 * H
    xw = _project(x, w_ih)
    has_bias = b_ih is not None
    b_ih, b_hh = _zeros_if_none(b_ih, G, x.dtype), _zeros_if_none(b_hh, G, x.dtype)
    (hs,) = _state_buffers(T, B, H, x.dtype, training, reverse, h0)
    out = _workspace.empty((T, B, H), dtype=x.dtype)
    cache_shape = (T, B, G) if training else (0, 0, 0)
    gates, hhat = np.empty(cache_shape, x.dtype), np.empty(cache_shape, x.dtype)
    stats = _workspace.empty((T, B, _STATS) if training else (0, 0, 0), x.dtype)
    full = _full_lengths(lengths, T, B)
    _ln_gru_forward_loop(gemm_for(x.dtype), xw, *_recurrent_weight(w_hh, B, T), gamma_ih,
                         gamma_hh, b_ih, b_hh, full, reverse, training, hs, out, gates, hhat,
                         stats)
    cache = None
    if training:
        cache = (x, hs, gates, xw, hhat, stats, w_ih, w_hh, gamma_ih, gamma_hh, b_hh,
                 has_bias, full, reverse)
    return out, _final(hs, T, training, reverse), cache


def layernorm_gru_backward(d_out, d_h_n, cache):
    """Backward of :func:`layernorm_gru_forward`."""
    (x, hs, gates, xhat, hhat, stats, w_ih, w_hh, gamma_ih, gamma_hh, b_hh, has_bias, full,
     reverse) = cache
    T, B, _ = x.shape
    H = hs.shape[2]
    G = 3 * H
    rv = int(reverse)
    d_xw = _workspace.empty((T, B, G), x.dtype)
    d_hw = _workspace.empty((T, B, G), x.dtype)
    acc = np.zeros((4, G), x.dtype)
    d_h = d_h_n.astype(x.dtype, copy=True)
    _ln_gru_backward_loop(gemm_for(x.dtype), np.ascontiguousarray(d_out), d_h, w_hh, gamma_ih,
                          gamma_hh, b_hh, full, reverse, hs, gates, xhat, hhat, stats, d_xw, d_hw,
                          acc)
    d_x, d_w_ih, d_w_hh = _weight_grads(d_xw, d_hw, x, hs[rv:T + rv], w_ih)
    if not has_bias:
        return d_x, d_h, d_w_ih, d_w_hh, None, None, acc[0], acc[1]
    return d_x, d_h, d_w_ih, d_w_hh, acc[2], acc[3], acc[0], acc[1]
