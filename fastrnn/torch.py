"""fastrnn's CPU kernels inside PyTorch autograd: ``fastrnn.torch.RNN``, ``LSTM``, ``GRU``.

Each class subclasses its ``torch.nn`` counterpart: the same constructor,
parameters, initialisation and ``state_dict`` names, so ``load_state_dict``
works both ways, and optimizers, ``.double()``, ``.train()``/``.eval()``
work as usual. Only ``forward`` differs: it runs the fastrnn numba (or
numpy) kernels through one ``torch.autograd.Function`` per call, on numpy
views of the tensors where the memory layout allows (no copy of a
contiguous time-major input, of the weights, or of the outputs).

Extensions to torch's API, all keyword-only: ``backend`` ('auto', 'numba',
'numpy') at construction, ``reset_after`` for the GRU (default True,
torch's form), and ``forward(input, hx=None, *, lengths=None)`` with
fastrnn's ``lengths`` semantics. ``PackedSequence`` input works as in torch.

Not supported (rejected, naming the option): ``dropout > 0``,
``proj_size > 0``, tensors on a GPU (move them to the CPU, or use the
fastrnn layer's cuda backend), dtypes other than float32 and float64, and
double backward.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from . import backends
from .interop._stack import Stack, backward as _stack_backward, forward as _stack_forward
from .interop._stack import host_lengths

__all__ = ["RNN", "LSTM", "GRU"]

_CELLS = {"RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "LSTM": "lstm", "GRU": "gru"}
_DTYPES = (torch.float32, torch.float64)


def _numpy(t):
    """A numpy view of a CPU tensor (a copy only where numpy needs C order)."""
    return np.ascontiguousarray(t.detach().numpy())


def _grouped(stack, flat):
    """torch's flat weight list as numpy (w_ih, w_hh, b_ih, b_hh) per layer and direction."""
    per = 4 if stack.bias else 2
    arrays = [_numpy(w) for w in flat]
    return [tuple(arrays[k:k + per]) + ((None, None) if per == 2 else ())
            for k in range(0, len(arrays), per)]


class _Fused(torch.autograd.Function):
    """Forward and BPTT of a whole stack, one autograd node.

    Inputs: ``stack`` (static), ``lengths`` (int64 numpy or None), ``x``
    (T, B, I), then the S initial states (L*D, B, H), then the weights in
    torch's ``_flat_weights`` order. Outputs: ``out`` and the S final states.
    """

    @staticmethod
    def forward(ctx, stack, lengths, x, *tensors):
        S = stack.S
        states = tuple(_numpy(s) for s in tensors[:S])
        out, finals, caches = _stack_forward(stack, _numpy(x), states,
                                             _grouped(stack, tensors[S:]), lengths,
                                             training=True)
        outputs = (torch.from_numpy(out),) + tuple(torch.from_numpy(f) for f in finals)
        ctx.stack, ctx.lengths, ctx.caches = stack, lengths, caches
        # The kernel caches hold numpy views of the inputs: saving them makes torch
        # raise in backward if any was modified in place after forward. The outputs
        # are not in the caches: the caller may modify them in place.
        ctx.save_for_backward(x, *tensors)
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, *d_finals):
        ctx.saved_tensors  # noqa: B018 -- the in-place modification check
        stack = ctx.stack
        d_x, d_states, d_weights = _stack_backward(
            stack, _numpy(d_out), tuple(_numpy(d) for d in d_finals), ctx.caches, ctx.lengths)
        grads = [torch.from_numpy(d_x)] + [torch.from_numpy(d) for d in d_states]
        grads += [torch.from_numpy(g) for per_k in d_weights for g in per_k]
        return (None, None) + tuple(grads)


class _FusedBase:
    """What the three classes add to their ``torch.nn`` base: the fastrnn forward."""

    def _init_fused(self, backend, reset_after=True):
        if self.dropout:
            raise ValueError(f"dropout={self.dropout} is not supported by fastrnn.torch "
                             f"(use dropout=0)")
        if getattr(self, "proj_size", 0):
            raise ValueError(f"proj_size={self.proj_size} is not supported by fastrnn.torch "
                             f"(use proj_size=0)")
        resolved = backends.get(backend)
        if resolved.xp is not np:
            raise ValueError(f"backend must be a CPU backend ('auto', 'numba', 'numpy') for "
                             f"fastrnn.torch, got {backend!r}")
        if not isinstance(reset_after, (bool, np.bool_)):
            raise TypeError(f"reset_after must be a bool, got {reset_after!r}")
        self.backend = resolved.name
        self.reset_after = bool(reset_after)

    def _stack(self):
        return Stack(self.backend, _CELLS[self.mode], self.hidden_size, self.num_layers,
                     self.bidirectional, False, self.bias, self.reset_after)

    def _flat(self):
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")[:4 if self.bias else 2]
        return [getattr(self, f"{n}_l{layer}{sfx}") for layer in range(self.num_layers)
                for sfx in ("", "_reverse")[:2 if self.bidirectional else 1] for n in names]

    def extra_repr(self):
        s = super().extra_repr() + f", backend={self.backend!r}"
        return s if self.reset_after else s + ", reset_after=False"

    def forward(self, input, hx=None, *, lengths=None):  # noqa: A002 -- torch's name
        """torch's forward: ``output, h_n`` (LSTM: ``output, (h_n, c_n)``).

        ``input`` (T, B, I), (B, T, I) with ``batch_first``, unbatched (T, I),
        or a ``PackedSequence``; ``lengths`` (B,) integers in [0, T] is
        fastrnn's alternative to packing (padded outputs are 0, ``h_n`` is the
        state after each sequence's last valid step, length 0 gives ``h0``).
        """
        if self.dropout:
            raise ValueError(f"dropout={self.dropout} is not supported by fastrnn.torch")
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("lengths cannot be given with a PackedSequence input "
                                 "(the packing holds the lengths)")
            x, lens = pad_packed_sequence(input)   # (T, B, I), original batch order
            batched = True
        else:
            x = input
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"input must be a torch.Tensor or PackedSequence, got "
                                f"{type(x).__name__}")
            if x.dim() not in (2, 3):
                raise ValueError(f"input must have 3 dimensions, or 2 when unbatched; got "
                                 f"shape {tuple(x.shape)}")
            batched = x.dim() == 3
            x = (x.transpose(0, 1) if self.batch_first else x) if batched else x.unsqueeze(1)
            lens = lengths
        w = self._flat()
        if x.device.type != "cpu" or w[0].device.type != "cpu":
            raise ValueError("input and parameters must be on the CPU for fastrnn.torch "
                             f"(got {x.device} and {w[0].device})")
        if x.dtype not in _DTYPES or x.dtype != w[0].dtype:
            raise TypeError(f"input has dtype {x.dtype} and the parameters {w[0].dtype}; "
                            f"fastrnn.torch needs both float32 or both float64")
        if x.shape[-1] != self.input_size:
            raise ValueError(f"input has {x.shape[-1]} features, expected "
                             f"input_size={self.input_size}")
        T, B = x.shape[0], x.shape[1]
        if T == 0 or B == 0:
            raise ValueError(f"input must have at least one step and one sequence, got "
                             f"shape {tuple(x.shape)}")
        lens = self._check_lengths(lens, T, B, batched)
        stack = self._stack()
        states = self._check_hx(hx, B, batched, x.dtype, stack)
        training = torch.is_grad_enabled() and (
            x.requires_grad or any(t.requires_grad for t in (*states, *w)))
        if training:
            out, *finals = _Fused.apply(stack, lens, x, *states, *w)
        else:
            out, *finals = self._infer(stack, lens, x, states, w)
        if packed:
            out = self._repack(out, input)
        elif not batched:
            out, finals = out.squeeze(1), [f.squeeze(1) for f in finals]
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, (tuple(finals) if stack.S == 2 else finals[0])

    @staticmethod
    def _infer(stack, lens, x, states, w):
        out, finals, _ = _stack_forward(stack, _numpy(x), tuple(_numpy(s) for s in states),
                                        _grouped(stack, w), lens, training=False)
        return [torch.from_numpy(out)] + [torch.from_numpy(f) for f in finals]

    @staticmethod
    def _repack(out, like):
        """``out`` (T, B, D*H), in the original batch order, packed as ``like``."""
        if like.sorted_indices is not None:
            out = out.index_select(1, like.sorted_indices)
        data = torch.cat([out[t, :int(n)] for t, n in enumerate(like.batch_sizes)])
        return PackedSequence(data, like.batch_sizes, like.sorted_indices,
                              like.unsorted_indices)

    @staticmethod
    def _check_lengths(lengths, T, B, batched):
        if lengths is None:
            return None
        if not batched:
            raise ValueError("lengths is only accepted with batched (3-D) input")
        host = lengths.cpu().numpy() if isinstance(lengths, torch.Tensor) else np.asarray(lengths)
        if host.dtype.kind not in "iu":
            raise TypeError(f"lengths must hold integers, got dtype {host.dtype}")
        if host.shape != (B,):
            raise ValueError(f"lengths must have shape (B,) = ({B},), got {host.shape}")
        if host.min() < 0 or host.max() > T:
            raise ValueError(f"lengths must lie in [0, T] = [0, {T}], got values from "
                             f"{host.min()} to {host.max()}")
        return host_lengths(host, T)

    def _check_hx(self, hx, B, batched, dtype, stack):
        LD = self.num_layers * stack.D
        shape = (LD, B, self.hidden_size) if batched else (LD, self.hidden_size)
        if hx is None:
            z = torch.zeros((LD, B, self.hidden_size), dtype=dtype)
            return (z,) * stack.S
        if stack.S == 2:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise ValueError(f"hx must be a pair (h_0, c_0) for an LSTM, got "
                                 f"{type(hx).__name__}")
            items, names = tuple(hx), ("hx[0]", "hx[1]")
        else:
            items, names = (hx,), ("hx",)
        out = []
        for name, s in zip(names, items):
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
            if tuple(s.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(s.shape)}")
            if s.dtype != dtype or s.device.type != "cpu":
                raise TypeError(f"{name} must be a CPU tensor of dtype {dtype}, got "
                                f"{s.dtype} on {s.device}")
            out.append(s if batched else s.unsqueeze(1))
        return tuple(out)


class RNN(_FusedBase, torch.nn.RNN):
    """``torch.nn.RNN`` (tanh or ReLU) running fastrnn's kernels; plus ``backend``."""

    def __init__(self, *args, backend="auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fused(backend)


class LSTM(_FusedBase, torch.nn.LSTM):
    """``torch.nn.LSTM`` running fastrnn's kernels; plus ``backend`` (no ``proj_size``)."""

    def __init__(self, *args, backend="auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fused(backend)


class GRU(_FusedBase, torch.nn.GRU):
    """``torch.nn.GRU`` running fastrnn's kernels; plus ``backend`` and ``reset_after``
    (False: n = tanh(W_in x + b_in + W_hn (r * h) + b_hn), which torch lacks)."""

    def __init__(self, *args, backend="auto", reset_after=True, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fused(backend, reset_after)
