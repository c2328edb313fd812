"""fastrnn.from_torch / interop.to_torch and fastrnn.torch, against torch.nn (the oracle)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastrnn
from conftest import random_lengths, torch_or_skip

KINDS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]


def torch_cls(torch, kind, cell=False):
    name = {"lstm": "LSTM", "gru": "GRU"}.get(kind, "RNN") + ("Cell" if cell else "")
    extra = {"nonlinearity": kind[4:]} if kind.startswith("rnn") else {}
    return getattr(torch.nn, name), extra


def fused_cls(kind):
    import fastrnn.torch as ft
    extra = {"nonlinearity": kind[4:]} if kind.startswith("rnn") else {}
    return {"lstm": ft.LSTM, "gru": ft.GRU}.get(kind, ft.RNN), extra


def test_import_fastrnn_imports_no_framework():
    code = ("import fastrnn, fastrnn.interop, sys; "
            "bad = {'torch', 'onnx', 'keras', 'jax', 'onnxruntime'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


def configs(seed, n):
    """n random configurations (kind, num_layers, bidirectional, bias, batch_first, lengths?)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield (KINDS[i % 4], int(rng.integers(1, 3)), bool(rng.integers(2)),
               bool(rng.integers(2)), bool(rng.integers(2)), bool(rng.integers(2)))


def torch_run(torch, t, x, hx, lengths, w_out, batch_first, T):
    """torch's out, states and gradients of sum(out * w_out) (+ sum of the states)."""
    xt = torch.tensor(x, requires_grad=True)
    hs = [torch.tensor(h, requires_grad=True) for h in hx]
    inp = xt if lengths is None else torch.nn.utils.rnn.pack_padded_sequence(
        xt, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
    o, sn = t(inp, tuple(hs) if len(hs) == 2 else hs[0])
    if lengths is not None:
        o, _ = torch.nn.utils.rnn.pad_packed_sequence(o, batch_first=batch_first, total_length=T)
    sn = sn if isinstance(sn, tuple) else (sn,)
    ((o * torch.tensor(w_out)).sum() + sum(s.sum() for s in sn)).backward()
    grads = {k: p.grad.numpy() for k, p in t.named_parameters()}
    return o.detach().numpy(), [s.detach().numpy() for s in sn], xt.grad.numpy(), \
        [h.grad.numpy() for h in hs], grads


@pytest.mark.parametrize("case", list(configs(1, 8)))
def test_from_torch_matches_torch(backend, case):
    torch = torch_or_skip()
    kind, L, bidi, bias, batch_first, with_lengths = case
    rng = np.random.default_rng(hash(case) % 2**32)
    T, B, I, H = 5, 3, 4, 3
    cls, extra = torch_cls(torch, kind)
    torch.manual_seed(0)
    t = cls(I, H, L, **extra, bias=bias, batch_first=batch_first, bidirectional=bidi).double()
    m = fastrnn.from_torch(t, backend=backend)
    assert (m.num_layers, m.bidirectional, m.bias, m.batch_first, m.dtype) == \
        (L, bidi, bias, batch_first, np.float64)
    D, S = 2 if bidi else 1, 2 if kind == "lstm" else 1
    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I))
    hx = [rng.standard_normal((L * D, B, H)) for _ in range(S)]
    lengths = random_lengths(rng, T, B, allow_zero=False) if with_lengths else None
    w_out = rng.standard_normal(x.shape[:2] + (D * H,))
    o, sn, d_x, d_hx, grads = torch_run(torch, t, x, hx, lengths, w_out, batch_first, T)

    out, s_n = m(x, tuple(hx) if S == 2 else hx[0], lengths=lengths)
    s_n = s_n if S == 2 else (s_n,)
    ones = tuple(np.ones_like(s) for s in s_n)
    dx, dhx = m.backward(w_out, ones if S == 2 else ones[0])
    dhx = dhx if S == 2 else (dhx,)
    tol = {"rtol": 1e-9, "atol": 1e-11}
    np.testing.assert_allclose(out, o, **tol)
    for a, b in zip(s_n, sn):
        np.testing.assert_allclose(a, b, **tol)
    np.testing.assert_allclose(dx, d_x, **tol)
    for a, b in zip(dhx, d_hx):
        np.testing.assert_allclose(a, b, **tol)
    assert set(m.grads) == set(grads)
    for k, g in grads.items():
        np.testing.assert_allclose(m.grads[k], g, err_msg=k, **tol)


@pytest.mark.parametrize("kind", KINDS)
def test_from_torch_cells(backend, kind):
    torch = torch_or_skip()
    rng = np.random.default_rng(7)
    cls, extra = torch_cls(torch, kind, cell=True)
    torch.manual_seed(1)
    t = cls(4, 3, **extra).double()
    cell = fastrnn.from_torch(t, backend=backend)
    assert type(cell).__name__ == cls.__name__ and cell.dtype == np.float64
    x = rng.standard_normal((2, 4))
    hs = [rng.standard_normal((2, 3)) for _ in range(2 if kind == "lstm" else 1)]
    xt = torch.tensor(x, requires_grad=True)
    st = t(xt, tuple(torch.tensor(h) for h in hs) if kind == "lstm" else torch.tensor(hs[0]))
    st = st if isinstance(st, tuple) else (st,)
    st[0].sum().backward()
    ours = cell(x, tuple(hs) if kind == "lstm" else hs[0])
    ours = ours if isinstance(ours, tuple) else (ours,)
    for a, b in zip(ours, st):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-10, atol=1e-12)
    d_x, _ = cell.backward(np.ones((2, 3)))
    np.testing.assert_allclose(d_x, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    for k, p in t.named_parameters():
        np.testing.assert_allclose(cell.grads[k], p.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_torch_fastrnn_torch(kind):
    torch = torch_or_skip()
    cls, extra = torch_cls(torch, kind)
    torch.manual_seed(2)
    t = cls(3, 4, 2, **extra, bidirectional=True, batch_first=True)
    back = fastrnn.interop.to_torch(fastrnn.from_torch(t))
    assert type(back) is cls and back.batch_first and back.bidirectional
    assert back.weight_ih_l0.dtype == torch.float32
    for k, v in t.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(2, 5, 3)
    np.testing.assert_array_equal(back(x)[0].detach().numpy(), t(x)[0].detach().numpy())
    cell_cls, cell_extra = torch_cls(torch, kind, cell=True)
    c = cell_cls(3, 4, **cell_extra, bias=False)
    back = fastrnn.interop.to_torch(fastrnn.from_torch(c))
    assert type(back) is cell_cls and back.bias is False
    for k, v in c.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_from_torch_rejections_name_the_option():
    torch = torch_or_skip()
    cases = [(torch.nn.RNN(3, 4).half(), TypeError, "float16"),
             (torch.nn.Linear(3, 4), TypeError, "Linear")]
    for module, exc, word in cases:
        before = {k: v.clone() for k, v in module.state_dict().items()}
        with pytest.raises(exc, match=word):
            fastrnn.from_torch(module)
        for k, v in module.state_dict().items():
            assert torch.equal(v, before[k])
    # dropout carries over; ignore_dropout=True drops it, exact at inference.
    t = torch.nn.GRU(3, 4, 2, dropout=0.5).eval()
    assert fastrnn.from_torch(t).dropout == 0.5
    assert fastrnn.interop.to_torch(fastrnn.from_torch(t)).dropout == 0.5
    m = fastrnn.from_torch(t, ignore_dropout=True).eval()
    assert m.dropout == 0.0
    x = np.random.default_rng(3).standard_normal((4, 2, 3)).astype(np.float32)
    np.testing.assert_allclose(m(x)[0], t(torch.from_numpy(x))[0].detach().numpy(),
                               rtol=1e-5, atol=1e-6)


def test_to_torch_rejections_name_the_option():
    torch_or_skip()
    for layer, word in [(fastrnn.LSTM(3, 4, reverse=True), "reverse"),
                        (fastrnn.GRU(3, 4, reset_after=False), "reset_after"),
                        (fastrnn.GRUCell(3, 4, reset_after=False), "reset_after"),
                        (fastrnn.LSTMCell(3, 4), "fused")]:
        before = layer.state_dict()
        with pytest.raises(ValueError, match=word):
            fastrnn.interop.to_torch(layer, fused=word == "fused")
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(v, before[k])
    with pytest.raises(TypeError, match="Linear"):
        fastrnn.interop.to_torch(fastrnn.Linear(3, 4))
    layer = fastrnn.GRU(3, 4, reset_after=False, batch_first=True, seed=2)
    gru = fastrnn.interop.to_torch(layer, fused=True)
    assert gru.reset_after is False and gru.batch_first
    x = np.random.default_rng(1).standard_normal((2, 5, 3)).astype(np.float32)
    import torch
    np.testing.assert_allclose(gru(torch.from_numpy(x))[0].detach().numpy(), layer(x)[0],
                               rtol=1e-6, atol=1e-7)
    back = fastrnn.from_torch(gru)                   # a fastrnn.torch module is a torch.nn.GRU
    assert back.reset_after is False
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(back.params[k], v)


# ------------------------------------------------------------------ fastrnn.torch


@pytest.mark.parametrize("kind", KINDS)
def test_fused_gradcheck_float64(kind):
    """On the default backend: both backends run under torch in the next test."""
    torch = torch_or_skip()
    cls, extra = fused_cls(kind)
    torch.manual_seed(3)
    m = cls(3, 2, 2, **extra, bidirectional=True).double()
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    S = 2 if kind == "lstm" else 1
    hx = [torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True) for _ in range(S)]
    lengths = np.array([4, 1, 3])
    params = list(m.parameters())

    def f(x, *rest):
        out, s_n = m(x, tuple(rest[:S]) if S == 2 else rest[0], lengths=lengths)
        s_n = s_n if S == 2 else (s_n,)
        return (out,) + tuple(s_n)

    assert torch.autograd.gradcheck(f, (x, *hx, *params), eps=1e-6, atol=1e-7)


def test_fused_gru_reset_before_gradcheck():
    torch = torch_or_skip()
    import fastrnn.torch as ft
    m = ft.GRU(3, 2, reset_after=False).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: m(x)[0], (x, *m.parameters()))
    assert "reset_after=False" in repr(m)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_matches_torch_nn_float32(backend, kind):
    torch = torch_or_skip()
    cls, extra = fused_cls(kind)
    ref_cls, _ = torch_cls(torch, kind)
    torch.manual_seed(4)
    m = cls(5, 6, 2, **extra, bidirectional=True, batch_first=True, backend=backend)
    ref = ref_cls(5, 6, 2, **extra, bidirectional=True, batch_first=True)
    ref.load_state_dict(m.state_dict())        # torch names both ways
    m.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 5)
    lengths = torch.tensor([7, 2, 5])
    outs, grads = [], []
    for mod in (m, ref):
        xi = x.clone().requires_grad_()
        packed = torch.nn.utils.rnn.pack_padded_sequence(xi, lengths, batch_first=True,
                                                         enforce_sorted=False)
        o, s_n = mod(packed)
        assert isinstance(o, torch.nn.utils.rnn.PackedSequence)
        o, _ = torch.nn.utils.rnn.pad_packed_sequence(o, batch_first=True)
        h = s_n[0] if kind == "lstm" else s_n
        (o.square().sum() + h.sum()).backward()
        outs.append((o.detach(), h.detach()))
        grads.append([xi.grad] + [p.grad for p in mod.parameters()])
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # lengths= equals packing (with padded outputs 0); unbatched equals a batch of one.
    with torch.no_grad():
        full = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([7, 7, 7]),
                                                       batch_first=True)
        torch.testing.assert_close(m(full)[0].data, ref(full)[0].data, rtol=1e-4, atol=1e-5)
        o_l, _ = m(x, lengths=lengths)
        o_p, _ = ref(torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                             enforce_sorted=False))
        o_p, _ = torch.nn.utils.rnn.pad_packed_sequence(o_p, batch_first=True, total_length=7)
        torch.testing.assert_close(o_l, o_p, rtol=1e-4, atol=1e-5)
        m.batch_first = ref.batch_first = False
        torch.testing.assert_close(m(x[0])[0], ref(x[0])[0], rtol=1e-4, atol=1e-5)


def test_fused_in_place_modification_is_detected():
    torch = torch_or_skip()
    import fastrnn.torch as ft
    m = ft.LSTM(3, 2)
    x = torch.randn(4, 2, 3, requires_grad=True)
    out, _ = m(x)
    with torch.no_grad():
        m.weight_hh_l0.mul_(2)      # the kernels' cache holds a view of this weight
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("kind", KINDS)
def test_fused_outputs_may_be_modified_in_place(kind):
    """The outputs are not in the kernels' cache: in-place changes keep gradients right."""
    torch = torch_or_skip()
    cls, extra = fused_cls(kind)
    ref_cls, _ = torch_cls(torch, kind)
    m = cls(3, 2, 2, **extra).double()
    ref = ref_cls(3, 2, 2, **extra).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    grads = []
    for mod in (m, ref):
        xi = x.clone().requires_grad_()
        out, _ = mod(xi)
        with torch.no_grad():
            expected = out.clone() * 3
        out.mul_(3)
        torch.testing.assert_close(out.detach(), expected)
        if mod is ref and kind == "lstm":
            break          # torch's own LSTM refuses this (it saves its output)
        out.square().sum().backward()
        grads.append(xi.grad)
    if kind != "lstm":
        torch.testing.assert_close(grads[0], grads[1])
    else:   # the same loss through torch.nn.LSTM without the in-place change
        xi = x.clone().requires_grad_()
        (ref(xi)[0] * 3).square().sum().backward()
        torch.testing.assert_close(grads[0], xi.grad)


def test_fused_rejections_name_the_argument():
    torch = torch_or_skip()
    import fastrnn.torch as ft
    for make, exc, word in [(lambda: ft.GRU(3, 4, 2, dropout=0.1), ValueError, "dropout"),
                            (lambda: ft.LSTM(3, 4, proj_size=2), ValueError, "proj_size"),
                            (lambda: ft.RNN(3, 4, backend="cuda"), (ValueError, RuntimeError),
                             "backend|cuda"),
                            (lambda: ft.RNN(3, 4, backend="nope"), ValueError, "backend"),
                            (lambda: ft.GRU(3, 4, reset_after=1), TypeError, "reset_after")]:
        with pytest.raises(exc, match=word):
            make()
    m = ft.LSTM(3, 4, 2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(5, 2, 3)
    h = torch.zeros(2, 2, 4)
    bad_calls = [((x.double(),), {}, TypeError, "dtype"),
                 ((torch.randn(5, 2, 7),), {}, ValueError, "input_size"),
                 ((torch.randn(5),), {}, ValueError, "dimensions"),
                 ((x, h), {}, ValueError, "pair"),
                 ((x, (h[:1], h)), {}, ValueError, r"hx\[0\]"),
                 ((x, (h, h.double())), {}, TypeError, r"hx\[1\]"),
                 ((x,), {"lengths": [5, 6]}, ValueError, "lengths"),
                 ((x,), {"lengths": [5.0, 2.0]}, TypeError, "lengths"),
                 ((x,), {"lengths": [5]}, ValueError, "lengths"),
                 ((x.numpy(),), {}, TypeError, "input")]
    for args, kwargs, exc, word in bad_calls:
        with pytest.raises(exc, match=word):
            m(*args, **kwargs)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="lengths"):
        m(packed, lengths=[5, 3])
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    m.dropout = 0.5
    with pytest.raises(ValueError, match="dropout"):
        m(x)


def test_fused_inference_under_no_grad_keeps_no_graph():
    torch = torch_or_skip()
    import fastrnn.torch as ft
    m = ft.GRU(3, 4)
    ref = torch.nn.GRU(3, 4)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(6, 2, 3)
    with torch.no_grad():
        out, h = m(x)
    assert out.grad_fn is None
    torch.testing.assert_close(out, ref(x)[0].detach(), rtol=1e-4, atol=1e-5)
    out, _ = m(x)                           # parameters require grad: a graph
    assert out.grad_fn is not None


def test_from_torch_lstm_with_projections_round_trip():
    torch = torch_or_skip()
    t = torch.nn.LSTM(3, 6, 2, proj_size=2, bidirectional=True).double()
    m = fastrnn.from_torch(t)
    assert m.proj_size == 2 and m.dtype == np.float64
    x = np.random.default_rng(4).standard_normal((5, 2, 3))
    out, (h, c) = m.eval()(x)
    to, (th, tc) = t(torch.from_numpy(x))
    np.testing.assert_allclose(out, to.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h, th.detach().numpy(), rtol=1e-10, atol=1e-12)
    back = fastrnn.interop.to_torch(m)
    assert back.proj_size == 2
    for k, v in t.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
