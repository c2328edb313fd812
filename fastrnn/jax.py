"""fastrnn's CPU kernels as JAX functions: one ``jax.custom_vjp`` per cell kind.

::

    out, h_n = fastrnn.jax.rnn_tanh(x, h0, w_ih, w_hh, b_ih, b_hh)   # and rnn_relu
    out, h_n, c_n = fastrnn.jax.lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    out, h_n = fastrnn.jax.gru(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after=True)

One layer, one direction, the kernel contract's shapes and torch's gate
order (:mod:`fastrnn.backends`): ``x`` (T, B, I), states (B, H), ``w_ih``
(G, I), ``w_hh`` (G, H), biases (G,) or None; keywords ``lengths`` (B,)
integers in [0, T] (padded outputs are 0, ``h_n`` is the state after each
sequence's last valid step), ``reverse`` (run backward in time) and
``backend`` ('auto', 'numba', 'numpy'). Stack them for several layers;
a bidirectional layer is a forward and a ``reverse=True`` call, concatenated.

The kernels run on the host through ``jax.pure_callback``, so the functions
work under ``jit``, ``grad`` and ``vmap`` (which loops over the mapped axis).
Forward runs in inference mode; the backward pass runs the kernel's training
forward again and then its BPTT, so a gradient costs about one forward more
than in fastrnn's own layers and JAX holds no opaque cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import backends

__all__ = ["rnn_tanh", "rnn_relu", "lstm", "gru"]


def _host(a):
    """A writable C-ordered numpy copy of a callback argument."""
    return np.array(a, order="C", copy=True)


@functools.lru_cache(maxsize=None)
def _op(cell, backend, reverse, reset_after):
    """The custom_vjp function ``f(x, states, weights, lengths) -> (out, *finals)``."""
    fwd, bwd = backends.get(backend).kernels(cell)
    options = {"reset_after": reset_after} if cell == "gru" else {}

    def unpack(x, states, weights, lengths, training):
        x = _host(x)
        T = x.shape[0]
        lengths = np.asarray(lengths).astype(np.int64)
        if (lengths == T).all():
            lengths = None
        elif training:
            x[np.arange(T)[:, None] >= lengths[None, :]] = 0
        weights = tuple(_host(w) for w in weights)
        if len(weights) == 2:
            weights += (None, None)
        return x, tuple(_host(s) for s in states), weights, lengths

    def host_forward(x, states, weights, lengths):
        x, states, weights, lengths = unpack(x, states, weights, lengths, False)
        result = fwd(x, *states, *weights, lengths=lengths, reverse=reverse, training=False,
                     **options)
        return tuple(result[:-1])

    def host_backward(x, states, weights, lengths, d_out, d_finals):
        x, states, weights, lengths = unpack(x, states, weights, lengths, True)
        cache = fwd(x, *states, *weights, lengths=lengths, reverse=reverse, training=True,
                    **options)[-1]
        d_out = _host(d_out)
        if lengths is not None:
            d_out[np.arange(d_out.shape[0])[:, None] >= lengths[None, :]] = 0
        result = bwd(d_out, *(_host(d) for d in d_finals), cache)
        S = len(states)
        d_weights = result[1 + S:1 + S + len([w for w in weights if w is not None])]
        return result[0], tuple(result[1:1 + S]), tuple(d_weights)

    def shapes_out(x, states):
        T, B = x.shape[:2]
        H = states[0].shape[-1]
        return ((jax.ShapeDtypeStruct((T, B, H), x.dtype),)
                + tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in states))

    @jax.custom_vjp
    def f(x, states, weights, lengths):
        return jax.pure_callback(host_forward, shapes_out(x, states), x, states, weights,
                                 lengths, vmap_method="sequential")

    def f_fwd(x, states, weights, lengths):
        return f(x, states, weights, lengths), (x, states, weights, lengths)

    def f_bwd(residuals, cotangents):
        x, states, weights, lengths = residuals
        like = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                      (x, states, weights))
        d_x, d_states, d_weights = jax.pure_callback(
            host_backward, like, x, states, weights, lengths, cotangents[0],
            tuple(cotangents[1:]), vmap_method="sequential")
        return d_x, d_states, d_weights, None

    f.defvjp(f_fwd, f_bwd)
    return f


def _call(cell, x, states, weights, lengths, reverse, backend, reset_after=True):
    x = jnp.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"x must have shape (T, B, input_size), got {x.shape}")
    if x.dtype not in (jnp.float32, jnp.float64):
        raise TypeError(f"x has dtype {x.dtype}; fastrnn.jax needs float32 or float64")
    T, B, I = x.shape
    names = ("h0", "c0")[:len(states)]
    states = tuple(jnp.asarray(s) for s in states)
    H = states[0].shape[-1] if states[0].ndim == 2 else None
    for name, s in zip(names, states):
        if s.shape != (B, H) or s.dtype != x.dtype:
            raise ValueError(f"{name} must have shape (B, H) = ({B}, {H}) and x's dtype "
                             f"{x.dtype}, got {s.shape} {s.dtype}")
    w_ih, w_hh, b_ih, b_hh = weights
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih and b_hh must both be given or both be None")
    G = backends.gate_count(cell) * H
    expected = {"w_ih": (G, I), "w_hh": (G, H), "b_ih": (G,), "b_hh": (G,)}
    given = {"w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh}
    arrays = []
    for name, w in given.items():
        if w is None:
            continue
        w = jnp.asarray(w)
        if w.shape != expected[name] or w.dtype != x.dtype:
            raise ValueError(f"{name} must have shape {expected[name]} and x's dtype "
                             f"{x.dtype}, got {w.shape} {w.dtype}")
        arrays.append(w)
    if lengths is None:
        lengths = jnp.full((B,), T, dtype=jnp.int32)
    else:
        lengths = jnp.asarray(lengths)
        if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"lengths must be an integer array of shape (B,) = ({B},), got "
                             f"{lengths.shape} {lengths.dtype}")
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse must be a bool, got {reverse!r}")
    backend = backends.get(backend)
    if backend.xp is not np:
        raise ValueError(f"backend must be a CPU backend for fastrnn.jax, got {backend.name!r}")
    return _op(cell, backend.name, reverse, bool(reset_after))(x, states, tuple(arrays),
                                                               lengths)


def rnn_tanh(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, *, lengths=None, reverse=False,
             backend="auto"):
    """h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh); returns ``(out, h_n)``."""
    return _call("rnn_tanh", x, (h0,), (w_ih, w_hh, b_ih, b_hh), lengths, reverse, backend)


def rnn_relu(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, *, lengths=None, reverse=False,
             backend="auto"):
    """h_t = relu(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh); returns ``(out, h_n)``."""
    return _call("rnn_relu", x, (h0,), (w_ih, w_hh, b_ih, b_hh), lengths, reverse, backend)


def lstm(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, *, lengths=None, reverse=False,
         backend="auto"):
    """LSTM, gates i, f, g, o (torch's order); returns ``(out, h_n, c_n)``."""
    return _call("lstm", x, (h0, c0), (w_ih, w_hh, b_ih, b_hh), lengths, reverse, backend)


def gru(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, *, lengths=None, reverse=False,
        reset_after=True, backend="auto"):
    """GRU, gates r, z, n; ``reset_after`` as in :class:`fastrnn.GRU`; returns ``(out, h_n)``."""
    if not isinstance(reset_after, bool):
        raise TypeError(f"reset_after must be a bool, got {reset_after!r}")
    return _call("gru", x, (h0,), (w_ih, w_hh, b_ih, b_hh), lengths, reverse, backend,
                 reset_after)
