"""Cells: against torch's cells over a loop, finite differences, the layers, bad input."""

import numpy as np
import pytest

import fastrnn
from conftest import KINDS, TORCH_KINDS, make_cell, make_layer, n_states, torch_class, torch_or_skip

CELLS = KINDS


def run_loop(cell, xs, states, w_states):
    """Run ``cell`` over ``xs`` (T, B, I) from ``states``; loss = sum_t sum_k s_k[t] * w_k[t].

    Returns the states after every step (k, T, B, H), d_xs and the gradient of the
    initial states, with the backward loop a user would write.
    """
    S = len(states)
    hx = states if S == 2 else states[0]
    outs = [[] for _ in range(S)]
    for x in xs:
        hx = cell(x, hx)
        for k, s in enumerate(hx if S == 2 else (hx,)):
            outs[k].append(s)
    d_next = [np.zeros_like(s) for s in states]
    d_xs = [None] * len(xs)
    for t in reversed(range(len(xs))):
        d = [d_next[k] + w_states[k][t] for k in range(S)]
        if S == 2:
            d_xs[t], d_next = cell.backward(d[0], d[1])
        else:
            d_xs[t], d_h = cell.backward(d[0])
            d_next = [d_h]
    return np.array(outs), np.array(d_xs), d_next


@pytest.mark.parametrize("kind", TORCH_KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_loop_matches_torch_cells(backend, kind, bias):
    torch = torch_or_skip()
    rng = np.random.default_rng(TORCH_KINDS.index(kind) * 2 + bias)
    T, B, I, H = 4, 3, 5, 4
    cell = make_cell(kind, I, H, bias=bias, backend=backend, dtype=np.float64, seed=1)
    tcls, extra = torch_class(torch, kind, "Cell")
    tcell = tcls(I, H, bias=bias, **extra).double()
    assert list(cell.state_dict()) == list(tcell.state_dict())
    tcell.load_state_dict({k: torch.from_numpy(v) for k, v in cell.state_dict().items()})

    S = n_states(kind)
    xs = rng.standard_normal((T, B, I))
    states = [rng.standard_normal((B, H)) for _ in range(S)]
    w_states = [rng.standard_normal((T, B, H)) for _ in range(S)]
    outs, d_xs, d_states = run_loop(cell, xs, states, w_states)

    xt = torch.tensor(xs, requires_grad=True)
    st = [torch.tensor(s, requires_grad=True) for s in states]
    hx = tuple(st) if S == 2 else st[0]
    loss = 0
    touts = [[] for _ in range(S)]
    for t in range(T):
        hx = tcell(xt[t], hx)
        for k, s in enumerate(hx if S == 2 else (hx,)):
            touts[k].append(s.detach().numpy())
            loss = loss + (s * torch.tensor(w_states[k][t])).sum()
    loss.backward()
    tol = dict(rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(outs, np.array(touts), **tol)
    np.testing.assert_allclose(d_xs, xt.grad.numpy(), **tol)
    for k in range(S):
        np.testing.assert_allclose(d_states[k], st[k].grad.numpy(), **tol)
    grads = {k: p.grad.numpy() for k, p in tcell.named_parameters()}
    assert grads.keys() == cell.grads.keys()
    for name, g in grads.items():
        np.testing.assert_allclose(cell.grads[name], g, err_msg=name, **tol)
    assert cell.tape_length == 0


@pytest.mark.parametrize("kind", list(CELLS))
def test_finite_differences(backend, kind):
    rng = np.random.default_rng(7)
    T, B, I, H = 3, 2, 3, 3
    cell = make_cell(kind, I, H, backend=backend, dtype=np.float64, seed=2)
    S = n_states(kind)
    xs = rng.standard_normal((T, B, I))
    states = [rng.standard_normal((B, H)) for _ in range(S)]
    w_states = [rng.standard_normal((T, B, H)) for _ in range(S)]

    def loss():
        cell.eval()
        hx = states if S == 2 else states[0]
        total = 0.0
        for t in range(T):
            hx = cell(xs[t], hx)
            total += sum((s * w[t]).sum() for s, w in zip(hx if S == 2 else (hx,), w_states))
        cell.train()
        return total

    cell.zero_grad()
    _, d_xs, d_states = run_loop(cell, xs, states, w_states)
    analytic = {"x": d_xs, **{f"state{k}": d for k, d in enumerate(d_states)},
                **{k: v.copy() for k, v in cell.grads.items()}}
    tensors = {"x": xs, **{f"state{k}": s for k, s in enumerate(states)}, **cell.params}
    eps = 1e-6
    for name, a in tensors.items():
        numeric = np.empty_like(a)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + eps
            plus = loss()
            a[idx] = old - eps
            minus = loss()
            a[idx] = old
            numeric[idx] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(analytic[name], numeric, rtol=1e-5, atol=1e-7,
                                   err_msg=f"{kind} {name}")


@pytest.mark.parametrize("kind", list(CELLS))
def test_step_by_step_equals_whole_sequence(backend, kind):
    """T cell calls and T backward calls equal one layer call and its backward."""
    rng = np.random.default_rng(11)
    T, B, I, H = 5, 3, 4, 6
    cell = make_cell(kind, I, H, backend=backend, dtype=np.float64, seed=3)
    layer = make_layer(kind, I, H, backend=backend, dtype=np.float64)
    layer.load_state_dict({f"{k}_l0": v for k, v in cell.state_dict().items()})
    S = n_states(kind)
    xs = rng.standard_normal((T, B, I))
    states = [rng.standard_normal((B, H)) for _ in range(S)]
    d_out = rng.standard_normal((T, B, H))
    d_last = [rng.standard_normal((B, H)) for _ in range(S)]
    # The cell loop sees d_out[t] on h_t, plus d_last on the final state(s).
    w_states = [d_out.copy()] + [np.zeros((T, B, H))] * (S - 1)
    for k in range(S):
        w_states[k] = w_states[k].copy()
        w_states[k][-1] += d_last[k]
    outs, d_xs, d_states = run_loop(cell, xs, states, w_states)

    out, s_n = layer(xs, tuple(s[None] for s in states) if S == 2 else states[0][None])
    s_n = s_n if S == 2 else (s_n,)
    d_x, d_s0 = layer.backward(d_out, tuple(d[None] for d in d_last) if S == 2
                               else d_last[0][None])
    d_s0 = d_s0 if S == 2 else (d_s0,)
    tol = dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(outs[0], out, **tol)
    for k in range(S):
        np.testing.assert_allclose(outs[k][-1], s_n[k][0], **tol)
        np.testing.assert_allclose(d_states[k], d_s0[k][0], **tol)
    np.testing.assert_allclose(d_xs, d_x, **tol)
    for name, g in cell.grads.items():
        np.testing.assert_allclose(g, layer.grads[f"{name}_l0"], err_msg=name, **tol)


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_unbatched_equals_batch_of_one(backend, kind):
    rng = np.random.default_rng(5)
    I, H = 3, 4
    a = make_cell(kind, I, H, backend=backend, dtype=np.float64, seed=4)
    b = make_cell(kind, I, H, backend=backend, dtype=np.float64, seed=4)
    x = rng.standard_normal(I)
    S = n_states(kind)
    hx = [rng.standard_normal(H) for _ in range(S)]
    ya = a(x, tuple(hx) if S == 2 else hx[0])
    yb = b(x[None], tuple(h[None] for h in hx) if S == 2 else hx[0][None])
    ya, yb = (ya, yb) if S == 2 else ((ya,), (yb,))
    for u, v in zip(ya, yb):
        assert u.shape == (H,)
        np.testing.assert_allclose(u, v[0], rtol=1e-14)
    d = rng.standard_normal(H)
    ra = a.backward(d)
    rb = b.backward(d[None])
    assert ra[0].shape == (I,)
    np.testing.assert_allclose(ra[0], rb[0][0], rtol=1e-14)
    for u, v in zip(ra[1] if S == 2 else (ra[1],), rb[1] if S == 2 else (rb[1],)):
        assert u.shape == (H,)
        np.testing.assert_allclose(u, v[0], rtol=1e-14)
    for name in a.grads:
        np.testing.assert_allclose(a.grads[name], b.grads[name], rtol=1e-14)


def test_zero_state_default_and_float32(backend):
    rng = np.random.default_rng(6)
    cell = fastrnn.LSTMCell(3, 5, backend=backend, seed=0)
    assert cell.dtype == np.float32
    x = rng.standard_normal((2, 3)).astype(np.float32)
    h, c = cell(x)
    h2, c2 = cell(x, (np.zeros((2, 5), np.float32), np.zeros((2, 5), np.float32)))
    assert h.dtype == c.dtype == np.float32
    np.testing.assert_array_equal(h, h2)
    np.testing.assert_array_equal(c, c2)
    cell64 = fastrnn.LSTMCell(3, 5, backend=backend, dtype=np.float64, seed=0)
    h64, _ = cell64(x.astype(np.float64))
    np.testing.assert_allclose(h, h64, rtol=1e-5, atol=1e-6)


def test_tape_order_grads_accumulate_and_modes(backend):
    rng = np.random.default_rng(8)
    cell = fastrnn.GRUCell(3, 4, backend=backend, dtype=np.float64, seed=0)
    x = rng.standard_normal((2, 3))
    buf = x.copy()
    h1 = cell(buf)
    buf[:] = 100.0   # refilling the input buffer must not corrupt the tape
    assert cell.tape_length == 1
    cell.eval()
    cell(x, h1)
    assert cell.tape_length == 1       # eval records nothing
    cell.train()
    d = rng.standard_normal((2, 4))
    d_x, _ = cell.backward(d)
    first = {k: v.copy() for k, v in cell.grads.items()}
    cell(x)
    d_x2, _ = cell.backward(d)
    np.testing.assert_allclose(d_x, d_x2)
    for k in first:
        np.testing.assert_allclose(cell.grads[k], 2 * first[k])
    cell.zero_grad()
    assert all(not g.any() for g in cell.grads.values())
    with pytest.raises(RuntimeError, match="recorded step"):
        cell.backward(d)
    cell(x)
    cell(x)
    cell.clear_tape()
    assert cell.tape_length == 0


def test_bad_input_errors_and_failed_calls_change_nothing():
    cell = fastrnn.LSTMCell(3, 4, dtype=np.float32, seed=0)
    x = np.ones((2, 3), np.float32)
    h, c = cell(x)
    grads = {k: v.copy() for k, v in cell.grads.items()}
    with pytest.raises(TypeError, match="float64.*float32"):
        cell(np.ones((2, 3)))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        cell([[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="x must have shape"):
        cell(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="x must have shape"):
        cell(np.ones((1, 2, 3), np.float32))
    with pytest.raises(ValueError, match="B >= 1"):
        cell(np.ones((0, 3), np.float32))
    with pytest.raises(ValueError, match=r"hx\[1\] must have shape"):
        cell(x, (h, np.ones((3, 4), np.float32)))
    with pytest.raises(ValueError, match="pair"):
        cell(x, h)
    with pytest.raises(TypeError, match=r"hx\[0\] has dtype float64"):
        cell(x, (h.astype(np.float64), c))
    assert cell.tape_length == 1
    with pytest.raises(ValueError, match="d_h must have shape"):
        cell.backward(np.ones((2, 5), np.float32))
    with pytest.raises(TypeError, match="d_c has dtype float64"):
        cell.backward(np.ones((2, 4), np.float32), np.ones((2, 4)))
    assert cell.tape_length == 1
    for k in grads:
        np.testing.assert_array_equal(cell.grads[k], grads[k])
    rnn = fastrnn.RNNCell(3, 4)
    rnn(x)
    with pytest.raises(ValueError, match="d_c is only accepted"):
        rnn.backward(np.ones((2, 4), np.float32), np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="nonlinearity"):
        fastrnn.RNNCell(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="hidden_size"):
        fastrnn.GRUCell(3, 0)
    with pytest.raises(TypeError, match="reset_after"):
        fastrnn.GRUCell(3, 4, reset_after="yes")
    with pytest.raises(TypeError, match="dtype"):
        fastrnn.GRUCell(3, 4, dtype=np.int32)


def test_state_dict_round_trip_and_all_or_nothing():
    cell = fastrnn.GRUCell(3, 4, seed=0)
    sd = cell.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {
        "weight_ih": (12, 3), "weight_hh": (12, 4), "bias_ih": (12,), "bias_hh": (12,)}
    assert list(fastrnn.GRUCell(3, 4, bias=False).state_dict()) == ["weight_ih", "weight_hh"]
    other = fastrnn.GRUCell(3, 4, seed=1)
    before = other.state_dict()
    bad = dict(sd)
    bad["weight_hh"] = np.zeros((12, 5))
    with pytest.raises(ValueError, match="weight_hh"):
        other.load_state_dict(bad)
    with pytest.raises(KeyError, match="bias_hh"):
        other.load_state_dict({k: v for k, v in sd.items() if k != "bias_hh"})
    for k in before:
        np.testing.assert_array_equal(other.params[k], before[k])
    other.load_state_dict(sd)
    for k in sd:
        np.testing.assert_array_equal(other.params[k], sd[k])
    assert "GRUCell(3, 4" in repr(other)
