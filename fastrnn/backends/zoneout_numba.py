"""Zoneout (Krueger et al. 2016) in the Numba backend's fused time loops.

The kernels of :mod:`.numba_cpu` hand over to these when they are given
``zoneout_h`` / ``zoneout_c`` (see the contract in :mod:`fastrnn.backends`).
The loops are those of :mod:`.numba_cpu`, reusing its row passes, with two
additions:

* forward: the cell's row pass writes the candidate state (h~, c~) into a
  scratch or cache row, and a mixing pass writes the state
  ``k * prev + (1 - k) * candidate``;
* backward: the gradient of each state is split before the cell's row pass,
  ``(1 - k)`` of it to the candidate and ``k`` of it straight to the previous
  state, where it is added after the recurrent GEMM.

The caches keep the candidates the backward rows need: the RNN's h~ (its
activation's derivative is read off it) and the LSTM's c~ (for tanh(c~)).
Not covered (the layers refuse them before any call): the LSTM projection
and the GRU with ``reset_after=False``.
"""

from __future__ import annotations

import numba
import numpy as np

from . import _workspace
from ._numba_math import tanh
from .numba_cpu import (_add_row, _bias, _c, _carry_row, _copy_row, _final, _full_lengths,
                        _gru_backward_row, _gru_biases, _gru_row, _jit, _lstm_backward_row,
                        _lstm_row, _mm, _param_grads, _project, _recurrent_weight, _slots,
                        _state_buffers, _zero_row, gemm_for)


class Cache(tuple):
    """What a zoneout forward leaves for backward; the numba backward kernels tell it
    from their own caches by its type."""


@_jit
def _weights(z, t, b):
    """Row of the zoneout weights for step ``t``, sequence ``b`` (size-1 axes broadcast)."""
    return z[t if z.shape[0] > 1 else 0, b if z.shape[1] > 1 else 0]


#: The mixing passes are compiled without reassociation: k * prev + (1 - k) * cand must
#: stay exactly prev for k = 1 and cand for k = 0 (rewritten as cand + k (prev - cand)
#: it would not).
_exact_jit = numba.njit(fastmath={"nsz", "arcp", "contract"}, cache=True, nogil=True,
                        error_model="numpy")


@_exact_jit
def _mix_row(k, prev, cand, new):
    """new = k * prev + (1 - k) * cand."""
    for j in range(new.shape[0]):
        new[j] = k[j] * prev[j] + (1 - k[j]) * cand[j]


@_exact_jit
def _split_row(k, d1, d2, d_cand, d_direct):
    """The gradient d1 + d2 of a zoned-out state: (1 - k) of it to the candidate, k of
    it straight to the previous state (``d_cand`` may be ``d1``)."""
    for j in range(d_cand.shape[0]):
        d = d1[j] + d2[j]
        d_cand[j] = (1 - k[j]) * d
        d_direct[j] = k[j] * d


def _no_zoneout(H, dtype):
    """Weights 0 everywhere: the state an LSTM was given no mask for is not zoned out."""
    return np.zeros((1, 1, H), dtype=dtype)


# ------------------------------------------------------------- vanilla RNN

@_jit
def _rnn_forward_loop(gemm, xw, bias, w_hh, trans_w, zh, lengths, reverse, training, relu, hs,
                      hhat, out):
    T, B, H = xw.shape
    r = 1 if reverse else 0
    a = np.empty((B, H), dtype=xw.dtype)
    for k in range(T):
        t = T - 1 - k if reverse else k
        prev, new = _slots(t, k, r, training)
        h_prev, h_new = hs[prev], hs[new]
        _mm(gemm, h_prev, False, w_hh, trans_w, a, 0.0)
        for b in range(B):
            if t < lengths[b]:
                cand = hhat[t, b] if training else a[b]
                for j in range(H):
                    v = a[b, j] + xw[t, b, j] + bias[j]
                    cand[j] = (v if not v <= 0 else 0.0) if relu else tanh(v)  # NaN stays NaN
                _mix_row(_weights(zh, t, b), h_prev[b], cand, h_new[b])
                _copy_row(h_new[b], out[t, b])
            else:
                _carry_row(h_prev[b], h_new[b], out[t, b])


@_jit
def _rnn_backward_loop(gemm, d_out, d_h, w_hh, zh, lengths, reverse, relu, hhat, d_a):
    T, B, H = d_out.shape
    tmp = np.empty((B, H), dtype=d_out.dtype)
    direct = np.empty((B, H), dtype=d_out.dtype)
    for k in range(T):
        t = k if reverse else T - 1 - k
        for b in range(B):
            if t < lengths[b]:
                _split_row(_weights(zh, t, b), d_out[t, b], d_h[b], d_a[t, b], direct[b])
                for j in range(H):
                    hv = hhat[t, b, j]
                    if relu:
                        d_a[t, b, j] = d_a[t, b, j] if hv > 0 else 0.0
                    else:
                        d_a[t, b, j] = d_a[t, b, j] * (1 - hv * hv)
            else:
                _zero_row(d_a[t, b])
        _mm(gemm, d_a[t], False, w_hh, False, tmp, 0.0)
        for b in range(B):
            if t < lengths[b]:
                for j in range(H):
                    d_h[b, j] = tmp[b, j] + direct[b, j]


def rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training, relu, zoneout_h):
    x, w_ih, w_hh = _c(x, w_ih, w_hh)
    T, B, _ = x.shape
    H = h0.shape[1]
    xw = _project(x, w_ih)
    bias = _bias(b_ih, b_hh, w_ih.shape[0], x.dtype)
    (hs,) = _state_buffers(T, B, H, x.dtype, training, reverse, h0)
    out = _workspace.empty((T, B, H), dtype=x.dtype)
    hhat = _workspace.empty((T, B, H) if training else (0, 0, 0), dtype=x.dtype)
    full = _full_lengths(lengths, T, B)
    _rnn_forward_loop(gemm_for(x.dtype), xw, bias, *_recurrent_weight(w_hh, B, T), zoneout_h,
                      full, reverse, training, relu, hs, hhat, out)
    cache = None
    if training:
        cache = Cache((x, hs, hhat, w_ih, w_hh, b_ih is not None, full, reverse, relu,
                       zoneout_h))
    return out, _final(hs, T, training, reverse), cache


def rnn_backward(d_out, d_h_n, cache):
    x, hs, hhat, w_ih, w_hh, has_bias, full, reverse, relu, zh = cache
    T, B, _ = x.shape
    r = int(reverse)
    d_a = _workspace.empty((T, B, w_hh.shape[0]), dtype=x.dtype)
    d_h = d_h_n.astype(x.dtype, copy=True)
    _rnn_backward_loop(gemm_for(x.dtype), np.ascontiguousarray(d_out), d_h, w_hh, zh, full,
                       reverse, relu, hhat, d_a)
    grads = _param_grads(d_a, d_a, x, hs[r:T + r], w_ih, has_bias)
    return (grads[0], d_h) + grads[1:]


# -------------------------------------------------------------------- LSTM

@_jit
def _lstm_forward_loop(gemm, xw, bias, w_hh, trans_w, zh, zc, lengths, reverse, training, hs, cs,
                       out, gates, chat):
    T, B, G = xw.shape
    H = G // 4
    r = 1 if reverse else 0
    scratch = np.empty((B, G), dtype=xw.dtype)
    c_scratch = np.empty((B, H), dtype=xw.dtype)
    h_cand = np.empty((B, H), dtype=xw.dtype)
    for k in range(T):
        t = T - 1 - k if reverse else k
        prev, new = _slots(t, k, r, training)
        h_prev, c_prev, h_new, c_new = hs[prev], cs[prev], hs[new], cs[new]
        a = gates[t] if training else scratch
        c_cand = chat[t] if training else c_scratch
        _mm(gemm, h_prev, False, w_hh, trans_w, a, 0.0)
        for b in range(B):
            if t < lengths[b]:
                _lstm_row(a[b], xw[t, b], bias, c_prev[b], c_cand[b], h_cand[b], H)
                _mix_row(_weights(zc, t, b), c_prev[b], c_cand[b], c_new[b])
                _mix_row(_weights(zh, t, b), h_prev[b], h_cand[b], h_new[b])
                _copy_row(h_new[b], out[t, b])
            else:
                _carry_row(h_prev[b], h_new[b], out[t, b])
                _copy_row(c_prev[b], c_new[b])


@_jit
def _lstm_backward_loop(gemm, d_out, d_h, d_c, w_hh, zh, zc, lengths, reverse, cs, chat, gates,
                        d_a):
    T, B, H = d_out.shape
    r = 1 if reverse else 0
    tmp = np.empty((B, H), dtype=d_out.dtype)
    d_cand = np.empty((B, H), dtype=d_out.dtype)
    direct_h = np.empty((B, H), dtype=d_out.dtype)
    direct_c = np.empty((B, H), dtype=d_out.dtype)
    zeros = np.zeros(H, dtype=d_out.dtype)
    for k in range(T):
        t = k if reverse else T - 1 - k
        c_prev = cs[t + r]
        for b in range(B):
            if t < lengths[b]:
                _split_row(_weights(zh, t, b), d_out[t, b], d_h[b], d_cand[b], direct_h[b])
                _split_row(_weights(zc, t, b), d_c[b], zeros, d_c[b], direct_c[b])
                # tanh of c~ (the candidate): the row pass reads it off the cache
                _lstm_backward_row(gates[t, b], c_prev[b], chat[t, b], d_cand[b], zeros, d_c[b],
                                   d_a[t, b], H)
                _add_row(direct_c[b], d_c[b])
            else:
                _zero_row(d_a[t, b])
        _mm(gemm, d_a[t], False, w_hh, False, tmp, 0.0)
        for b in range(B):
            if t < lengths[b]:
                for j in range(H):
                    d_h[b, j] = tmp[b, j] + direct_h[b, j]


def lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training, zoneout_h,
                 zoneout_c):
    x, w_ih, w_hh = _c(x, w_ih, w_hh)
    T, B, _ = x.shape
    H = c0.shape[1]
    zh = _no_zoneout(H, x.dtype) if zoneout_h is None else zoneout_h
    zc = _no_zoneout(H, x.dtype) if zoneout_c is None else zoneout_c
    xw = _project(x, w_ih)
    bias = _bias(b_ih, b_hh, w_ih.shape[0], x.dtype)
    hs, cs = _state_buffers(T, B, H, x.dtype, training, reverse, h0, c0)
    out = _workspace.empty((T, B, H), dtype=x.dtype)
    shape = (T, B, 4 * H) if training else (0, 0, 0)
    gates = np.empty(shape, dtype=x.dtype)
    chat = _workspace.empty((T, B, H) if training else (0, 0, 0), dtype=x.dtype)
    full = _full_lengths(lengths, T, B)
    _lstm_forward_loop(gemm_for(x.dtype), xw, bias, *_recurrent_weight(w_hh, B, T), zh, zc, full,
                       reverse, training, hs, cs, out, gates, chat)
    cache = None
    if training:
        cache = Cache((x, hs, cs, chat, gates, w_ih, w_hh, b_ih is not None, full, reverse, zh,
                       zc))
    return out, _final(hs, T, training, reverse), _final(cs, T, training, reverse), cache


def lstm_backward(d_out, d_h_n, d_c_n, cache):
    x, hs, cs, chat, gates, w_ih, w_hh, has_bias, full, reverse, zh, zc = cache
    T, B, _ = x.shape
    r = int(reverse)
    d_a = _workspace.empty((T, B, w_hh.shape[0]), dtype=x.dtype)
    d_h = d_h_n.astype(x.dtype, copy=True)
    d_c = d_c_n.astype(x.dtype, copy=True)
    _lstm_backward_loop(gemm_for(x.dtype), np.ascontiguousarray(d_out), d_h, d_c, w_hh, zh, zc,
                        full, reverse, cs, chat, gates, d_a)
    grads = _param_grads(d_a, d_a, x, hs[r:T + r], w_ih, has_bias)
    return (grads[0], d_h, d_c) + grads[1:]


# --------------------------------------------------------------------- GRU

@_jit
def _gru_forward_loop(gemm, xw, bias, w_hh, trans_w, b_hn, zh, lengths, reverse, training, hs,
                      out, gates, hns):
    T, B, G = xw.shape
    H = G // 3
    r_ = 1 if reverse else 0
    scratch = np.empty((B, G), dtype=xw.dtype)
    scratch_hn = np.empty((B, H), dtype=xw.dtype)
    h_cand = np.empty((B, H), dtype=xw.dtype)
    for k in range(T):
        t = T - 1 - k if reverse else k
        prev, new = _slots(t, k, r_, training)
        h_prev, h_new = hs[prev], hs[new]
        a, hn = (gates[t], hns[t]) if training else (scratch, scratch_hn)
        _mm(gemm, h_prev, False, w_hh, trans_w, a, 0.0)
        for b in range(B):
            if t < lengths[b]:
                _gru_row(a[b], xw[t, b], bias, b_hn, h_prev[b], h_cand[b], hn[b], H)
                _mix_row(_weights(zh, t, b), h_prev[b], h_cand[b], h_new[b])
                _copy_row(h_new[b], out[t, b])
            else:
                _carry_row(h_prev[b], h_new[b], out[t, b])


@_jit
def _gru_backward_loop(gemm, d_out, d_h, w_hh, zh, lengths, reverse, hs, gates, hns, d_a_x,
                       d_a_h):
    T, B, H = d_out.shape
    rv = 1 if reverse else 0
    tmp = np.empty((B, H), dtype=d_out.dtype)
    d_cand = np.empty((B, H), dtype=d_out.dtype)
    direct = np.empty((B, H), dtype=d_out.dtype)
    for k in range(T):
        t = k if reverse else T - 1 - k
        h_prev = hs[t + rv]
        for b in range(B):
            if t < lengths[b]:
                _split_row(_weights(zh, t, b), d_out[t, b], d_h[b], d_cand[b], direct[b])
                _zero_row(d_h[b])     # the row pass leaves its direct part, d_cand * z, here
                _gru_backward_row(gates[t, b], hns[t, b], h_prev[b], d_cand[b], d_h[b],
                                  d_a_x[t, b], d_a_h[t, b], H)
                _add_row(direct[b], d_h[b])
            else:
                _zero_row(d_a_x[t, b])
                _zero_row(d_a_h[t, b])
        _mm(gemm, d_a_h[t], False, w_hh, False, tmp, 0.0)
        for b in range(B):
            if t < lengths[b]:
                _add_row(tmp[b], d_h[b])


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training, zoneout_h):
    """reset_after=True only (the layers refuse zoneout with reset_after=False here)."""
    x, w_ih, w_hh = _c(x, w_ih, w_hh)
    T, B, _ = x.shape
    H = h0.shape[1]
    (hs,) = _state_buffers(T, B, H, x.dtype, training, reverse, h0)
    out = _workspace.empty((T, B, H), dtype=x.dtype)
    gates = _workspace.empty((T, B, 3 * H) if training else (0, 0, 0), dtype=x.dtype)
    hns = _workspace.empty((T, B, H) if training else (0, 0, 0), dtype=x.dtype)
    full = _full_lengths(lengths, T, B)
    xw = _project(x, w_ih)
    bias, b_hn = _gru_biases(b_ih, b_hh, H, x.dtype)
    _gru_forward_loop(gemm_for(x.dtype), xw, bias, *_recurrent_weight(w_hh, B, T), b_hn,
                      zoneout_h, full, reverse, training, hs, out, gates, hns)
    cache = None
    if training:
        cache = Cache((x, hs, gates, hns, w_ih, w_hh, b_ih is not None, full, reverse,
                       zoneout_h))
    return out, _final(hs, T, training, reverse), cache


def gru_backward(d_out, d_h_n, cache):
    x, hs, gates, hns, w_ih, w_hh, has_bias, full, reverse, zh = cache
    T, B, _ = x.shape
    H = hs.shape[2]
    rv = int(reverse)
    d_h = d_h_n.astype(x.dtype, copy=True)
    d_a_x = _workspace.empty((T, B, 3 * H), dtype=x.dtype)
    d_a_h = _workspace.empty((T, B, 3 * H), dtype=x.dtype)
    _gru_backward_loop(gemm_for(x.dtype), np.ascontiguousarray(d_out), d_h, w_hh, zh, full,
                       reverse, hs, gates, hns, d_a_x, d_a_h)
    grads = _param_grads(d_a_x, d_a_h, x, hs[rv:T + rv], w_ih, has_bias)
    return (grads[0], d_h) + grads[1:]
