"""LSTM with projections (proj_size, torch's LSTMP) against torch.nn.LSTM(proj_size=P):
forward, final states and every gradient on random configurations, on every CPU
backend; finite differences; state dicts both ways; bad values."""

import numpy as np
import pytest

import fastrnn
from conftest import random_lengths, torch_or_skip


def run_both(torch, T, B, I, H, P, L, bidirectional, batch_first, bias, lengths, backend, dtype,
             seed):
    rng = np.random.default_rng(seed)
    D = 2 if bidirectional else 1
    m = fastrnn.LSTM(I, H, L, proj_size=P, bidirectional=bidirectional,
                     batch_first=batch_first, bias=bias, backend=backend, dtype=dtype, seed=seed)
    t = torch.nn.LSTM(I, H, L, proj_size=P, bidirectional=bidirectional,
                      batch_first=batch_first, bias=bias).double()
    t.load_state_dict({k: torch.from_numpy(v.astype(np.float64))
                       for k, v in m.state_dict().items()})
    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I))
    h0, c0 = rng.standard_normal((L * D, B, P)), rng.standard_normal((L * D, B, H))
    w_out = rng.standard_normal((B, T, D * P) if batch_first else (T, B, D * P))
    w_h, w_c = rng.standard_normal((L * D, B, P)), rng.standard_normal((L * D, B, H))

    out, (h_n, c_n) = m(x.astype(dtype), (h0.astype(dtype), c0.astype(dtype)), lengths)
    d_x, (d_h0, d_c0) = m.backward(w_out.astype(dtype), (w_h.astype(dtype), w_c.astype(dtype)))
    ours = {"out": out, "h_n": h_n, "c_n": c_n, "x": d_x, "h0": d_h0, "c0": d_c0, **m.grads}

    xt = torch.tensor(x, requires_grad=True)
    ht, ct = torch.tensor(h0, requires_grad=True), torch.tensor(c0, requires_grad=True)
    inp = xt if lengths is None else torch.nn.utils.rnn.pack_padded_sequence(
        xt, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
    o, (hn, cn) = t(inp, (ht, ct))
    if lengths is not None:
        o, _ = torch.nn.utils.rnn.pad_packed_sequence(o, batch_first=batch_first, total_length=T)
    ((o * torch.tensor(w_out)).sum() + (hn * torch.tensor(w_h)).sum()
     + (cn * torch.tensor(w_c)).sum()).backward()
    theirs = {"out": o.detach().numpy(), "h_n": hn.detach().numpy(), "c_n": cn.detach().numpy(),
              "x": xt.grad.numpy(), "h0": ht.grad.numpy(), "c0": ct.grad.numpy(),
              **{k: p.grad.numpy() for k, p in t.named_parameters()}}
    return ours, theirs


@pytest.mark.parametrize("case", range(10))
def test_matches_torch_float64(backend, case):
    torch = torch_or_skip()
    rng = np.random.default_rng(700 + case)
    T, B, I = (int(v) for v in rng.integers(1, 7, size=3))
    H = int(rng.integers(2, 8))
    P = int(rng.integers(1, H))
    L, bidirectional, batch_first, bias = (int(rng.integers(1, 4)), bool(rng.integers(2)),
                                           bool(rng.integers(2)), bool(case % 4))
    lengths = random_lengths(rng, T, B, allow_zero=False) if case % 3 else None
    ours, theirs = run_both(torch, T, B, I, H, P, L, bidirectional, batch_first, bias, lengths,
                            backend, np.float64, case)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-9, atol=1e-11,
                                   err_msg=name)


def test_matches_torch_float32(backend):
    torch = torch_or_skip()
    ours, theirs = run_both(torch, 12, 5, 8, 16, 6, 2, True, False, True,
                            np.array([9, 4, 12, 1, 7]), backend, np.float32, 5)
    for name in ours:
        assert ours[name].dtype == np.float32
        scale = max(np.abs(theirs[name]).max(), 1.0)
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=2e-5 * scale,
                                   err_msg=name)


def test_gradcheck(backend):
    m = fastrnn.LSTM(3, 5, 2, proj_size=2, bidirectional=True, backend=backend,
                     dtype=np.float64, seed=0)
    rng = np.random.default_rng(1)
    hx = (rng.standard_normal((4, 3, 2)), rng.standard_normal((4, 3, 5)))
    report = fastrnn.gradcheck(m, rng.standard_normal((5, 3, 3)), hx, lengths=[5, 2, 3],
                               max_elements=10)
    assert report.passed, str(report)
    assert {"weight_hr_l0", "weight_hr_l1_reverse"} <= set(report.errors)
    assert report.errors["weight_hr_l1_reverse"].max_numeric > 1e-4


def test_unbatched_and_chunked_inference(backend):
    m = fastrnn.LSTM(4, 8, proj_size=3, backend=backend, dtype=np.float64, seed=2).eval()
    x = np.random.default_rng(3).standard_normal((30, 2, 4))
    out, (h, c) = m(x)
    assert out.shape == (30, 2, 3) and h.shape == (1, 2, 3) and c.shape == (1, 2, 8)
    m.eval_chunk = 7
    out2, (h2, c2) = m(x)
    np.testing.assert_allclose(out2, out, rtol=1e-12, atol=1e-13)
    u, (hu, cu) = m(x[:, 1])
    np.testing.assert_allclose(u, out[:, 1], rtol=1e-12, atol=1e-13)
    assert hu.shape == (1, 3) and cu.shape == (1, 8)


def test_bad_values():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="proj_size"):
            fastrnn.LSTM(3, 4, proj_size=bad)
    for bad in (4, 5):
        with pytest.raises(ValueError, match="smaller than hidden_size"):
            fastrnn.LSTM(3, 4, proj_size=bad)
    m = fastrnn.LSTM(3, 4, proj_size=2)
    with pytest.raises(ValueError, match=r"hx\[0\] must have shape \(1, 3, 2\)"):
        m(np.zeros((5, 3, 3), np.float32), (np.zeros((1, 3, 4), np.float32),
                                            np.zeros((1, 3, 4), np.float32)))
    assert "proj_size=2" in repr(m)
