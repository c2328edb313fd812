"""The checks of the kernel contract, written once for every backend.

:func:`checked` wraps a backend's ``{cell}_forward`` / ``{cell}_backward`` so
that every call is checked against the contract of :mod:`fastrnn.backends`
(notation ``T, B, I, H, G``) before the kernel runs: array type (the backend's
``xp.ndarray``), dtype (float32 or float64, one for all arrays), shapes,
``lengths`` (integers in ``[0, T]``) and the flags. A wrong call raises
TypeError (type, dtype) or ValueError (shape, value) naming the argument;
nothing is computed and nothing is written. Any memory layout is accepted:
the kernels receive C-contiguous arrays (copies only where needed), so no
backend reads memory through strides it did not expect.

Backward checks ``d_out`` and the state gradients against the shapes the
forward call recorded: the checked forward returns its cache wrapped in a
:class:`Cache` that knows the cell kind, backend, shapes and dtype, and the
checked backward accepts only such a cache.
"""

from __future__ import annotations

import numpy as np

from . import KERNEL_OPTIONS, cell_kind

_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_FLOATS = (_F32, _F64)


class Cache:
    """The opaque cache of a checked forward call (see :func:`checked`)."""

    __slots__ = ("backend", "cell", "shape", "dtype", "inner")

    def __init__(self, backend, cell, shape, dtype, inner):
        self.backend, self.cell, self.shape, self.dtype = backend, cell, shape, dtype
        self.inner = inner

    def __repr__(self):
        T, B, I, H, P = self.shape
        return f"<{self.backend} {self.cell} cache T={T} B={B} I={I} H={H} P={P} {self.dtype}>"


def _array(xp, name, a, shape, dtype):
    """Check one array; ``dtype`` None means: any float dtype (returned)."""
    if not isinstance(a, xp.ndarray):
        raise TypeError(f"{name} must be a {xp.__name__}.ndarray, got {type(a).__name__}")
    if dtype is None:
        if a.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32 or float64, got dtype {a.dtype}")
    elif a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype}, expected {dtype} (the dtype of x)")
    if a.ndim != len(shape) or any(want is not None and got != want
                                   for got, want in zip(a.shape, shape)):
        want = ", ".join("?" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape ({want}{',' if len(shape) == 1 else ''}), "
                         f"got {tuple(a.shape)}")
    return a.dtype


def _zoneout(xp, name, z, T, B, width, dtype):
    """A zoneout mask: (T or 1, B or 1, width), the dtype of x; returned C-contiguous."""
    _array(xp, name, z, (None, None, width), dtype)
    if z.shape[0] not in (1, T) or z.shape[1] not in (1, B):
        raise ValueError(f"{name} must have shape (T or 1, B or 1, {width}) = ({T} or 1, "
                         f"{B} or 1, {width}), got {tuple(z.shape)}")
    return z if z.flags.c_contiguous else xp.ascontiguousarray(z)


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _lengths(xp, lengths, T, B):
    if lengths is None:
        return
    if not isinstance(lengths, (np.ndarray, xp.ndarray)):
        raise TypeError(f"lengths must be an integer array or None, got "
                        f"{type(lengths).__name__}")
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"lengths must be an integer array, got dtype {lengths.dtype}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape (B,) = ({B},), got {tuple(lengths.shape)}")
    low, high = int(lengths.min()), int(lengths.max())
    if low < 0 or high > T:
        raise ValueError(f"lengths must lie in [0, T] = [0, {T}], got values from {low} to "
                         f"{high}")


class _Signature:
    """The forward signature of one cell kind, bound by hand: ``inspect.Signature.bind``
    costs more than the kernel call at small sizes."""

    def __init__(self, cell):
        kind = cell_kind(cell)
        self.cell, self.states, self.gates = cell, kind.states, kind.gates
        self.arrays = ("x", "h0", "c0")[:1 + kind.states] + ("w_ih", "w_hh", "b_ih", "b_hh")
        self.defaults = {"lengths": None, "reverse": False, "training": True,
                         **KERNEL_OPTIONS.get(cell, {}),
                         **{name: None for name in kind.optional_arrays}}
        self.options = tuple(self.defaults)
        self.optional = kind.optional_arrays
        self.zoneout = kind.zoneout_arrays
        self.flags = tuple(k for k in self.options[1:] if k not in self.optional)

    def bind(self, args, kwargs):
        """``(arrays list, options dict)`` of a call; TypeError for a wrong call."""
        na, no = len(self.arrays), len(self.options)
        if len(args) > na + no:
            raise TypeError(f"{self.cell}_forward takes at most {na + no} positional "
                            f"arguments, got {len(args)}")
        arrays = list(args[:na])
        options = dict(zip(self.options, args[na:]))
        for key, value in kwargs.items():
            if key in self.defaults:
                if key in options:
                    raise TypeError(f"{self.cell}_forward got two values for argument {key!r}")
                options[key] = value
            elif key in self.arrays:
                index = self.arrays.index(key)
                if index < len(arrays):
                    raise TypeError(f"{self.cell}_forward got two values for argument {key!r}")
                arrays.extend([_MISSING] * (index + 1 - len(arrays)))
                arrays[index] = value
            else:
                raise TypeError(f"{self.cell}_forward got an unexpected argument {key!r}")
        arrays.extend([_MISSING] * (na - len(arrays)))
        missing = [n for n, a in zip(self.arrays, arrays) if a is _MISSING]
        if missing:
            raise TypeError(f"{self.cell}_forward is missing argument(s) {', '.join(missing)}")
        return arrays, options


_MISSING = object()


def check_forward(xp, cell, args, kwargs, signature=None):
    """Check a forward call's arguments.

    Returns ``(arrays, options, (T, B, I, H, P, dtype))``: the positional array
    arguments, C-contiguous, the keyword options, and the sizes (``P`` is the LSTM
    projection's, ``H`` without one)."""
    sig = signature or _Signature(cell)
    arrays, options = sig.bind(args, kwargs)
    x, h0 = arrays[0], arrays[1]
    nd = xp.ndarray
    if isinstance(x, nd) and x.ndim == 3 and (x.dtype == _F32 or x.dtype == _F64):
        dtype = x.dtype
    else:
        dtype = _array(xp, "x", x, (None, None, None), None)
    T, B, I = x.shape
    if T == 0 or B == 0:
        raise ValueError(f"x must have T >= 1 and B >= 1, got shape {tuple(x.shape)}")
    if not (isinstance(h0, nd) and h0.ndim == 2 and h0.shape[0] == B and h0.dtype == dtype):
        _array(xp, "h0", h0, (B, None), dtype)
    P = h0.shape[1]
    w_hr = options.get("w_hr")
    if sig.states == 2:
        _array(xp, "c0", arrays[2], (B, None if w_hr is not None else P), dtype)
        H = arrays[2].shape[1]
    else:
        H = P
    if w_hr is not None:
        _array(xp, "w_hr", w_hr, (P, H), dtype)
        if w_hr.ndim == 2 and not P < H:
            raise ValueError(f"w_hr must project to fewer features than hidden_size: got "
                             f"shape {tuple(w_hr.shape)} (P={P} >= H={H})")
        options["w_hr"] = w_hr if w_hr.flags.c_contiguous else xp.ascontiguousarray(w_hr)
    if H == 0 or I == 0:
        raise ValueError(f"input and hidden sizes must be >= 1, got I={I}, H={H}")
    for name, width in zip(sig.zoneout, (P, H)):
        if options.get(name) is not None:
            options[name] = _zoneout(xp, name, options[name], T, B, width, dtype)
    G = sig.gates * H
    want = {"c0": (B, H), "w_ih": (G, I), "w_hh": (G, P), "b_ih": (G,), "b_hh": (G,)}
    b_ih, b_hh = arrays[-2], arrays[-1]
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih and b_hh must both be arrays or both be None")
    for k in range(2, len(arrays)):
        a = arrays[k]
        if a is None:
            continue
        name = sig.arrays[k]
        # the fast test first; the message-making check only when it fails
        if not (isinstance(a, nd) and a.shape == want[name] and a.dtype == dtype):
            _array(xp, name, a, want[name], dtype)
    if options.get("lengths") is not None:
        _lengths(xp, options["lengths"], T, B)
    for flag in sig.flags:
        value = options.get(flag, False)
        if value is not True and value is not False:
            _flag(flag, value)
    for k, a in enumerate(arrays):
        if a is not None and not a.flags.c_contiguous:
            arrays[k] = xp.ascontiguousarray(a)
    return arrays, options, (T, B, I, H, P, dtype)


def check_backward(xp, backend, cell, d_out, d_states, cache):
    """Check a backward call against the forward call that made ``cache``; returns the
    backend's own cache."""
    if not isinstance(cache, Cache) or cache.backend != backend or cache.cell != cell:
        raise TypeError(f"cache must be what a train-mode {backend} {cell}_forward returned, "
                        f"got {cache!r}")
    T, B, _, H, P = cache.shape
    _array(xp, "d_out", d_out, (T, B, P), cache.dtype)
    for name, d, n in zip(("d_h_n", "d_c_n"), d_states, (P, H)):
        _array(xp, name, d, (B, n), cache.dtype)
    return [d if d.flags.c_contiguous else xp.ascontiguousarray(d)
            for d in (d_out, *d_states)], cache.inner


def checked(backend, xp, cell, module):
    """``(forward, backward)`` of ``cell`` in the backend ``module`` with the contract
    checked at every call. The module's functions are looked up at each call (a
    patched kernel is the one that runs)."""
    S = cell_kind(cell).states
    signature = _Signature(cell)
    fname, bname = f"{cell}_forward", f"{cell}_backward"

    def checked_forward(*args, **kwargs):
        arrays, options, (T, B, I, H, P, dtype) = check_forward(xp, cell, args, kwargs,
                                                                signature)
        result = getattr(module, fname)(*arrays, **options)
        if result[-1] is None:
            return result
        return result[:-1] + (Cache(backend, cell, (T, B, I, H, P), dtype, result[-1]),)

    def checked_backward(d_out, *rest):
        if len(rest) != S + 1:
            raise TypeError(f"{cell}_backward takes d_out, {'d_h_n, d_c_n' if S == 2 else 'd_h_n'}"
                            f" and cache; got {1 + len(rest)} arguments")
        d_states, cache = rest[:S], rest[S]
        arrays, inner = check_backward(xp, backend, cell, d_out, d_states, cache)
        return getattr(module, bname)(*arrays, inner)

    checked_forward.__name__ = fname
    checked_forward.__doc__ = getattr(module, fname).__doc__
    checked_backward.__name__ = bname
    checked_backward.__doc__ = getattr(module, bname).__doc__
    return checked_forward, checked_backward
