"""Activations for the Numba kernels, written so that LLVM vectorizes them.

``math.tanh`` and ``math.exp`` in a Numba loop are scalar libm calls (tens
of ns per LSTM element). In float32 we use a rational approximation
``tanh(x) ~ x P(x^2) / Q(x^2)``, which is plain arithmetic and vectorizes;
its coefficients were fitted for fastrnn (minimax relative error on
[0, 9]): the maximum error is below 8 float32 ulp, about 4.5e-7 absolute.
Beyond |x| = 9, tanh rounds to +-1 in float32. ``sigmoid(x) = (1 + tanh(x/2)) / 2``.
float64 uses libm, exact to float64.

NaN propagates: the clamps are written so that a NaN input takes the
polynomial branch and comes out as NaN. ``|tanh(x)| <= 1`` and ``0 <= sigmoid(x) <= 1``
hold exactly (``tests/test_activations.py`` sweeps a dense sample of float32
inputs against float64).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

#: The one fastmath flag set of every Numba kernel: no ``nnan``/``ninf``, so
#: NaN and infinity propagate honestly.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

_P = tuple(np.float32(c) for c in (1.0, 0.1296437065320952, 0.002968662758915746,
                                   9.686108563702124e-06, -1.3942574566725655e-08,
                                   2.0941394235016175e-11))
_Q = tuple(np.float32(c) for c in (1.0, 0.46297698035208873, 0.02396111839686822,
                                   0.0002346086691812015))
P0, P1, P2, P3, P4, P5 = _P
Q0, Q1, Q2, Q3 = _Q
CLAMP32 = np.float32(9.0)
HALF32 = np.float32(0.5)
ONE32 = np.float32(1.0)


def tanh(x):
    """tanh, vectorizable in float32 (approximation), libm in float64."""
    return math.tanh(x)


def sigmoid(x):
    """The logistic function 1 / (1 + exp(-x))."""
    return 1.0 / (1.0 + math.exp(-x))


def _tanh32_py(x):
    xc = (CLAMP32 if x > 0 else -CLAMP32) if abs(x) > CLAMP32 else x
    u = xc * xc
    p = ((((P5 * u + P4) * u + P3) * u + P2) * u + P1) * u + P0
    q = ((Q3 * u + Q2) * u + Q1) * u + Q0
    r = xc * p / q
    # Near the clamp the rational form overshoots 1 by up to 2 ulp; |tanh| <= 1 is
    # kept exactly (tests/test_activations.py). A NaN fails both tests and stays NaN.
    r = ONE32 if r > ONE32 else r
    return -ONE32 if r < -ONE32 else r


_tanh32 = njit(inline="always", fastmath=FASTMATH)(_tanh32_py)


@overload(tanh, jit_options={"fastmath": FASTMATH})
def _tanh_overload(x):
    if x == types.float32:
        return _tanh32_py
    return lambda x: math.tanh(x)


@overload(sigmoid, jit_options={"fastmath": FASTMATH})
def _sigmoid_overload(x):
    if x == types.float32:
        def impl(x):
            return HALF32 * _tanh32(HALF32 * x) + HALF32
        return impl

    def impl64(x):
        # exp of a non-positive argument only: no overflow for any finite x.
        e = math.exp(-abs(x))
        return 1.0 / (1.0 + e) if x >= 0 else e / (1.0 + e)
    return impl64
