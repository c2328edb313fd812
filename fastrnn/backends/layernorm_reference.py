"""NumPy reference kernels of the layer-normalised LSTM and GRU (Ba et al. 2016).

Readable kernels that mirror the equations; the oracle of the numba kernels
(:mod:`.layernorm_numba`). Notation and masking are those of
:mod:`fastrnn.backends` (``T, B, I, H, G``; inactive steps carry the state and
output 0; ``T + 1`` state buffers with offset ``r = int(reverse)``).

Layer norm over the last axis of a row ``v`` of length ``N``, with epsilon
``EPS = 1e-5`` as in ``torch.nn.LayerNorm``::

    LN(v) = (v - mean(v)) / sqrt(var(v) + EPS)      (biased variance)

The gains and shifts are applied by the cells; the kernels keep the
normalised rows and ``rstd = 1 / sqrt(var + EPS)`` for backward, whose layer-norm
step is ``d_v = rstd * (d_vhat - mean(d_vhat) - vhat * mean(d_vhat * vhat))``.

Kernel signatures (one layer, one direction; ``b_*``, ``beta_c`` and their
gradients are ``None`` without biases)::

    layernorm_lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, gamma_ih, gamma_hh,
                           gamma_c, beta_c, lengths=None, reverse=False,
                           training=True) -> out, h_n, c_n, cache
    layernorm_lstm_backward(d_out, d_h_n, d_c_n, cache)
        -> d_x, d_h0, d_c0, d_w_ih, d_w_hh, d_b_ih, d_b_hh,
           d_gamma_ih, d_gamma_hh, d_gamma_c, d_beta_c
    layernorm_gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, gamma_ih, gamma_hh,
                          lengths=None, reverse=False, training=True)
        -> out, h_n, cache
    layernorm_gru_backward(d_out, d_h_n, cache)
        -> d_x, d_h0, d_w_ih, d_w_hh, d_b_ih, d_b_hh, d_gamma_ih, d_gamma_hh

Shapes: ``gamma_ih, gamma_hh`` (G,); ``gamma_c, beta_c`` (H,).
"""

from __future__ import annotations

import numpy as np

from .reference import _active, _sigmoid, _steps

xp = np

#: Layer-norm epsilon, as torch.nn.LayerNorm's default.
EPS = 1e-5


def _layer_norm(v):
    """Normalise the last axis: ``(vhat, rstd)`` with ``rstd`` of shape (..., 1)."""
    centred = v - v.mean(axis=-1, keepdims=True)
    rstd = 1 / np.sqrt((centred * centred).mean(axis=-1, keepdims=True) + EPS)
    return centred * rstd, rstd


def _layer_norm_backward(d_vhat, vhat, rstd):
    """Gradient with respect to ``v`` of ``vhat = LN(v)``, given ``d_vhat``."""
    return rstd * (d_vhat - d_vhat.mean(axis=-1, keepdims=True)
                   - vhat * (d_vhat * vhat).mean(axis=-1, keepdims=True))


def _plus(a, b):
    return a if b is None else a + b


def _sum_tb(a):
    """Sum over time and batch of a (T, B, N) array: (N,)."""
    return a.reshape(-1, a.shape[-1]).sum(axis=0)


def _input_side(x, w_ih, gamma_ih, b_ih):
    """LN(W_ih x) of every step at once: ``(xhat, rstd, gamma_ih * xhat + b_ih)``."""
    T, B, I = x.shape
    xw = (x.reshape(T * B, I) @ w_ih.T).reshape(T, B, -1)
    xhat, rstd = _layer_norm(xw)
    return xhat, rstd, _plus(gamma_ih * xhat, b_ih)


def _weight_grads(d_xw, d_hw, x, h_prev, w_ih):
    """Whole-sequence GEMMs: d_x, d_w_ih, d_w_hh from the gradients of W_ih x and W_hh h."""
    T, B, I = x.shape
    G = d_xw.shape[2]
    d_xw2, d_hw2 = d_xw.reshape(T * B, G), d_hw.reshape(T * B, G)
    return ((d_xw2 @ w_ih).reshape(T, B, I), d_xw2.T @ x.reshape(T * B, I),
            d_hw2.T @ h_prev.reshape(T * B, -1))


# ----------------------------------------------------------------------- LSTM

def layernorm_lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, gamma_ih, gamma_hh, gamma_c,
                           beta_c, lengths=None, reverse=False, training=True):
    """Layer-normalised LSTM, one layer, one direction, gates i, f, g, o.

    Equations
    ---------
    .. math::
        [a_i, a_f, a_g, a_o] = \\gamma_{ih} \\odot LN(W_{ih} x_t) + b_{ih}
                             + \\gamma_{hh} \\odot LN(W_{hh} h_{t-1}) + b_{hh}
        i = \\sigma(a_i),\\ f = \\sigma(a_f),\\ g = \\tanh(a_g),\\ o = \\sigma(a_o)
        c_t = f \\odot c_{t-1} + i \\odot g
        h_t = o \\odot \\tanh(\\gamma_c \\odot LN(c_t) + \\beta_c)

    The gate norms run over the 4H gate rows of one sequence, the cell norm
    over its H units. ``c_t`` itself (not its norm) is the carried state.
    """
    T, B, _ = x.shape
    H = h0.shape[1]
    r = int(reverse)
    xhat, x_rstd, a_x = _input_side(x, w_ih, gamma_ih, b_ih)
    out = np.zeros((T, B, H), dtype=x.dtype)
    hs = np.empty((T + 1, B, H), dtype=x.dtype)
    cs = np.empty((T + 1, B, H), dtype=x.dtype)
    saved = {k: [None] * T for k in ("gates", "hhat", "h_rstd", "chat", "c_rstd", "tanh_y")}
    hs[r * T], cs[r * T] = h0, c0
    h, c = h0, c0
    for t in _steps(T, reverse):
        hhat, h_rstd = _layer_norm(h @ w_hh.T)
        a = a_x[t] + _plus(gamma_hh * hhat, b_hh)
        i = _sigmoid(a[:, 0 * H:1 * H])
        f = _sigmoid(a[:, 1 * H:2 * H])
        g = np.tanh(a[:, 2 * H:3 * H])
        o = _sigmoid(a[:, 3 * H:4 * H])
        c_new = f * c + i * g
        chat, c_rstd = _layer_norm(c_new)
        tanh_y = np.tanh(_plus(gamma_c * chat, beta_c))
        h_new = o * tanh_y
        m = _active(lengths, t, B)
        out[t] = np.where(m, h_new, 0)
        h = np.where(m, h_new, h)
        c = np.where(m, c_new, c)
        hs[t + 1 - r], cs[t + 1 - r] = h, c
        if training:
            for k, v in (("gates", np.concatenate([i, f, g, o], axis=1)), ("hhat", hhat),
                         ("h_rstd", h_rstd), ("chat", chat), ("c_rstd", c_rstd),
                         ("tanh_y", tanh_y)):
                saved[k][t] = v
    cache = None
    if training:
        cache = {k: np.stack(v) for k, v in saved.items()}
        cache.update(x=x, xhat=xhat, x_rstd=x_rstd, hs=hs, cs=cs, w_ih=w_ih, w_hh=w_hh,
                     gamma_ih=gamma_ih, gamma_hh=gamma_hh, gamma_c=gamma_c,
                     has_bias=b_ih is not None, lengths=lengths, reverse=reverse)
    return out, h.copy(), c.copy(), cache


def layernorm_lstm_backward(d_out, d_h_n, d_c_n, cache):
    """Backward of :func:`layernorm_lstm_forward`.

    Equations
    ---------
    .. math::
        \\delta h = \\partial L/\\partial h_t,\\quad
        \\delta y = \\delta h\\, o (1 - \\tanh^2 y),\\quad y = \\gamma_c \\hat c + \\beta_c
        \\delta c = \\partial L/\\partial c_t + LN'(\\gamma_c \\delta y)
        \\delta a_i = \\delta c\\, g\\, i(1-i),\\ \\delta a_f = \\delta c\\, c_{t-1} f(1-f),\\
        \\delta a_g = \\delta c\\, i (1-g^2),\\ \\delta a_o = \\delta h \\tanh(y)\\, o(1-o)
        \\partial L/\\partial h_{t-1} = LN'(\\gamma_{hh} \\delta a) W_{hh},\\quad
        \\partial L/\\partial c_{t-1} = \\delta c\\, f

    where ``LN'`` is the layer-norm step of the module docstring, each with
    its own row statistics.
    """
    x, hs, cs, gates = cache["x"], cache["hs"], cache["cs"], cache["gates"]
    w_hh, lengths, reverse = cache["w_hh"], cache["lengths"], cache["reverse"]
    gamma_hh, gamma_c = cache["gamma_hh"], cache["gamma_c"]
    T, B, _ = x.shape
    H = hs.shape[2]
    r = int(reverse)
    d_a = np.zeros((T, B, 4 * H), dtype=x.dtype)
    d_hw = np.zeros((T, B, 4 * H), dtype=x.dtype)
    d_y_all = np.zeros((T, B, H), dtype=x.dtype)
    d_h, d_c = d_h_n.copy(), d_c_n.copy()
    for t in _steps(T, not reverse):
        m = _active(lengths, t, B)
        i, f, g, o = (gates[t, :, k * H:(k + 1) * H] for k in range(4))
        tanh_y, c_prev = cache["tanh_y"][t], cs[t + r]
        d_h_total = d_out[t] + d_h
        d_y = np.where(m, d_h_total * o * (1 - tanh_y * tanh_y), 0)
        d_c_total = d_c + _layer_norm_backward(gamma_c * d_y, cache["chat"][t],
                                               cache["c_rstd"][t])
        d_a_t = np.concatenate([
            d_c_total * g * i * (1 - i),
            d_c_total * c_prev * f * (1 - f),
            d_c_total * i * (1 - g * g),
            d_h_total * tanh_y * o * (1 - o),
        ], axis=1)
        d_a[t] = np.where(m, d_a_t, 0)
        d_y_all[t] = d_y
        d_hw[t] = _layer_norm_backward(gamma_hh * d_a[t], cache["hhat"][t], cache["h_rstd"][t])
        d_h = np.where(m, d_hw[t] @ w_hh, d_h)
        d_c = np.where(m, d_c_total * f, d_c)
    d_xw = _layer_norm_backward(cache["gamma_ih"] * d_a, cache["xhat"], cache["x_rstd"])
    d_x, d_w_ih, d_w_hh = _weight_grads(d_xw, d_hw, x, hs[r:T + r], cache["w_ih"])
    d_gamma_ih = _sum_tb(d_a * cache["xhat"])
    d_gamma_hh = _sum_tb(d_a * cache["hhat"])
    d_gamma_c = _sum_tb(d_y_all * cache["chat"])
    d_b = _sum_tb(d_a) if cache["has_bias"] else None
    d_beta_c = _sum_tb(d_y_all) if cache["has_bias"] else None
    return (d_x, d_h, d_c, d_w_ih, d_w_hh, d_b, None if d_b is None else d_b.copy(),
            d_gamma_ih, d_gamma_hh, d_gamma_c, d_beta_c)


# ------------------------------------------------------------------------ GRU

def layernorm_gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, gamma_ih, gamma_hh, lengths=None,
                          reverse=False, training=True):
    """Layer-normalised GRU, one layer, one direction, gates r, z, n (reset after).

    Equations
    ---------
    .. math::
        [x_r, x_z, x_n] = \\gamma_{ih} \\odot LN(W_{ih} x_t) + b_{ih}
        [u_r, u_z, u_n] = \\gamma_{hh} \\odot LN(W_{hh} h_{t-1}) + b_{hh}
        r = \\sigma(x_r + u_r),\\quad z = \\sigma(x_z + u_z)
        n = \\tanh(x_n + r \\odot u_n)
        h_t = (1 - z) \\odot n + z \\odot h_{t-1}

    As haste's LayerNormGRU: both norms run over the 3H gate rows of one
    sequence, and the reset gate applies after the recurrent product, as in
    ``torch.nn.GRU``.
    """
    T, B, _ = x.shape
    H = h0.shape[1]
    rv = int(reverse)
    xhat, x_rstd, x_a = _input_side(x, w_ih, gamma_ih, b_ih)
    out = np.zeros((T, B, H), dtype=x.dtype)
    hs = np.empty((T + 1, B, H), dtype=x.dtype)
    saved = {k: [None] * T for k in ("gates", "hhat", "h_rstd", "u_n")}
    hs[rv * T] = h0
    h = h0
    for t in _steps(T, reverse):
        hhat, h_rstd = _layer_norm(h @ w_hh.T)
        u = _plus(gamma_hh * hhat, b_hh)
        r = _sigmoid(x_a[t, :, :H] + u[:, :H])
        z = _sigmoid(x_a[t, :, H:2 * H] + u[:, H:2 * H])
        n = np.tanh(x_a[t, :, 2 * H:] + r * u[:, 2 * H:])
        h_new = (1 - z) * n + z * h
        m = _active(lengths, t, B)
        out[t] = np.where(m, h_new, 0)
        h = np.where(m, h_new, h)
        hs[t + 1 - rv] = h
        if training:
            for k, v in (("gates", np.concatenate([r, z, n], axis=1)), ("hhat", hhat),
                         ("h_rstd", h_rstd), ("u_n", u[:, 2 * H:])):
                saved[k][t] = v
    cache = None
    if training:
        cache = {k: np.stack(v) for k, v in saved.items()}
        cache.update(x=x, xhat=xhat, x_rstd=x_rstd, hs=hs, w_ih=w_ih, w_hh=w_hh,
                     gamma_ih=gamma_ih, gamma_hh=gamma_hh, has_bias=b_ih is not None,
                     lengths=lengths, reverse=reverse)
    return out, h.copy(), cache


def layernorm_gru_backward(d_out, d_h_n, cache):
    """Backward of :func:`layernorm_gru_forward`.

    Equations
    ---------
    .. math::
        \\delta h = \\partial L/\\partial h_t,\\quad
        \\delta a_n = \\delta h (1-z)(1-n^2),\\quad
        \\delta a_z = \\delta h (h_{t-1} - n) z (1-z),\\quad
        \\delta a_r = \\delta a_n u_n r (1-r)
        \\delta x_\\cdot = [\\delta a_r, \\delta a_z, \\delta a_n],\\quad
        \\delta u_\\cdot = [\\delta a_r, \\delta a_z, r\\, \\delta a_n]
        \\partial L/\\partial h_{t-1} = \\delta h\\, z + LN'(\\gamma_{hh} \\delta u) W_{hh}
    """
    x, hs, gates, w_hh = cache["x"], cache["hs"], cache["gates"], cache["w_hh"]
    lengths, reverse, gamma_hh = cache["lengths"], cache["reverse"], cache["gamma_hh"]
    T, B, _ = x.shape
    H = hs.shape[2]
    rv = int(reverse)
    d_xa = np.zeros((T, B, 3 * H), dtype=x.dtype)
    d_u = np.zeros((T, B, 3 * H), dtype=x.dtype)
    d_hw = np.zeros((T, B, 3 * H), dtype=x.dtype)
    d_h = d_h_n.copy()
    for t in _steps(T, not reverse):
        m = _active(lengths, t, B)
        r, z, n = (gates[t, :, k * H:(k + 1) * H] for k in range(3))
        h_prev = hs[t + rv]
        d_h_total = d_out[t] + d_h
        d_a_n = d_h_total * (1 - z) * (1 - n * n)
        d_a_z = d_h_total * (h_prev - n) * z * (1 - z)
        d_a_r = d_a_n * cache["u_n"][t] * r * (1 - r)
        d_xa[t] = np.where(m, np.concatenate([d_a_r, d_a_z, d_a_n], axis=1), 0)
        d_u[t] = np.where(m, np.concatenate([d_a_r, d_a_z, d_a_n * r], axis=1), 0)
        d_hw[t] = _layer_norm_backward(gamma_hh * d_u[t], cache["hhat"][t], cache["h_rstd"][t])
        d_h = np.where(m, d_h_total * z + d_hw[t] @ w_hh, d_h)
    d_xw = _layer_norm_backward(cache["gamma_ih"] * d_xa, cache["xhat"], cache["x_rstd"])
    d_x, d_w_ih, d_w_hh = _weight_grads(d_xw, d_hw, x, hs[rv:T + rv], cache["w_ih"])
    d_gamma_ih = _sum_tb(d_xa * cache["xhat"])
    d_gamma_hh = _sum_tb(d_u * cache["hhat"])
    has_bias = cache["has_bias"]
    return (d_x, d_h, d_w_ih, d_w_hh, _sum_tb(d_xa) if has_bias else None,
            _sum_tb(d_u) if has_bias else None, d_gamma_ih, d_gamma_hh)
