"""Single-step cells: ``RNNCell``, ``LSTMCell`` and ``GRUCell``, with PyTorch's conventions.

A cell runs one time step, ``h = cell(x_t, h)`` (LSTM: ``h, c = cell(x_t, (h, c))``),
inside a loop the user writes (decoders, sampling, beam search). Each step
is one call of the backend's single-layer kernel with ``T = 1``, so a cell
runs on the same numpy, numba or cuda kernels as the layers.

Backward is a tape: in train mode every call pushes its kernel cache, and
``cell.backward(d_h[, d_c])`` pops the most recent one, so a loop that calls
the cell ``T`` times calls backward ``T`` times, in reverse order::

    h = None
    for t in range(T):
        h = cell(x[t], h)                      # pushes step t
        ...
    d_h = d_h_from_loss[T - 1]
    for t in reversed(range(T)):
        d_x[t], d_h_prev = cell.backward(d_h)  # pops step t
        d_h = d_h_prev + (d_h_from_loss[t - 1] if t else 0)

Shapes: ``x_t`` is (B, input_size) or unbatched (input_size,); states are
(B, hidden_size) or (hidden_size,) to match. Parameters are
``weight_ih`` (G, input_size), ``weight_hh`` (G, hidden_size), ``bias_ih``
and ``bias_hh`` (G,), with ``G = H`` (RNN), ``4H`` (LSTM, gates i, f, g, o)
or ``3H`` (GRU, gates r, z, n), exactly as ``torch.nn.RNNCell/LSTMCell/GRUCell``.
"""

from __future__ import annotations

import numpy as np

from . import backends
from ._recurrent import Recurrent, rnn_kind


class _CellBase(Recurrent):
    """Shared machinery of :class:`RNNCell`, :class:`LSTMCell` and :class:`GRUCell`."""

    def __init__(self, cell, input_size, hidden_size, bias=True, *, backend="auto",
                 dtype=np.float32, seed=None, **options):
        super().__init__(cell, input_size, hidden_size, bias, backend, dtype, seed, **options)
        self._set_kernels()
        self._tape = []

    def _forget(self):
        self._tape = []

    def _on_move(self):
        self._set_kernels()

    def _set_kernels(self):
        # Resolved once: the per-step path does no lookups. The cell validates its
        # arguments itself (below), so it calls the kernels without the contract's
        # per-call checks (see backends.Backend.raw_kernels).
        self._fwd, self._bwd = self._backend.raw_kernels(self._cell)
        self._ndarray = self._backend.xp.ndarray

    def _param_shapes(self) -> dict:
        """Torch's parameter names and shapes, in torch's order."""
        return self._gate_shapes("", self.input_size)

    # ---------------------------------------------------------------- tape

    @property
    def tape_length(self) -> int:
        """Number of recorded steps that :meth:`backward` can still undo."""
        return len(self._tape)

    def clear_tape(self):
        """Forget every recorded step (for example after a train-mode rollout
        whose gradient is not needed)."""
        self._tape.clear()

    # ---------------------------------------------------------- validation

    def _bad_array(self, name, a):
        """The error for an ``a`` that failed the fast check of type and dtype."""
        xp = self._xp
        if not isinstance(a, xp.ndarray):
            return TypeError(f"{name} must be a {xp.__name__}.ndarray for backend "
                             f"{self.backend!r}, got {type(a).__name__}")
        return TypeError(f"{name} has dtype {a.dtype} but the cell's dtype is {self.dtype}; "
                         f"convert one of them explicitly")

    def _check_x(self, x):
        """Return ``(x as (1, B, I) contiguous, batched)``."""
        if not isinstance(x, self._ndarray) or x.dtype != self.dtype:
            raise self._bad_array("x", x)
        shape = x.shape
        if len(shape) == 2 and shape[1] == self.input_size and shape[0]:
            batched = True
        elif len(shape) == 1 and shape[0] == self.input_size:
            batched = False
        else:
            raise ValueError(f"x must have shape (B, input_size) with B >= 1 or (input_size,), "
                             f"with input_size={self.input_size}; got {tuple(shape)}")
        x = x[None] if batched else x.reshape(1, 1, self.input_size)
        if self.training:
            # The tape keeps x until backward: a copy protects it from a loop that
            # refills one input buffer in place at every step.
            x = x.copy()
        elif not x.flags.c_contiguous:
            x = self._xp.ascontiguousarray(x)
        return x, batched

    def _check_state(self, name, s, B, batched):
        """Return ``s`` as a contiguous (B, H) array."""
        if not isinstance(s, self._ndarray) or s.dtype != self.dtype:
            raise self._bad_array(name, s)
        H = self.hidden_size
        if batched:
            if s.shape != (B, H):
                raise ValueError(f"{name} must have shape (B, hidden_size) = ({B}, {H}) to "
                                 f"match x, got {tuple(s.shape)}")
        elif s.shape != (H,):
            raise ValueError(f"{name} must have shape (hidden_size,) = ({H},) for unbatched x, "
                             f"got {tuple(s.shape)}")
        if not batched:
            s = s[None]
        return s if s.flags.c_contiguous else self._xp.ascontiguousarray(s)

    def _check_states(self, name, hx, B, batched):
        """Return the state tuple ((B, H),) or ((B, H), (B, H)); None gives zeros."""
        if hx is None:
            zeros = self._xp.zeros((B, self.hidden_size), dtype=self.dtype)
            return (zeros,) * self._num_states   # read only by the kernels
        if self._num_states == 1:
            return (self._check_state(name, hx, B, batched),)
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise ValueError(f"{name} must be a pair (h, c) for an LSTMCell, got "
                             f"{type(hx).__name__}")
        return (self._check_state(f"{name}[0]", hx[0], B, batched),
                self._check_state(f"{name}[1]", hx[1], B, batched))

    # ---------------------------------------------------------- computing

    def forward(self, x, hx=None):
        """Run one step.

        Parameters
        ----------
        x : array (B, input_size) or unbatched (input_size,); the cell's dtype.
        hx : previous state (B, hidden_size) or (hidden_size,); a pair
            ``(h, c)`` for the LSTMCell; None means zeros.

        Returns
        -------
        h : the new state, shape of ``hx``; for the LSTMCell a pair ``(h, c)``.
            New arrays: the cell keeps no reference to them.
        """
        x, batched = self._check_x(x)
        B = x.shape[1]
        states = self._check_states("hx", hx, B, batched)
        training = self.training
        result = self._fwd(x, *states, *self._weights_of(""), None, False, training,
                           **self._options)
        if training:
            self._tape.append((result[-1], batched, B))
        if self._num_states == 1:
            h = result[1]
            return h if batched else h[0]
        h, c = result[1], result[2]
        return (h, c) if batched else (h[0], c[0])

    def backward(self, d_h, d_c=None):
        """Undo the most recent recorded step.

        Parameters
        ----------
        d_h : gradient of the loss with respect to the ``h`` that step returned
            (everything that flows into it: the loss at that step and the
            gradient from later steps), shape of that ``h``.
        d_c : LSTMCell only: the same for ``c``; None means zeros.

        Returns
        -------
        d_x : gradient with respect to that step's ``x``, shape of ``x``.
        d_hx : gradient with respect to that step's input state, shape of ``h``
            (LSTMCell: a pair ``(d_h_prev, d_c_prev)``).

        Parameter gradients are added to :attr:`grads`. The step is removed
        from the tape; a failed call leaves the tape and the gradients as
        they were.
        """
        if not self._tape:
            raise RuntimeError("backward needs a recorded step: call the cell in train mode "
                               "first (each backward undoes one call, most recent first)")
        cache, batched, B = self._tape[-1]
        d_states = [self._check_state("d_h", d_h, B, batched)]
        if self._num_states == 2:
            if d_c is None:
                d_states.append(self._xp.zeros((B, self.hidden_size), dtype=self.dtype))
            else:
                d_states.append(self._check_state("d_c", d_c, B, batched))
        elif d_c is not None:
            raise ValueError(f"d_c is only accepted by an LSTMCell, not {type(self).__name__}")
        d_out = self._xp.zeros((1, B, self.hidden_size), dtype=self.dtype)
        result = self._bwd(d_out, *d_states, cache)
        # Everything succeeded: now, and only now, change the cell's state.
        self._tape.pop()
        S = self._num_states
        grads = self.grads
        grads["weight_ih"] += result[1 + S]
        grads["weight_hh"] += result[2 + S]
        if self.bias:
            grads["bias_ih"] += result[3 + S]
            grads["bias_hh"] += result[4 + S]
        d_x = result[0][0]
        if S == 1:
            d_h0 = result[1]
            return (d_x, d_h0) if batched else (d_x[0], d_h0[0])
        d_h0, d_c0 = result[1], result[2]
        return (d_x, (d_h0, d_c0)) if batched else (d_x[0], (d_h0[0], d_c0[0]))

    __call__ = forward


class RNNCell(_CellBase):
    """Elman RNN cell: h' = act(W_ih x + b_ih + W_hh h + b_hh), act tanh or ReLU.

    Parameters as ``torch.nn.RNNCell(input_size, hidden_size, bias=True,
    nonlinearity='tanh')``; plus ``backend`` ('auto', 'numpy', 'numba',
    'cuda'), ``dtype`` (float32 or float64) and ``seed``.
    """

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", *,
                 backend="auto", dtype=np.float32, seed=None):
        super().__init__(rnn_kind(nonlinearity), input_size, hidden_size, bias, backend=backend,
                         dtype=dtype, seed=seed)
        self.nonlinearity = nonlinearity


class LSTMCell(_CellBase):
    """LSTM cell with PyTorch's gate order (i, f, g, o): ``h, c = cell(x, (h, c))``.

    Equations
    ---------
    .. math::
        [i, f, g, o] = [\\sigma, \\sigma, \\tanh, \\sigma](W_{ih} x + b_{ih} + W_{hh} h + b_{hh})
        c' = f \\odot c + i \\odot g,\\quad h' = o \\odot \\tanh(c')

    Parameters as ``torch.nn.LSTMCell(input_size, hidden_size, bias=True)``;
    plus ``backend``, ``dtype`` and ``seed``. ``backward(d_h, d_c=None)``
    returns ``d_x, (d_h_prev, d_c_prev)``.
    """

    def __init__(self, input_size, hidden_size, bias=True, *, backend="auto",
                 dtype=np.float32, seed=None):
        super().__init__("lstm", input_size, hidden_size, bias, backend=backend, dtype=dtype,
                         seed=seed)


class GRUCell(_CellBase):
    """GRU cell with PyTorch's gate order (r, z, n).

    Equations
    ---------
    .. math::
        r = \\sigma(W_{ir} x + b_{ir} + W_{hr} h + b_{hr}),\\quad
        z = \\sigma(W_{iz} x + b_{iz} + W_{hz} h + b_{hz})
        n = \\tanh(W_{in} x + b_{in} + r \\odot (W_{hn} h + b_{hn}))\\quad (reset\\_after)
        h' = (1 - z) \\odot n + z \\odot h

    Parameters as ``torch.nn.GRUCell(input_size, hidden_size, bias=True)``;
    plus ``backend``, ``dtype``, ``seed`` and ``reset_after`` (default True,
    PyTorch's form; False is Cho et al.'s n = tanh(W_in x + b_in + W_hn (r h) + b_hn)).
    """

    def __init__(self, input_size, hidden_size, bias=True, *, backend="auto",
                 dtype=np.float32, seed=None, reset_after=True):
        super().__init__("gru", input_size, hidden_size, bias, backend=backend, dtype=dtype,
                         seed=seed, reset_after=reset_after)

    @property
    def reset_after(self) -> bool:
        """Which form of the candidate n this cell computes (fixed at construction)."""
        return self._options["reset_after"]


_FAMILIES = {cls.__name__: cls for cls in (RNNCell, LSTMCell, GRUCell)}


def make_cell(cell, input_size, hidden_size, **kwargs):
    """The cell of a cell kind of :data:`fastrnn.backends.CELLS`; ``kwargs`` as the
    cell's constructor takes them."""
    kind = backends.cell_kind(cell)
    return _FAMILIES[kind.family + "Cell"](input_size, hidden_size,
                                           **kind.constructor_options(), **kwargs)
