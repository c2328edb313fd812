"""The training toolkit against torch: Linear, Embedding, cross_entropy, optimizers, clipping,
truncated BPTT and gradient_flow."""

import math

import numpy as np
import pytest

import fastrnn
from fastrnn import losses, optim
from fastrnn.diagnostics import gradient_flow
from fastrnn.tbptt import chunks

from conftest import make_layer, torch_or_skip


def t64(torch, a):
    return torch.tensor(np.asarray(a, dtype=np.float64))


# ------------------------------------------------------------ Linear, Embedding

@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(backend, bias):
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    lin = fastrnn.Linear(5, 3, bias=bias, backend=backend, dtype=np.float64, seed=1)
    ref = torch.nn.Linear(5, 3, bias=bias).double()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in lin.state_dict().items()})
    x = rng.standard_normal((4, 2, 5))
    w = rng.standard_normal((4, 2, 3))
    y = lin(x)
    d_x = lin.backward(w)
    xt = torch.tensor(x, requires_grad=True)
    yt = ref(xt)
    (yt * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d_x, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    for name, p in ref.named_parameters():
        np.testing.assert_allclose(lin.grads[name], p.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_linear_init_range_grads_accumulate_and_errors(backend):
    lin = fastrnn.Linear(16, 4, backend=backend, seed=0)
    assert lin.params["weight"].shape == (4, 16) and lin.params["bias"].shape == (4,)
    assert np.abs(lin.params["weight"]).max() <= 0.25 and lin.params["weight"].dtype == np.float32
    x = np.ones((3, 16), np.float32)
    for _ in range(2):
        lin(x)
        lin.backward(np.ones((3, 4), np.float32))
    np.testing.assert_allclose(lin.grads["bias"], 6.0)
    with pytest.raises(RuntimeError, match="pending"):
        lin.backward(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="in_features=16"):
        lin(np.ones((3, 5), np.float32))
    lin.eval()
    lin(x)
    with pytest.raises(RuntimeError):
        lin.backward(np.ones((3, 4), np.float32))
    lin.zero_grad()
    assert not lin.grads["bias"].any()
    before = lin.state_dict()
    with pytest.raises(KeyError, match="missing"):
        lin.load_state_dict({"weight": before["weight"]})
    lin.load_state_dict({k: v * 2 for k, v in before.items()})
    np.testing.assert_allclose(lin.params["weight"], before["weight"] * 2)
    twin = lin.copy(dtype=np.float64)
    assert twin.params["weight"].dtype == np.float64 and lin.params["weight"].dtype == np.float32
    np.testing.assert_allclose(twin(x.astype(np.float64)), lin(x), rtol=1e-5, atol=1e-5)


def test_embedding_matches_torch(backend):
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    emb = fastrnn.Embedding(7, 3, padding_idx=2, backend=backend, dtype=np.float64, seed=0)
    assert not emb.params["weight"][2].any()
    ref = torch.nn.Embedding(7, 3, padding_idx=2).double()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in emb.state_dict().items()})
    idx = np.array([[1, 2, 1], [6, 0, 1]])
    w = rng.standard_normal((2, 3, 3))
    y = emb(idx)
    assert emb.backward(w) is None
    yt = ref(torch.tensor(idx))
    (yt * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(y, yt.detach().numpy())
    np.testing.assert_allclose(emb.grads["weight"], ref.weight.grad.numpy(), atol=1e-12)
    with pytest.raises(IndexError):
        emb(np.array([7]))


# ---------------------------------------------------------------- cross-entropy

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_matches_torch(dtype):
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 4, 6)) * 30).astype(dtype)   # large: needs stability
    targets = rng.integers(0, 6, (3, 4))
    targets[0, 1] = targets[2, 3] = -100
    loss, d = losses.cross_entropy(logits, targets)
    zt = t64(torch, logits).requires_grad_()
    ref = torch.nn.functional.cross_entropy(zt.reshape(-1, 6), torch.tensor(targets).reshape(-1))
    ref.backward()
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert d.dtype == dtype and d.shape == logits.shape
    assert math.isfinite(loss)
    np.testing.assert_allclose(loss, ref.item(), rtol=tol)
    np.testing.assert_allclose(d, zt.grad.numpy(), rtol=tol, atol=tol)
    targets[targets == -100] = 0
    s, d_s = losses.cross_entropy(logits, targets, ignore_index=3, reduction="sum")
    ref_s = torch.nn.functional.cross_entropy(t64(torch, logits).reshape(-1, 6),
                                              torch.tensor(targets).reshape(-1),
                                              ignore_index=3, reduction="sum")
    np.testing.assert_allclose(s, ref_s.item(), rtol=tol)


def test_cross_entropy_all_ignored_and_errors():
    loss, d = losses.cross_entropy(np.zeros((2, 3)), np.full(2, -100))
    assert math.isnan(loss) and not d.any()
    with pytest.raises(ValueError, match="shape"):
        losses.cross_entropy(np.zeros((2, 3)), np.zeros(3, int))
    with pytest.raises(IndexError):
        losses.cross_entropy(np.zeros((2, 3)), np.array([0, 3]))


def test_mse_loss_matches_torch():
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    p, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    loss, d = losses.mse_loss(p, y)
    pt = torch.tensor(p, requires_grad=True)
    ref = torch.nn.functional.mse_loss(pt, torch.tensor(y))
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-12)
    np.testing.assert_allclose(d, pt.grad.numpy(), rtol=1e-12)


# ----------------------------------------------------------------- optimizers

class _Params:
    """The smallest thing an optimizer accepts: params and grads dicts."""

    def __init__(self, rng):
        self.params = {"a": rng.standard_normal((3, 2)), "b": rng.standard_normal(4)}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}


OPTIMIZERS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.3)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
]


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS)
def test_optimizer_matches_torch_over_steps(name, kwargs):
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    models = [_Params(rng), _Params(rng)]
    tensors = [torch.tensor(p, requires_grad=True) for m in models for p in m.params.values()]
    ours = getattr(optim, name)(models, **kwargs)
    theirs = getattr(torch.optim, name)(tensors, **kwargs)
    for _ in range(5):
        grads = [rng.standard_normal(t.shape) for t in tensors]
        pairs = [(mod, k) for mod in models for k in mod.params]
        for (mod, k), g in zip(pairs, grads):
            mod.grads[k][...] = g
        for t, g in zip(tensors, grads):
            t.grad = torch.tensor(g)
        ours.step()
        theirs.step()
        for (mod, k), t in zip(pairs, tensors):
            np.testing.assert_allclose(mod.params[k], t.detach().numpy(), rtol=1e-12,
                                       atol=1e-12)
    ours.zero_grad()
    assert not any(g.any() for m in models for g in m.grads.values())


def test_optimizer_updates_a_layer_in_place_and_follows_load_state_dict(backend):
    lstm = fastrnn.LSTM(2, 3, backend=backend, seed=0)
    opt = optim.SGD([lstm], lr=1.0)
    w = lstm.params["weight_hh_l0"]
    lstm.grads["weight_hh_l0"][...] = 1
    opt.step()
    assert lstm.params["weight_hh_l0"] is w
    lstm.load_state_dict({k: np.zeros_like(v) for k, v in lstm.params.items()})
    opt.step()   # reads the new arrays
    np.testing.assert_allclose(lstm.params["weight_hh_l0"], -1)
    with pytest.raises(TypeError, match="models\\[1\\]"):
        optim.Adam([lstm, object()])


# ------------------------------------------------------------------- clipping

@pytest.mark.parametrize("norm_type,max_norm", [(2.0, 1.0), (1.0, 0.5), (math.inf, 0.3),
                                                (2.0, 1e3)])
def test_clip_grad_norm_matches_torch(norm_type, max_norm):
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    grads = [{"a": rng.standard_normal((3, 2)), "b": rng.standard_normal(4)},
             {"c": rng.standard_normal(5)}]
    tensors = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True)
               for d in grads for g in d.values()]
    for t, g in zip(tensors, [g for d in grads for g in d.values()]):
        t.grad = torch.tensor(g)
    total = fastrnn.clip_grad_norm_(grads, max_norm, norm_type)
    ref = torch.nn.utils.clip_grad_norm_(tensors, max_norm, norm_type)
    np.testing.assert_allclose(total, ref.item(), rtol=1e-12)
    for t, g in zip(tensors, [g for d in grads for g in d.values()]):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-12)


def test_clip_on_models_and_values(backend):
    gru = fastrnn.GRU(2, 3, backend=backend, seed=0)
    gru.grads["weight_ih_l0"][...] = 10
    total = fastrnn.clip_grad_norm_(gru, 1.0)
    assert total == pytest.approx(10 * math.sqrt(9 * 2), rel=1e-6)
    assert fastrnn.clip_grad_norm_([gru], 1.0) == pytest.approx(1.0, rel=1e-5)
    fastrnn.clip_grad_value_([gru], 0.01)
    assert np.abs(gru.grads["weight_ih_l0"]).max() == pytest.approx(0.01)
    gru.grads["bias_hh_l0"][0] = np.nan
    with pytest.raises(RuntimeError, match="nan"):
        fastrnn.clip_grad_norm_(gru, 1.0, error_if_nonfinite=True)


# --------------------------------------------------------------- truncated BPTT

def test_chunks():
    x, y = np.arange(10).reshape(10, 1), np.arange(10)
    assert [len(a) for a, _ in chunks(x, y, size=4)] == [4, 4, 2]
    assert [len(a) for a in chunks(x, size=4, drop_last=True)] == [4, 4]
    z = np.zeros((2, 7, 3))
    assert [a.shape[1] for a in chunks(z, size=3, axis=1)] == [3, 3, 1]
    with pytest.raises(ValueError, match="arrays\\[1\\]"):
        next(chunks(x, y[:5], size=2))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_truncated_bptt_matches_torch_detach_loop(backend, kind):
    """Chunks of an LSTM/GRU + Linear head + cross-entropy, an SGD step per chunk, against
    the same loop in torch with h.detach() between chunks."""
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    T, B, I, H, C, size = 11, 3, 4, 5, 6, 4
    rnn = make_layer(kind, I, H, backend=backend, dtype=np.float64, seed=0)
    head = fastrnn.Linear(H, C, backend=backend, dtype=np.float64, seed=1)
    x = rng.standard_normal((T, B, I))
    y = rng.integers(0, C, (T, B))
    opt = optim.SGD([rnn, head], lr=0.5, momentum=0.9)

    def loss_fn(out, steps):
        loss, d_logits = losses.cross_entropy(head(out), y[steps])
        return loss, head.backward(d_logits)

    def after_chunk(index):
        opt.step()
        opt.zero_grad()

    our_losses, state = fastrnn.truncated_bptt(rnn, x, size, loss_fn, after_chunk=after_chunk)

    t_rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](I, H).double()
    t_head = torch.nn.Linear(H, C).double()
    t_rnn.load_state_dict({k: torch.from_numpy(v) for k, v in
                           make_layer(kind, I, H, dtype=np.float64, seed=0).state_dict().items()})
    t_head.load_state_dict({k: torch.from_numpy(v) for k, v in
                            fastrnn.Linear(H, C, dtype=np.float64, seed=1).state_dict().items()})
    t_opt = torch.optim.SGD([*t_rnn.parameters(), *t_head.parameters()], lr=0.5, momentum=0.9)
    h, their_losses = None, []
    for start in range(0, T, size):
        if h is not None:
            h = tuple(s.detach() for s in h) if kind == "lstm" else h.detach()
        out, h = t_rnn(torch.tensor(x[start:start + size]), h)
        loss = torch.nn.functional.cross_entropy(t_head(out).reshape(-1, C),
                                                 torch.tensor(y[start:start + size]).reshape(-1))
        loss.backward()
        t_opt.step()
        t_opt.zero_grad()
        their_losses.append(loss.item())

    np.testing.assert_allclose(our_losses, their_losses, rtol=1e-10)
    for k, p in t_rnn.named_parameters():
        np.testing.assert_allclose(rnn.params[k], p.detach().numpy(), rtol=1e-9, atol=1e-12)
    final = state[0] if kind == "lstm" else state
    np.testing.assert_allclose(final, (h[0] if kind == "lstm" else h).detach().numpy(),
                               rtol=1e-9, atol=1e-12)


def test_truncated_bptt_accumulates_chunk_gradients_batch_first(backend):
    """Without after_chunk the chunk gradients add up; the gradient never crosses a boundary:
    each chunk's gradient equals that of a fresh run from the carried state."""
    rng = np.random.default_rng(1)
    rnn = fastrnn.RNN(2, 3, batch_first=True, backend=backend, dtype=np.float64, seed=0)
    x = rng.standard_normal((2, 6, 2))
    w = rng.standard_normal((2, 6, 3))
    fastrnn.truncated_bptt(rnn, x, 3, lambda out, s: (float((out * w[:, s]).sum()), w[:, s]))
    ref = rnn.copy()
    ref.zero_grad()
    _, h = ref(x[:, :3])
    ref.backward(w[:, :3])
    ref(x[:, 3:], h)
    ref.backward(w[:, 3:])
    for k in rnn.grads:
        np.testing.assert_allclose(rnn.grads[k], ref.grads[k], rtol=1e-12)


# -------------------------------------------------------------- gradient flow

@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_gradient_flow_matches_torch_retain_grad(backend, kind):
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    T, B, I, H = 7, 2, 3, 4
    m = make_layer(kind, I, H, backend=backend, dtype=np.float64, seed=0)
    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal((1, B, H))
    hx = (h0, rng.standard_normal((1, B, H))) if kind == "lstm" else h0
    grads_before = {k: v.copy() for k, v in m.grads.items()}
    norms = gradient_flow(m, x, hx)
    assert norms.shape == (T,)
    for k, v in m.grads.items():   # the model is untouched
        np.testing.assert_array_equal(v, grads_before[k])

    cell = {"rnn_tanh": torch.nn.RNNCell, "lstm": torch.nn.LSTMCell,
            "gru": torch.nn.GRUCell}[kind](I, H).double()
    cell.load_state_dict({k[:-3]: torch.from_numpy(v) for k, v in m.state_dict().items()})
    state = tuple(t64(torch, s[0]) for s in hx) if kind == "lstm" else t64(torch, h0[0])
    hs = []
    for t in range(T):
        state = cell(t64(torch, x[t]), state)
        h = state[0] if kind == "lstm" else state
        h.retain_grad()
        hs.append(h)
    hs[-1].sum().backward()
    expected = [h.grad.norm().item() for h in hs]
    np.testing.assert_allclose(norms, expected, rtol=1e-10)


def test_gradient_flow_layouts_and_errors(backend):
    rng = np.random.default_rng(0)
    m = fastrnn.GRU(2, 3, backend=backend, dtype=np.float64, seed=0)
    x = rng.standard_normal((5, 2))
    unbatched = gradient_flow(m, x)
    np.testing.assert_allclose(unbatched, gradient_flow(m, x[:, None, :]), rtol=1e-12)
    bf = fastrnn.GRU(2, 3, batch_first=True, backend=backend, dtype=np.float64, seed=0)
    np.testing.assert_allclose(unbatched, gradient_flow(bf, x[None]), rtol=1e-12)
    assert unbatched[-1] == pytest.approx(math.sqrt(3))
    with pytest.raises(ValueError, match="single-layer"):
        gradient_flow(fastrnn.GRU(2, 3, num_layers=2, backend=backend), x)
