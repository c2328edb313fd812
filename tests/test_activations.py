"""The float32 activations of the numba kernels (fastrnn/backends/_numba_math.py)
against float64 libm, on a dense sample of float32 inputs: the docstring's claim
(tanh within 8 ulp, 4.5e-7 absolute; NaN propagates) is asserted here."""

import numba
import numpy as np

from fastrnn.backends._numba_math import FASTMATH, sigmoid, tanh


@numba.njit(fastmath=FASTMATH)
def _apply(x, out_tanh, out_sigmoid):
    for i in range(x.shape[0]):
        out_tanh[i] = tanh(x[i])
        out_sigmoid[i] = sigmoid(x[i])


def dense_float32_sample():
    """Every 257th float32 bit pattern from +0 up to 12.0 (past the clamp at 9),
    both signs: about 8 million inputs, every binade and its mantissa spread."""
    top = np.float32(12.0).view(np.uint32)
    bits = np.arange(0, top, 257, dtype=np.uint32)
    x = bits.view(np.float32)
    return np.concatenate([x, -x, np.array([12.0, 30.0, 1e30, np.inf], np.float32)])


def ulps(got32, want64):
    """|got - want| in units of the float32 spacing at the correctly rounded value."""
    ref = want64.astype(np.float32)
    spacing = np.spacing(np.abs(ref)).astype(np.float64)
    return np.abs(got32.astype(np.float64) - want64) / spacing


def test_tanh_and_sigmoid_float32_accuracy():
    x = dense_float32_sample()
    t, s = np.empty_like(x), np.empty_like(x)
    _apply(x, t, s)
    x64 = x.astype(np.float64)
    want_t = np.tanh(x64)
    want_s = 0.5 * (1.0 + np.tanh(0.5 * x64))
    assert np.abs(t - want_t).max() <= 4.5e-7
    assert ulps(t, want_t).max() <= 8
    assert np.abs(s - want_s).max() <= 4.5e-7
    # saturation is exact: +-1 and 0/1, never beyond
    assert np.all(np.abs(t) <= 1) and np.all((s >= 0) & (s <= 1))
    assert t[-1] == 1 and s[-1] == 1


def test_nan_propagates():
    x = np.array([np.nan, -np.nan], np.float32)
    t, s = np.empty_like(x), np.empty_like(x)
    _apply(x, t, s)
    assert np.isnan(t).all() and np.isnan(s).all()
