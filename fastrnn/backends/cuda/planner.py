"""The persistent-launch planner: the geometry of one persistent launch, or why there is none.

Pure arithmetic on the problem (cell, B, H, dtype, direction) and the limits of
a device (:class:`PersistentLimits`), so it is tested without a GPU; the
runtime supplies the real device's limits. The work split it plans is that of
``csrc/fastrnn_persist.cuh``: block q owns hidden units ``q J .. q J + J - 1``
of every gate, each thread one unit and 1-8 batch rows (``bt``), or, where
``B J`` is small, one K split of one unit's dot products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fastrnn.backends import gate_count


@dataclass(frozen=True)
class PersistentLimits:
    """What a persistent launch may use on one device."""

    sms: int                    # multiprocessors: at most one block each
    shared_bytes: int           # dynamic shared memory a block may opt in to
    threads: int = 256          # threads per block (FASTRNN_PERSIST_THREADS at most)
    min_split_vectors: int = 8  # a K split gets at least this many 16-byte vectors
    cooperative: bool = True    # the device can launch cooperative grids


@dataclass(frozen=True)
class PersistentPlan:
    """The geometry of one persistent launch (see csrc/fastrnn_persist.cuh)."""

    blocks: int
    threads: int
    J: int             # hidden units per block
    groups: int        # batch groups per block
    splits: int        # K splits per (unit, batch group)
    bt: int            # batches per thread: 1, 2, 4 or 8
    stride: int        # elements per shared weight row
    shared_bytes: int

    def geometry(self) -> tuple:
        """The J, groups, splits, bt, stride arguments of the kernels."""
        return self.J, self.groups, self.splits, self.bt, self.stride


def persistent_plan(cell: str, B: int, H: int, dtype, backward: bool = False,
                    reset_after: bool = True, *, limits: PersistentLimits):
    """The persistent launch for this problem on a device with ``limits``.

    Returns ``(PersistentPlan, None)`` when it fits, else ``(None, why not)``.
    """
    itemsize = np.dtype(dtype).itemsize
    width = 16 // itemsize
    gates = gate_count(cell)
    if cell == "gru" and not reset_after:
        return None, "the GRU with reset_after=False runs stepwise (two barriers per step)"
    if not limits.cooperative:
        return None, "the device cannot launch cooperative grids"
    if H % width:
        return None, f"H = {H} is not a multiple of {width} ({np.dtype(dtype).name} vectors)"
    J = -(-H // limits.sms)
    blocks = -(-H // J)
    K = gates * H if backward else H    # length of the dot products
    if B * J <= limits.threads:
        bt, groups = 1, B
        splits = max(1, min(limits.threads // (B * J),
                            K // width // limits.min_split_vectors))
    else:
        bt = 1 << math.ceil(math.log2(-(-B * J // limits.threads)))
        while J * -(-B // bt) > limits.threads:   # groups rounds up: J * groups must fit
            bt *= 2
        if bt > 8:
            return None, (f"B * ceil(H / SMs) = {B * J} is more than 8 batches for each "
                          f"of {limits.threads} threads")
        groups, splits = -(-B // bt), 1
    stride = ((K * itemsize + 127) // 128 * 128 + 16) // itemsize
    rows = J if backward else gates * J
    partial = (splits - 1) * J * groups * (1 if backward else gates) * bt
    shared = (rows * stride + partial) * itemsize
    shared = (shared + 15) // 16 * 16
    if shared > limits.shared_bytes:
        return None, (f"the weight slice needs {shared} bytes of shared memory per block, "
                      f"more than the {limits.shared_bytes} a block can have")
    return PersistentPlan(blocks, limits.threads, J, groups, splits, bt, stride, shared), None
