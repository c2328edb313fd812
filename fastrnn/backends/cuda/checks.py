"""Argument checks of the cuda backend: those of its kernel functions, and those of a launch.

The functions of the package check their arguments themselves (the cells call them
without :mod:`fastrnn.backends.contract`'s checks), once per call: array type
(``xp.ndarray``), dtype (one float dtype for all), shapes, and ``lengths``; each
returns C-contiguous arrays for the kernels. A launch checks its arguments' dtypes
and contiguity once per sequence (:class:`~.runtime.StepKernel`), since a wrong pointer
type corrupts memory silently.
"""

from __future__ import annotations

import numpy as np

from fastrnn.backends import gate_count, state_count

from .loader import SUFFIXES


def suffix(dtype) -> str:
    """The kernel suffix (``f32``, ``f64``) of the dtype of ``x``; TypeError for any other."""
    try:
        return SUFFIXES[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise TypeError(f"x must be float32 or float64, got {dtype}") from None


def _ndarray(xp, name, a, dims=None):
    """Check that ``a`` is an ``xp`` array, with one dimension per name in ``dims``."""
    if not isinstance(a, xp.ndarray):
        raise TypeError(f"{name} must be a {xp.__name__}.ndarray, got {type(a).__name__}")
    if dims is not None and a.ndim != len(dims):
        raise ValueError(f"{name} must have {len(dims)} dimensions ({', '.join(dims)}), "
                         f"got shape {a.shape}")


def device_array(xp, name, a, shape, dtype):
    """``a`` as a C-contiguous ``xp`` array, after checking its type, dtype and shape."""
    _ndarray(xp, name, a)
    if a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype}, expected {dtype} (the dtype of x)")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    return xp.ascontiguousarray(a)


def forward(xp, cell, x, states, w_ih, w_hh, b_ih, b_hh, w_hr=None):
    """Check the forward arguments of ``cell``; return contiguous copies and ``(T, B, I, H, P)``.

    With the LSTM's projection ``w_hr`` (P, H), h0 and w_hh have P columns and c0 has H
    (the width of c0 sets H); without it P = H.
    """
    _ndarray(xp, "x", x, ("T", "B", "I"))
    suffix(x.dtype)
    T, B, I = x.shape
    _ndarray(xp, "h0", states[0], ("B", "H" if w_hr is None else "P"))
    P = states[0].shape[1]
    if w_hr is None:
        H = P
    else:
        _ndarray(xp, "c0", states[1], ("B", "H"))
        H = states[1].shape[1]
        w_hr = device_array(xp, "w_hr", w_hr, (P, H), x.dtype)
    G = gate_count(cell) * H
    names = ("h0", "c0")[:state_count(cell)]
    states = tuple(device_array(xp, n, s, (B, width), x.dtype)
                   for n, s, width in zip(names, states, (P, H)))
    w_ih = device_array(xp, "w_ih", w_ih, (G, I), x.dtype)
    w_hh = device_array(xp, "w_hh", w_hh, (G, P), x.dtype)
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih and b_hh must both be arrays or both be None")
    if b_ih is not None:
        b_ih = device_array(xp, "b_ih", b_ih, (G,), x.dtype)
        b_hh = device_array(xp, "b_hh", b_hh, (G,), x.dtype)
    return xp.ascontiguousarray(x), states, w_ih, w_hh, b_ih, b_hh, w_hr, (T, B, I, H, P)


def lengths(xp, lengths, T, B):
    """lengths as a device int32 (B,) array; all T when None (every step active)."""
    if lengths is None:
        return xp.full((B,), T, dtype=np.int32)
    if getattr(lengths, "dtype", np.dtype(np.float64)).kind not in "iu":
        raise TypeError(f"lengths must be an integer array, got "
                        f"{getattr(lengths, 'dtype', type(lengths).__name__)}")
    lengths = xp.asarray(lengths)
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape (B,) = ({B},), got {tuple(lengths.shape)}")
    # Values outside [0, T] behave like 0 or T: the kernels only test t < lengths[b].
    return xp.ascontiguousarray(lengths.clip(0, T).astype(np.int32))


def backward(xp, cache, d_out, d_states):
    """Check ``d_out`` and the state gradients against the forward call that made ``cache``."""
    if cache is None:
        raise ValueError("cache is None: backward needs a forward call with training=True")
    x = cache["x"]
    T, B, _ = x.shape
    # the widths of h and of the LSTM's c: P and H with the projection
    widths = tuple(cache[k].shape[2] for k in ("hs", "cs") if k in cache)
    d_out = device_array(xp, "d_out", d_out, (T, B, widths[0]), x.dtype)
    names = ("d_h_n", "d_c_n")
    return d_out, tuple(device_array(xp, n, s, (B, width), x.dtype)
                        for n, s, width in zip(names, d_states, widths))


def launch_arguments(name, args):
    """A kernel's arguments: Python ints (passed as C ``int``) or C-contiguous arrays of the
    kernel's float dtype (from its name), int32 or uint32."""
    dtype = np.dtype(np.float32 if name.endswith("_f32") else np.float64)
    for position, a in enumerate(args):
        if isinstance(a, int):
            continue
        if not a.flags.c_contiguous or a.dtype not in (dtype, np.int32, np.uint32):
            raise TypeError(f"{name}: argument {position} must be a C-contiguous "
                            f"{dtype}, int32 or uint32 array, got {a.dtype} with strides "
                            f"{a.strides}")
    return args
