"""Optimizers over fastrnn models, with the update rules of ``torch.optim``.

An optimizer takes a list of models: anything with a ``params`` dict and a
``grads`` dict with the same keys (:class:`fastrnn.RNN`, :class:`fastrnn.LSTM`,
:class:`fastrnn.GRU`, :class:`fastrnn.Linear`, :class:`fastrnn.Embedding`,
or your own object). Each :meth:`step` reads ``model.params[name]`` afresh,
so ``load_state_dict`` or ``to()`` on a model between steps is fine, and
updates it in place. Per-parameter state (momentum, moments) is kept by
model position and parameter name.
"""

from __future__ import annotations

import math

import numpy as np


def _as_models(models):
    if hasattr(models, "params") and hasattr(models, "grads"):
        return [models]
    models = list(models)
    for i, m in enumerate(models):
        if not (hasattr(m, "params") and hasattr(m, "grads")):
            raise TypeError(f"models[{i}] must have 'params' and 'grads' dicts, got "
                            f"{type(m).__name__}")
    return models


def _check_nonnegative(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


class Optimizer:
    """Base class: holds the models and per-parameter state; subclasses define :meth:`_update`."""

    def __init__(self, models):
        self.models = _as_models(models)
        self.state = {}

    def _pairs(self):
        """(key, param, grad) for every parameter of every model."""
        for i, m in enumerate(self.models):
            for name, p in m.params.items():
                yield (i, name), p, m.grads[name]

    def zero_grad(self):
        """Set the gradients of every model to zero."""
        for _, _, g in self._pairs():
            g[...] = 0

    def step(self):
        """Update every parameter in place from its gradient."""
        for key, p, g in self._pairs():
            self._update(self.state.setdefault(key, {}), p, g)

    def _update(self, state, p, g):
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    Equations
    ---------
    g = grad + weight_decay * p;
    b = g at the first step, then b = momentum * b + (1 - dampening) * g;
    g = g + momentum * b if nesterov else b   (when momentum != 0);
    p = p - lr * g   (p + lr * g with ``maximize``).
    """

    def __init__(self, models, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False):
        super().__init__(models)
        self.lr = _check_nonnegative("lr", lr)
        self.momentum = _check_nonnegative("momentum", momentum)
        self.dampening = float(dampening)
        self.weight_decay = _check_nonnegative("weight_decay", weight_decay)
        if nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov momentum requires a momentum > 0 and zero dampening")
        self.nesterov, self.maximize = bool(nesterov), bool(maximize)

    def _update(self, state, p, g):
        g = -g if self.maximize else g
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            b = state.get("momentum_buffer")
            if b is None:
                b = state["momentum_buffer"] = g.copy()
            else:
                b *= self.momentum
                b += (1 - self.dampening) * g
            g = g + self.momentum * b if self.nesterov else b
        p -= p.dtype.type(self.lr) * g


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (``amsgrad`` included); :class:`AdamW` decouples the decay.

    Equations
    ---------
    g = grad + weight_decay * p;   t = t + 1;
    m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g**2;
    (amsgrad: v_max = max(v_max, v), used in place of v below)
    p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps).
    """

    _decoupled = False

    def __init__(self, models, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, maximize=False):
        super().__init__(models)
        self.lr = _check_nonnegative("lr", lr)
        beta1, beta2 = betas
        for name, beta in (("betas[0]", beta1), ("betas[1]", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {beta!r}")
        self.betas = (float(beta1), float(beta2))
        self.eps = _check_nonnegative("eps", eps)
        self.weight_decay = _check_nonnegative("weight_decay", weight_decay)
        self.amsgrad, self.maximize = bool(amsgrad), bool(maximize)

    def _update(self, state, p, g):
        beta1, beta2 = self.betas
        g = -g if self.maximize else g
        if self.weight_decay:
            if self._decoupled:
                p *= p.dtype.type(1 - self.lr * self.weight_decay)
            else:
                g = g + self.weight_decay * p
        if not state:
            state.update(step=0, exp_avg=p * 0, exp_avg_sq=p * 0)
            if self.amsgrad:
                state["max_exp_avg_sq"] = p * 0
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        m += (1 - beta1) * (g - m)
        v *= beta2
        v += (1 - beta2) * g * g
        if self.amsgrad:
            v_max = state["max_exp_avg_sq"]
            np.maximum(v_max, v, out=v_max)   # a ufunc: cupy arrays dispatch to cupy
            v = v_max
        step_size = self.lr / (1 - beta1 ** t)
        denom = np.sqrt(v) / p.dtype.type(math.sqrt(1 - beta2 ** t)) + p.dtype.type(self.eps)
        p -= p.dtype.type(step_size) * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay, as ``torch.optim.AdamW``: p = p * (1 - lr * weight_decay) first."""

    _decoupled = True

    def __init__(self, models, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False):
        super().__init__(models, lr, betas, eps, weight_decay, amsgrad, maximize=maximize)
