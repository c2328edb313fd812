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
array's memory is a pooled block (sizes rounded up by at most 1/8, :func:`block_size`),
owned by a small exporter object whose death returns the block (``weakref.finalize``);
NumPy's views keep that owner alive. At most ``MAX_IDLE_BYTES`` wait in the pool; :func:`clear`
(``fastrnn.release_buffers()``) frees them.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import weakref

import numpy as np

#: Buffers from this size (bytes) come from the pool; smaller ones from ``np.empty``
#: (glibc serves those from its heap without fresh pages).
MIN_BYTES = 1 << 20
#: Idle bytes the pool keeps at most: past that, the blocks idle the longest are freed.
MAX_IDLE_BYTES = 1 << 29

_lock = threading.Lock()
_idle: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()  # id -> block
_idle_bytes = 0
#: Blocks whose arrays died, not yet back in ``_idle``: the finalizers only put them here.
#: A finalizer can run inside any allocation (a garbage collection freeing a cycle that
#: held an array), even on a thread that holds ``_lock``: taking the lock there would
#: deadlock, and ``SimpleQueue.put`` is safe in such callbacks.
_returned: queue.SimpleQueue = queue.SimpleQueue()


def block_size(nbytes):
    """The size of the block for ``nbytes``: rounded up to a sixteenth of its power of two
    (at most 1/8 more), so that buffers of nearby sizes (a layer's states, T + 1 steps, and
    its output, T) share blocks, and a kept output holds little more than it needs."""
    q = 1 << max(12, nbytes.bit_length() - 4)
    return -(-nbytes // q) * q


class _Lease:
    """Exports one pooled block to NumPy (``__array_interface__``) as the array's owner;
    when the last array made from it dies, the block goes back to the pool."""

    __slots__ = ("block", "__array_interface__", "__weakref__")


def _new_block(size):
    """A block of ``size`` bytes that the pool did not have."""
    return np.empty(size, np.uint8)


def _drain():
    """Move the returned blocks into the idle ones, freeing those idle the longest past
    ``MAX_IDLE_BYTES`` (call with ``_lock`` held)."""
    global _idle_bytes
    while True:
        try:
            block = _returned.get_nowait()
        except queue.Empty:
            break
        _idle[id(block)] = block
        _idle_bytes += block.size
    while _idle_bytes > MAX_IDLE_BYTES:
        _, block = _idle.popitem(last=False)
        _idle_bytes -= block.size


def _take(size):
    """An idle block of ``size`` bytes, the one returned last, or None."""
    global _idle_bytes
    with _lock:
        _drain()
        for key in reversed(_idle):
            if _idle[key].size == size:
                _idle_bytes -= size
                return _idle.pop(key)
    return None


def empty(shape, dtype):
    """An uninitialized C-ordered array, as ``np.empty(shape, dtype)`` (``shape`` a tuple),
    whose memory comes from the pool from ``MIN_BYTES`` up."""
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for n in shape:        # (math.prod and a tuple of ints first: 1.2 us a call; 0.6 so, np.empty 0.3)
        nbytes *= n
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype)
    size = block_size(int(nbytes))
    block = _take(size)
    if block is None:
        block = _new_block(size)
    lease = _Lease()
    lease.block = block
    lease.__array_interface__ = {"shape": tuple(int(n) for n in shape), "typestr": dtype.str,
                                 "version": 3, "data": (block.ctypes.data, False)}
    weakref.finalize(lease, _returned.put, block).atexit = False
    return np.asarray(lease)


def idle_bytes():
    """Bytes of idle blocks the pool holds now."""
    with _lock:
        _drain()
        return _idle_bytes


def clear():
    """Free every idle block (blocks in use go back to the pool, then stay until the next
    :func:`clear` or are freed past ``MAX_IDLE_BYTES``); the bytes freed
    (``fastrnn.release_buffers``)."""
    global _idle_bytes
    with _lock:
        _drain()
        freed = _idle_bytes
        _idle.clear()
        _idle_bytes = 0
    return freed


def _after_fork():
    """A forked child starts with a free lock and an empty pool (another thread of the
    parent may have held the lock at the fork)."""
    global _lock, _idle, _idle_bytes, _returned
    _lock, _idle, _idle_bytes = threading.Lock(), collections.OrderedDict(), 0
    _returned = queue.SimpleQueue()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
