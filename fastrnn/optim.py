"""Optimizers over fastrnn models, with the update rules of ``torch.optim``.

An optimizer takes a list of models: anything with a ``params`` dict and a
``grads`` dict with the same keys (:class:`fastrnn.RNN`, :class:`fastrnn.LSTM`,
:class:`fastrnn.GRU`, :class:`fastrnn.Linear`, :class:`fastrnn.Embedding`,
or your own object). Each :meth:`step` reads ``model.params[name]`` afresh,
so ``load_state_dict`` on a model between steps is fine, and updates it in
place. Per-parameter state (momentum, moments) is kept by model position and
parameter name, in the parameters' array type and dtype at the first step:
after moving a model with ``to()`` (another backend or dtype), make a new
optimizer.
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def _as_models(models):
    if hasattr(models, "params") and hasattr(models, "grads"):
        return [models]
    try:
        models = list(models)
    except TypeError as exc:
        raise TypeError(f"models must be a model (with 'params' and 'grads' dicts) or a list "
                        f"of models, got {type(models).__name__}") from exc
    if not models:
        raise ValueError("models is empty: the optimizer needs at least one model")
    for i, m in enumerate(models):
        if not (hasattr(m, "params") and hasattr(m, "grads")):
            raise TypeError(f"models[{i}] must have 'params' and 'grads' dicts, got "
                            f"{type(m).__name__}")
        if getattr(m, "frozen", False):
            m._refuse_frozen(f"models[{i}]")
    return models


def _check_number(name, value, low=0.0, high=math.inf, high_open=False):
    """A finite real in [low, high] ([low, high) with ``high_open``), as a float.

    A non-number raises TypeError; nan, an infinity or a value out of range ValueError.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or value < low or above:
        if math.isfinite(high):
            where = f"lie in [{low:g}, {high:g}{')' if high_open else ']'}"
        else:
            where = f"be finite and >= {low:g}" if math.isfinite(low) else "be finite"
        raise ValueError(f"{name} must {where}, got {value!r}")
    return value


def _check_nonnegative(name, value):
    return _check_number(name, value)


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
        """Update every parameter in place from its gradient.

        Every parameter is checked first (a gradient for each, of its shape):
        a failed step raises KeyError or ValueError and updates nothing.
        """
        pairs = list(self._check_pairs())
        for key, p, g in pairs:
            self._update(self.state.setdefault(key, {}), p, g)

    def _check_pairs(self):
        for i, m in enumerate(self.models):
            for name, p in m.params.items():
                if name not in m.grads:
                    raise KeyError(f"models[{i}].grads has no entry {name!r} for the parameter "
                                   f"of that name")
                g = m.grads[name]
                if tuple(g.shape) != tuple(p.shape):
                    raise ValueError(f"models[{i}].grads[{name!r}] has shape {tuple(g.shape)}, "
                                     f"expected the parameter's {tuple(p.shape)}")
                yield (i, name), p, g

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
        self.dampening = _check_number("dampening", dampening, -math.inf)
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
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (_check_number("betas[0]", betas[0], 0.0, 1.0, high_open=True),
                      _check_number("betas[1]", betas[1], 0.0, 1.0, high_open=True))
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
