"""Property tests: on random configurations every compiled CPU backend agrees with the
float64 reference. (The reference itself is checked against independent oracles:
torch in test_torch.py, finite differences in test_gradients.py; comparing it with
itself here could not fail.)

A configuration draws the cell (RNN tanh/ReLU, LSTM, GRU with reset_after True and
False), T, B, I, H, layers, direction, layout, bias, lengths (0 and T included),
unbatched input and an initial state. Forward output, final states and every
gradient (x, the initial states, every parameter) are compared with the float64
numpy reference.

Tolerances. float64: 1e-9 relative to the tensor's scale (the backends differ only
in summation order). float32: the float32 run of the reference measures the error an
honest float32 implementation makes on *this* configuration; a backend may be at
most 10 times that, plus a floor of 2e-5 of the scale for the cases where the
honest error happens to be ~0 (numba's float32 tanh is an approximation with up
to 4.5e-7 absolute error).
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import CPU_BACKENDS, LAYERS, make_layer

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw):
    kind = draw(st.sampled_from(sorted(LAYERS)))
    T = draw(st.integers(1, 6))
    unbatched = draw(st.booleans()) and draw(st.booleans())   # 1 in 4
    B = 1 if unbatched else draw(st.integers(1, 4))
    lengths = None
    if not unbatched and draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    return dict(kind=kind, T=T, B=B, I=draw(st.integers(1, 4)), H=draw(st.integers(1, 5)),
                num_layers=draw(st.integers(1, 2)), bidirectional=draw(st.booleans()),
                batch_first=draw(st.booleans()), bias=draw(st.booleans()),
                unbatched=unbatched, lengths=lengths, with_hx=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 16)))


def run(m, x, hx, lengths, d_out, d_h_n):
    """Forward and backward; every output and gradient as float64 arrays, by name."""
    m.zero_grad()
    out, h_n = m(x, hx, lengths)
    d_x, d_hx = m.backward(d_out, d_h_n)
    pair = isinstance(h_n, tuple)
    results = {"out": out, "d_x": d_x}
    for i, (h, d) in enumerate(zip(h_n if pair else (h_n,), d_hx if pair else (d_hx,))):
        results[f"h_n[{i}]"], results[f"d_h0[{i}]"] = h, d
    results.update({f"grad {k}": g for k, g in m.grads.items()})
    return {k: np.asarray(v, dtype=np.float64) for k, v in results.items()}


def problem(cfg):
    """The float64 reference layer and float64 inputs of a configuration."""
    rng = np.random.default_rng(cfg["seed"])
    ref = make_layer(cfg["kind"], cfg["I"], cfg["H"], backend="numpy", dtype=np.float64,
                     seed=cfg["seed"], num_layers=cfg["num_layers"],
                     bidirectional=cfg["bidirectional"], batch_first=cfg["batch_first"],
                     bias=cfg["bias"])
    T, B, I, H = cfg["T"], cfg["B"], cfg["I"], cfg["H"]
    D, S = 2 if cfg["bidirectional"] else 1, 2 if cfg["kind"] == "lstm" else 1
    if cfg["unbatched"]:
        x_shape, state_shape, out_shape = (T, I), (cfg["num_layers"] * D, H), (T, D * H)
    else:
        x_shape = (B, T, I) if cfg["batch_first"] else (T, B, I)
        state_shape = (cfg["num_layers"] * D, B, H)
        out_shape = (B, T, D * H) if cfg["batch_first"] else (T, B, D * H)
    x = rng.standard_normal(x_shape)
    hx = tuple(rng.standard_normal(state_shape) for _ in range(S)) if cfg["with_hx"] else None
    d_out = rng.standard_normal(out_shape)
    d_h_n = tuple(rng.standard_normal(state_shape) for _ in range(S))
    lengths = None if cfg["lengths"] is None else np.array(cfg["lengths"])
    return ref, x, hx, lengths, d_out, d_h_n


def results_for(ref, backend, dtype, x, hx, lengths, d_out, d_h_n):
    m = ref.copy(backend=backend, dtype=dtype)
    S = m._num_states

    def cast(a):
        return None if a is None else a.astype(dtype)

    hx_ = None if hx is None else (tuple(cast(h) for h in hx) if S == 2 else cast(hx[0]))
    d_h_n_ = tuple(cast(d) for d in d_h_n) if S == 2 else cast(d_h_n[0])
    return run(m, cast(x), hx_, lengths, cast(d_out), d_h_n_)


def check(cfg, dtype):
    ref, x, hx, lengths, d_out, d_h_n = problem(cfg)
    truth = results_for(ref, "numpy", np.float64, x, hx, lengths, d_out, d_h_n)
    honest = None
    if dtype == np.float32:
        honest = results_for(ref, "numpy", np.float32, x, hx, lengths, d_out, d_h_n)
    for backend in [b for b in CPU_BACKENDS if b != "numpy"]:
        got = results_for(ref, backend, dtype, x, hx, lengths, d_out, d_h_n)
        assert got.keys() == truth.keys()
        for name, want in truth.items():
            assert got[name].shape == want.shape, name
            scale = max(1.0, float(np.abs(want).max(initial=0.0)))
            err = float(np.abs(got[name] - want).max(initial=0.0))
            if dtype == np.float64:
                allowed = 1e-9 * scale
            else:
                honest_err = float(np.abs(honest[name] - want).max(initial=0.0))
                allowed = 10 * honest_err + 2e-5 * scale
            assert err <= allowed, (f"{backend} {np.dtype(dtype).name} {name}: error {err:.3g} > "
                                    f"allowed {allowed:.3g}; config {cfg}")


def edge(**overrides):
    cfg = dict(kind="lstm", T=4, B=3, I=2, H=3, num_layers=1, bidirectional=True,
               batch_first=False, bias=True, unbatched=False, lengths=None, with_hx=True, seed=1)
    cfg.update(overrides)
    return cfg


EDGE_CASES = [
    edge(T=1), edge(B=1), edge(H=1), edge(I=1, H=1, B=1, T=1),
    edge(lengths=[1, 1, 1]), edge(lengths=[4, 4, 4]), edge(lengths=[0, 0, 0]),
    edge(lengths=[0, 4, 2], kind="gru_reset_before", num_layers=2),
    edge(unbatched=True, B=1, kind="gru"), edge(unbatched=True, B=1, T=1, kind="rnn_relu"),
    edge(kind="gru", bias=False, batch_first=True, lengths=[3, 0, 1]),
]


def with_edges(test):
    for cfg in EDGE_CASES:
        test = example(cfg=cfg)(test)
    return test


@SETTINGS
@with_edges
@given(cfg=configs())
def test_backends_agree_with_reference_float64(cfg):
    check(cfg, np.float64)


@SETTINGS
@with_edges
@given(cfg=configs())
def test_backends_agree_with_reference_float32(cfg):
    check(cfg, np.float32)


@pytest.mark.parametrize("cfg", EDGE_CASES, ids=[str(i) for i in range(len(EDGE_CASES))])
def test_edge_cases_every_cell(cfg):
    """Each edge case for every cell kind, float64."""
    for kind in sorted(LAYERS):
        check({**cfg, "kind": kind}, np.float64)
