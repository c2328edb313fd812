"""dropout=p between layers (torch's semantics): train mode only, masks from the
layer's generator reused by backward (exact gradients for the masks drawn), eval
mode untouched, the rate is p, bad values rejected."""

import warnings

import numpy as np
import pytest

import fastrnn
from conftest import LAYERS, make_layer


def fixed_masks(model, masks):
    """Make ``model`` (and its copies) draw ``masks`` in turn, one per layer boundary."""
    count = [0]

    def drop(a):
        mask = masks[count[0] % len(masks)]
        count[0] += 1
        return a * mask, mask
    model._drop = drop


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_train_forward_equals_the_masked_computation(backend, kind):
    rng = np.random.default_rng(3)
    T, B, I, H, L = 5, 3, 4, 6, 3
    m = make_layer(kind, I, H, num_layers=L, bidirectional=True, dropout=0.4, backend=backend,
                   dtype=np.float64, seed=2)
    x = rng.standard_normal((T, B, I))
    out, _ = m(x)
    masks = m._pending.masks
    assert len(masks) == L - 1 and all(mk.shape == (T, B, 2 * H) for mk in masks)
    assert set(np.unique(masks[0])) <= {0.0, 1 / 0.6}
    # layer by layer without dropout, masks applied by hand
    a = x
    for layer in range(L):
        one = make_layer(kind, a.shape[2], H, bidirectional=True, backend=backend,
                         dtype=np.float64)
        one.load_state_dict({k.replace(f"_l{layer}", "_l0"): v for k, v in m.state_dict().items()
                             if f"_l{layer}" in k})
        a = one.eval()(a if layer == 0 else a * masks[layer - 1])[0]
    np.testing.assert_allclose(out, a, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_gradcheck_with_the_masks_held_fixed(backend, kind):
    rng = np.random.default_rng(4)
    T, B, I, H = 4, 2, 3, 4
    m = make_layer(kind, I, H, num_layers=2, dropout=0.5, backend=backend, dtype=np.float64,
                   seed=1)
    mask = (rng.random((T, B, H)) >= 0.5) / 0.5
    fixed_masks(m, [mask])
    report = fastrnn.gradcheck(m, rng.standard_normal((T, B, I)), lengths=[4, 2],
                               max_elements=8)
    assert report.passed, str(report)
    assert report.errors["weight_ih_l0"].max_numeric > 1e-4


def test_rate_is_p_and_eval_is_untouched(backend):
    x = np.random.default_rng(5).standard_normal((50, 40, 8)).astype(np.float32)
    m = fastrnn.GRU(8, 32, num_layers=2, dropout=0.3, backend=backend, seed=0)
    plain = fastrnn.GRU(8, 32, num_layers=2, backend=backend, seed=0)
    m(x)
    dropped = float(np.mean(m._pending.masks[0] == 0))
    n = m._pending.masks[0].size
    assert abs(dropped - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)
    np.testing.assert_array_equal(m.eval()(x)[0], plain.eval()(x)[0])
    # train-mode draws differ between calls; reseeding replays them
    m.train()
    m.seed_dropout(7)
    first = m(x)[0]
    m.seed_dropout(7)
    np.testing.assert_array_equal(m(x)[0], first)


def test_bad_dropout_and_the_one_layer_warning():
    for bad in (-0.1, 1.0, 1.5, "0.2", True, float("nan")):
        with pytest.raises(ValueError, match="dropout"):
            fastrnn.LSTM(3, 4, num_layers=2, dropout=bad)
    with pytest.warns(UserWarning, match="num_layers=1"):
        fastrnn.RNN(3, 4, dropout=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastrnn.RNN(3, 4, num_layers=2, dropout=0.2)
        fastrnn.RNN(3, 4, dropout=0.0)
    assert "dropout=0.2" in repr(fastrnn.GRU(3, 4, num_layers=2, dropout=0.2))
