"""The NumPy reference backend: readable kernels that mirror the equations.

This is the oracle of every test and benchmark. Shapes and the masking rule
are those of :mod:`fastrnn.backends` (``T, B, I, H, G``). Each kernel does
the input projection of all time steps as one GEMM, then one step at a time
the recurrent GEMM and the pointwise gate maths. Backward walks the steps in
the opposite order and finishes with whole-sequence GEMMs for ``d_x``,
``d_w_ih`` and ``d_w_hh``.
"""

from __future__ import annotations

import numpy as np

xp = np


def _steps(T: int, reverse: bool) -> range:
    return range(T - 1, -1, -1) if reverse else range(T)


def _active(lengths, t: int, B: int):
    """(B, 1) bool: which sequences are active at step ``t``."""
    if lengths is None:
        return np.ones((B, 1), dtype=bool)
    return (t < lengths)[:, None]


def _sigmoid(a):
    # exp of a negative argument only: no overflow warning for any finite a.
    e = np.exp(-np.abs(a))
    return np.where(a >= 0, 1 / (1 + e), e / (1 + e)).astype(a.dtype, copy=False)


def _zone(z, t):
    """Zoneout weight of the previous state at step ``t``, broadcastable to (B, width);
    None without zoneout."""
    return None if z is None else z[t if z.shape[0] > 1 else 0]


def _zone_mix(k, prev, new):
    """Zoneout: k h_{t-1} + (1 - k) h~_t."""
    return new if k is None else k * prev + (1 - k) * new


def _zone_split(k, d):
    """The gradient ``d`` of a zoned-out state split into (the part of h~_t, the part
    that goes straight to h_{t-1})."""
    return (d, 0) if k is None else ((1 - k) * d, k * d)


def _project(x, w_ih, bias):
    """Input projection of every step at once: x W_ih^T + bias, (T, B, G)."""
    T, B, I = x.shape
    xw = (x.reshape(T * B, I) @ w_ih.T).reshape(T, B, -1)
    if bias is not None:
        xw += bias
    return xw


def _bias_sum(b_ih, b_hh):
    return None if b_ih is None else b_ih + b_hh


def _param_grads(d_a_x, d_a_h, x, h_prev, w_ih, b_ih):
    """Whole-sequence GEMMs: d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh.

    d_a_x: (T, B, G) gradient of the pre-activations fed by x W_ih^T + b_ih.
    d_a_h: (T, B, G) gradient of the pre-activations fed by h W_hh^T + b_hh.
    h_prev: (T, B, H) state before every step.
    """
    T, B, I = x.shape
    G = d_a_x.shape[2]
    d_a_x2 = d_a_x.reshape(T * B, G)
    d_a_h2 = d_a_h.reshape(T * B, G)
    d_x = (d_a_x2 @ w_ih).reshape(T, B, I)
    d_w_ih = d_a_x2.T @ x.reshape(T * B, I)
    d_w_hh = d_a_h2.T @ h_prev.reshape(T * B, -1)
    if b_ih is None:
        return d_x, d_w_ih, d_w_hh, None, None
    d_b_ih = d_a_x2.sum(axis=0)
    return d_x, d_w_ih, d_w_hh, d_b_ih, d_a_h2.sum(axis=0)


# ---------------------------------------------------------------- vanilla RNN

def _rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training, relu, zoneout_h):
    T, B, _ = x.shape
    H = h0.shape[1]
    r = int(reverse)
    xw = _project(x, w_ih, _bias_sum(b_ih, b_hh))
    out = np.zeros((T, B, H), dtype=x.dtype)
    hs = np.empty((T + 1, B, H), dtype=x.dtype)
    hs[r * T] = h0
    # h~_t before zoneout, for the activation's derivative in backward
    hhat = np.empty((T, B, H), dtype=x.dtype) if training and zoneout_h is not None else None
    h = h0
    for t in _steps(T, reverse):
        a = xw[t] + h @ w_hh.T
        h_new = np.maximum(a, 0) if relu else np.tanh(a)
        if hhat is not None:
            hhat[t] = h_new
        h_new = _zone_mix(_zone(zoneout_h, t), h, h_new)
        m = _active(lengths, t, B)
        out[t] = np.where(m, h_new, 0)
        h = np.where(m, h_new, h)
        hs[t + 1 - r] = h
    h_n = h.copy()
    cache = None
    if training:
        cache = dict(x=x, hs=hs, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih,
                     lengths=lengths, reverse=reverse, relu=relu, zoneout_h=zoneout_h,
                     hhat=hhat)
    return out, h_n, cache


def _rnn_backward(d_out, d_h_n, cache):
    x, hs, w_hh = cache["x"], cache["hs"], cache["w_hh"]
    lengths, reverse = cache["lengths"], cache["reverse"]
    T, B, _ = x.shape
    r = int(reverse)
    d_a = np.zeros((T, B, w_hh.shape[0]), dtype=x.dtype)
    d_h = d_h_n.copy()
    for t in _steps(T, not reverse):
        m = _active(lengths, t, B)
        h_new = hs[t + 1 - r] if cache["hhat"] is None else cache["hhat"][t]
        d_h_total, d_h_direct = _zone_split(_zone(cache["zoneout_h"], t), d_out[t] + d_h)
        if cache["relu"]:
            d_a[t] = np.where(m & (h_new > 0), d_h_total, 0)
        else:
            d_a[t] = np.where(m, d_h_total * (1 - h_new * h_new), 0)
        d_h = np.where(m, d_a[t] @ w_hh + d_h_direct, d_h)
    d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh = _param_grads(
        d_a, d_a, x, hs[r:T + r], cache["w_ih"], cache["b_ih"])
    return d_x, d_h, d_w_ih, d_w_hh, d_b_ih, d_b_hh


def rnn_tanh_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True,
                     zoneout_h=None):
    """Elman RNN with tanh, one layer, one direction.

    Equations
    ---------
    .. math:: h_t = \\tanh(W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh})

    With ``zoneout_h`` (weights k): h_t = k h_{t-1} + (1 - k) tanh(...).
    Parameters and returns follow the contract of :mod:`fastrnn.backends`.
    """
    return _rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training, False,
                        zoneout_h)


def rnn_relu_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True,
                     zoneout_h=None):
    """Elman RNN with ReLU, one layer, one direction.

    Equations
    ---------
    .. math:: h_t = \\max(0, W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh})

    With ``zoneout_h`` as :func:`rnn_tanh_forward`.
    """
    return _rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training, True,
                        zoneout_h)


def rnn_tanh_backward(d_out, d_h_n, cache):
    """Backward of :func:`rnn_tanh_forward`, using tanh'(a) = 1 - h~^2 (h~ before zoneout)."""
    return _rnn_backward(d_out, d_h_n, cache)


def rnn_relu_backward(d_out, d_h_n, cache):
    """Backward of :func:`rnn_relu_forward`, using relu'(a) = [h > 0]."""
    return _rnn_backward(d_out, d_h_n, cache)


# ----------------------------------------------------------------------- LSTM

def lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True,
                 w_hr=None, zoneout_h=None, zoneout_c=None):
    """LSTM, one layer, one direction, PyTorch's gate order i, f, g, o; with ``w_hr``
    (P, H) torch's LSTM with projections (``proj_size=P``).

    Equations
    ---------
    .. math::
        [a_i, a_f, a_g, a_o] = W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}
        i = \\sigma(a_i),\\ f = \\sigma(a_f),\\ g = \\tanh(a_g),\\ o = \\sigma(a_o)
        c_t = f \\odot c_{t-1} + i \\odot g
        m_t = o \\odot \\tanh(c_t),\\quad h_t = W_{hr} m_t \\ (\\text{or } m_t \\text{ without } W_{hr})

    Shapes with ``w_hr``: ``h0``, ``h_n`` and ``out`` have P columns, ``w_hh`` is
    (4H, P); ``c0`` and ``c_n`` keep H. With zoneout (weights ``k_c``, ``k_h``) the
    values above are the new candidates c~_t, h~_t, and the states are
    ``c_t = k_c c_{t-1} + (1 - k_c) c~_t``, ``h_t = k_h h_{t-1} + (1 - k_h) h~_t``.
    The cache keeps the gates after activation, ``tanh(c~_t)``, ``m_t`` (with
    ``w_hr``) and the states.
    """
    T, B, _ = x.shape
    H, P = c0.shape[1], h0.shape[1]
    r = int(reverse)
    xw = _project(x, w_ih, _bias_sum(b_ih, b_hh))
    out = np.zeros((T, B, P), dtype=x.dtype)
    gates = np.empty((T, B, 4 * H), dtype=x.dtype) if training else None
    tanh_cs = np.empty((T, B, H), dtype=x.dtype) if training else None
    ms = np.empty((T, B, H), dtype=x.dtype) if training and w_hr is not None else None
    hs = np.empty((T + 1, B, P), dtype=x.dtype)
    cs = np.empty((T + 1, B, H), dtype=x.dtype)
    hs[r * T], cs[r * T] = h0, c0
    h, c = h0, c0
    for t in _steps(T, reverse):
        a = xw[t] + h @ w_hh.T
        i = _sigmoid(a[:, 0 * H:1 * H])
        f = _sigmoid(a[:, 1 * H:2 * H])
        g = np.tanh(a[:, 2 * H:3 * H])
        o = _sigmoid(a[:, 3 * H:4 * H])
        c_new = f * c + i * g
        tanh_c = np.tanh(c_new)
        m_t = o * tanh_c
        h_new = m_t if w_hr is None else m_t @ w_hr.T
        c_new = _zone_mix(_zone(zoneout_c, t), c, c_new)
        h_new = _zone_mix(_zone(zoneout_h, t), h, h_new)
        m = _active(lengths, t, B)
        out[t] = np.where(m, h_new, 0)
        h = np.where(m, h_new, h)
        c = np.where(m, c_new, c)
        hs[t + 1 - r], cs[t + 1 - r] = h, c
        if training:
            gates[t] = np.concatenate([i, f, g, o], axis=1)
            tanh_cs[t] = tanh_c
            if ms is not None:
                ms[t] = m_t
    cache = None
    if training:
        cache = dict(x=x, hs=hs, cs=cs, gates=gates, tanh_cs=tanh_cs, w_ih=w_ih, w_hh=w_hh,
                     b_ih=b_ih, lengths=lengths, reverse=reverse, w_hr=w_hr, ms=ms,
                     zoneout_h=zoneout_h, zoneout_c=zoneout_c)
    return out, h.copy(), c.copy(), cache


def lstm_backward(d_out, d_h_n, d_c_n, cache):
    """Backward of :func:`lstm_forward`.

    Equations
    ---------
    .. math::
        \\delta h = \\partial L/\\partial h_t,\\quad
        \\delta c = \\partial L/\\partial c_t + \\delta h\\, o (1 - \\tanh^2 c_t)
        \\delta a_i = \\delta c\\, g\\, i(1-i),\\ \\delta a_f = \\delta c\\, c_{t-1} f(1-f)
        \\delta a_g = \\delta c\\, i (1-g^2),\\ \\delta a_o = \\delta h \\tanh(c_t)\\, o(1-o)
        \\partial L/\\partial h_{t-1} = \\delta a W_{hh},\\quad
        \\partial L/\\partial c_{t-1} = \\delta c\\, f

    With projections ``\\delta h`` above is ``\\delta m = (\\partial L/\\partial h_t) W_{hr}``
    and ``\\partial L/\\partial W_{hr} = \\sum_t (\\partial L/\\partial h_t)^T m_t``, returned
    last. With zoneout the gradients of h_t and c_t split: ``(1 - k)`` of each goes
    through the cell as above, ``k`` of each straight to ``h_{t-1}``, ``c_{t-1}``.
    """
    x, hs, cs, gates, tanh_cs = (cache[k] for k in ("x", "hs", "cs", "gates", "tanh_cs"))
    w_hh, lengths, reverse = cache["w_hh"], cache["lengths"], cache["reverse"]
    w_hr, ms = cache["w_hr"], cache["ms"]
    T, B, _ = x.shape
    H = cs.shape[2]
    r = int(reverse)
    d_a = np.zeros((T, B, 4 * H), dtype=x.dtype)
    d_hp = None if w_hr is None else np.zeros((T, B, w_hr.shape[0]), dtype=x.dtype)
    d_h, d_c = d_h_n.copy(), d_c_n.copy()
    for t in _steps(T, not reverse):
        m = _active(lengths, t, B)
        i, f, g, o = (gates[t, :, k * H:(k + 1) * H] for k in range(4))
        tanh_c, c_prev = tanh_cs[t], cs[t + r]
        d_h_total, d_h_direct = _zone_split(_zone(cache["zoneout_h"], t), d_out[t] + d_h)
        d_c_in, d_c_direct = _zone_split(_zone(cache["zoneout_c"], t), d_c)
        if w_hr is not None:
            d_hp[t] = np.where(m, d_h_total, 0)
            d_h_total = d_h_total @ w_hr      # the gradient of m_t
        d_c_total = d_c_in + d_h_total * o * (1 - tanh_c * tanh_c)
        d_a_t = np.concatenate([
            d_c_total * g * i * (1 - i),
            d_c_total * c_prev * f * (1 - f),
            d_c_total * i * (1 - g * g),
            d_h_total * tanh_c * o * (1 - o),
        ], axis=1)
        d_a[t] = np.where(m, d_a_t, 0)
        d_h = np.where(m, d_a[t] @ w_hh + d_h_direct, d_h)
        d_c = np.where(m, d_c_total * f + d_c_direct, d_c)
    d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh = _param_grads(
        d_a, d_a, x, hs[r:T + r], cache["w_ih"], cache["b_ih"])
    if w_hr is None:
        return d_x, d_h, d_c, d_w_ih, d_w_hh, d_b_ih, d_b_hh
    d_w_hr = d_hp.reshape(T * B, -1).T @ ms.reshape(T * B, H)
    return d_x, d_h, d_c, d_w_ih, d_w_hh, d_b_ih, d_b_hh, d_w_hr


# ------------------------------------------------------------------------ GRU

def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True,
                reset_after=True, zoneout_h=None):
    """GRU, one layer, one direction, PyTorch's gate order r, z, n.

    Equations
    ---------
    .. math::
        r = \\sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr})
        z = \\sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz})
        n = \\tanh(W_{in} x_t + b_{in} + r \\odot (W_{hn} h_{t-1} + b_{hn}))
            \\quad \\text{(reset_after=True, PyTorch and cuDNN)}
        n = \\tanh(W_{in} x_t + b_{in} + W_{hn} (r \\odot h_{t-1}) + b_{hn})
            \\quad \\text{(reset_after=False, Cho et al. 2014)}
        h_t = (1 - z) \\odot n + z \\odot h_{t-1}

    With ``zoneout_h`` (weights k) that h_t is the candidate h~_t and
    ``h_t = k h_{t-1} + (1 - k) h~_t``. The cache keeps r, z, n after activation, the states, and
    ``hn = W_hn h_{t-1} + b_hn`` (reset_after) or nothing more (``r * h``
    is a product of cached values).
    """
    T, B, _ = x.shape
    H = h0.shape[1]
    rev = int(reverse)
    if reset_after:
        xw = _project(x, w_ih, b_ih)
        if b_ih is not None:  # b_hr, b_hz add to the x side; b_hn stays inside r * (.)
            xw[:, :, :2 * H] += b_hh[:2 * H]
        b_hn = None if b_hh is None else b_hh[2 * H:]
    else:
        xw = _project(x, w_ih, _bias_sum(b_ih, b_hh))
    w_hrz, w_hn = w_hh[:2 * H], w_hh[2 * H:]
    out = np.zeros((T, B, H), dtype=x.dtype)
    gates = np.empty((T, B, 3 * H), dtype=x.dtype) if training else None
    hns = np.empty((T, B, H), dtype=x.dtype) if training and reset_after else None
    hs = np.empty((T + 1, B, H), dtype=x.dtype)
    hs[rev * T] = h0
    h = h0
    for t in _steps(T, reverse):
        a_rz = xw[t, :, :2 * H] + h @ w_hrz.T
        r = _sigmoid(a_rz[:, :H])
        z = _sigmoid(a_rz[:, H:])
        if reset_after:
            hn = h @ w_hn.T
            if b_hn is not None:
                hn += b_hn
            n = np.tanh(xw[t, :, 2 * H:] + r * hn)
        else:
            n = np.tanh(xw[t, :, 2 * H:] + (r * h) @ w_hn.T)
        h_new = _zone_mix(_zone(zoneout_h, t), h, (1 - z) * n + z * h)
        m = _active(lengths, t, B)
        out[t] = np.where(m, h_new, 0)
        h = np.where(m, h_new, h)
        hs[t + 1 - rev] = h
        if training:
            gates[t] = np.concatenate([r, z, n], axis=1)
            if reset_after:
                hns[t] = hn
    cache = None
    if training:
        cache = dict(x=x, hs=hs, gates=gates, hns=hns, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih,
                     lengths=lengths, reverse=reverse, reset_after=reset_after,
                     zoneout_h=zoneout_h)
    return out, h.copy(), cache


def gru_backward(d_out, d_h_n, cache):
    """Backward of :func:`gru_forward`.

    Equations
    ---------
    .. math::
        \\delta h = \\partial L/\\partial h_t,\\quad \\delta n = \\delta h (1-z),\\quad
        \\delta z = \\delta h (h_{t-1} - n),\\quad \\delta a_n = \\delta n (1 - n^2)
        \\text{reset_after: } \\delta r = \\delta a_n\\, hn,\\quad
        \\delta hn = \\delta a_n\\, r
        \\text{otherwise: } \\delta(r h) = \\delta a_n W_{hn},\\quad
        \\delta r = \\delta(r h)\\, h_{t-1}
        \\partial L/\\partial h_{t-1} = \\delta h\\, z + [\\delta a_r, \\delta a_z,
        \\delta hn] W_{hh}\\ \\text{(reset_after)}
    """
    x, hs, gates, w_hh = cache["x"], cache["hs"], cache["gates"], cache["w_hh"]
    lengths, reverse, reset_after = cache["lengths"], cache["reverse"], cache["reset_after"]
    T, B, _ = x.shape
    H = hs.shape[2]
    rev = int(reverse)
    w_hrz, w_hn = w_hh[:2 * H], w_hh[2 * H:]
    d_a_x = np.zeros((T, B, 3 * H), dtype=x.dtype)   # feeds W_ih, b_ih
    d_a_h = np.zeros((T, B, 3 * H), dtype=x.dtype)   # feeds W_hh (and b_hh if reset_after)
    d_h = d_h_n.copy()
    for t in _steps(T, not reverse):
        m = _active(lengths, t, B)
        r, z, n = (gates[t, :, k * H:(k + 1) * H] for k in range(3))
        h_prev = hs[t + rev]
        d_h_total, d_h_direct = _zone_split(_zone(cache["zoneout_h"], t), d_out[t] + d_h)
        d_a_n = d_h_total * (1 - z) * (1 - n * n)
        d_a_z = d_h_total * (h_prev - n) * z * (1 - z)
        if reset_after:
            hn = cache["hns"][t]
            d_a_r = d_a_n * hn * r * (1 - r)
            d_hn = d_a_n * r
            d_a_h_t = np.concatenate([d_a_r, d_a_z, d_hn], axis=1)
            d_h_prev = d_h_total * z + d_a_h_t @ w_hh
        else:
            d_rh = d_a_n @ w_hn
            d_a_r = d_rh * h_prev * r * (1 - r)
            # W_hn sees r * h: its rows of d_a_h are scaled when d_w_hh is formed below.
            d_a_h_t = np.concatenate([d_a_r, d_a_z, d_a_n], axis=1)
            d_h_prev = d_h_total * z + d_rh * r + d_a_h_t[:, :2 * H] @ w_hrz
        d_a_x[t] = np.where(m, np.concatenate([d_a_r, d_a_z, d_a_n], axis=1), 0)
        d_a_h[t] = np.where(m, d_a_h_t, 0)
        d_h = np.where(m, d_h_prev + d_h_direct, d_h)
    h_prev_all = hs[rev:T + rev]
    d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh = _param_grads(
        d_a_x, d_a_h, x, h_prev_all, cache["w_ih"], cache["b_ih"])
    if not reset_after:
        # n's recurrent GEMM input is r * h_{t-1}, and b_hn is outside r.
        rh = gates[:, :, :H] * h_prev_all
        d_w_hh[2 * H:] = d_a_h[:, :, 2 * H:].reshape(T * B, H).T @ rh.reshape(T * B, H)
    return d_x, d_h, d_w_ih, d_w_hh, d_b_ih, d_b_hh
