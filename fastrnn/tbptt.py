"""Truncated backpropagation through time (TBPTT).

A long sequence is cut into chunks of ``size`` steps. The forward state is
carried from one chunk to the next, the gradient is not: each chunk's
backward stops at the chunk's first step. In torch this is
``h = h.detach()`` between chunks; in fastrnn it is what happens anyway,
because ``model.backward`` only reaches the last forward call and its
``d_hx`` is simply dropped. The loop, written out::

    state = None                                   # zeros
    for xs, ys in chunks(x, y, size=35):           # (35, B, I), (35, B)
        out, state = rnn(xs, state)                # carry the state forward
        logits = head(out)                         # (35, B, C)
        loss, d_logits = cross_entropy(logits, ys)
        rnn.backward(head.backward(d_logits))      # d_hx returned and dropped: the cut
        clip_grad_norm_([rnn, head], 1.0)
        opt.step(); opt.zero_grad()

:func:`truncated_bptt` runs this loop for you, with your loss and your
per-chunk update.
"""

from __future__ import annotations

import numbers
from typing import Callable


def _check_size(size):
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return int(size)


def chunks(*arrays, size, axis=0, drop_last=False):
    """Yield consecutive slices of ``size`` steps along ``axis`` of every array, together.

    Parameters
    ----------
    *arrays : arrays with the same length along ``axis`` (e.g. inputs and targets).
    size : steps per chunk; the last chunk is shorter when the length is not a
        multiple, unless ``drop_last``.
    axis : the time axis (0 for time-major, 1 for ``batch_first``).

    Yields
    ------
    The chunk of the single array, or a tuple of chunks (views, not copies).
    """
    size = _check_size(size)
    if not arrays:
        raise ValueError("chunks needs at least one array")
    for i, a in enumerate(arrays):
        if not hasattr(a, "shape"):
            raise TypeError(f"arrays[{i}] must be an array, got {type(a).__name__}")
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or \
            not 0 <= axis < min(a.ndim for a in arrays):
        raise ValueError(f"axis must be an integer in [0, {min(a.ndim for a in arrays)}), got "
                         f"{axis!r}")
    T = arrays[0].shape[axis]
    for i, a in enumerate(arrays[1:], 1):
        if a.shape[axis] != T:
            raise ValueError(f"arrays[{i}] has {a.shape[axis]} steps along axis {axis}, "
                             f"arrays[0] has {T}")
    stop_at = T - T % size if drop_last else T
    for start in range(0, stop_at, size):
        index = (slice(None),) * axis + (slice(start, min(start + size, T)),)
        parts = tuple(a[index] for a in arrays)
        yield parts[0] if len(parts) == 1 else parts


def truncated_bptt(model, x, size, loss_fn: Callable, hx=None, after_chunk: Callable = None):
    """Run ``model`` over ``x`` chunk by chunk with truncated backpropagation.

    Parameters
    ----------
    model : a recurrent layer (:class:`fastrnn.RNN`, ``LSTM`` or ``GRU``) in train mode.
    x : the whole input sequence, in the model's layout.
    size : steps per chunk (the truncation length).
    loss_fn : ``loss_fn(out, steps) -> (loss, d_out)`` or ``(loss, d_out, d_h_n)``,
        called for every chunk; ``out`` is the chunk's output and ``steps`` the
        ``slice`` of time steps it covers, to cut the matching targets. It runs
        any layers above the RNN, forward and backward, and returns the
        gradient of the loss with respect to ``out`` (and to the chunk's final
        state, if the loss uses it).
    hx : the state before the first chunk (None: zeros).
    after_chunk : ``after_chunk(index)`` is called after each chunk's backward,
        e.g. to clip, step the optimizer and zero the gradients. Without it,
        the gradients of all chunks accumulate in ``grads``.

    Returns
    -------
    losses : list of the chunk losses.
    state : the state after the last chunk, to continue from.

    The gradient of each chunk stops at the chunk's start: exactly the
    gradients of the same loop in torch with ``h = h.detach()`` between chunks.

    The arguments (model in train mode, ``x``, ``hx``, ``size``, the
    callables) are checked before the first chunk runs. An error raised
    inside the loop (by ``loss_fn``, ``after_chunk`` or a backward) leaves
    the chunks already processed as they are.
    """
    size = _check_size(size)
    if not (hasattr(model, "backward") and hasattr(model, "_check_input")):
        raise TypeError(f"model must be a fastrnn RNN, LSTM or GRU layer, got "
                        f"{type(model).__name__}")
    if not model.training:
        raise RuntimeError("truncated_bptt needs the model in train mode (call model.train())")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if after_chunk is not None and not callable(after_chunk):
        raise TypeError(f"after_chunk must be None or callable, got {type(after_chunk).__name__}")
    # x (and hx, by the model's first call) are checked before any chunk runs.
    x_time_major, batched = model._check_input(x)
    if hx is not None:
        model._check_states("hx", hx, x_time_major.shape[1], batched)
    axis = 1 if getattr(model, "batch_first", False) and x.ndim == 3 else 0
    state, losses = hx, []
    for index, start in enumerate(range(0, x.shape[axis], size)):
        steps = slice(start, min(start + size, x.shape[axis]))
        out, state = model(x[(slice(None),) * axis + (steps,)], state)
        result = loss_fn(out, steps)
        if not isinstance(result, tuple) or len(result) not in (2, 3):
            raise TypeError(f"loss_fn must return (loss, d_out) or (loss, d_out, d_h_n), got "
                            f"{type(result).__name__}")
        loss, *grads = result
        model.backward(*grads)   # its d_hx is dropped: the gradient is cut here
        losses.append(loss)
        if after_chunk is not None:
            after_chunk(index)
    return losses, state
