"""Multi-layer, bidirectional RNN, LSTM and GRU layers with PyTorch's conventions.

The layers know nothing of any backend's internals: they validate input,
walk layers and directions, and call the backend's single-layer kernels
(:mod:`fastrnn.backends`).
"""

from __future__ import annotations

import functools
import numbers
import warnings

import numpy as np

from . import backends
from ._module import _check_bool, _check_positive_int, _rng
from ._recurrent import Recurrent, direction_suffix, rnn_kind

class _Pending:
    """What a train-mode forward leaves for backward."""

    __slots__ = ("caches", "shape_out", "batched", "T", "B", "padded", "masks")

    def __init__(self, caches, shape_out, batched, T, B, padded=None, masks=()):
        self.caches, self.shape_out, self.batched, self.T, self.B = caches, shape_out, batched, T, B
        #: (T, B) bool, True at padded steps; None without lengths.
        self.padded = padded
        #: Dropout masks (scaled by 1 / (1 - p)) applied to the outputs of layers
        #: 0 .. L-2, in order; empty without dropout.
        self.masks = masks


class _RNNBase(Recurrent):
    """Shared machinery of :class:`RNN`, :class:`LSTM` and :class:`GRU`."""

    def __init__(self, cell, input_size, hidden_size, num_layers=1, *, bias=True,
                 batch_first=False, bidirectional=False, reverse=False, dropout=0.0,
                 zoneout=0.0, backend="auto", dtype=np.float32, seed=None, **options):
        self.num_layers = _check_positive_int("num_layers", num_layers)
        #: Zoneout rate of each state (h, and the LSTM's c); 0 is none.
        self._zoneout = _check_zoneout(zoneout, backends.cell_kind(cell).states)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or \
                not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn("dropout acts between layers: with num_layers=1 it does nothing "
                          f"(dropout={self.dropout}, num_layers=1)", UserWarning, stacklevel=3)
        self.batch_first = _check_bool("batch_first", batch_first)
        self.bidirectional = _check_bool("bidirectional", bidirectional)
        #: A single direction that runs backward in time (ONNX direction="reverse",
        #: Keras go_backwards before its output flip); parameters keep the names of
        #: the forward direction, no "_reverse" suffix.
        self.reverse = _check_bool("reverse", reverse)
        if self.reverse and self.bidirectional:
            raise ValueError("reverse=True runs one direction backward in time; it cannot be "
                             "combined with bidirectional=True")
        super().__init__(cell, input_size, hidden_size, bias, backend, dtype, seed, **options)
        # A stream of its own, reproducible from ``seed`` but apart from the weights'.
        self.seed_dropout(None if seed is None else np.random.SeedSequence(seed).spawn(1)[0])

    def seed_dropout(self, seed=None):
        """Reseed the generator of the dropout and zoneout masks (``seed``: what numpy's
        ``default_rng`` takes; None draws fresh entropy)."""
        self._dropout_rng = _rng(seed)

    @property
    def _stochastic(self) -> bool:
        """Whether a train-mode forward draws masks (dropout between layers, zoneout)."""
        return bool(self.dropout and self.num_layers > 1) or any(self._zoneout)

    @property
    def zoneout(self):
        """The zoneout rate: a float (RNN, GRU), a pair ``(z_h, z_c)`` (LSTM)."""
        return self._zoneout if self._num_states == 2 else self._zoneout[0]

    def _unsupported(self, backend):
        if any(self._zoneout):
            if backend == "cuda":
                return "zoneout"
            if backend == "numba" and self.proj_size:
                return "zoneout together with proj_size"
            if backend == "numba" and not self._options.get("reset_after", True):
                return "zoneout together with reset_after=False"
        return None

    def _zoneout_masks(self, T, B) -> dict:
        """The zoneout keywords of one kernel call: per state, the weight of its previous
        value, a 0/1 mask (T, B, width) drawn with probability z in train mode (the
        layer's generator), z itself (1, 1, width) in eval mode."""
        masks = {}
        for name, z, width in zip(self._kind.zoneout_arrays, self._zoneout,
                                  self._state_widths()):
            if not z:
                continue
            if self.training:
                mask = (self._dropout_rng.random((T, B, width)) < z).astype(self.dtype)
            else:
                mask = np.full((1, 1, width), z, dtype=self.dtype)
            masks[name] = self._xp.asarray(mask)
        return masks

    # ------------------------------------------------------------ structure

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _runs_reverse(self, direction) -> bool:
        """Whether direction 0 (forward) or 1 (the bidirectional reverse) runs backward in time."""
        return bool(direction) or self.reverse

    def _directions(self):
        """``(layer, direction, k, suffix)`` in torch's order; ``k`` indexes h_n."""
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                yield layer, direction, layer * self.num_directions + direction, \
                    direction_suffix(layer, direction)

    def _param_shapes(self) -> dict:
        """Torch's parameter names and shapes, in torch's order."""
        shapes = {}
        for layer, _, _, suffix in self._directions():
            layer_in = self.input_size if layer == 0 else self.num_directions * self._out_size
            shapes.update(self._gate_shapes(suffix, layer_in))
            shapes.update(self._extra_shapes(suffix))
            if self.proj_size:   # torch's order: the projection after the biases
                G = self._kind.gates * self.hidden_size
                shapes["weight_hh" + suffix] = (G, self.proj_size)
                shapes["weight_hr" + suffix] = (self.proj_size, self.hidden_size)
        return shapes

    def _extra_shapes(self, suffix) -> dict:
        """Parameters a layer family adds per layer and direction, after torch's four."""
        return {}

    def _direction_options(self, suffix) -> dict:
        """Kernel keywords of one layer and direction: the cell's options, and the
        projection ``w_hr`` with proj_size."""
        if not self.proj_size:
            return self._options
        return {**self._options, "w_hr": self.params["weight_hr" + suffix]}

    # Hooks of the layer loop: a layer family with kernels of its own (the
    # LayerNorm layers) overrides these three and shares everything else.

    def _kernels(self):
        """``(forward, backward)`` single-layer kernels of the layer's backend; a frozen
        layer's without the contract's per-call checks (``Backend.raw_kernels``), while
        its parameters are the ones :meth:`freeze` checked (``params`` reassigned, or
        ``training`` set by hand, goes back to the checked kernels): :meth:`forward`
        checks the inputs itself (``python bench/packed_parts.py --parts overhead``)."""
        if self.frozen and not self.training and self.params is self._frozen_params:
            return self._backend.raw_kernels(self._cell)
        return self._backend.kernels(self._cell)

    def _direction_args(self, suffix):
        """``(positional weight arrays, keyword options)`` of one layer and direction."""
        return self._weights_of(suffix), self._direction_options(suffix)

    def _check_params(self):
        """Called before the kernels read the parameters (the contract's checks of
        the plain kernels cover them)."""

    def _grad_names(self, suffix) -> tuple:
        """Parameter names in the order the backward kernels return their gradients
        (the bias gradients are None without biases)."""
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        names += ("weight_hr",) if self.proj_size else ()
        return tuple(n + suffix for n in names)

    def _repr_fields(self) -> dict:
        fields = {"num_layers": self.num_layers} if self.num_layers != 1 else {}
        if self.proj_size:
            fields["proj_size"] = self.proj_size
        fields.update({flag: True for flag in ("batch_first", "bidirectional", "reverse")
                       if getattr(self, flag)})
        if self.dropout:
            fields["dropout"] = self.dropout
        if any(self._zoneout):
            fields["zoneout"] = self.zoneout
        fields.update(super()._repr_fields())
        return fields

    # ---------------------------------------------------------- validation

    def _check_array(self, name, a):
        xp = self._xp
        if not isinstance(a, xp.ndarray):
            raise TypeError(f"{name} must be a {xp.__name__}.ndarray for backend "
                            f"{self.backend!r}, got {type(a).__name__}")
        if a.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {a.dtype} but the model's dtype is "
                            f"{self.dtype}; convert one of them explicitly")
        return a

    def _check_input(self, x):
        x = self._check_array("x", x)
        if x.ndim not in (2, 3):
            raise ValueError(f"x must have 3 dimensions ({'B, T' if self.batch_first else 'T, B'}"
                             f", input_size) or 2 (T, input_size) for unbatched input; "
                             f"got shape {tuple(x.shape)}")
        if x.shape[-1] != self.input_size:
            raise ValueError(f"x has {x.shape[-1]} features in its last dimension, expected "
                             f"input_size={self.input_size}")
        batched = x.ndim == 3
        x = self._to_time_major(x, batched)
        if x.shape[0] == 0:
            raise ValueError("x must have at least one time step")
        if x.shape[1] == 0:
            raise ValueError("x must have at least one sequence (B >= 1)")
        return self._xp.ascontiguousarray(x), batched

    def _check_lengths(self, lengths, T, B, batched):
        if lengths is None:
            return None
        if not batched:
            raise ValueError("lengths is only accepted with batched (3-D) input")
        host = lengths.get() if hasattr(lengths, "get") else np.asarray(lengths)
        if host.dtype.kind not in "iu":
            raise TypeError(f"lengths must be an integer array, got dtype {host.dtype}")
        if host.shape != (B,):
            raise ValueError(f"lengths must have shape (B,) = ({B},), got {host.shape}")
        if B and (host.min() < 0 or host.max() > T):
            raise ValueError(f"lengths must lie in [0, T] = [0, {T}], got values from "
                             f"{host.min()} to {host.max()}")
        if (host == T).all():
            return None  # every sequence is full: no masking needed
        return self._xp.asarray(host.astype(np.int64))

    #: torch's proj_size (the LSTM's projection of h); 0 means none.
    proj_size = 0

    @property
    def _out_size(self) -> int:
        """Features of h (and of each direction's output): proj_size or hidden_size."""
        return self.proj_size or self.hidden_size

    def _state_widths(self) -> tuple:
        """Features of each state array: h (proj_size or H), and the LSTM's c (H)."""
        return (self._out_size, self.hidden_size)[:self._num_states]

    def _check_states(self, name, states, B, batched):
        """Return a tuple of (L*D, B, width) arrays from hx / d_h_n (None gives zeros)."""
        S = self._num_states
        LD = self.num_layers * self.num_directions
        widths = self._state_widths()
        if states is None:
            return tuple(self._xp.zeros((LD, B, w), dtype=self.dtype) for w in widths)
        if S == 2:
            if not isinstance(states, (tuple, list)) or len(states) != 2:
                raise ValueError(f"{name} must be a pair (h, c) for an LSTM, got "
                                 f"{type(states).__name__}")
            names = (f"{name}[0]", f"{name}[1]")
        else:
            states, names = (states,), (name,)
        out = []
        for n, s, w, what in zip(names, states, widths,
                                 ("proj_size" if self.proj_size else "hidden_size",
                                  "hidden_size")):
            s = self._check_array(n, s)
            shape = (LD, B, w) if batched else (LD, w)
            if tuple(s.shape) != shape:
                raise ValueError(f"{n} must have shape {shape} (num_layers * num_directions, "
                                 f"{'B, ' if batched else ''}{what}), got {tuple(s.shape)}")
            out.append(self._xp.ascontiguousarray(s if batched else s[:, None, :]))
        return tuple(out)

    # ---------------------------------------------------------- computing

    def __call__(self, x, hx=None, lengths=None):
        return self.forward(x, hx, lengths)

    def forward(self, x, hx=None, lengths=None):
        """Run the layer over a sequence.

        Parameters
        ----------
        x : array (T, B, input_size), (B, T, input_size) if ``batch_first``, or
            (T, input_size) unbatched; the model's dtype.
        hx : initial state (num_layers * D, B, H), or unbatched (num_layers * D, H);
            a pair ``(h0, c0)`` for the LSTM; None means zeros.
        lengths : integer array (B,), values in [0, T]; None means all T.

        Returns
        -------
        out : (T, B, D * H) (batch_first: (B, T, D * H); unbatched: (T, D * H)),
            0 at padded steps.
        h_n : (num_layers * D, B, H); for the LSTM a pair ``(h_n, c_n)``.
        """
        xp = self._xp
        x_in = x
        x, batched = self._check_input(x)
        T, B = x.shape[:2]
        lengths = self._check_lengths(lengths, T, B, batched)
        h0s = self._check_states("hx", hx, B, batched)
        padded = None
        if self.training:
            if x is x_in or xp.may_share_memory(x, x_in):
                # The caches keep x until backward: a copy protects them from a caller
                # that refills its input buffer in place before calling backward.
                x = x.copy()
            if lengths is not None:
                # Padded steps must not reach d_w_ih = sum_t d_a[t]^T x[t]: d_a is 0
                # there, but 0 * nan (or inf) padding is nan. Their outputs are 0 anyway.
                padded = xp.arange(T)[:, None] >= lengths[None, :]
                x[padded] = 0
        # Inference over a long sequence runs the kernels chunk by chunk, so the
        # temporaries (input projection (T, B, G), state buffers) are chunk-sized.
        chunk = None if self.training else _check_positive_int("eval_chunk", self.eval_chunk)
        run = self._run_direction if chunk is None or T <= chunk else \
            functools.partial(self._run_chunked, chunk=chunk)
        self._check_params()
        fwd, _ = self._kernels()
        S, D, H = self._num_states, self.num_directions, self._out_size
        # (L D, B, width) each; with one layer and direction, views of the kernel's own
        # final states (new arrays, by the contract): 1.8 of a B = 1 call's 9 us here
        LD = self.num_layers * D
        states_n = None if LD == 1 else tuple(
            xp.empty((LD, B, w), dtype=self.dtype) for w in self._state_widths())
        caches, masks = [], []
        layer_input = x
        for layer in range(self.num_layers):
            if layer and self.training and self.dropout:
                layer_input, mask = self._drop(layer_input)
                masks.append(mask)
            # Both directions write into one (T, B, D*H) output; a single direction
            # run in one call keeps the kernel's own output (no copy).
            layer_out = None if D == 1 and run == self._run_direction else \
                xp.empty((T, B, D * H), dtype=self.dtype)
            for direction in range(D):
                k = layer * D + direction
                weights, options = self._direction_args(direction_suffix(layer, direction))
                if any(self._zoneout):
                    options = {**options, **self._zoneout_masks(T, B)}
                out, finals, cache = run(
                    fwd, layer_input, tuple(s[k] for s in h0s), weights, options, lengths,
                    self._runs_reverse(direction),
                    None if layer_out is None else
                    layer_out[:, :, direction * H:(direction + 1) * H])
                caches.append(cache)
                if LD == 1:
                    states_n = tuple(s[None] for s in finals)
                else:
                    for s_n, s in zip(states_n, finals):
                        s_n[k] = s
            layer_input = out if layer_out is None else layer_out
        out, states_n = self._from_time_major(layer_input, states_n, batched)
        self._pending = (_Pending(caches, tuple(out.shape), batched, T, B, padded, masks)
                         if self.training else None)
        return out, (states_n if S == 2 else states_n[0])

    def _drop(self, a):
        """Dropout of a layer's output (train mode): ``(a * mask, mask)``, the mask 0 with
        probability p and 1 / (1 - p) otherwise, drawn from the layer's generator."""
        keep = self._dropout_rng.random(a.shape) >= self.dropout
        mask = self._xp.asarray((keep / (1.0 - self.dropout)).astype(self.dtype))
        return a * mask, mask

    def _to_time_major(self, seq, batched):
        """A (T, B, .) view of the caller's ``x`` or ``d_out`` (batch-first or unbatched)."""
        if not batched:
            return seq[:, None, :]
        return seq.transpose(1, 0, 2) if self.batch_first else seq

    def _from_time_major(self, seq, states, batched):
        """The caller's layout of a time-major (T, B, .) sequence and (L*D, B, H) states."""
        if not batched:
            return seq[:, 0], tuple(s[:, 0] for s in states)
        if self.batch_first:
            seq = self._xp.ascontiguousarray(seq.transpose(1, 0, 2))
        return seq, states

    def _run_direction(self, fwd, x, states, weights, options, lengths, reverse, out):
        """One layer and direction over ``x`` (T, B, I) in one kernel call; the output
        goes to ``out`` (a (T, B, H) view) if given. Returns ``(output, final states,
        cache)``."""
        result = fwd(x, *states, *weights, lengths=lengths, reverse=reverse,
                     training=self.training, **options)
        if out is not None:
            out[...] = result[0]
        return result[0], result[1:1 + self._num_states], result[-1]

    #: Inference (eval mode) over more steps than this runs each layer and
    #: direction in chunks of this many steps, with the state carried across
    #: chunks: peak memory is then the output plus chunk-sized temporaries,
    #: instead of T times the gate width. Training never chunks (backward
    #: needs the whole cache).
    eval_chunk = 1024

    def _run_chunked(self, fwd, x, states, weights, options, lengths, reverse, out, chunk):
        """Inference of one layer and direction over ``x`` (T, B, I), ``chunk`` steps at a time.

        Chunks run in time order (reverse: from the end), each starting from
        the state the previous one ended with. Step ``t`` is active iff
        ``t < lengths[b]``, i.e. ``t - t0 < lengths[b] - t0``: each chunk
        ``[t0, t1)`` gets ``clip(lengths - t0, 0, t1 - t0)``. Writes ``out``
        (T, B, H), a view; returns ``(out, final states, None)``.
        """
        xp = self._xp
        T = x.shape[0]
        S = self._num_states
        starts = range(0, T, chunk)
        for t0 in (reversed(starts) if reverse else starts):
            t1 = min(t0 + chunk, T)
            lens = None if lengths is None else xp.clip(lengths - t0, 0, t1 - t0)
            result = fwd(x[t0:t1], *states, *weights, lengths=lens, reverse=reverse,
                         training=False, **options)
            out[t0:t1] = result[0]
            states = tuple(result[1:1 + S])
        return out, states, None

    def pending_nbytes(self) -> int:
        """Bytes held for backward by the pending train-mode forward call (0 if none).

        Sums ``nbytes`` of every array in the backends' caches, each array
        once; the parameters, which the caches reference but do not copy, are
        not counted. Divided by ``T * B`` it is the training memory per step
        and sequence (see docs/hardening.md).
        """
        if self._pending is None:
            return 0
        skip = {id(p) for p in self.params.values()}
        seen, total = set(), 0
        for cache in self._pending.caches:
            cache = getattr(cache, "inner", cache)   # the contract's wrapper
            values = cache.values() if isinstance(cache, dict) else cache
            for v in values:
                if hasattr(v, "nbytes") and hasattr(v, "shape") and id(v) not in skip \
                        and id(v) not in seen:
                    seen.add(id(v))
                    total += int(v.nbytes)
        return total

    def backward(self, d_out, d_h_n=None):
        """Backpropagate through the last train-mode forward call.

        Parameters
        ----------
        d_out : gradient of the loss with respect to ``out``, same shape;
            values at padded steps are ignored.
        d_h_n : gradient with respect to ``h_n`` (LSTM: a pair for
            ``(h_n, c_n)``); None means zeros.

        Returns
        -------
        d_x : gradient with respect to ``x``, shape of ``x``.
        d_hx : gradient with respect to the initial state, shape of ``hx``
            (LSTM: a pair ``(d_h0, d_c0)``).

        Parameter gradients are added to :attr:`grads`. The pending forward
        is consumed: a second backward needs a new forward call.
        """
        pending = self._pending
        if pending is None:
            raise RuntimeError("backward needs a pending train-mode forward call: call the "
                               "model in train mode first (each backward consumes one)")
        xp = self._xp
        d_out = self._check_array("d_out", d_out)
        if tuple(d_out.shape) != pending.shape_out:
            raise ValueError(f"d_out must have the shape of out, {pending.shape_out}, "
                             f"got {tuple(d_out.shape)}")
        B, batched = pending.B, pending.batched
        d_out = self._to_time_major(d_out, batched)
        d_states = self._check_states("d_h_n", d_h_n, B, batched)
        if pending.padded is not None:
            # Gradients at padded steps are ignored; zeroed here (in a copy) so that a
            # nan or inf there cannot reach any kernel's arithmetic.
            d_out = d_out.copy()
            d_out[pending.padded] = 0
        _, bwd = self._kernels()
        S, D, H = self._num_states, self.num_directions, self._out_size
        d_states0 = tuple(xp.empty((self.num_layers * D, B, w), dtype=self.dtype)
                          for w in self._state_widths())
        new_grads = {}
        d_layer = d_out
        for layer in reversed(range(self.num_layers)):
            d_input = None
            for direction in range(D):
                k = layer * D + direction
                d_out_dir = xp.ascontiguousarray(d_layer[:, :, direction * H:(direction + 1) * H])
                result = bwd(d_out_dir, *(s[k] for s in d_states), pending.caches[k])
                d_input = result[0] if d_input is None else d_input + result[0]
                for s0, s in zip(d_states0, result[1:1 + S]):
                    s0[k] = s
                names = self._grad_names(direction_suffix(layer, direction))
                for name, g in zip(names, result[1 + S:]):
                    if name is not None and g is not None:
                        new_grads[name] = g
            d_layer = d_input
            if layer:
                d_layer = d_layer * pending.masks[layer - 1] if pending.masks else d_layer
        # Everything succeeded: now, and only now, change the layer's state.
        for name, g in new_grads.items():
            self.grads[name] += g
        self._pending = None
        d_x, d_states0 = self._from_time_major(d_layer, d_states0, batched)
        return d_x, (d_states0 if S == 2 else d_states0[0])

class RNN(_RNNBase):
    """Elman RNN with tanh or ReLU: h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh).

    Parameters as ``torch.nn.RNN``; plus ``reverse`` (one direction, backward in
    time), ``zoneout`` (a rate z in [0, 1), see :class:`LSTM`), ``backend`` ('auto',
    'numpy', 'numba', 'cuda'), ``dtype`` (float32 or float64) and ``seed``.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", *,
                 bias=True, batch_first=False, bidirectional=False, reverse=False,
                 dropout=0.0, zoneout=0.0, backend="auto", dtype=np.float32, seed=None):
        super().__init__(rnn_kind(nonlinearity), input_size, hidden_size, num_layers, bias=bias,
                         batch_first=batch_first, bidirectional=bidirectional, reverse=reverse,
                         dropout=dropout, zoneout=zoneout, backend=backend, dtype=dtype,
                         seed=seed)
        self.nonlinearity = nonlinearity


class LSTM(_RNNBase):
    """LSTM with PyTorch's gate order (i, f, g, o); ``hx`` and ``h_n`` are pairs (h, c).

    Parameters as ``torch.nn.LSTM``, ``proj_size`` included; plus ``reverse``,
    ``backend``, ``dtype`` and ``seed``. With ``proj_size=P`` (0 < P < H) it is
    torch's LSTM with projections: ``h_t = W_hr (o_t * tanh(c_t))`` with
    ``weight_hr_l{k}`` (P, H); ``weight_hh_l{k}`` is (4H, P), ``h_n`` (L*D, B, P),
    ``c_n`` (L*D, B, H), the output D*P features. Every backend runs it (cuda: in its
    stepwise time loop).

    ``zoneout=(z_h, z_c)`` (Krueger et al. 2016; a single number z means (z, z)): in
    train mode each unit of h and of c keeps its previous value with probability z_h,
    z_c (masks from the layer's generator, :meth:`seed_dropout`, reused by backward),
    ``c_t = k_c c_{t-1} + (1 - k_c) c~_t`` and ``h_t = k_h h_{t-1} + (1 - k_h) h~_t``
    with ``h~_t = o * tanh(c~_t)``; in eval mode k is the rate itself (the expectation).
    Every layer and direction has its own masks. The cuda backend has no zoneout
    kernels (NotImplementedError).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, *, bias=True, batch_first=False,
                 bidirectional=False, reverse=False, dropout=0.0, zoneout=0.0, proj_size=0,
                 backend="auto", dtype=np.float32, seed=None):
        if isinstance(proj_size, bool) or not isinstance(proj_size, numbers.Integral) or \
                proj_size < 0:
            raise ValueError(f"proj_size must be a non-negative integer, got {proj_size!r}")
        if proj_size and isinstance(hidden_size, numbers.Integral) and proj_size >= hidden_size:
            raise ValueError(f"proj_size must be smaller than hidden_size, got proj_size="
                             f"{proj_size} and hidden_size={hidden_size}")
        self.proj_size = int(proj_size)
        super().__init__("lstm", input_size, hidden_size, num_layers, bias=bias,
                         batch_first=batch_first, bidirectional=bidirectional, reverse=reverse,
                         dropout=dropout, zoneout=zoneout, backend=backend, dtype=dtype,
                         seed=seed)


class GRU(_RNNBase):
    """GRU with PyTorch's gate order (r, z, n).

    ``reset_after=True`` (default) is PyTorch's and cuDNN's form,
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); ``reset_after=False`` is
    Cho et al.'s, n = tanh(W_in x + b_in + W_hn (r * h) + b_hn). ``zoneout=z`` as
    :class:`LSTM`'s for h (the numba backend: with ``reset_after=True`` only).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, *, bias=True, batch_first=False,
                 bidirectional=False, reverse=False, dropout=0.0, zoneout=0.0, backend="auto",
                 dtype=np.float32, seed=None, reset_after=True):
        super().__init__("gru", input_size, hidden_size, num_layers, bias=bias,
                         batch_first=batch_first, bidirectional=bidirectional, reverse=reverse,
                         dropout=dropout, zoneout=zoneout, backend=backend, dtype=dtype,
                         seed=seed, reset_after=reset_after)

    @property
    def reset_after(self) -> bool:
        """Which form of the candidate n this layer computes (fixed at construction)."""
        return self._options["reset_after"]



def _check_zoneout(value, states) -> tuple:
    """Zoneout rates, one per state: a number in [0, 1), or for the LSTM (2 states) a
    number or a pair ``(z_h, z_c)``."""
    pair = states == 2 and isinstance(value, (tuple, list))
    rates = tuple(value) if pair else (value,) * states
    what = "a number in [0, 1) or a pair (z_h, z_c) of them" if states == 2 else \
        "a number in [0, 1)"
    if len(rates) != states or any(isinstance(z, bool) or not isinstance(z, numbers.Real) or
                                   not 0 <= z < 1 for z in rates):
        raise ValueError(f"zoneout must be {what}, got {value!r}")
    return tuple(float(z) for z in rates)


_FAMILIES = {cls.__name__: cls for cls in (RNN, LSTM, GRU)}


def make_layer(cell, input_size, hidden_size, num_layers=1, **kwargs):
    """The layer of a cell kind of :data:`fastrnn.backends.CELLS` ('rnn_tanh',
    'rnn_relu', 'lstm', 'gru'); ``kwargs`` as the layer's constructor takes them."""
    kind = backends.cell_kind(cell)
    return _FAMILIES[kind.family](input_size, hidden_size, num_layers,
                                  **kind.constructor_options(), **kwargs)
