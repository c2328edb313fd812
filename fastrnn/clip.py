"""Gradient clipping, in place, with ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` semantics."""

from __future__ import annotations

import math
import numbers

import numpy as np


def _grad_arrays(models_or_grad_dicts):
    """Every gradient array of a model, a grad dict, or a list of either."""
    items = models_or_grad_dicts
    if hasattr(items, "grads") or isinstance(items, dict):
        items = [items]
    try:
        items = list(items)
    except TypeError as exc:
        raise TypeError(f"models_or_grad_dicts must be a model, a dict of gradient arrays or a "
                        f"list of either, got {type(items).__name__}") from exc
    arrays = []
    for i, item in enumerate(items):
        grads = item.grads if hasattr(item, "grads") else item
        if not isinstance(grads, dict):
            raise TypeError(f"models_or_grad_dicts[{i}] must be a model with a 'grads' dict or "
                            f"a dict of gradient arrays, got {type(item).__name__}")
        arrays.extend(grads.values())
    for a in arrays:
        if not hasattr(a, "dtype") or a.dtype.kind != "f":
            raise TypeError(f"every gradient must be a floating array, got "
                            f"{getattr(a, 'dtype', type(a).__name__)}")
    return arrays


def _check_positive(name, value, allow_inf):
    """A real number > 0 (``inf`` allowed when ``allow_inf``), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not value > 0 or (value == math.inf and not allow_inf):
        raise ValueError(f"{name} must be > 0{' (inf allowed)' if allow_inf else ''}, "
                         f"got {value!r}")
    return value


def clip_grad_norm_(models_or_grad_dicts, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """Scale all gradients together, in place, so that their joint norm is at most ``max_norm``.

    Parameters
    ----------
    models_or_grad_dicts : a model (anything with a ``grads`` dict), a dict of
        gradient arrays, or a list of either.
    max_norm : the largest joint norm allowed, > 0 (``inf``: only measure the norm).
    norm_type : p of the p-norm, > 0; ``inf`` for the largest absolute value.
    error_if_nonfinite : raise RuntimeError when the norm is nan or inf.

    Returns
    -------
    total_norm : float, the joint norm *before* clipping.

    Equations
    ---------
    total = (sum over arrays of ||g||_p ** p) ** (1/p);
    every g is multiplied by min(1, max_norm / (total + 1e-6)), as in torch.
    """
    max_norm = _check_positive("max_norm", max_norm, allow_inf=True)
    norm_type = _check_positive("norm_type", norm_type, allow_inf=True)
    arrays = _grad_arrays(models_or_grad_dicts)
    if not arrays:
        return 0.0
    if norm_type == math.inf:
        total = max(float(abs(g).max()) if g.size else 0.0 for g in arrays)
    else:
        total = sum(float((abs(g.astype(np.float64)) ** norm_type).sum())
                    for g in arrays) ** (1.0 / norm_type)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is {total}; "
                           f"pass error_if_nonfinite=False to clip anyway")
    coef = max_norm / (total + 1e-6)
    if not coef >= 1.0:   # true for nan too: as torch, a nan norm propagates into the grads
        for g in arrays:
            g *= g.dtype.type(coef)
    return total


def clip_grad_value_(models_or_grad_dicts, clip_value):
    """Clamp every gradient, in place, to [-clip_value, clip_value], as torch.

    ``clip_value`` must be > 0 (``inf`` leaves the gradients as they are).
    """
    clip_value = _check_positive("clip_value", clip_value, allow_inf=True)
    for g in _grad_arrays(models_or_grad_dicts):
        g.clip(-clip_value, clip_value, out=g)
