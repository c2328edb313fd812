"""Backends: one kernel contract, several implementations.

Notation (fixed here, once, for every backend and every kernel)
---------------------------------------------------------------
``T`` time steps, ``B`` batch, ``I`` input features, ``H`` hidden features,
``G`` gate rows: ``H`` (RNN), ``4H`` (LSTM, gates ``i, f, g, o``) or ``3H``
(GRU, gates ``r, z, n``), in PyTorch's order. Arrays are C-ordered: the
rightmost dimension changes the fastest.

=========  ==============  ==================================================
name       shape           meaning
=========  ==============  ==================================================
x          (T, B, I)       input sequence, time-major
h0, c0     (B, H)          initial hidden (and LSTM cell) state
w_ih       (G, I)          input-to-hidden weights (``weight_ih_l{k}``)
w_hh       (G, H)          hidden-to-hidden weights (``weight_hh_l{k}``); (G, P)
                           with a projection
w_hr       (P, H) or None  LSTM only: the projection (``weight_hr_l{k}``, torch's
                           ``proj_size=P``); h0, h_n, out and d_* of them then have
                           P columns instead of H, c0 and c_n keep H
zoneout_h  (T|1, B|1, H)   zoneout of h (Krueger et al. 2016): the weight of the
           or None         previous state, ``h_t = k h_{t-1} + (1 - k) h~_t`` with
                           ``h~_t`` the cell's new state; 0/1 masks in training,
                           the rate z in inference; a size-1 axis broadcasts; P
                           columns with a projection
zoneout_c  (T|1, B|1, H)   LSTM only: the same for c; with it, h~_t uses the new
           or None         c~_t before zoneout (as in Krueger et al.)
b_ih, b_hh (G,) or None    biases; ``None`` when the layer has ``bias=False``
lengths    (B,) or None    valid steps per sequence, ``0 <= lengths[b] <= T``
out        (T, B, H)       hidden state after every step; 0 at padded steps
h_n, c_n   (B, H)          state after each sequence's last valid step
d_*        shape of *      gradient of the loss with respect to ``*``
=========  ==============  ==================================================

Every backend exposes, for each cell kind in :data:`CELLS`, one single-layer,
single-direction pair of stateless functions::

    {cell}_forward(x, h0[, c0], w_ih, w_hh, b_ih, b_hh, lengths=None,
                   reverse=False, training=True[, reset_after=True][, w_hr=None],
                   zoneout_h=None[, zoneout_c=None])
        -> out, h_n[, c_n], cache
    {cell}_backward(d_out, d_h_n[, d_c_n], cache)
        -> d_x, d_h0[, d_c0], d_w_ih, d_w_hh, d_b_ih, d_b_hh[, d_w_hr]

``c0``/``c_n``/``d_c_n``/``d_c0`` exist for the LSTM only, ``reset_after``
for the GRU only, ``w_hr`` and ``zoneout_c`` for the LSTM only (``d_w_hr`` is
returned when ``w_hr`` was given). The zoneout masks get no gradient; backward uses
the ones the forward call was given. ``cache`` is ``None`` when ``training`` is false; it is
opaque to callers and holds what backward needs (post-activation gates and
states), so backward never recomputes a pre-activation. ``d_b_*`` are
``None`` when the biases are. Gradients in ``d_out`` at padded steps are
ignored. ``out``, ``h_n`` and ``c_n`` are new arrays, the caller's: no two share memory,
nor with an argument or the cache (a layer of one layer and direction hands them on
as they are).

Masking (PyTorch's ``pack_padded_sequence(enforce_sorted=False)``): step
``t`` of sequence ``b`` is *active* when ``t < lengths[b]``. An inactive
step leaves the state unchanged and outputs 0. The forward direction visits
``t = 0 .. T-1``, the reverse direction ``t = T-1 .. 0``; in both the rule
is the same, so the reverse direction of each sequence starts at its own
last valid step.

State buffers of ``T + 1`` slots are stored in time order with an offset:
with ``r = int(reverse)``, the state before step ``t`` is ``hs[t + r]`` and
the state after it is ``hs[t + 1 - r]``; ``hs[r:T + r]`` are all the
"previous" states in time order, one contiguous block.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import NamedTuple


class CellKind(NamedTuple):
    """One cell kind: everything the layers, cells, backends, tests and benchmarks
    enumerate about it, written once."""

    #: Gate blocks: G = gates * H.
    gates: int
    #: State arrays: 1, or 2 for the LSTM's (h, c).
    states: int
    #: The layer family, which is also torch's class name (``torch.nn.LSTM``,
    #: ``torch.nn.LSTMCell``) and fastrnn's (``fastrnn.LSTM``, ``fastrnn.LSTMCell``).
    family: str
    #: Constructor options of the family that select this kind.
    options: tuple = ()
    #: Optional array arguments of the kernels (keywords, default None): the LSTM's
    #: projection ``w_hr`` (P, H) (torch's ``proj_size``), the zoneout masks.
    optional_arrays: tuple = ()

    @property
    def zoneout_arrays(self) -> tuple:
        """The optional arrays that are zoneout masks, one per state (h, and the LSTM's c)."""
        return tuple(a for a in self.optional_arrays if a.startswith("zoneout_"))

    def constructor_options(self) -> dict:
        return dict(self.options)


#: The registry of cell kinds: the kernel names of every backend are ``{kind}_forward``
#: and ``{kind}_backward``.
CELLS = {
    "rnn_tanh": CellKind(1, 1, "RNN", (("nonlinearity", "tanh"),), ("zoneout_h",)),
    "rnn_relu": CellKind(1, 1, "RNN", (("nonlinearity", "relu"),), ("zoneout_h",)),
    "lstm": CellKind(4, 2, "LSTM", optional_arrays=("w_hr", "zoneout_h", "zoneout_c")),
    "gru": CellKind(3, 1, "GRU", optional_arrays=("zoneout_h",)),
}

#: Kernel options a cell kind's functions take beyond the common ones, with defaults.
KERNEL_OPTIONS = {"gru": {"reset_after": True}}

#: Backends, fastest first; ``auto`` picks the first CPU backend available.
_MODULES = {
    "numba": "fastrnn.backends.numba_cpu",
    "numpy": "fastrnn.backends.reference",
    "cuda": "fastrnn.backends.cuda",
}
_AUTO_ORDER = ("numba", "numpy")
#: Every backend's name, whether or not it can run here.
NAMES = tuple(_MODULES)


def cell_kind(cell: str) -> CellKind:
    """The registry entry of ``cell``; ValueError naming the kinds for an unknown one."""
    try:
        return CELLS[cell]
    except (KeyError, TypeError):
        raise ValueError(f"cell must be one of {', '.join(map(repr, CELLS))}; got {cell!r}") \
            from None


def gate_count(cell: str) -> int:
    """Number of gate blocks of ``cell``: G = gate_count(cell) * H."""
    return cell_kind(cell).gates


def state_count(cell: str) -> int:
    """Number of state arrays of ``cell`` (2 for the LSTM's h and c)."""
    return cell_kind(cell).states


@dataclass(frozen=True)
class Backend:
    """A loaded backend: its name, array module and kernels."""

    name: str
    module: ModuleType
    #: The array module of this backend (numpy or cupy): the module's, read once (a
    #: property here cost every layer call several lookups).
    xp: ModuleType = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "xp", self.module.xp)

    def kernels(self, cell: str):
        """Return ``(forward, backward)`` for ``cell``, checked at the boundary.

        Every argument is checked (type, dtype, shape, contiguity, values of
        ``lengths``; see :mod:`.contract`) before the backend's kernel runs, so
        a wrong call raises TypeError or ValueError naming the argument instead
        of letting BLAS read out of bounds. The cost is a few microseconds per
        call (``python bench/micro.py``).
        """
        checked = _checked.get((self.name, cell))
        if checked is None:
            from . import contract
            self.raw_kernels(cell)   # an unknown cell raises here
            checked = contract.checked(self.name, self.xp, cell, self.module)
            _checked[(self.name, cell)] = checked
        return checked

    def raw_kernels(self, cell: str):
        """``(forward, backward)`` without the boundary checks: for callers that
        have validated the same things themselves (the cells, whose per-step
        cost is what they sell)."""
        cell_kind(cell)
        return (getattr(self.module, f"{cell}_forward"),
                getattr(self.module, f"{cell}_backward"))


_loaded: dict[str, Backend] = {}
#: (backend, cell) -> the checked kernels, made once.
_checked: dict = {}
_why_absent: dict[str, str] = {}


def _load(name: str) -> Backend | None:
    if name in _loaded:
        return _loaded[name]
    if name in _why_absent:
        return None
    try:
        module = importlib.import_module(_MODULES[name])
        reason = module.unavailable_reason() if hasattr(module, "unavailable_reason") else None
    except ImportError as exc:
        reason = f"import failed: {exc}"
    if reason:
        _why_absent[name] = reason
        return None
    _loaded[name] = Backend(name, module)
    return _loaded[name]


def available() -> list[str]:
    """Names of the backends that can run here."""
    return [name for name in _MODULES if _load(name) is not None]


def why_absent() -> dict[str, str]:
    """For every backend that cannot run here, the reason."""
    available()
    return dict(_why_absent)


def auto_name() -> str:
    """The backend ``backend='auto'`` resolves to: the fastest CPU backend."""
    for name in _AUTO_ORDER:
        if _load(name) is not None:
            return name
    raise RuntimeError("no CPU backend available")  # numpy is always importable


def get(name: str) -> Backend:
    """Return the backend ``name`` (``'auto'``, ``'numpy'``, ``'numba'``, ``'cuda'``).

    Raises ValueError for an unknown name and RuntimeError, with the reason,
    for a known backend that cannot run here. Never falls back to another.
    """
    if not isinstance(name, str) or (name != "auto" and name not in _MODULES):
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, _MODULES))}; "
                         f"got {name!r}")
    if name == "auto":
        name = auto_name()
    backend = _load(name)
    if backend is None:
        raise RuntimeError(f"backend {name!r} is not available: {_why_absent[name]}")
    return backend
