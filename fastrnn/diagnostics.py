"""Diagnostics: how far back the gradient reaches (vanishing and exploding gradients)."""

from __future__ import annotations

import numpy as np

from .layers import LSTM


def gradient_flow(model, x, hx=None):
    """Norm of dL/dh_t for every step t, with L = sum of the last step's hidden state.

    Parameters
    ----------
    model : a single-layer, single-direction :class:`fastrnn.RNN`, ``LSTM`` or
        ``GRU``; it is not changed (the work is done on a copy).
    x : input in the model's layout: (T, B, I), (B, T, I) if ``batch_first``,
        or (T, I) unbatched.
    hx : initial state as the model takes it (None: zeros).

    Returns
    -------
    numpy float64 array (T,): ``norms[t] = ||dL/dh_t||`` (Frobenius norm over
    batch and features), with ``L = sum(h_{T-1})``, so ``norms[T-1] = sqrt(B*H)``.
    A curve that falls steeply as t goes back is a vanishing gradient.

    dL/dh_t is the *total* gradient arriving at h_t, through every later step
    (for the LSTM, through the gates of step t+1; the cell state c_t carries
    its own gradient alongside). It is what ``h_t.retain_grad()`` gives in a
    torch loop over cells.

    Method (exact, O(T)): a forward pass one step at a time records the state
    before every step; then, from the last step back, each step is run again
    on its recorded state and its backward maps the gradient of the state
    after the step to the gradient of the state before it. These are the
    backend's own BPTT kernels, so the result is the gradient training uses.
    """
    if getattr(model, "num_layers", 1) != 1 or getattr(model, "bidirectional", False):
        raise ValueError("gradient_flow needs a single-layer, single-direction model, got "
                         f"{model!r}")
    xp = model._xp
    x, batched = model._check_input(x)   # TypeError/ValueError naming x; now (T, B, I)
    lstm = isinstance(model, LSTM)
    if hx is not None and not batched:
        hx = tuple(s[:, None, :] for s in hx) if lstm else hx[:, None, :]

    clone = model.copy()   # its grads accumulate, the model's do not
    clone.batch_first = False
    clone.eval()           # the recording pass keeps states only, no caches
    T, B = x.shape[:2]
    before = [hx]          # before[t]: the state before step t
    state = hx
    for t in range(T - 1):
        _, state = clone(x[t:t + 1], state)
        before.append(state)
    clone.train()

    H = model.hidden_size
    d_h = xp.ones((1, B, H), dtype=model.dtype)
    d_state = (d_h, xp.zeros_like(d_h)) if lstm else d_h
    no_d_out = xp.zeros((1, B, H), dtype=model.dtype)
    norms = np.empty(T)
    norms[T - 1] = float(xp.linalg.norm(d_h))
    for t in range(T - 1, 0, -1):
        clone(x[t:t + 1], before[t])
        _, d_state = clone.backward(no_d_out, d_state)
        norms[t - 1] = float(xp.linalg.norm(d_state[0] if lstm else d_state))
    return norms
