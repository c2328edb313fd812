"""LayerNormLSTM and LayerNormGRU: an independent torch oracle, finite differences,
masking, modes and argument errors, on both CPU backends."""

import numpy as np
import pytest

import fastrnn
from conftest import CPU_BACKENDS, torch_or_skip

CELLS = {"lstm": fastrnn.LayerNormLSTM, "gru": fastrnn.LayerNormGRU}

#: (num_layers, bidirectional, with lengths, bias, batch_first)
CONFIGS = [(1, False, False, True, False),
           (2, True, True, True, True),
           (1, False, True, False, False),
           (2, False, True, True, False)]


# ------------------------------------------------------------ torch oracle

def torch_layernorm_rnn(torch, cell, params, x, hx, lengths, num_layers, D, H):
    """The equations of the fastrnn docstrings, written again with torch autograd.

    x (T, B, I) time-major; hx a tuple of (L*D, B, H); params by fastrnn's names (the
    shifts absent without bias); returns out, tuple of final states."""
    F = torch.nn.functional
    T, B = x.shape[:2]
    lengths = torch.full((B,), T) if lengths is None else torch.as_tensor(lengths)
    finals = [[None] * (num_layers * D) for _ in hx]
    layer_input = x
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            s = f"_l{layer}" + ("_reverse" if d else "")
            p = {name[:-len(s)]: v for name, v in params.items() if name.endswith(s)}

            def norm(v, gain, shift):
                return F.layer_norm(v, (v.shape[-1],), gain, shift, eps=1e-5)

            state = [s0[k] for s0 in hx]
            out = [None] * T
            for t in (range(T - 1, -1, -1) if d else range(T)):
                xa = norm(layer_input[t] @ p["weight_ih"].T, p["gamma_ih"], p.get("bias_ih"))
                ua = norm(state[0] @ p["weight_hh"].T, p["gamma_hh"], p.get("bias_hh"))
                if cell == "lstm":
                    a = xa + ua
                    i, f, o = (torch.sigmoid(a[:, j * H:(j + 1) * H]) for j in (0, 1, 3))
                    g = torch.tanh(a[:, 2 * H:3 * H])
                    c_new = f * state[1] + i * g
                    h_new = o * torch.tanh(norm(c_new, p["gamma_c"], p.get("beta_c")))
                    new = [h_new, c_new]
                else:
                    r = torch.sigmoid(xa[:, :H] + ua[:, :H])
                    z = torch.sigmoid(xa[:, H:2 * H] + ua[:, H:2 * H])
                    n = torch.tanh(xa[:, 2 * H:] + r * ua[:, 2 * H:])
                    h_new = (1 - z) * n + z * state[0]
                    new = [h_new]
                active = (t < lengths)[:, None]
                out[t] = torch.where(active, h_new, torch.zeros_like(h_new))
                state = [torch.where(active, n_, s_) for n_, s_ in zip(new, state)]
            outs.append(torch.stack(out))
            for f_list, s_ in zip(finals, state):
                f_list[k] = s_
        layer_input = torch.cat(outs, dim=2)
    return layer_input, tuple(torch.stack(f_list) for f_list in finals)


def random_problem(rng, cell, config, dtype, T=5, B=3, I=4, H=3):
    L, bidi, with_lengths, bias, batch_first = config
    D = 2 if bidi else 1
    S = 2 if cell == "lstm" else 1
    x = rng.standard_normal((T, B, I))
    hx = tuple(rng.standard_normal((L * D, B, H)) * 0.5 for _ in range(S))
    lengths = np.array([T, 2, 0][:B]) if with_lengths else None
    model = CELLS[cell](I, H, L, bias=bias, bidirectional=bidi, batch_first=batch_first,
                        dtype=dtype, seed=int(rng.integers(1000)), backend="numpy")
    for name, v in model.params.items():   # gains and shifts away from their 1 and 0
        if name.startswith(("gamma_", "beta_")):
            v[...] = rng.uniform(0.5, 1.5, v.shape) if name.startswith("gamma") \
                else rng.uniform(-0.5, 0.5, v.shape)
    weights = (rng.standard_normal((T, B, D * H)),
               tuple(rng.standard_normal((L * D, B, H)) for _ in range(S)))
    return model, x, hx, lengths, weights


def run_fastrnn(model, x, hx, lengths, weights, dtype):
    """Forward and backward of loss = sum(out * w_out) + sum(state_n * w_state)."""
    S = len(hx)
    xf = x.astype(dtype)
    hxf = tuple(h.astype(dtype) for h in hx)
    w_out, w_states = weights[0].astype(dtype), tuple(w.astype(dtype) for w in weights[1])
    if model.batch_first:
        xf, w_out = xf.transpose(1, 0, 2).copy(), w_out.transpose(1, 0, 2).copy()
    model.zero_grad()
    out, states = model(xf, hxf if S == 2 else hxf[0], lengths)
    d_x, d_hx = model.backward(w_out, w_states if S == 2 else w_states[0])
    if model.batch_first:
        out, d_x = out.transpose(1, 0, 2), d_x.transpose(1, 0, 2)
    states = states if S == 2 else (states,)
    d_hx = d_hx if S == 2 else (d_hx,)
    return out, states, d_x, d_hx, {k: v.copy() for k, v in model.grads.items()}


def run_torch(torch, cell, model, x, hx, lengths, weights):
    def leaf(a):
        return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)

    params = {k: leaf(v) for k, v in model.params.items()}
    xt, hxt = leaf(x), tuple(leaf(h) for h in hx)
    out, states = torch_layernorm_rnn(torch, cell, params, xt, hxt, lengths, model.num_layers,
                                      model.num_directions, model.hidden_size)
    loss = (out * torch.tensor(weights[0])).sum()
    for s, w in zip(states, weights[1]):
        loss = loss + (s * torch.tensor(w)).sum()
    loss.backward()
    return (out.detach().numpy(), tuple(s.detach().numpy() for s in states), xt.grad.numpy(),
            tuple(h.grad.numpy() for h in hxt), {k: v.grad.numpy() for k, v in params.items()})


def flat(result):
    out, states, d_x, d_hx, grads = result
    named = {"out": out, "d_x": d_x}
    named.update({f"state_{i}": s for i, s in enumerate(states)})
    named.update({f"d_hx_{i}": s for i, s in enumerate(d_hx)})
    named.update({f"d_{k}": v for k, v in grads.items()})
    return named


def worst_errors(got, want):
    """Per tensor: max |got - want| / (1 + max |want|)."""
    return {k: float(np.abs(got[k] - want[k]).max() / (1 + np.abs(want[k]).max()))
            for k in want}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_against_torch_autograd(cell, config):
    """Forward, final states and every gradient against the torch oracle: float64 to 1e-10
    on both backends; in float32 the numba kernels' error is at most 4 times the
    reference's own float32 error (plus 1e-6)."""
    torch = torch_or_skip()
    rng = np.random.default_rng(16 + CONFIGS.index(config) + 10 * (cell == "gru"))
    model, x, hx, lengths, weights = random_problem(rng, cell, config, np.float64)
    want = flat(run_torch(torch, cell, model, x, hx, lengths, weights))
    assert set(want) == set(flat(run_fastrnn(model, x, hx, lengths, weights, np.float64)))
    for backend in CPU_BACKENDS:
        m64 = model.copy(backend=backend)
        errors = worst_errors(flat(run_fastrnn(m64, x, hx, lengths, weights, np.float64)), want)
        assert max(errors.values()) < 1e-10, (backend, errors)
    ref32 = worst_errors(flat(run_fastrnn(model.copy(dtype=np.float32), x, hx, lengths, weights,
                                          np.float32)), want)
    for backend in CPU_BACKENDS:
        got32 = worst_errors(flat(run_fastrnn(model.copy(backend=backend, dtype=np.float32), x,
                                              hx, lengths, weights, np.float32)), want)
        bad = {k: (got32[k], ref32[k]) for k in want if got32[k] > 4 * ref32[k] + 1e-6}
        assert not bad, (backend, bad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_gradcheck_float64(cell, backend):
    """Central finite differences, two bidirectional layers with lengths, random hx
    (LN(W_hh h) at h = 0 has a derivative of order 1/sqrt(eps): FD truncates badly there)."""
    rng = np.random.default_rng(7 if cell == "lstm" else 8)
    model, x, hx, lengths, _ = random_problem(rng, cell, (2, True, True, True, False),
                                              np.float64, T=4, B=3, I=3, H=2)
    model = model.copy(backend=backend)
    report = fastrnn.gradcheck(model, x, hx if cell == "lstm" else hx[0], lengths,
                               max_elements=10, seed=3)
    assert report.passed, str(report)
    assert {"gamma_ih_l1_reverse", "gamma_hh_l0"} <= set(report.errors)
    if cell == "lstm":
        assert {"gamma_c_l0", "beta_c_l1_reverse", "c0"} <= set(report.errors)


# ------------------------------------------------------ layer behaviour

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_modes_layouts_and_accumulation(cell, backend):
    rng = np.random.default_rng(21)
    model, x, hx, lengths, _ = random_problem(rng, cell, (2, True, True, True, False),
                                              np.float64)
    model = model.copy(backend=backend)
    hx_arg = hx if cell == "lstm" else hx[0]
    out, states = model(x, hx_arg, lengths)
    model.eval()
    out_eval, states_eval = model(x, hx_arg, lengths)
    np.testing.assert_array_equal(out, out_eval)   # same arithmetic, other buffers
    assert model._pending is None
    # Inactive steps output 0 and carry the state.
    assert not out[lengths[2]:, 2].any() and not out[2:, 1].any()
    h_n = states[0] if cell == "lstm" else states
    np.testing.assert_array_equal(h_n[:, 2], hx[0][:, 2])   # length 0: h_n is h0
    # batch_first and unbatched give the same numbers.
    bf = model.copy()
    bf.batch_first = True
    out_bf, _ = bf(x.transpose(1, 0, 2).copy(), hx_arg, lengths)
    np.testing.assert_allclose(out_bf.transpose(1, 0, 2), out, rtol=0, atol=1e-14)
    one = (tuple(h[:, 0] for h in hx) if cell == "lstm" else hx[0][:, 0])
    out_1, _ = model(x[:, 0], one)
    out_full, _ = model(x, hx_arg)
    np.testing.assert_allclose(out_1, out_full[:, 0], rtol=0, atol=1e-14)
    # backward adds into .grads.
    model.train()
    model.zero_grad()
    d_out = rng.standard_normal(out.shape)
    for _ in range(2):
        model(x, hx_arg, lengths)
        model.backward(d_out)
    once = model.copy()
    once.zero_grad()
    once(x, hx_arg, lengths)
    once.backward(d_out)
    for k in model.grads:
        np.testing.assert_allclose(model.grads[k], 2 * once.grads[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_padding_never_reaches_the_numbers(cell, backend):
    """nan in x and d_out at padded steps changes nothing."""
    rng = np.random.default_rng(5)
    model, x, hx, lengths, _ = random_problem(rng, cell, (1, True, True, True, False),
                                              np.float64)
    model = model.copy(backend=backend)
    hx_arg = hx if cell == "lstm" else hx[0]
    d_out = rng.standard_normal((x.shape[0], x.shape[1], 2 * model.hidden_size))
    clean = model.copy()
    out, _ = clean(x, hx_arg, lengths)
    clean.backward(d_out)
    padded = np.arange(x.shape[0])[:, None] >= lengths[None, :]
    x_nan, d_nan = x.copy(), d_out.copy()
    x_nan[padded], d_nan[padded] = np.nan, np.nan
    out_nan, _ = model(x_nan, hx_arg, lengths)
    d_x, _ = model.backward(d_nan)
    np.testing.assert_array_equal(out_nan, out)
    assert np.isfinite(d_x).all()
    for k in model.grads:
        np.testing.assert_array_equal(model.grads[k], clean.grads[k])


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_numba_small_batches_and_reverse(cell):
    """B = 1, 2 over T = 17 take the numba GEMM's small-row path with W_hh transposed;
    reverse=True equals the forward direction run on the flipped sequence."""
    rng = np.random.default_rng(33)
    for B in (1, 2):
        model, x, hx, _, _ = random_problem(rng, cell, (1, False, False, True, False),
                                            np.float64, T=17, B=B)
        hx_arg = hx if cell == "lstm" else hx[0]
        d_out = rng.standard_normal((17, B, model.hidden_size))
        results = []
        for backend in CPU_BACKENDS:
            m = model.copy(backend=backend)
            out, _ = m(x, hx_arg)
            d_x, _ = m.backward(d_out)
            results.append((out, d_x, m.grads))
        for out, d_x, grads in results[1:]:
            np.testing.assert_allclose(out, results[0][0], rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(d_x, results[0][1], rtol=1e-10, atol=1e-12)
            for k in grads:
                np.testing.assert_allclose(grads[k], results[0][2][k], rtol=1e-10, atol=1e-12)
        for backend in CPU_BACKENDS:
            fwd = model.copy(backend=backend).eval()
            rev = CELLS[cell](x.shape[2], model.hidden_size, reverse=True, backend=backend,
                              dtype=np.float64).eval()
            rev.load_state_dict(fwd.state_dict())
            out_rev, states_rev = rev(x, hx_arg)
            out_fwd, states_fwd = fwd(x[::-1].copy(), hx_arg)
            np.testing.assert_allclose(out_rev, out_fwd[::-1], rtol=0, atol=1e-14)


def test_parameters_state_dict_and_moves():
    lstm = fastrnn.LayerNormLSTM(3, 4, 2, bidirectional=True, backend="numpy", seed=0)
    names = list(lstm.state_dict())
    assert names[:8] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                         "gamma_ih_l0", "gamma_hh_l0", "gamma_c_l0", "beta_c_l0"]
    assert len(names) == 32 and names[-1] == "beta_c_l1_reverse"
    assert lstm.params["gamma_ih_l1"].shape == (16,) and lstm.params["gamma_c_l1"].shape == (4,)
    assert lstm.params["weight_ih_l1"].shape == (16, 8)
    assert (lstm.params["gamma_hh_l0"] == 1).all() and not lstm.params["beta_c_l0"].any()
    plain = fastrnn.LSTM(3, 4, 2, bidirectional=True, backend="numpy", seed=0)
    for k, v in plain.state_dict().items():   # same seed, same torch-like weights
        np.testing.assert_array_equal(lstm.params[k], v)
    gru = fastrnn.LayerNormGRU(3, 4, bias=False, backend="numpy")
    assert list(gru.state_dict()) == ["weight_ih_l0", "weight_hh_l0", "gamma_ih_l0",
                                      "gamma_hh_l0"]
    sd = lstm.state_dict()
    sd["gamma_c_l0"] = sd["gamma_c_l0"] * 3
    other = fastrnn.LayerNormLSTM(3, 4, 2, bidirectional=True, backend="numpy", seed=1)
    other.load_state_dict(sd)
    np.testing.assert_array_equal(other.params["gamma_c_l0"], 3 * lstm.params["gamma_c_l0"])
    moved = lstm.copy(dtype=np.float64)
    assert moved.params["gamma_ih_l0"].dtype == np.float64 and moved.dtype == np.float64
    assert "LayerNormLSTM(3, 4, num_layers=2, bidirectional=True" in repr(lstm)
    if "numba" in CPU_BACKENDS:
        assert lstm.copy(backend="numba").backend == "numba"


# ------------------------------------------------------------ bad values

def test_cuda_is_refused_naming_layernorm():
    for cls in CELLS.values():
        with pytest.raises(NotImplementedError, match="LayerNorm.*cuda"):
            cls(3, 4, backend="cuda")
    m = fastrnn.LayerNormLSTM(3, 4, backend="numpy")
    before = m.state_dict()
    with pytest.raises(NotImplementedError, match="LayerNorm.*cuda"):
        m.to(backend="cuda")
    assert m.backend == "numpy"
    for k, v in before.items():
        np.testing.assert_array_equal(m.params[k], v)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"hidden_size": 0}, ValueError, "hidden_size"),
    ({"input_size": 2.5}, ValueError, "input_size"),
    ({"num_layers": 0}, ValueError, "num_layers"),
    ({"bias": "yes"}, TypeError, "bias"),
    ({"batch_first": 1}, TypeError, "batch_first"),
    ({"bidirectional": None}, TypeError, "bidirectional"),
    ({"dtype": np.int32}, TypeError, "dtype"),
    ({"backend": "tpu"}, ValueError, "backend"),
    ({"backend": 3}, ValueError, "backend"),
    ({"seed": -1}, ValueError, "seed"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    args = {"input_size": 3, "hidden_size": 4, **kwargs}
    for cls in CELLS.values():
        with pytest.raises(error, match=match):
            cls(**args)
    with pytest.raises(TypeError, match="reset_after"):
        fastrnn.LayerNormGRU(3, 4, reset_after=False)


def test_bad_call_arguments_change_nothing():
    m = fastrnn.LayerNormLSTM(3, 4, backend=CPU_BACKENDS[0], dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    out, _ = m(x)
    pending = m._pending
    bad_calls = [
        ((x.astype(np.float32),), TypeError, "x has dtype"),
        ((x[..., :2],), ValueError, "input_size"),
        ((x, np.zeros((1, 2, 4))), ValueError, "pair"),
        ((x, (np.zeros((2, 2, 4)), np.zeros((1, 2, 4)))), ValueError, r"hx\[0\]"),
        ((x, None, np.array([6, 1])), ValueError, "lengths"),
        ((x, None, np.array([1.0, 2.0])), TypeError, "lengths"),
        ((x, None, np.array([1, 2, 3])), ValueError, "lengths"),
    ]
    for args, error, match in bad_calls:
        with pytest.raises(error, match=match):
            m(*args)
        assert m._pending is pending
    with pytest.raises(ValueError, match="d_out"):
        m.backward(np.zeros((5, 2, 3)))
    with pytest.raises(ValueError, match="d_h_n"):
        m.backward(np.zeros_like(out), np.zeros((1, 2, 4)))
    assert m._pending is pending and not any(g.any() for g in m.grads.values())
    with pytest.raises(KeyError, match="gamma_c_l0"):
        m.load_state_dict({k: v for k, v in m.state_dict().items() if k != "gamma_c_l0"})
    bad = m.state_dict()
    bad["gamma_ih_l0"] = np.ones(3)
    with pytest.raises(ValueError, match="gamma_ih_l0"):
        m.load_state_dict(bad)
    assert m.params["gamma_ih_l0"].shape == (16,)
    for name, value, error in (("gamma_c_l0", np.ones(3), ValueError),
                               ("gamma_hh_l0", np.ones(16, np.float32), TypeError)):
        saved = m.params[name]
        m.params[name] = value
        with pytest.raises(error, match=name):
            m(x)
        assert m._pending is pending
        m.params[name] = saved
    m.backward(np.zeros_like(out))
    with pytest.raises(RuntimeError, match="backward needs a pending"):
        m.backward(np.zeros_like(out))
