"""The numba backend's large buffers, reused from call to call: a pool of memory blocks.

A training step allocates tens of MB per layer (the gate cache, the states, the gates'
gradients: 52 MB each at the LSTM's 100x64x512x512) and drops them by the end of its
backward. From glibc's malloc, a block above its mmap threshold comes as fresh pages
at every call (page faults, and zeroing by the kernel), and that threshold moves with
what the process allocated and freed before (glibc raises it to the size of a freed
mapped block, up to 32 MB): the same step took 100 or 200 ms in one benchmark worker
depending on its earlier requests (``python bench/packed_parts.py --parts worker``), and
a block above 32 MB was always fresh. Here a block goes back to the pool when the last
array made from it dies (output arrays the caller keeps simply keep theirs), and the
next call of the same sizes gets it back, its pages already mapped.

:func:`empty` is ``np.empty`` for the kernels' buffers: from ``MIN_BYTES`` up, its
array's memory is a pooled block (sizes rounded up to ``GRAIN``), owned by a small
exporter object whose death returns the block (``weakref.finalize``); NumPy's views keep
that owner alive. At most ``MAX_IDLE_BYTES`` wait in the pool; :func:`clear`
(``fastrnn.release_buffers()``) frees them.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

#: Buffers from this size (bytes) come from the pool; smaller ones from ``np.empty``
#: (glibc serves those from its heap without fresh pages).
MIN_BYTES = 1 << 20
#: Block sizes are multiples of this (a huge page): buffers of nearby sizes (a layer's
#: states, T + 1 steps, and its output, T) share blocks.
GRAIN = 1 << 21
#: Idle bytes the pool keeps at most: a block returned beyond that is freed.
MAX_IDLE_BYTES = 1 << 29

_lock = threading.Lock()
_idle: dict[int, list[np.ndarray]] = {}       # block size -> idle blocks
_idle_bytes = 0


class _Lease:
    """Exports one pooled block to NumPy (``__array_interface__``) as the array's owner;
    when the last array made from it dies, the block goes back to the pool."""

    __slots__ = ("block", "__array_interface__", "__weakref__")


def _new_block(size):
    """A block of ``size`` bytes that the pool did not have."""
    return np.empty(size, np.uint8)


def _give_back(block):
    global _idle_bytes
    with _lock:
        if _idle_bytes + block.size <= MAX_IDLE_BYTES:
            _idle.setdefault(block.size, []).append(block)
            _idle_bytes += block.size


def empty(shape, dtype):
    """An uninitialized C-ordered array, as ``np.empty(shape, dtype)`` (``shape`` a tuple),
    whose memory comes from the pool from ``MIN_BYTES`` up."""
    global _idle_bytes
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for n in shape:        # (math.prod and a tuple of ints first: 1.2 us a call; 0.6 so, np.empty 0.3)
        nbytes *= n
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype)
    shape = tuple(int(n) for n in shape)
    size = -(-nbytes // GRAIN) * GRAIN
    with _lock:
        blocks = _idle.get(size)
        block = blocks.pop() if blocks else None
        if block is not None:
            _idle_bytes -= size
    if block is None:
        block = _new_block(size)
    lease = _Lease()
    lease.block = block
    lease.__array_interface__ = {"shape": shape, "typestr": dtype.str, "version": 3,
                                 "data": (block.ctypes.data, False)}
    weakref.finalize(lease, _give_back, block)
    return np.asarray(lease)


def idle_bytes():
    """Bytes of idle blocks the pool holds now."""
    return _idle_bytes


def clear():
    """Free every idle block (blocks in use go back to the pool, then stay until the next
    :func:`clear` or are freed beyond ``MAX_IDLE_BYTES``); the bytes freed
    (``fastrnn.release_buffers``)."""
    global _idle_bytes
    with _lock:
        freed = _idle_bytes
        _idle.clear()
        _idle_bytes = 0
    return freed
