"""Luong dot-product attention over a source sequence, forward and backward.

Notation: ``B`` batch, ``S`` source positions, ``H`` query/key features,
``Hv`` value features. Batch-major, as a decoder step sees it:

=========  ==========  =================================================
name       shape       meaning
=========  ==========  =================================================
query      (B, H)      the decoder state that asks
keys       (B, S, H)   what each source position is matched on
values     (B, S, Hv)  what each source position contributes
mask       (B, S)      bool, True at valid source positions; None = all
weights    (B, S)      attention distribution over the source
context    (B, Hv)     weighted sum of the values
=========  ==========  =================================================

Stateless like the kernels: ``dot_attention`` returns a ``cache`` that
:func:`dot_attention_backward` consumes. NumPy arrays (float32 or float64).
"""

from __future__ import annotations

import numpy as np

__all__ = ["dot_attention", "dot_attention_backward"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _check_float(name, a):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got dtype {a.dtype}")


def _check_same_dtype(name, a, ref_name, ref):
    if a.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {a.dtype} but {ref_name} has dtype {ref.dtype}; "
                        f"convert one of them explicitly")


def dot_attention(query, keys, values, mask=None):
    """Luong dot attention: scores ``query . key_s``, softmax over the source.

    Equations
    ---------
    .. math::
        e_{bs} = \\sum_h q_{bh} k_{bsh}
        w_{bs} = \\frac{m_{bs} \\exp(e_{bs} - \\max_{s'} e_{bs'})}
                        {\\sum_{s'} m_{bs'} \\exp(e_{bs'} - \\max_{s'} e_{bs'})}
        c_{bv} = \\sum_s w_{bs} v_{bsv}

    The max is over the valid positions only, so the softmax never overflows;
    masked positions get weight exactly 0.

    Parameters
    ----------
    query : (B, H) float array.
    keys : (B, S, H), the dtype of ``query``.
    values : (B, S, Hv), the dtype of ``query``.
    mask : (B, S) bool, True where the source position is valid; None means
        all valid. Every row needs at least one valid position.

    Returns
    -------
    context : (B, Hv).
    weights : (B, S), rows sum to 1, 0 at masked positions.
    cache : opaque, for :func:`dot_attention_backward`.
    """
    _check_float("query", query)
    _check_float("keys", keys)
    _check_float("values", values)
    _check_same_dtype("keys", keys, "query", query)
    _check_same_dtype("values", values, "query", query)
    if query.ndim != 2:
        raise ValueError(f"query must have shape (B, H), got {query.shape}")
    B, H = query.shape
    if keys.ndim != 3 or keys.shape[0] != B or keys.shape[2] != H:
        raise ValueError(f"keys must have shape (B, S, H) = ({B}, S, {H}) to match query, "
                         f"got {keys.shape}")
    S = keys.shape[1]
    if values.ndim != 3 or values.shape[:2] != (B, S):
        raise ValueError(f"values must have shape (B, S, Hv) = ({B}, {S}, Hv) to match keys, "
                         f"got {values.shape}")
    if S == 0:
        raise ValueError("keys must have at least one source position (S >= 1)")
    if mask is not None:
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            raise TypeError(f"mask must be a bool numpy.ndarray (True = valid), got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != (B, S):
            raise ValueError(f"mask must have shape (B, S) = ({B}, {S}), got {mask.shape}")
        if not mask.any(axis=1).all():
            raise ValueError("mask has a row with no valid source position; every row needs "
                             "at least one True")

    e = np.matmul(keys, query[:, :, None])[:, :, 0]                    # (B, S)
    if mask is not None:
        e = np.where(mask, e, -np.inf)
    e_max = e.max(axis=1, keepdims=True)                                # finite: a row has a valid s
    p = np.exp(e - e_max)                                               # exp(-inf) = 0 when masked
    weights = p / p.sum(axis=1, keepdims=True)
    context = np.matmul(weights[:, None, :], values)[:, 0, :]           # (B, Hv)
    cache = (query, keys, values, weights)
    return context, weights, cache


def dot_attention_backward(d_context, cache):
    """Backward of :func:`dot_attention`.

    Equations
    ---------
    .. math::
        \\delta w_{bs} = \\sum_v \\delta c_{bv} v_{bsv},\\quad
        \\delta v_{bsv} = w_{bs} \\delta c_{bv}
        \\delta e_{bs} = w_{bs} (\\delta w_{bs} - \\sum_{s'} w_{bs'} \\delta w_{bs'})
        \\delta q_{bh} = \\sum_s \\delta e_{bs} k_{bsh},\\quad
        \\delta k_{bsh} = \\delta e_{bs} q_{bh}

    Masked positions have ``w = 0``, hence zero gradient for their keys
    and values.

    Parameters
    ----------
    d_context : (B, Hv), gradient of the loss with respect to ``context``.
    cache : what :func:`dot_attention` returned.

    Returns
    -------
    d_query (B, H), d_keys (B, S, H), d_values (B, S, Hv).
    """
    query, keys, values, weights = cache
    _check_float("d_context", d_context)
    _check_same_dtype("d_context", d_context, "query", query)
    expected = (values.shape[0], values.shape[2])
    if d_context.shape != expected:
        raise ValueError(f"d_context must have the shape of context, {expected}, "
                         f"got {d_context.shape}")
    d_w = np.matmul(values, d_context[:, :, None])[:, :, 0]            # (B, S)
    d_values = weights[:, :, None] * d_context[:, None, :]
    d_e = weights * (d_w - (weights * d_w).sum(axis=1, keepdims=True))
    d_query = np.matmul(d_e[:, None, :], keys)[:, 0, :]                 # (B, H)
    d_keys = d_e[:, :, None] * query[:, None, :]
    return d_query, d_keys, d_values
