"""Gradient verification: analytic gradients against central finite differences."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from ._module import _rng
from .layers import _RNNBase


@dataclass
class TensorError:
    """Worst error of one tensor's analytic gradient."""

    max_abs: float
    max_rel: float
    checked: int
    passed: bool
    #: Largest |finite-difference gradient| among the checked elements: a check of
    #: gradients that are all ~0 passes trivially, this says whether it did.
    max_numeric: float = 0.0


@dataclass
class GradcheckReport:
    """Result of :func:`gradcheck`: per tensor, the worst error and a verdict."""

    errors: dict = field(default_factory=dict)
    atol: float = 0.0
    rtol: float = 0.0

    @property
    def passed(self) -> bool:
        return all(e.passed for e in self.errors.values())

    def __bool__(self):
        return self.passed

    def __str__(self):
        width = max([len(k) for k in self.errors] + [6])
        lines = [f"{'tensor':<{width}}  {'max abs err':>11}  {'max rel err':>11}  "
                 f"{'checked':>7}  ok"]
        for name, e in self.errors.items():
            lines.append(f"{name:<{width}}  {e.max_abs:11.2e}  {e.max_rel:11.2e}  "
                         f"{e.checked:7d}  {'yes' if e.passed else 'NO'}")
        lines.append(f"passed: {self.passed} (atol={self.atol:g}, rtol={self.rtol:g})")
        return "\n".join(lines)


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _check_float(name, a):
    if not hasattr(a, "dtype") or not hasattr(a, "shape"):
        raise TypeError(f"{name} must be a floating numpy or cupy array, got {type(a).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating dtype, got {a.dtype}")


def _check_arguments(model, x, hx, eps, atol, rtol, max_elements):
    """Errors that name the argument, raised before anything is computed."""
    if not isinstance(model, _RNNBase):
        raise TypeError(f"model must be a fastrnn RNN, LSTM or GRU layer, got "
                        f"{type(model).__name__}")
    _check_float("x", x)
    if hx is not None:
        if model._num_states == 2:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise ValueError(f"hx must be a pair (h0, c0) for an LSTM, got "
                                 f"{type(hx).__name__}")
            _check_float("hx[0]", hx[0])
            _check_float("hx[1]", hx[1])
        else:
            _check_float("hx", hx)
    for name, value, low_open in (("eps", eps, True), ("atol", atol, False),
                                  ("rtol", rtol, False)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {value!r}")
        if not math.isfinite(value) or value < 0 or (low_open and value == 0):
            raise ValueError(f"{name} must be finite and {'>' if low_open else '>='} 0, "
                             f"got {value!r}")
    if max_elements is not None:
        if isinstance(max_elements, bool) or not isinstance(max_elements, numbers.Integral):
            raise TypeError(f"max_elements must be None or a positive integer, got "
                            f"{max_elements!r}")
        if max_elements < 1:
            raise ValueError(f"max_elements must be None or a positive integer, got "
                             f"{max_elements!r}")


def gradcheck(model, x, hx=None, lengths=None, *, eps=1e-6, atol=1e-7, rtol=1e-5,
              max_elements=None, seed=0) -> GradcheckReport:
    """Check a layer's backward against central finite differences, in float64.

    The loss is ``L = sum(out * W_out) + sum(h_n * W_h) [+ sum(c_n * W_c)]`` with
    fixed random weights. A float64 copy of ``model`` (same backend) gives the
    analytic gradients of ``x``, the initial state(s) and every parameter;
    each is compared with ``(L(p + eps) - L(p - eps)) / (2 eps)``.

    Parameters
    ----------
    model : RNN, LSTM or GRU (any dtype: the check runs on a float64 copy).
    x, hx, lengths : as for ``model(x, hx, lengths)``; floating arrays of any
        precision (they are converted to float64).
    eps : finite-difference step, > 0.
    atol, rtol : an element passes when ``|analytic - numeric| <= atol + rtol * |numeric|``
        (both >= 0).
    max_elements : if given, check at most this many random elements per tensor (>= 1).

    Bad arguments raise TypeError or ValueError naming them; ``model`` is
    never changed (the check runs on a copy).
    seed : seed of the loss weights and of the element sample.

    Returns
    -------
    GradcheckReport : ``report.passed``, ``report.errors[name]`` (``max_abs``,
        ``max_rel``, ``checked``, ``passed``); ``print(report)`` shows a table.
    """
    _check_arguments(model, x, hx, eps, atol, rtol, max_elements)
    rng = _rng(seed)
    m = model.copy(dtype=np.float64).train()
    m.zero_grad()
    xp = m._xp

    def to64(a):
        # C order: the perturbations below go through a flat view of each tensor.
        return None if a is None else xp.asarray(_host(a).astype(np.float64, order="C"))

    x = to64(x)
    is_pair = m._num_states == 2
    if hx is not None:
        hx = tuple(to64(h) for h in hx) if is_pair else (to64(hx),)
        out, states = m(x, hx if is_pair else hx[0], lengths)
    else:
        out, states = m(x, None, lengths)
        hx = tuple(xp.zeros_like(s) for s in (states if is_pair else (states,)))
    states = states if is_pair else (states,)
    w_out = xp.asarray(rng.standard_normal(out.shape))
    w_states = tuple(xp.asarray(rng.standard_normal(s.shape)) for s in states)

    # The loss runs in eval mode (nothing recorded), unless train mode computes
    # something else (dropout or zoneout masks): then in train mode, with the copy's
    # mask generator reseeded before every call, so every call draws the same masks
    # and the check is exact for them.
    stochastic = bool(getattr(m, "_stochastic", False))
    mask_seed = int(rng.integers(2 ** 63))

    def run():
        if stochastic:
            m.seed_dropout(mask_seed)
        return m(x, hx if is_pair else hx[0], lengths)

    def loss():
        (m.train() if stochastic else m.eval())
        o, s = run()
        m._forget()
        s = s if is_pair else (s,)
        total = float((o * w_out).sum())
        for si, wi in zip(s, w_states):
            total += float((si * wi).sum())
        return total

    m.train()
    run()
    d_x, d_hx = m.backward(w_out, w_states if is_pair else w_states[0])
    d_hx = d_hx if is_pair else (d_hx,)

    state_names = ("h0", "c0") if is_pair else ("h0",)
    tensors = [("x", x, d_x)] + list(zip(state_names, hx, d_hx))
    tensors += [(name, m.params[name], m.grads[name]) for name in m.params]

    report = GradcheckReport(atol=atol, rtol=rtol)
    for name, value, analytic in tensors:
        flat = value.reshape(-1)  # a view: perturbing it perturbs the tensor
        idx = np.arange(flat.size)
        if max_elements is not None and flat.size > max_elements:
            idx = rng.choice(flat.size, size=max_elements, replace=False)
        analytic = _host(analytic).reshape(-1)[idx]
        numeric = np.empty(len(idx))
        for j, i in enumerate(idx):
            old = float(flat[i])
            flat[i] = old + eps
            up = loss()
            flat[i] = old - eps
            down = loss()
            flat[i] = old
            numeric[j] = (up - down) / (2 * eps)
        diff = np.abs(analytic - numeric)
        rel = diff / np.maximum(np.abs(numeric), 1e-12)
        ok = bool(np.all(diff <= atol + rtol * np.abs(numeric)))
        report.errors[name] = TensorError(float(diff.max(initial=0.0)),
                                          float(rel.max(initial=0.0)), len(idx), ok,
                                          float(np.abs(numeric).max(initial=0.0)))
    return report
