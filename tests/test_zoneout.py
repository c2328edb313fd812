"""zoneout (Krueger et al. 2016): h_t = k h_{t-1} + (1 - k) h~_t (and c for the LSTM),
0/1 masks k drawn with probability z in train mode and reused by backward, k = z in
eval mode. The kernels are checked against an implementation of the same equations in
torch autograd written here, and the layers against finite differences."""

import numpy as np
import pytest

import fastrnn
import fastrnn.interop
from conftest import KINDS, make_layer, n_states, require, torch_or_skip


def torch_zoneout_layer(torch, kind, x, states, weights, masks, lengths, reverse):
    """One layer and direction with zoneout, in torch autograd, straight from the
    equations. ``masks``: per state, an array broadcastable to (T, B, H)."""
    cell, options = KINDS[kind]
    w_ih, w_hh, b_ih, b_hh = weights
    T, B, _ = x.shape
    H = states[0].shape[1]
    h = states[0]
    c = states[1] if len(states) == 2 else None
    active = torch.ones((T, B, 1), dtype=x.dtype) if lengths is None else \
        (torch.arange(T)[:, None] < torch.as_tensor(lengths)[None, :]).to(x.dtype)[:, :, None]
    outs = [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        k_h = masks[0][t if masks[0].shape[0] > 1 else 0]
        gx = x[t] @ w_ih.T + b_ih
        gh = h @ w_hh.T + b_hh
        if cell.startswith("rnn"):
            a = gx + gh
            cand = torch.relu(a) if cell == "rnn_relu" else torch.tanh(a)
        elif cell == "lstm":
            a = gx + gh
            i, f = torch.sigmoid(a[:, :H]), torch.sigmoid(a[:, H:2 * H])
            g, o = torch.tanh(a[:, 2 * H:3 * H]), torch.sigmoid(a[:, 3 * H:])
            c_cand = f * c + i * g
            cand = o * torch.tanh(c_cand)
            k_c = masks[1][t if masks[1].shape[0] > 1 else 0]
            m = active[t]
            c = m * (k_c * c + (1 - k_c) * c_cand) + (1 - m) * c
        else:
            r = torch.sigmoid(gx[:, :H] + gh[:, :H])
            z = torch.sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H])
            if options.get("reset_after", True):
                n = torch.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
            else:
                n = torch.tanh(gx[:, 2 * H:] + (r * h) @ w_hh[2 * H:].T + b_hh[2 * H:])
            cand = (1 - z) * n + z * h
        new = k_h * h + (1 - k_h) * cand
        m = active[t]
        outs[t] = m * new
        h = m * new + (1 - m) * h
    return torch.stack(outs), (h,) if c is None else (h, c)


def _problem(kind, dtype, seed=0, T=6, B=3, I=4, H=5, mask_T=None):
    rng = np.random.default_rng(seed)
    cell, _ = KINDS[kind]
    G = fastrnn.backends.gate_count(cell) * H
    x = rng.standard_normal((T, B, I)).astype(dtype)
    states = [(0.5 * rng.standard_normal((B, H))).astype(dtype) for _ in range(n_states(kind))]
    weights = [(0.4 * rng.standard_normal(s)).astype(dtype) for s in ((G, I), (G, H), (G,), (G,))]
    masks = [(rng.random((mask_T or T, B, H)) < 0.4).astype(dtype) for _ in states]
    return rng, x, states, weights, masks


def _zoneout_kwargs(kind, masks):
    names = fastrnn.backends.cell_kind(KINDS[kind][0]).zoneout_arrays
    return dict(zip(names, masks))


def _numba_refuses(backend, kind):
    return backend == "numba" and kind == "gru_reset_before"


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_kernels_match_torch_autograd_of_the_equations(backend, kind, reverse):
    torch = torch_or_skip()
    cell, options = KINDS[kind]
    rng, x, states, weights, masks = _problem(kind, np.float64, seed=1)
    lengths = np.array([6, 2, 0])
    fwd, bwd = fastrnn.backends.get(backend).kernels(cell)
    kwargs = dict(lengths=lengths, reverse=reverse, training=True, **options,
                  **_zoneout_kwargs(kind, masks))
    if _numba_refuses(backend, kind):
        with pytest.raises(NotImplementedError, match="zoneout.*reset_after=False"):
            fwd(x, *states, *weights, **kwargs)
        return
    res = fwd(x, *states, *weights, **kwargs)
    out, finals, cache = res[0], res[1:-1], res[-1]

    tx = torch.tensor(x, requires_grad=True)
    ts = [torch.tensor(s, requires_grad=True) for s in states]
    tw = [torch.tensor(w, requires_grad=True) for w in weights]
    t_out, t_finals = torch_zoneout_layer(torch, kind, tx, ts, tw,
                                          [torch.tensor(m) for m in masks], lengths, reverse)
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-12, atol=1e-12)
    for mine, theirs in zip(finals, t_finals):
        np.testing.assert_allclose(mine, theirs.detach().numpy(), rtol=1e-12, atol=1e-12)

    d_out = rng.standard_normal(out.shape)
    d_states = [rng.standard_normal(s.shape) for s in states]
    loss = (t_out * torch.tensor(d_out)).sum() + sum(
        (f * torch.tensor(d)).sum() for f, d in zip(t_finals, d_states))
    loss.backward()
    grads = bwd(d_out, *d_states, cache)
    expected = [tx.grad] + [s.grad for s in ts] + [w.grad for w in tw]
    for mine, theirs in zip(grads, expected):
        np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-10, atol=1e-11)
    assert np.abs(grads[1]).max() > 1e-3   # d_h0: the zoned-out path reaches it


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_float32_kernels_follow_float64(backend, kind):
    cell, options = KINDS[kind]
    _, x, states, weights, masks = _problem(kind, np.float64, seed=2, T=20, B=4, H=16,
                                            mask_T=1)
    fwd, _ = fastrnn.backends.get(backend).kernels(cell)
    ref = fwd(x, *states, *weights, training=False, **options, **_zoneout_kwargs(kind, masks))
    f32 = [a.astype(np.float32) for a in (x, *states, *weights)]
    got = fwd(*f32, training=False, **options,
              **_zoneout_kwargs(kind, [m.astype(np.float32) for m in masks]))
    for a, b in zip(got[:-1], ref[:-1]):
        np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_layer_gradcheck_with_masks_held_fixed(backend, kind):
    rng = np.random.default_rng(5)
    zoneout = (0.3, 0.5) if n_states(kind) == 2 else 0.3
    if _numba_refuses(backend, kind):
        with pytest.raises(NotImplementedError, match="zoneout together with reset_after"):
            make_layer(kind, 3, 4, zoneout=zoneout, backend=backend)
        return
    m = make_layer(kind, 3, 4, num_layers=2, bidirectional=True, zoneout=zoneout,
                   backend=backend, dtype=np.float64, seed=3)
    report = fastrnn.gradcheck(m, rng.standard_normal((5, 2, 3)), lengths=[5, 3],
                               max_elements=6)
    assert report.passed, str(report)
    assert report.errors["weight_hh_l0"].max_numeric > 1e-4


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_eval_mode_mixes_by_the_rate(backend, kind):
    torch = torch_or_skip()
    rates = (0.25, 0.6) if n_states(kind) == 2 else (0.25,)
    if _numba_refuses(backend, kind):
        with pytest.raises(NotImplementedError, match="zoneout together with reset_after"):
            make_layer(kind, 4, 5, zoneout=rates[0], backend=backend)
        return
    m = make_layer(kind, 4, 5, zoneout=rates if len(rates) == 2 else rates[0], backend=backend,
                   dtype=np.float64, seed=4).eval()
    rng = np.random.default_rng(6)
    x = rng.standard_normal((6, 3, 4))
    out, _ = m(x)
    sfx = "_l0"
    weights = [torch.tensor(m.params[n + sfx]) for n in ("weight_ih", "weight_hh", "bias_ih",
                                                         "bias_hh")]
    states = [torch.zeros((3, 5), dtype=torch.float64) for _ in rates]
    expected, _ = torch_zoneout_layer(torch, kind, torch.tensor(x), states, weights,
                                      [torch.full((1, 1, 5), z, dtype=torch.float64)
                                       for z in rates], None, False)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-12, atol=1e-12)
    # eval draws nothing: the same output again
    np.testing.assert_array_equal(m(x)[0], out)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_train_masks_keep_units_at_the_rate(backend, kind):
    T, B, H = 60, 8, 32
    rates = (0.3, 0.7) if n_states(kind) == 2 else (0.3,)
    m = make_layer(kind, 4, H, zoneout=rates if len(rates) == 2 else rates[0], backend=backend,
                   dtype=np.float64, seed=7)
    x = np.random.default_rng(8).standard_normal((T, B, 4))
    out, _ = m(x)
    cache = m._pending.caches[0]
    # h_t == h_{t-1} exactly only where the unit was zoned out (a new value equal to the
    # old one has probability 0 with random weights)
    h = np.concatenate([np.zeros((1, B, H)), out])
    kept = np.mean(h[1:] == h[:-1])
    n = T * B * H
    assert abs(kept - rates[0]) < 4 * np.sqrt(rates[0] * (1 - rates[0]) / n)
    if len(rates) == 2:     # c: read off the state buffers of the cache, in time order
        inner = getattr(cache, "inner", cache)
        cs = inner["cs"] if isinstance(inner, dict) else inner[2]
        kept_c = np.mean(cs[1:] == cs[:-1])
        assert abs(kept_c - rates[1]) < 4 * np.sqrt(rates[1] * (1 - rates[1]) / n)
    # a reseeded generator draws the same masks; another seed, others
    m.seed_dropout(11)
    a = m(x)[0]
    m.seed_dropout(11)
    np.testing.assert_array_equal(m(x)[0], a)
    m.seed_dropout(12)
    assert not np.array_equal(m(x)[0], a)


def test_bad_values_name_zoneout():
    for bad in (-0.1, 1.0, True, "0.1", None, float("nan")):
        with pytest.raises(ValueError, match="zoneout"):
            fastrnn.GRU(3, 4, zoneout=bad)
    for bad in ((0.1,), (0.1, 0.2, 0.3), (0.1, 1.5), [0.1, "a"]):
        with pytest.raises(ValueError, match="zoneout"):
            fastrnn.LSTM(3, 4, zoneout=bad)
    with pytest.raises(ValueError, match="zoneout"):
        fastrnn.RNN(3, 4, zoneout=(0.1, 0.2))
    assert fastrnn.LSTM(3, 4, zoneout=0.2).zoneout == (0.2, 0.2)
    assert fastrnn.LSTM(3, 4, zoneout=[0.1, 0.0]).zoneout == (0.1, 0.0)
    assert fastrnn.GRU(3, 4, zoneout=0.2).zoneout == 0.2
    assert "zoneout=(0.1, 0.0)" in repr(fastrnn.LSTM(3, 4, zoneout=(0.1, 0)))
    assert "zoneout" not in repr(fastrnn.LSTM(3, 4))


def test_backends_without_kernels_refuse_and_change_nothing():
    with pytest.raises(NotImplementedError, match="zoneout.*cuda"):
        fastrnn.LSTM(3, 4, zoneout=0.1, backend="cuda")
    m = fastrnn.GRU(3, 4, zoneout=0.1, backend="numpy", reset_after=False)
    before = m.state_dict()
    for target in ("cuda", "numba"):
        if target == "numba" and "numba" not in fastrnn.backends.available():
            continue
        with pytest.raises(NotImplementedError, match="zoneout"):
            m.to(target)
        assert m.backend == "numpy"
        assert all(np.array_equal(before[k], m.params[k]) for k in before)
    if "numba" in fastrnn.backends.available():
        with pytest.raises(NotImplementedError, match="zoneout together with proj_size"):
            fastrnn.LSTM(3, 4, proj_size=2, zoneout=0.1, backend="numba")
    # without zoneout the same configurations construct
    fastrnn.GRU(3, 4, reset_after=False, backend="numpy").to("numba")


def test_numpy_runs_zoneout_with_projections():
    """The reference covers every combination; h's masks have proj_size columns."""
    m = fastrnn.LSTM(3, 6, proj_size=2, zoneout=(0.3, 0.3), backend="numpy",
                     dtype=np.float64, seed=0)
    report = fastrnn.gradcheck(m, np.random.default_rng(0).standard_normal((4, 2, 3)),
                               max_elements=6)
    assert report.passed, str(report)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((6, 3, 4)), "zoneout_h must have shape"),
    (np.zeros((2, 3, 5)), "zoneout_h must have shape \\(T or 1"),
    (np.zeros((6, 3, 5), np.float32), "zoneout_h has dtype float32"),
    ([[0.5]], "zoneout_h must be a numpy.ndarray"),
])
def test_contract_checks_the_masks(backend, bad, match):
    _, x, states, weights, _ = _problem("gru", np.float64)
    fwd, _ = fastrnn.backends.get(backend).kernels("gru")
    with pytest.raises((ValueError, TypeError), match=match):
        fwd(x, *states, *weights, zoneout_h=bad)


def test_exporters_refuse_zoneout():
    torch_or_skip()
    require("onnx")
    for model in (fastrnn.GRU(3, 4, zoneout=0.1), fastrnn.LSTM(3, 4, zoneout=(0, 0.2))):
        with pytest.raises(ValueError, match="zoneout"):
            fastrnn.interop.to_torch(model)
        with pytest.raises(ValueError, match="zoneout"):
            fastrnn.interop.to_onnx(model)
