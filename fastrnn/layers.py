"""Multi-layer, bidirectional RNN, LSTM and GRU layers with PyTorch's conventions.

The layers know nothing of any backend's internals: they validate input,
walk layers and directions, and call the backend's single-layer kernels
(:mod:`fastrnn.backends`).
"""

from __future__ import annotations

import numpy as np

from . import backends
from ._module import Module, _check_bool, _check_positive_int, _init_uniform

class _Pending:
    """What a train-mode forward leaves for backward."""

    __slots__ = ("caches", "shape_out", "batched", "T", "B", "padded")

    def __init__(self, caches, shape_out, batched, T, B, padded=None):
        self.caches, self.shape_out, self.batched, self.T, self.B = caches, shape_out, batched, T, B
        #: (T, B) bool, True at padded steps; None without lengths.
        self.padded = padded


class _RNNBase(Module):
    """Shared machinery of :class:`RNN`, :class:`LSTM` and :class:`GRU`."""

    def __init__(self, cell, input_size, hidden_size, num_layers=1, *, bias=True,
                 batch_first=False, bidirectional=False, reverse=False, backend="auto",
                 dtype=np.float32, seed=None):
        self.input_size = _check_positive_int("input_size", input_size)
        self.hidden_size = _check_positive_int("hidden_size", hidden_size)
        self.num_layers = _check_positive_int("num_layers", num_layers)
        self.bias = _check_bool("bias", bias)
        self.batch_first = _check_bool("batch_first", batch_first)
        self.bidirectional = _check_bool("bidirectional", bidirectional)
        #: A single direction that runs backward in time (ONNX direction="reverse",
        #: Keras go_backwards before its output flip); parameters keep the names of
        #: the forward direction, no "_reverse" suffix.
        self.reverse = _check_bool("reverse", reverse)
        if self.reverse and self.bidirectional:
            raise ValueError("reverse=True runs one direction backward in time; it cannot be "
                             "combined with bidirectional=True")
        self._cell = cell
        super().__init__(backend, dtype)
        # PyTorch's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H)).
        self._set_params(_init_uniform(self._param_shapes(), 1.0 / np.sqrt(hidden_size), seed,
                                       np, self.dtype))

    # ------------------------------------------------------------ structure

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def _num_states(self) -> int:
        return backends.state_count(self._cell)

    def _runs_reverse(self, direction) -> bool:
        """Whether direction 0 (forward) or 1 (the bidirectional reverse) runs backward in time."""
        return bool(direction) or self.reverse

    def _kernel_options(self) -> dict:
        return {}

    def _param_shapes(self) -> dict:
        """Torch's parameter names and shapes, in torch's order."""
        G = backends.gate_count(self._cell) * self.hidden_size
        H, D = self.hidden_size, self.num_directions
        shapes = {}
        for layer in range(self.num_layers):
            layer_in = self.input_size if layer == 0 else D * H
            for suffix in ("", "_reverse")[:D]:
                shapes[f"weight_ih_l{layer}{suffix}"] = (G, layer_in)
                shapes[f"weight_hh_l{layer}{suffix}"] = (G, H)
                if self.bias:
                    shapes[f"bias_ih_l{layer}{suffix}"] = (G,)
                    shapes[f"bias_hh_l{layer}{suffix}"] = (G,)
        return shapes

    def _weights(self, layer, direction):
        suffix = f"l{layer}{'_reverse' if direction else ''}"
        p = self.params
        if self.bias:
            return (p[f"weight_ih_{suffix}"], p[f"weight_hh_{suffix}"],
                    p[f"bias_ih_{suffix}"], p[f"bias_hh_{suffix}"])
        return p[f"weight_ih_{suffix}"], p[f"weight_hh_{suffix}"], None, None

    def __repr__(self):
        extra = f", num_layers={self.num_layers}" if self.num_layers != 1 else ""
        for flag in ("batch_first", "bidirectional", "reverse"):
            if getattr(self, flag):
                extra += f", {flag}=True"
        if not self.bias:
            extra += ", bias=False"
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}{extra}"
                f"{self._repr_extra()}, backend={self.backend!r}, dtype={self.dtype.name})")

    def _repr_extra(self):
        return ""

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
        if not batched:
            x = x[:, None, :]
        elif self.batch_first:
            x = x.transpose(1, 0, 2)
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

    def _state_shape(self, B, batched):
        LD = self.num_layers * self.num_directions
        return (LD, B, self.hidden_size) if batched else (LD, self.hidden_size)

    def _check_states(self, name, states, B, batched):
        """Return a tuple of (L*D, B, H) arrays from hx / d_h_n (None gives zeros)."""
        S = self._num_states
        shape = self._state_shape(B, batched)
        if states is None:
            return tuple(self._xp.zeros((shape[0], B, self.hidden_size), dtype=self.dtype)
                         for _ in range(S))
        if S == 2:
            if not isinstance(states, (tuple, list)) or len(states) != 2:
                raise ValueError(f"{name} must be a pair (h, c) for an LSTM, got "
                                 f"{type(states).__name__}")
            names = (f"{name}[0]", f"{name}[1]")
        else:
            states, names = (states,), (name,)
        out = []
        for n, s in zip(names, states):
            s = self._check_array(n, s)
            if tuple(s.shape) != shape:
                raise ValueError(f"{n} must have shape {shape} (num_layers * num_directions, "
                                 f"{'B, ' if batched else ''}hidden_size), got {tuple(s.shape)}")
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
        if self.training and (x is x_in or xp.may_share_memory(x, x_in)):
            # The caches keep x until backward: a copy protects them from a caller
            # that refills its input buffer in place before calling backward.
            x = x.copy()
        padded = None
        if self.training and lengths is not None:
            # Padded steps must not reach d_w_ih = sum_t d_a[t]^T x[t]: d_a is 0 there,
            # but 0 * nan (or inf) padding is nan. Their outputs are 0 anyway.
            padded = xp.arange(T)[:, None] >= lengths[None, :]
            x[padded] = 0
        fwd, _ = self._backend.kernels(self._cell)
        options = self._kernel_options()
        S, D, H = self._num_states, self.num_directions, self.hidden_size
        # Inference over a long sequence runs the kernels chunk by chunk, so the
        # temporaries (input projection (T, B, G), state buffers) are chunk-sized.
        chunk = None
        if not self.training:
            chunk = _check_positive_int("eval_chunk", self.eval_chunk)
            chunk = None if T <= chunk else chunk
        states_n = tuple(xp.empty((self.num_layers * D, B, H), dtype=self.dtype)
                         for _ in range(S))
        caches = []
        layer_input = x
        for layer in range(self.num_layers):
            outs = []
            layer_out = None if chunk is None else xp.empty((T, B, D * H), dtype=self.dtype)
            for direction in range(D):
                k = layer * D + direction
                init = tuple(s[k] for s in h0s)
                weights = self._weights(layer, direction)
                if chunk is None:
                    result = fwd(layer_input, *init, *weights, lengths=lengths,
                                 reverse=self._runs_reverse(direction),
                                 training=self.training, **options)
                    outs.append(result[0])
                    finals = result[1:1 + S]
                    caches.append(result[-1])
                else:
                    finals = self._forward_chunked(
                        fwd, layer_input, init, weights, lengths, self._runs_reverse(direction),
                        chunk,
                        options, layer_out[:, :, direction * H:(direction + 1) * H])
                for s_n, s in zip(states_n, finals):
                    s_n[k] = s
            if chunk is not None:
                layer_input = layer_out
            else:
                layer_input = outs[0] if D == 1 else xp.concatenate(outs, axis=2)
        out = layer_input
        if not batched:
            out, states_n = out[:, 0], tuple(s[:, 0] for s in states_n)
        elif self.batch_first:
            out = xp.ascontiguousarray(out.transpose(1, 0, 2))
        self._pending = (_Pending(caches, tuple(out.shape), batched, T, B, padded)
                         if self.training else None)
        return out, (states_n if S == 2 else states_n[0])

    #: Inference (eval mode) over more steps than this runs each layer and
    #: direction in chunks of this many steps, with the state carried across
    #: chunks: peak memory is then the output plus chunk-sized temporaries,
    #: instead of T times the gate width. Training never chunks (backward
    #: needs the whole cache).
    eval_chunk = 1024

    def _forward_chunked(self, fwd, x, states, weights, lengths, reverse, chunk, options, out):
        """Inference of one layer and direction over ``x`` (T, B, I), ``chunk`` steps at a time.

        Chunks run in time order (reverse: from the end), each starting from
        the state the previous one ended with. Step ``t`` is active iff
        ``t < lengths[b]``, i.e. ``t - t0 < lengths[b] - t0``: each chunk
        ``[t0, t1)`` gets ``clip(lengths - t0, 0, t1 - t0)``. Writes ``out``
        (T, B, H), a view; returns the final state tuple.
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
        return states

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
        T, B, batched = pending.T, pending.B, pending.batched
        if not batched:
            d_out = d_out[:, None, :]
        elif self.batch_first:
            d_out = d_out.transpose(1, 0, 2)
        d_states = self._check_states("d_h_n", d_h_n, B, batched)
        if pending.padded is not None:
            # Gradients at padded steps are ignored; zeroed here (in a copy) so that a
            # nan or inf there cannot reach any kernel's arithmetic.
            d_out = d_out.copy()
            d_out[pending.padded] = 0
        _, bwd = self._backend.kernels(self._cell)
        S, D, H = self._num_states, self.num_directions, self.hidden_size
        d_states0 = tuple(xp.empty((self.num_layers * D, B, H), dtype=self.dtype)
                          for _ in range(S))
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
                suffix = f"l{layer}{'_reverse' if direction else ''}"
                names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")[:4 if self.bias else 2]
                for name, g in zip(names, result[1 + S:]):
                    new_grads[f"{name}_{suffix}"] = g
            d_layer = d_input
        # Everything succeeded: now, and only now, change the layer's state.
        for name, g in new_grads.items():
            self.grads[name] += g
        self._pending = None
        d_x = d_layer
        if not batched:
            d_x, d_states0 = d_x[:, 0], tuple(s[:, 0] for s in d_states0)
        elif self.batch_first:
            d_x = xp.ascontiguousarray(d_x.transpose(1, 0, 2))
        return d_x, (d_states0 if S == 2 else d_states0[0])


class RNN(_RNNBase):
    """Elman RNN with tanh or ReLU: h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh).

    Parameters as ``torch.nn.RNN``; plus ``backend`` ('auto', 'numpy',
    'numba', 'cuda'), ``dtype`` (float32 or float64) and ``seed``.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", *,
                 bias=True, batch_first=False, bidirectional=False, reverse=False,
                 backend="auto", dtype=np.float32, seed=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(f"rnn_{nonlinearity}", input_size, hidden_size, num_layers, bias=bias,
                         batch_first=batch_first, bidirectional=bidirectional, reverse=reverse,
                         backend=backend, dtype=dtype, seed=seed)

    def _repr_extra(self):
        return ", nonlinearity='relu'" if self.nonlinearity == "relu" else ""


class LSTM(_RNNBase):
    """LSTM with PyTorch's gate order (i, f, g, o); ``hx`` and ``h_n`` are pairs (h, c).

    Parameters as ``torch.nn.LSTM`` (no ``proj_size``); plus ``backend``,
    ``dtype`` and ``seed``.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, *, bias=True, batch_first=False,
                 bidirectional=False, reverse=False, backend="auto", dtype=np.float32,
                 seed=None):
        super().__init__("lstm", input_size, hidden_size, num_layers, bias=bias,
                         batch_first=batch_first, bidirectional=bidirectional, reverse=reverse,
                         backend=backend, dtype=dtype, seed=seed)


class GRU(_RNNBase):
    """GRU with PyTorch's gate order (r, z, n).

    ``reset_after=True`` (default) is PyTorch's and cuDNN's form,
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); ``reset_after=False`` is
    Cho et al.'s, n = tanh(W_in x + b_in + W_hn (r * h) + b_hn).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, *, bias=True, batch_first=False,
                 bidirectional=False, reverse=False, backend="auto", dtype=np.float32,
                 seed=None, reset_after=True):
        if not isinstance(reset_after, (bool, np.bool_)):
            raise TypeError(f"reset_after must be a bool, got {reset_after!r}")
        self.reset_after = bool(reset_after)
        super().__init__("gru", input_size, hidden_size, num_layers, bias=bias,
                         batch_first=batch_first, bidirectional=bidirectional, reverse=reverse,
                         backend=backend, dtype=dtype, seed=seed)

    def _kernel_options(self):
        return {"reset_after": self.reset_after}

    def _repr_extra(self):
        return "" if self.reset_after else ", reset_after=False"
