"""Gate orders and bias layouts of the formats fastrnn reads and writes, written once.

fastrnn's order is PyTorch's: RNN one block, LSTM ``i, f, g, o``, GRU ``r, z, n``.
Each table entry is the permutation ``perm`` with
``torch_blocks[k] = foreign_blocks[perm[k]]``.
"""

from __future__ import annotations

import numpy as np

from .. import backends

#: ONNX: LSTM gates i, o, f, c; GRU gates z, r, h.
ONNX = {"rnn": (0,), "lstm": (0, 2, 3, 1), "gru": (1, 0, 2)}
#: Keras: LSTM gates i, f, c, o (torch's order); GRU gates z, r, h.
KERAS = {"rnn": (0,), "lstm": (0, 1, 2, 3), "gru": (1, 0, 2)}


def family(cell: str) -> str:
    """'rnn', 'lstm' or 'gru' for a cell kind of :data:`fastrnn.backends.CELLS`."""
    return backends.cell_kind(cell).family.lower()


def to_torch_order(a, perm, axis=0):
    """Reorder the gate blocks of ``a`` along ``axis`` from a foreign order to torch's."""
    blocks = np.split(np.asarray(a), len(perm), axis=axis)
    return np.concatenate([blocks[p] for p in perm], axis=axis)


def from_torch_order(a, perm, axis=0):
    """Inverse of :func:`to_torch_order`: torch's gate order to the foreign one."""
    inverse = np.argsort(perm)
    return to_torch_order(a, tuple(int(p) for p in inverse), axis=axis)


def cell_of(obj) -> str:
    """The cell kind of a fastrnn RNN/LSTM/GRU layer or cell (a key of
    :data:`fastrnn.backends.CELLS`); TypeError for anything else."""
    from .. import cells, layers
    for kind, classes in (("rnn", (layers.RNN, cells.RNNCell)),
                          ("lstm", (layers.LSTM, cells.LSTMCell)),
                          ("gru", (layers.GRU, cells.GRUCell))):
        if isinstance(obj, classes):
            return f"rnn_{obj.nonlinearity}" if kind == "rnn" else kind
    raise TypeError(f"expected a fastrnn RNN, LSTM or GRU layer or cell, got "
                    f"{type(obj).__name__}")


def is_cell(obj) -> bool:
    """Whether ``obj`` is a fastrnn RNNCell, LSTMCell or GRUCell."""
    from .. import cells
    return isinstance(obj, (cells.RNNCell, cells.LSTMCell, cells.GRUCell))
