"""Frozen modules (``Module.freeze``): inference-only copies whose parameters cannot
change. Their outputs are the eval-mode module's, bitwise, on every backend and path of
the numba backend (packed loops on one thread, fused and split by rows, the BLAS loops);
the numba backend packs their weights once and drops the panels with the module; and
everything that would change them or train them refuses, naming what was called."""

import gc

import numpy as np
import pytest

import fastrnn
from fastrnn import optim

pk = pytest.importorskip("fastrnn.backends.packed_numba")

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


def _flat(result):
    """The arrays of a call's result, nested tuples (``(out, (h_n, c_n))``) flattened."""
    if isinstance(result, tuple):
        return [a for r in result for a in _flat(r)]
    return [result]


def _assert_same_bits(a, b):
    for p, q in zip(_flat(a), _flat(b), strict=True):
        assert p.dtype == q.dtype and np.array_equal(p, q, equal_nan=True)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", [(12, 1, 64, 80), (6, 16, 128, 128), (5, 3, 7, 40)],
                         ids=lambda s: "x".join(map(str, s)))
def test_frozen_equals_eval_bitwise_on_numba(cell, shape):
    """Two layers, both directions: one thread at B = 1 and 3 rows, fused at 16 rows
    (split by rows where the BLAS has two threads); the second call reuses the panels."""
    T, B, I, H = shape
    m = fastrnn.make_layer(cell, I, H, num_layers=2, bidirectional=True, backend="numba",
                           seed=0).eval()
    frozen = m.freeze()
    x = np.random.default_rng(1).standard_normal((T, B, I)).astype(np.float32)
    h0 = np.random.default_rng(2).standard_normal((4, B, H)).astype(np.float32)
    hx = (h0, h0 * 0.5) if cell == "lstm" else h0
    want = m(x, hx)
    _assert_same_bits(frozen(x, hx), want)
    _assert_same_bits(frozen(x, hx), want)
    lengths = np.arange(B) % T + 1
    _assert_same_bits(frozen(x, hx, lengths), m(x, hx, lengths))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_frozen_equals_eval_on_every_host_backend_and_dtype(backend, dtype):
    m = fastrnn.LSTM(9, 20, backend=backend, dtype=dtype, seed=0, proj_size=7).eval()
    x = np.random.default_rng(0).standard_normal((8, 4, 9)).astype(dtype)
    _assert_same_bits(m.freeze()(x), m(x))


def _pack_calls(monkeypatch):
    calls = []
    real = pk.pack

    def spy(w, gates):
        calls.append(w.shape)
        return real(w, gates)

    monkeypatch.setattr(pk, "pack", spy)
    return calls


@pytest.mark.parametrize("B, projection", [(1, "blas"), (1, "panels"), (16, "fused")])
def test_frozen_weights_are_packed_once_and_dropped_with_the_module(monkeypatch, B, projection):
    m = fastrnn.GRU(32, 48, backend="numba", seed=0).eval()
    x = np.random.default_rng(0).standard_normal((10, B, 32)).astype(np.float32)
    calls = _pack_calls(monkeypatch)
    monkeypatch.setattr(pk, "fused", projection == "fused")
    monkeypatch.setattr(pk, "panel_chunks", projection == "panels")
    m(x)
    m(x)
    per_call = len(calls) // 2
    # W_hh, and W_ih where the micro-kernel projects (fused, or by chunks from its panels)
    assert per_call == (1 if projection == "blas" else 2)
    calls.clear()
    frozen = m.freeze()
    before = len(pk._packed)
    for _ in range(3):
        frozen(x)
    assert len(calls) == per_call                   # the first call only
    assert len(pk._packed) == before + per_call
    del frozen
    gc.collect()
    assert len(pk._packed) == before


def test_only_weights_that_cannot_change_are_kept_packed():
    w = np.ones((8, 4), np.float32)
    view = w.view()
    view.flags.writeable = False
    assert not pk.immutable(w) and not pk.immutable(view)    # w can still change it
    frozen = fastrnn.RNN(4, 8, backend="numba", seed=0).freeze()
    assert all(pk.immutable(v) for v in frozen.params.values())
    assert not any(pk.immutable(v) for v in frozen.copy().params.values())


def test_frozen_parameters_cannot_be_written():
    frozen = fastrnn.LSTM(4, 6, backend="numba", seed=0).freeze()
    w = frozen.params["weight_hh_l0"]
    with pytest.raises(ValueError, match="read-only"):
        w[0, 0] = 1.0
    with pytest.raises(ValueError, match="WRITEABLE"):
        w.flags.writeable = True


def test_freeze_leaves_the_original_alone_and_copies_its_parameters():
    m = fastrnn.GRU(4, 6, backend="numpy", seed=0).train()
    frozen = m.freeze()
    assert m.training and not m.frozen and frozen.frozen and not frozen.training
    assert frozen.grads == {}
    m.params["weight_ih_l0"][:] = 0                  # the original still trains and changes
    assert np.abs(frozen.params["weight_ih_l0"]).max() > 0


def test_what_would_train_or_change_a_frozen_module_refuses():
    frozen = fastrnn.LSTM(4, 6, backend="numpy", seed=0).freeze()
    x = np.zeros((3, 2, 4), np.float32)
    with pytest.raises(ValueError, match=r"train\(\): the module is frozen"):
        frozen.train()
    with pytest.raises(ValueError, match=r"load_state_dict\(\): the module is frozen"):
        frozen.load_state_dict(frozen.state_dict())
    with pytest.raises(ValueError, match=r"models\[0\]: the module is frozen"):
        optim.SGD([frozen], lr=0.1)
    frozen.eval()                                    # eval mode it already is
    frozen(x)
    with pytest.raises(RuntimeError):
        frozen.backward(np.zeros((3, 2, 6), np.float32))
    assert frozen.frozen and not frozen.training


def test_a_frozen_module_moves_frozen_and_copies_to_one_that_trains():
    frozen = fastrnn.GRU(4, 6, backend="numpy", seed=0).freeze()
    moved = frozen.to(dtype=np.float64)
    assert moved.frozen and all(pk.immutable(v) and v.dtype == np.float64
                                for v in moved.params.values())
    thawed = frozen.copy(dtype=np.float32)
    assert not thawed.frozen and set(thawed.grads) == set(thawed.params)
    thawed.train()
    x = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)
    out, _ = thawed(x)
    thawed.backward(np.ones_like(out))
    assert any(np.abs(g).max() > 0 for g in thawed.grads.values())


@pytest.mark.parametrize("make, x_shape", [
    (lambda: fastrnn.GRUCell(5, 6, backend="numba", seed=0), (2, 5)),
    (lambda: fastrnn.LayerNormLSTM(5, 6, backend="numba", seed=0), (3, 2, 5)),
    (lambda: fastrnn.nn.Linear(5, 6, seed=0), (2, 5)),
], ids=["GRUCell", "LayerNormLSTM", "Linear"])
def test_every_module_family_freezes(make, x_shape):
    m = make().eval()
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    got, want = _flat(m.freeze()(x)), _flat(m(x))
    assert len(got) == len(want) and all(np.array_equal(p, q) for p, q in zip(got, want))


def test_freeze_checks_the_parameters_once_and_keeps_them_in_a_read_only_mapping():
    m = fastrnn.LSTM(4, 6, backend="numba", seed=0)
    frozen = m.freeze()
    with pytest.raises(TypeError):
        frozen.params["weight_hh_l0"] = np.zeros((24, 6), np.float32)
    m.params["weight_hh_l0"] = np.zeros((24, 5), np.float32)     # a wrong shape
    with pytest.raises(ValueError, match="weight_hh_l0"):
        m.freeze()


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m(np.zeros((3, 2, 5), np.float32)), ValueError, "input_size"),
    (lambda m: m(np.zeros((3, 2, 4), np.float64)), TypeError, "dtype"),
    (lambda m: m(np.zeros((3, 2, 4), np.float32), np.zeros((1, 3, 6), np.float32)),
     ValueError, "hx"),
    (lambda m: m(np.zeros((3, 2, 4), np.float32), lengths=np.array([1, 4])), ValueError,
     "lengths"),
], ids=["input_size", "dtype", "hx", "lengths"])
def test_a_frozen_layer_checks_its_inputs_as_the_kernels_contract_would(call, error, match):
    """A frozen layer calls the kernels without the contract's checks: the layer's own
    checks stand in for them, with the same errors and nothing computed."""
    frozen = fastrnn.GRU(4, 6, backend="numba", seed=0).freeze()
    with pytest.raises(error, match=match):
        call(frozen)


def test_panels_never_outlive_their_weights():
    """Frozen modules made and dropped one after another (their arrays' ids reused): each
    call gives its own weights' results, never a dropped module's panels."""
    x = np.random.default_rng(0).standard_normal((6, 2, 16)).astype(np.float32)
    for seed in range(6):
        m = fastrnn.LSTM(16, 32, backend="numba", seed=seed).eval()
        frozen = m.freeze()
        _assert_same_bits(frozen(x), m(x))
        del frozen
        gc.collect()


@pytest.mark.parametrize("make, x_shape, kwargs", [
    (lambda: fastrnn.GRU(6, 20, batch_first=True, backend="numba", seed=0), (3, 7, 6), {}),
    (lambda: fastrnn.LSTM(6, 20, backend="numba", seed=0), (7, 6), {}),
    (lambda: fastrnn.RNN(6, 40, num_layers=2, backend="numba", seed=0), (9, 3, 6),
     {"lengths": np.array([9, 4, 1])}),
    (lambda: fastrnn.LSTM(6, 20, zoneout=(0.2, 0.1), backend="numba", seed=0), (7, 3, 6), {}),
    (lambda: fastrnn.GRU(6, 20, reset_after=False, backend="numba", seed=0), (7, 3, 6), {}),
    (lambda: fastrnn.LayerNormGRU(6, 20, bidirectional=True, backend="numba", seed=0),
     (7, 3, 6), {}),
], ids=["batch_first", "unbatched", "chunked_lengths", "zoneout", "reset_before", "layernorm"])
def test_frozen_equals_eval_for_every_layer_option(make, x_shape, kwargs):
    m = make().eval()
    m.eval_chunk = 4              # the chunked runs of a long inference (9 > 4 steps)
    frozen = m.freeze()
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    got, want = _flat(frozen(x, **kwargs)), _flat(m(x, **kwargs))
    assert len(got) == len(want) and all(np.array_equal(p, q) for p, q in zip(got, want))


def test_a_frozen_layer_skips_the_contract_only_with_the_parameters_it_checked(monkeypatch):
    from fastrnn.backends import contract
    frozen = fastrnn.GRU(4, 6, backend="numba", seed=0).freeze()
    x = np.zeros((3, 2, 4), np.float32)

    def refuse(*args, **kwargs):
        raise AssertionError("the contract's checks ran")

    with monkeypatch.context() as patch:
        patch.setattr(contract, "check_forward", refuse)
        frozen(x)                                       # raw kernels: no contract
        with pytest.raises(AssertionError, match="contract"):
            fastrnn.GRU(4, 6, backend="numba", seed=0).eval()(x)
    frozen.params = {**frozen.params, "weight_hh_l0": np.zeros((18, 5), np.float32)}
    with pytest.raises(ValueError, match="w_hh"):       # reassigned: checked again
        frozen(x)
