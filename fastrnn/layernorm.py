"""Layer-normalised LSTM and GRU layers (Ba et al. 2016, as in haste).

:class:`LayerNormLSTM` and :class:`LayerNormGRU` take the arguments of
:class:`fastrnn.LSTM` / :class:`fastrnn.GRU` (``num_layers``, ``bias``,
``batch_first``, ``bidirectional``, ``reverse``, ``backend``, ``dtype``,
``seed``), validate input, states and lengths with the same code, and run
the kernels of :mod:`fastrnn.backends.layernorm_reference` (``numpy``) or
:mod:`fastrnn.backends.layernorm_numba` (``numba``). There is no cuda kernel:
``backend='cuda'`` raises NotImplementedError.

Parameters of layer ``k`` (suffix ``_l{k}``, ``_l{k}_reverse`` for the reverse
direction of a bidirectional layer), in this order::

    weight_ih_l{k}  (G, I_k)   as torch.nn.LSTM / GRU
    weight_hh_l{k}  (G, H)
    bias_ih_l{k}    (G,)       shift of the input-side norm    (bias=True only)
    bias_hh_l{k}    (G,)       shift of the recurrent-side norm (bias=True only)
    gamma_ih_l{k}   (G,)       gain of the input-side norm, initialised to 1
    gamma_hh_l{k}   (G,)       gain of the recurrent-side norm, initialised to 1
    gamma_c_l{k}    (H,)       LSTM only: gain of the cell norm, initialised to 1
    beta_c_l{k}     (H,)       LSTM only: shift of the cell norm, initialised to 0
                               (bias=True only)

with ``G = 4H`` (LSTM) or ``3H`` (GRU) and ``I_0 = input_size``,
``I_k = D * H`` above. Weights and biases are initialised as torch's,
U(-1/sqrt(H), 1/sqrt(H)), and with a given ``seed`` equal those of
``fastrnn.LSTM``/``GRU`` with that seed.
"""

from __future__ import annotations

import importlib

import numpy as np

from ._module import _init_uniform
from .layers import _RNNBase

#: The kernel module of each backend that has layer-norm kernels.
_KERNEL_MODULES = {"numpy": "fastrnn.backends.layernorm_reference",
                   "numba": "fastrnn.backends.layernorm_numba"}


class _LayerNormRNN(_RNNBase):
    """Shared machinery of :class:`LayerNormLSTM` and :class:`LayerNormGRU`."""

    #: Cell kind in :data:`fastrnn.backends.CELLS` whose gates and states these have.
    _base_cell = None
    #: Kernel names in the layer-norm kernel modules.
    _kernel = None

    def __init__(self, input_size, hidden_size, num_layers=1, *, bias=True, batch_first=False,
                 bidirectional=False, reverse=False, backend="auto", dtype=np.float32,
                 seed=None):
        super().__init__(self._base_cell, input_size, hidden_size, num_layers, bias=bias,
                         batch_first=batch_first, bidirectional=bidirectional, reverse=reverse,
                         backend=backend, dtype=dtype, seed=seed)

    def _unsupported(self, backend):
        """Every backend without layer-norm kernels (cuda)."""
        if backend not in _KERNEL_MODULES:
            return f"{type(self).__name__}: LayerNorm"
        return None

    def _initial_params(self, seed) -> dict:
        """torch's initialisation for the weights and biases; gains 1, shifts 0."""
        shapes = self._param_shapes()
        torch_like = {k: s for k, s in shapes.items() if k.startswith(("weight_", "bias_"))}
        params = _init_uniform(torch_like, 1.0 / np.sqrt(self.hidden_size), seed, np, self.dtype)
        for name, shape in shapes.items():
            if name.startswith("gamma_"):
                params[name] = np.ones(shape, self.dtype)
            elif name.startswith("beta_"):
                params[name] = np.zeros(shape, self.dtype)
        return {k: params[k] for k in shapes}

    # ------------------------------------------------------------ structure

    def _extra_shapes(self, suffix) -> dict:
        """The gate norms' gains, (G,) each (the LSTM adds the cell norm's)."""
        G = self._kind.gates * self.hidden_size
        return {"gamma_ih" + suffix: (G,), "gamma_hh" + suffix: (G,)}

    def _names(self, suffix):
        """Names of one direction's parameters, in the kernels' argument order."""
        raise NotImplementedError

    def _kernels(self):
        module = importlib.import_module(_KERNEL_MODULES[self.backend])
        return (getattr(module, f"{self._kernel}_forward"),
                getattr(module, f"{self._kernel}_backward"))


    def _check_params(self):
        """Every parameter an ndarray of the layer's dtype and its shape, before any
        kernel reads it (the numba kernels trust the shapes they are given)."""
        for name, shape in self._param_shapes().items():
            p = self.params.get(name)
            if not isinstance(p, np.ndarray) or p.dtype != self.dtype:
                raise TypeError(f"params[{name!r}] must be a numpy array of dtype {self.dtype}, "
                                f"got {type(p).__name__}"
                                f"{' of dtype ' + str(p.dtype) if hasattr(p, 'dtype') else ''}")
            if p.shape != shape:
                raise ValueError(f"params[{name!r}] must have shape {shape}, got {p.shape}")

    # ---------------------------------------------------------- computing
    # The layer loop, checks, chunked inference and backward are _RNNBase's; these
    # hooks give it the layer-norm kernels and their parameters.

    def _direction_args(self, suffix):
        return tuple(None if n is None else self.params[n] for n in self._names(suffix)), {}

    def _grad_names(self, suffix):
        return self._names(suffix)


class LayerNormLSTM(_LayerNormRNN):
    """LSTM with layer normalisation (Ba et al. 2016), as haste's LayerNormLSTM.

    Arguments as :class:`fastrnn.LSTM` (``input_size, hidden_size,
    num_layers=1, *, bias, batch_first, bidirectional, reverse, backend,
    dtype, seed``); ``backend`` is ``'auto'``, ``'numba'`` or ``'numpy'``
    (``'cuda'`` raises NotImplementedError). ``hx`` and ``h_n`` are pairs
    ``(h, c)``.

    Equations
    ---------
    With ``LN(v) = (v - mean(v)) / sqrt(var(v) + 1e-5)`` over one sequence's
    row (biased variance, as ``torch.nn.LayerNorm``):

    .. math::
        [a_i, a_f, a_g, a_o] = \\gamma_{ih} \\odot LN(W_{ih} x_t) + b_{ih}
                             + \\gamma_{hh} \\odot LN(W_{hh} h_{t-1}) + b_{hh}
        i = \\sigma(a_i),\\ f = \\sigma(a_f),\\ g = \\tanh(a_g),\\ o = \\sigma(a_o)
        c_t = f \\odot c_{t-1} + i \\odot g
        h_t = o \\odot \\tanh(\\gamma_c \\odot LN(c_t) + \\beta_c)

    The gate norms run over the 4H gate rows, the cell norm over the H units;
    the carried cell state is ``c_t``, not its norm. ``bias=False`` drops
    ``b_ih``, ``b_hh`` and ``beta_c``. Parameter names: ``weight_ih_l{k}``,
    ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}`` (torch's), then
    ``gamma_ih_l{k}``, ``gamma_hh_l{k}`` (4H,), ``gamma_c_l{k}``, ``beta_c_l{k}``
    (H,); ``_reverse`` appended for a bidirectional layer's reverse direction.
    """

    _base_cell = "lstm"
    _kernel = "layernorm_lstm"

    def _extra_shapes(self, suffix) -> dict:
        shapes = super()._extra_shapes(suffix)
        shapes["gamma_c" + suffix] = (self.hidden_size,)
        if self.bias:
            shapes["beta_c" + suffix] = (self.hidden_size,)
        return shapes

    def _names(self, suffix):
        b = self.bias
        return ("weight_ih" + suffix, "weight_hh" + suffix,
                "bias_ih" + suffix if b else None, "bias_hh" + suffix if b else None,
                "gamma_ih" + suffix, "gamma_hh" + suffix, "gamma_c" + suffix,
                "beta_c" + suffix if b else None)


class LayerNormGRU(_LayerNormRNN):
    """GRU with layer normalisation, as haste's LayerNormGRU (reset gate after the product).

    Arguments as :class:`fastrnn.GRU` without ``reset_after`` (always the
    torch/cuDNN form); ``backend`` is ``'auto'``, ``'numba'`` or ``'numpy'``
    (``'cuda'`` raises NotImplementedError).

    Equations
    ---------
    With ``LN(v) = (v - mean(v)) / sqrt(var(v) + 1e-5)`` over one sequence's
    3H gate rows:

    .. math::
        [x_r, x_z, x_n] = \\gamma_{ih} \\odot LN(W_{ih} x_t) + b_{ih}
        [u_r, u_z, u_n] = \\gamma_{hh} \\odot LN(W_{hh} h_{t-1}) + b_{hh}
        r = \\sigma(x_r + u_r),\\quad z = \\sigma(x_z + u_z)
        n = \\tanh(x_n + r \\odot u_n)
        h_t = (1 - z) \\odot n + z \\odot h_{t-1}

    With all gains 1 this is ``torch.nn.GRU`` applied to normalised
    projections. ``bias=False`` drops ``b_ih`` and ``b_hh``. Parameter names:
    torch's ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
    ``bias_hh_l{k}``, then ``gamma_ih_l{k}``, ``gamma_hh_l{k}`` (3H,).
    """

    _base_cell = "gru"
    _kernel = "layernorm_gru"

    def _names(self, suffix):
        b = self.bias
        return ("weight_ih" + suffix, "weight_hh" + suffix,
                "bias_ih" + suffix if b else None, "bias_hh" + suffix if b else None,
                "gamma_ih" + suffix, "gamma_hh" + suffix)
