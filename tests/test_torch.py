"""fastrnn against torch.nn.RNN/LSTM/GRU: forward, final states and every gradient."""

import numpy as np
import pytest

from conftest import TORCH_KINDS, make_layer, n_states, random_lengths, torch_class, torch_or_skip


def torch_layer(torch, kind, I, H, **kwargs):
    cls, extra = torch_class(torch, kind)
    return cls(I, H, **extra, **kwargs)


def run_both(torch, kind, T, B, I, H, L, bidirectional, batch_first, bias, lengths, backend,
             dtype, seed):
    rng = np.random.default_rng(seed)
    D = 2 if bidirectional else 1
    m = make_layer(kind, I, H, num_layers=L, bidirectional=bidirectional,
                   batch_first=batch_first, bias=bias, backend=backend, dtype=dtype, seed=seed)
    t = torch_layer(torch, kind, I, H, num_layers=L, bidirectional=bidirectional,
                    batch_first=batch_first, bias=bias).double()
    t.load_state_dict({k: torch.from_numpy(v.astype(np.float64)) for k, v in
                       m.state_dict().items()})
    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I))
    states = [rng.standard_normal((L * D, B, H)) for _ in range(n_states(kind))]
    w_out = rng.standard_normal((B, T, D * H) if batch_first else (T, B, D * H))
    w_states = [rng.standard_normal((L * D, B, H)) for _ in states]

    # fastrnn
    hx = tuple(s.astype(dtype) for s in states)
    out, s_n = m(x.astype(dtype), hx if kind == "lstm" else hx[0], lengths)
    s_n = s_n if kind == "lstm" else (s_n,)
    d_w = tuple(w.astype(dtype) for w in w_states)
    d_x, d_hx = m.backward(w_out.astype(dtype), d_w if kind == "lstm" else d_w[0])
    d_hx = d_hx if kind == "lstm" else (d_hx,)
    ours = {"out": out, "x": d_x, **{f"h_n{i}": s for i, s in enumerate(s_n)},
            **{f"hx{i}": g for i, g in enumerate(d_hx)}, **m.grads}

    # torch, the same computation through pack_padded_sequence
    xt = torch.tensor(x, requires_grad=True)
    st = [torch.tensor(s, requires_grad=True) for s in states]
    inp = xt
    if lengths is not None:
        inp = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.tensor(lengths),
                                                      batch_first=batch_first,
                                                      enforce_sorted=False)
    o, sn = t(inp, tuple(st) if kind == "lstm" else st[0])
    if lengths is not None:
        o, _ = torch.nn.utils.rnn.pad_packed_sequence(o, batch_first=batch_first,
                                                      total_length=T)
    sn = sn if kind == "lstm" else (sn,)
    loss = (o * torch.tensor(w_out)).sum() + sum((a * torch.tensor(w)).sum()
                                                  for a, w in zip(sn, w_states))
    loss.backward()
    theirs = {"out": o.detach().numpy(), "x": xt.grad.numpy(),
              **{f"h_n{i}": s.detach().numpy() for i, s in enumerate(sn)},
              **{f"hx{i}": s.grad.numpy() for i, s in enumerate(st)},
              **{k: p.grad.numpy() for k, p in t.named_parameters()}}
    return ours, theirs


@pytest.mark.parametrize("case", range(24))
def test_matches_torch_float64(backend, case):
    torch = torch_or_skip()
    rng = np.random.default_rng(1000 + case)
    kind = TORCH_KINDS[case % 4]
    T, B, I, H = (int(v) for v in rng.integers(1, 7, size=4))
    L, bidirectional, batch_first, bias = (int(rng.integers(1, 4)), bool(rng.integers(2)),
                                           bool(rng.integers(2)), bool(case % 5))
    lengths = random_lengths(rng, T, B, allow_zero=False) if case % 3 else None
    ours, theirs = run_both(torch, kind, T, B, I, H, L, bidirectional, batch_first, bias,
                            lengths, backend, np.float64, seed=case)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-9, atol=1e-11,
                                   err_msg=f"{kind} {name}")


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_matches_torch_float32(backend, kind):
    torch = torch_or_skip()
    lengths = np.array([9, 4, 12, 1, 7])
    ours, theirs = run_both(torch, kind, 12, 5, 8, 16, 2, True, False, True, lengths, backend,
                            np.float32, seed=5)
    for name in ours:
        assert ours[name].dtype == np.float32
        scale = max(np.abs(theirs[name]).max(), 1.0)
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=2e-5 * scale,
                                   err_msg=f"{kind} {name}")
