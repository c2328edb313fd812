"""Finite-difference gradchecks (float64) of every cell, option, direction and depth."""

import numpy as np
import pytest

import fastrnn
from conftest import LAYERS, make_layer, random_lengths


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_gradcheck_layers(backend, kind, bidirectional, num_layers, with_lengths):
    # A stable seed (str hashes are salted per process): a failure replays.
    rng = np.random.default_rng([sorted(LAYERS).index(kind), bidirectional, num_layers,
                                 with_lengths])
    T, B, I, H = 5, 3, 3, 4
    m = make_layer(kind, I, H, num_layers=num_layers, bidirectional=bidirectional,
                   backend=backend, dtype=np.float64, seed=1)
    x = rng.standard_normal((T, B, I))
    D = 2 if bidirectional else 1
    h0 = rng.standard_normal((num_layers * D, B, H)) * 0.5
    hx = (h0, rng.standard_normal(h0.shape) * 0.5) if kind == "lstm" else h0
    lengths = random_lengths(rng, T, B) if with_lengths else None
    report = fastrnn.gradcheck(m, x, hx, lengths)
    assert report.passed, str(report)
    # Every tensor was checked, and its gradient is not trivially ~0.
    assert set(report.errors) >= {"x", "h0", *m.params}
    for name, e in report.errors.items():
        assert e.checked > 0 and e.max_numeric > 1e-4, (name, e)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_gradcheck_no_bias_batch_first(backend, kind):
    rng = np.random.default_rng(7)
    m = make_layer(kind, 2, 3, bias=False, batch_first=True, backend=backend,
                   dtype=np.float64, seed=2)
    assert not any(k.startswith("bias") for k in m.params)
    x = rng.standard_normal((4, 6, 2))  # (B, T, I)
    report = fastrnn.gradcheck(m, x, lengths=np.array([6, 1, 0, 3]))
    assert report.passed, str(report)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_gradcheck_unbatched(backend, kind):
    rng = np.random.default_rng(3)
    m = make_layer(kind, 3, 2, backend=backend, dtype=np.float64, seed=3)
    report = fastrnn.gradcheck(m, rng.standard_normal((5, 3)))
    assert report.passed, str(report)


def test_gradcheck_detects_a_wrong_gradient(backend, monkeypatch):
    """The check can fail: corrupt one element of d_x and it must say so."""
    m = fastrnn.LSTM(2, 3, backend=backend, dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 2, 2))
    backward = fastrnn.LSTM.backward

    def corrupted(self, *args, **kwargs):
        d_x, d_hx = backward(self, *args, **kwargs)
        d_x[0, 0, 0] += 1e-3
        return d_x, d_hx

    monkeypatch.setattr(fastrnn.LSTM, "backward", corrupted)
    report = fastrnn.gradcheck(m, x)
    assert not report.passed
    assert not report.errors["x"].passed
    assert report.errors["weight_hh_l0"].passed
