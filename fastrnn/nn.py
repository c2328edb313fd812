"""Feed-forward layers that sit around the recurrent ones: :class:`Linear` and :class:`Embedding`.

They follow ``torch.nn.Linear`` and ``torch.nn.Embedding`` (parameter names,
shapes and initialisation) and the protocol of the recurrent layers
(:mod:`fastrnn.layers`): a train-mode call records what :meth:`backward`
needs; backward consumes it, returns the gradient of the input and adds the
parameter gradients to :attr:`grads`.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._module import Module, _check_bool, _check_positive_int, _rng


class _Module(Module):
    """What :class:`Linear` and :class:`Embedding` share beyond :class:`fastrnn._module.Module`."""

    def _param_shapes(self) -> dict:
        return {k: tuple(v.shape) for k, v in self.params.items()}

    def _take_pending(self):
        if self._pending is None:
            raise RuntimeError("backward needs a pending train-mode forward call: call the "
                               "module in train mode first (each backward consumes one)")
        return self._pending

    def _check_grad(self, name, a, shape):
        """``a`` must be an array of the module's dtype and of ``shape``."""
        xp = self._xp
        if not isinstance(a, xp.ndarray):
            raise TypeError(f"{name} must be a {xp.__name__}.ndarray, got {type(a).__name__}")
        if a.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {a.dtype} but the module's dtype is {self.dtype}; "
                            f"convert one of them explicitly")
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{name} must have the shape of y, {tuple(shape)}, got "
                             f"{tuple(a.shape)}")


class Linear(_Module):
    """Affine map over the last axis: ``y = x W^T + b``, as ``torch.nn.Linear``.

    Parameters
    ----------
    in_features, out_features : sizes of the last axis of ``x`` and ``y``.
    bias : whether to add ``b``.
    backend : backend whose array module holds the parameters ('auto', 'numpy', ...).
    dtype : float32 or float64.
    seed : seed of the initialisation.

    Parameters are ``weight`` (out_features, in_features) and ``bias``
    (out_features,), both initialised as torch does, U(-k, k) with
    k = 1/sqrt(in_features).

    Equations
    ---------
    y = x W^T + b;  d_x = d_y W;  d_W = sum over leading axes of d_y^T x;  d_b = sum of d_y.
    """

    def __init__(self, in_features, out_features, bias=True, *, backend="auto",
                 dtype=np.float32, seed=None):
        super().__init__(backend, dtype)
        self.in_features = _check_positive_int("in_features", in_features)
        self.out_features = _check_positive_int("out_features", out_features)
        self.bias = _check_bool("bias", bias)
        rng = _rng(seed)
        k = 1.0 / np.sqrt(self.in_features)
        params = {"weight": rng.uniform(-k, k, (self.out_features, self.in_features))}
        if self.bias:
            params["bias"] = rng.uniform(-k, k, (self.out_features,))
        self._set_params(params)

    def __repr__(self):
        return (f"Linear({self.in_features}, {self.out_features}"
                f"{'' if self.bias else ', bias=False'}, backend={self.backend!r}, "
                f"dtype={self.dtype.name})")

    def forward(self, x):
        """``x`` (..., in_features) -> ``y`` (..., out_features)."""
        xp = self._xp
        if not isinstance(x, xp.ndarray):
            raise TypeError(f"x must be a {xp.__name__}.ndarray, got {type(x).__name__}")
        if x.dtype != self.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the module's dtype is {self.dtype}")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have in_features={self.in_features} in its last "
                             f"dimension, got shape {tuple(x.shape)}")
        y = x @ self.params["weight"].T
        if self.bias:
            y += self.params["bias"]
        # Backward needs x: a copy, so that refilling the caller's buffer cannot change it.
        self._pending = x.copy() if self.training else None
        return y

    def backward(self, d_y):
        """Gradient of ``x`` from ``d_y`` (shape of ``y``); parameter gradients are added to :attr:`grads`."""
        x = self._take_pending()
        self._check_grad("d_y", d_y, x.shape[:-1] + (self.out_features,))
        d_y2 = d_y.reshape(-1, self.out_features)
        self.grads["weight"] += d_y2.T @ x.reshape(-1, self.in_features)
        if self.bias:
            self.grads["bias"] += d_y2.sum(axis=0)
        self._pending = None
        return d_y @ self.params["weight"]


class Embedding(_Module):
    """Lookup table: ``y = W[indices]``, as ``torch.nn.Embedding``.

    Parameters
    ----------
    num_embeddings, embedding_dim : shape of ``weight``.
    padding_idx : a row kept at zero that receives no gradient, as in torch.
    backend, dtype, seed : as :class:`Linear`.

    ``weight`` is initialised N(0, 1) as in torch. Backward adds the rows of
    ``d_y`` into the rows of ``weight``'s gradient that were looked up (a
    repeated index receives the sum) and returns None: integer indices have no
    gradient.
    """

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, *, backend="auto",
                 dtype=np.float32, seed=None):
        super().__init__(backend, dtype)
        self.num_embeddings = _check_positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = _check_positive_int("embedding_dim", embedding_dim)
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, numbers.Integral) or \
                    not -self.num_embeddings <= padding_idx < self.num_embeddings:
                raise ValueError(f"padding_idx must be an integer in [-{self.num_embeddings}, "
                                 f"{self.num_embeddings}), got {padding_idx!r}")
            padding_idx = int(padding_idx) % self.num_embeddings
        self.padding_idx = padding_idx
        weight = _rng(seed).standard_normal((self.num_embeddings,
                                                              self.embedding_dim))
        if padding_idx is not None:
            weight[padding_idx] = 0
        self._set_params({"weight": weight})

    def __repr__(self):
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return (f"Embedding({self.num_embeddings}, {self.embedding_dim}{pad}, "
                f"backend={self.backend!r}, dtype={self.dtype.name})")

    def forward(self, indices):
        """Integer ``indices`` (any shape) -> ``y`` (indices.shape + (embedding_dim,))."""
        xp = self._xp
        try:
            indices = xp.array(indices)   # a copy: backward must see the indices of this call
        except (TypeError, ValueError) as exc:
            raise TypeError(f"indices must be an integer array, got {type(indices).__name__}") \
                from exc
        if indices.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers, got dtype {indices.dtype}")
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= self.num_embeddings):
            raise IndexError(f"indices must lie in [0, {self.num_embeddings}), got values from "
                             f"{int(indices.min())} to {int(indices.max())}")
        self._pending = indices if self.training else None
        return self.params["weight"][indices]

    def backward(self, d_y):
        """Add ``d_y`` (indices.shape + (embedding_dim,)) into the looked-up rows of the gradient; returns None."""
        indices = self._take_pending()
        self._check_grad("d_y", d_y, indices.shape + (self.embedding_dim,))
        d_w = self._xp.zeros_like(self.grads["weight"])
        self._xp.add.at(d_w, indices.reshape(-1), d_y.reshape(-1, self.embedding_dim))
        if self.padding_idx is not None:
            d_w[self.padding_idx] = 0
        self.grads["weight"] += d_w
        self._pending = None
        return None
