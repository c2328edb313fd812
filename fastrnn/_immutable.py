"""Arrays whose values can never change: what a frozen module's parameters are
(:meth:`fastrnn.Module.freeze`) and what the numba backend may keep packed across calls
(:func:`fastrnn.backends.packed_numba.packed`). Both sides use this one definition."""

from __future__ import annotations

import numpy as np


def immutable_copy(a):
    """A copy of host array ``a`` that can never be written: read-only, over a ``bytes``
    object (NumPy refuses to make such an array writeable again)."""
    return np.frombuffer(np.ascontiguousarray(a).tobytes(), dtype=a.dtype).reshape(a.shape)


def immutable(a) -> bool:
    """Whether the values of ``a`` can never change: read-only down to an immutable
    ``bytes`` base, as :func:`immutable_copy` makes them. A read-only view of a writeable
    array is not: its base can still be written."""
    base = a
    while isinstance(base, np.ndarray):
        if base.flags.writeable:
            return False
        base = base.base
    return isinstance(base, bytes)
