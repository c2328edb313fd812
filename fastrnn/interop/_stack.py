"""A stack of layers and directions over the raw single-layer kernels.

What :mod:`fastrnn.layers` does inside a layer object, as two stateless
functions, so that another framework's autograd can own the cache
(:mod:`fastrnn.torch`, :mod:`fastrnn.jax`). Shapes as in
:mod:`fastrnn.backends`; ``k = layer * D + direction`` indexes the stacked
states and the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import backends


@dataclass(frozen=True)
class Stack:
    """Everything static about a stack: the backend, the cell kind and the shape."""

    backend: str
    cell: str
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    reverse: bool = False
    bias: bool = True
    reset_after: bool = True

    @property
    def D(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def S(self) -> int:
        return backends.state_count(self.cell)

    def kernels(self):
        return backends.get(self.backend).kernels(self.cell)

    def options(self) -> dict:
        return {"reset_after": self.reset_after} if self.cell == "gru" else {}


def host_lengths(lengths, T):
    """int64 (B,) lengths for the kernels, or None when every sequence is full."""
    if lengths is None:
        return None
    lengths = np.asarray(lengths).astype(np.int64)
    return None if (lengths == T).all() else lengths


def forward(stack: Stack, x, states, weights, lengths=None, training=True):
    """Run the stack.

    x : (T, B, I) C-contiguous. states : tuple of S arrays (L*D, B, H).
    weights : list, per k, of (w_ih, w_hh, b_ih, b_hh) (biases None without bias).
    lengths : int64 (B,) or None (see :func:`host_lengths`).

    Returns ``out (T, B, D*H), finals (tuple of S arrays (L*D, B, H)), caches``
    (caches None when not training).
    """
    fwd, _ = stack.kernels()
    T, B = x.shape[:2]
    S, D, H = stack.S, stack.D, stack.hidden_size
    if training and lengths is not None:
        # Padded steps must not reach d_w_ih (0 * nan is nan); their outputs are 0 anyway.
        x = x.copy()
        x[np.arange(T)[:, None] >= lengths[None, :]] = 0
    finals = tuple(np.empty((stack.num_layers * D, B, H), dtype=x.dtype) for _ in range(S))
    caches = []
    layer_input = x
    for layer in range(stack.num_layers):
        outs = []
        for direction in range(D):
            k = layer * D + direction
            result = fwd(layer_input, *(s[k] for s in states), *weights[k], lengths=lengths,
                         reverse=bool(direction) or stack.reverse, training=training,
                         **stack.options())
            outs.append(result[0])
            for f, s in zip(finals, result[1:1 + S]):
                f[k] = s
            caches.append(result[-1])
        layer_input = outs[0] if D == 1 else np.concatenate(outs, axis=2)
    return layer_input, finals, (caches if training else None)


def backward(stack: Stack, d_out, d_finals, caches, lengths=None):
    """Backpropagate through :func:`forward`'s caches.

    d_out : (T, B, D*H); d_finals : tuple of S arrays (L*D, B, H).
    Returns ``d_x (T, B, I), d_states (tuple of S arrays (L*D, B, H)), d_weights``
    with d_weights, per k, a tuple (d_w_ih, d_w_hh[, d_b_ih, d_b_hh]).
    """
    _, bwd = stack.kernels()
    S, D, H = stack.S, stack.D, stack.hidden_size
    T, B = d_out.shape[:2]
    if lengths is not None:
        # Gradients at padded steps are ignored; zeroed so that nan there reaches nothing.
        d_out = d_out.copy()
        d_out[np.arange(T)[:, None] >= lengths[None, :]] = 0
    d_states = tuple(np.empty((stack.num_layers * D, B, H), dtype=d_out.dtype)
                     for _ in range(S))
    d_weights = [None] * (stack.num_layers * D)
    d_layer = d_out
    for layer in reversed(range(stack.num_layers)):
        d_input = None
        for direction in range(D):
            k = layer * D + direction
            d_dir = np.ascontiguousarray(d_layer[:, :, direction * H:(direction + 1) * H])
            result = bwd(d_dir, *(np.ascontiguousarray(s[k]) for s in d_finals), caches[k])
            d_input = result[0] if d_input is None else d_input + result[0]
            for d0, s in zip(d_states, result[1:1 + S]):
                d0[k] = s
            d_weights[k] = tuple(result[1 + S:1 + S + (4 if stack.bias else 2)])
        d_layer = d_input
    return d_layer, d_states, d_weights
