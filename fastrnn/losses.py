"""Loss functions that return the loss and its gradient together."""

from __future__ import annotations

import numbers


def _xp_of(a):
    """The array module of ``a``: numpy, or cupy for a cupy array."""
    if type(a).__module__.startswith("cupy"):
        import cupy
        return cupy
    import numpy
    return numpy


def _check_float_array(name, a, min_ndim=0):
    """``a`` must be a numpy/cupy array of a floating dtype with at least ``min_ndim`` axes."""
    if not hasattr(a, "dtype") or not hasattr(a, "shape") or isinstance(a, (int, float)):
        raise TypeError(f"{name} must be a floating numpy or cupy array, got {type(a).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating dtype, got {a.dtype}")
    if a.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape "
                         f"{tuple(a.shape)}")


def _check_reduction(reduction):
    if not isinstance(reduction, str) or reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def log_softmax(logits):
    """Log-softmax over the last axis, computed stably: z - max(z) - log(sum(exp(z - max(z))))."""
    _check_float_array("logits", logits, 1)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have at least one class on its last axis, got shape "
                         f"{tuple(logits.shape)}")
    xp = _xp_of(logits)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    """Softmax cross-entropy over the last axis and its gradient, as ``torch.nn.functional.cross_entropy``.

    Parameters
    ----------
    logits : float array (..., C): unnormalised scores, the classes on the
        **last** axis (torch puts them on axis 1; for (N, C) input the two agree).
    targets : integer array (...), the shape of ``logits`` without its last axis;
        values in [0, C) or ``ignore_index``.
    ignore_index : targets equal to it contribute neither loss nor gradient.
    reduction : 'mean' (over the targets not ignored, as torch) or 'sum'.

    Returns
    -------
    loss : float. With 'mean' and every target ignored it is nan, as in torch.
    d_logits : gradient of ``loss`` with respect to ``logits``, same shape and dtype.

    Equations
    ---------
    log p = log_softmax(z);  loss = -(1/N) sum_{n not ignored} log p[n, y_n];
    d_z[n] = (softmax(z[n]) - onehot(y_n)) / N for kept n, 0 for ignored n.
    """
    _check_reduction(reduction)
    _check_float_array("logits", logits, 1)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have at least one class on its last axis, got shape "
                         f"{tuple(logits.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}")
    xp = _xp_of(logits)
    try:
        targets = xp.asarray(targets)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"targets must be an integer array, got {type(targets).__name__}") \
            from exc
    if targets.dtype.kind not in "iu":
        raise TypeError(f"targets must be integers, got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have the shape of logits without its last axis, "
                         f"{tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    C = logits.shape[-1]
    z = logits.reshape(-1, C)
    y = targets.reshape(-1)
    keep = y != ignore_index
    if bool(((y[keep] < 0) | (y[keep] >= C)).any()):
        raise IndexError(f"targets must lie in [0, {C}) or equal ignore_index={ignore_index}")
    y_safe = xp.where(keep, y, 0)
    rows = xp.arange(y.shape[0])
    log_p = log_softmax(z)
    picked = xp.where(keep, log_p[rows, y_safe], 0)
    count = int(keep.sum())
    scale = 1.0 / count if reduction == "mean" and count else 1.0
    if reduction == "mean" and count == 0:
        loss = float("nan")
    else:
        loss = float(-picked.sum(dtype=xp.float64) * scale)
    d_z = xp.exp(log_p)
    d_z[rows, y_safe] -= 1
    d_z *= keep[:, None].astype(d_z.dtype) * d_z.dtype.type(scale)
    return loss, d_z.reshape(logits.shape)


def mse_loss(pred, target, reduction="mean"):
    """Squared error and its gradient, as ``torch.nn.functional.mse_loss``.

    ``pred`` and ``target`` have the same shape; returns ``(loss, d_pred)``.
    loss = mean((pred - target)**2) ('mean') or its sum ('sum');
    d_pred = 2 (pred - target) / N ('mean', N = pred.size) or 2 (pred - target).
    """
    _check_reduction(reduction)
    _check_float_array("pred", pred)
    if not hasattr(target, "dtype") or target.dtype.kind not in "fiu":
        raise TypeError(f"target must be a real numeric array, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    diff = pred - target.astype(pred.dtype, copy=False)
    scale = 1.0 / diff.size if reduction == "mean" and diff.size else 1.0
    loss = float((diff.astype("float64") ** 2).sum() * scale)
    return loss, diff * pred.dtype.type(2 * scale)
