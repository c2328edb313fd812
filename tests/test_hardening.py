"""Extremes, non-finite values, long sequences, memory, threads and determinism on every CPU backend."""

import tracemalloc
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastrnn
from fastrnn import backends

from conftest import CPU_BACKENDS, LAYERS, make_layer

SATURATING = [k for k in LAYERS if k != "rnn_relu"]   # ReLU does not saturate: it may overflow


def as_tuple(h):
    return h if isinstance(h, tuple) else (h,)


def run_train(m, x, lengths=None, d_out=None, hx=None):
    """Forward and backward; returns every output and gradient as a flat list of copies."""
    m.zero_grad()
    out, h_n = m(x, hx, lengths)
    d_out = np.ones_like(out) if d_out is None else d_out
    d_x, d_hx = m.backward(d_out)
    return ([out.copy(), *as_tuple(h_n), d_x, *as_tuple(d_hx)] +
            [m.grads[k].copy() for k in sorted(m.grads)])


# ---------------------------------------------------------------- extremes

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", SATURATING)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_saturation_without_overflow(backend, kind, dtype):
    """Inputs and weights up to 1e4 saturate sigmoid and tanh: no overflow, no nan.

    Overflow, invalid operations and division by zero raise; warnings are errors.
    Underflow is not an error: a saturated gate is exp(-1e8) ~ 0, and products of
    such gates are tiny by design (IEEE gradual underflow is the correct result).
    """
    rng = np.random.default_rng(0)
    m = make_layer(kind, 3, 4, backend=backend, dtype=dtype, seed=0, bidirectional=True)

    def big(shape):
        return (rng.choice([-1e4, 1e4], shape) * rng.random(shape)).astype(dtype)

    m.load_state_dict({k: big(v.shape) for k, v in m.params.items()})
    x = big((6, 3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
            results = run_train(m, x, lengths=np.array([6, 3, 0]))
    for a in results:
        assert np.isfinite(a).all()
    out = results[0]
    assert np.abs(out).max() <= 1   # every cell's output is bounded by tanh (LSTM: o * tanh c)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_activations_at_extremes(backend):
    """The activations themselves at +-1e4, +-inf: exact saturation, no nan."""
    for dtype in (np.float32, np.float64):
        m = fastrnn.GRU(1, 1, backend=backend, dtype=dtype, seed=0)
        m.load_state_dict({k: np.ones_like(v) for k, v in m.params.items()})
        for value in (1e4, -1e4, np.inf, -np.inf):
            with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
                out, h_n = m.eval()(np.full((3, 1, 1), value, dtype))
            assert np.isfinite(out).all(), (dtype, value)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_stays_in_its_sequence(backend, kind):
    """A nan in one sequence's input reaches that sequence's outputs and state only."""
    rng = np.random.default_rng(1)
    m = make_layer(kind, 3, 4, backend=backend, dtype=np.float64, seed=0, num_layers=2,
                   bidirectional=True).eval()
    x = rng.standard_normal((6, 3, 3))
    lengths = np.array([6, 4, 5])
    out, h_n = m(x, lengths=lengths)
    x_nan = x.copy()
    x_nan[2, 1, 0] = np.nan
    out_nan, h_n_nan = m(x_nan, lengths=lengths)
    others = [0, 2]
    np.testing.assert_array_equal(out[:, others], out_nan[:, others])
    for a, b in zip(as_tuple(h_n), as_tuple(h_n_nan)):
        np.testing.assert_array_equal(a[:, others], b[:, others])
        assert np.isnan(b[:, 1]).all()
    assert np.isnan(out_nan[:4, 1]).all()          # every valid step (reverse direction too)
    np.testing.assert_array_equal(out_nan[4:, 1], 0)   # padded steps stay 0


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nonfinite_padding_is_ignored(backend, kind):
    """nan/inf in x and d_out at padded steps change nothing, forward or backward."""
    rng = np.random.default_rng(2)
    m = make_layer(kind, 3, 4, backend=backend, dtype=np.float64, seed=0, bidirectional=True)
    x = rng.standard_normal((6, 3, 3))
    d_out = rng.standard_normal((6, 3, 8))
    lengths = np.array([6, 4, 5])
    clean = run_train(m, x, lengths, d_out)
    x_bad, d_bad = x.copy(), d_out.copy()
    x_bad[4, 1], x_bad[5, 1, 0], x_bad[5, 2] = np.inf, np.nan, -np.inf
    d_bad[4, 1], d_bad[5, 1], d_bad[5, 2, 0] = np.nan, np.inf, np.nan
    saved = x_bad.copy(), d_bad.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dirty = run_train(m, x_bad, lengths, d_bad)
    for a, b in zip(clean, dirty):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(saved[0], x_bad)   # the caller's arrays are not touched
    np.testing.assert_array_equal(saved[1], d_bad)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernel_ignores_nonfinite_d_out_at_padded_steps(backend, reset_after):
    """The kernel contract itself: d_out at padded steps is ignored (the layers also
    zero it before calling the kernels, so this checks the kernels alone)."""
    fwd, bwd = backends.get(backend).kernels("gru")
    rng = np.random.default_rng(0)
    T, B, I, H = 4, 2, 3, 2
    x, h0 = rng.standard_normal((T, B, I)), rng.standard_normal((B, H))
    w_ih, w_hh = rng.standard_normal((3 * H, I)), rng.standard_normal((3 * H, H))
    b_ih, b_hh = rng.standard_normal(3 * H), rng.standard_normal(3 * H)
    lengths = np.array([4, 2])
    cache = fwd(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=lengths, reset_after=reset_after)[-1]
    d_out = rng.standard_normal((T, B, H))
    clean = bwd(d_out, np.zeros((B, H)), cache)
    d_out[2:, 1] = np.nan
    cache = fwd(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=lengths, reset_after=reset_after)[-1]
    with np.errstate(invalid="ignore"):   # the reference computes, then selects by mask
        dirty = bwd(d_out, np.zeros((B, H)), cache)
    for a, b in zip(clean, dirty):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------- long sequences

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chunked_inference_equals_unchunked(backend, kind, dtype):
    """Eval mode over T > eval_chunk runs chunk by chunk with the state carried across:
    the same outputs and final states, both directions, with lengths (incl. 0 and T)."""
    rng = np.random.default_rng(4)
    T, B = 23, 5
    m = make_layer(kind, 3, 4, backend=backend, dtype=dtype, seed=0, num_layers=2,
                   bidirectional=True, batch_first=True).eval()
    x = rng.standard_normal((B, T, 3)).astype(dtype)
    hx = tuple(rng.standard_normal((4, B, 4)).astype(dtype) for _ in range(2 if kind == "lstm"
                                                                            else 1))
    hx = hx if kind == "lstm" else hx[0]
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    for lengths in (np.array([23, 0, 7, 8, 16]), np.array([1, 23, 22, 9, 2]), None):
        m.eval_chunk = 10 ** 9
        out, h_n = m(x, hx, lengths)
        for chunk in (8, 7, 1):
            m.eval_chunk = chunk
            out_c, h_n_c = m(x, hx, lengths)
            np.testing.assert_allclose(out_c, out, **tol)
            for a, b in zip(as_tuple(h_n_c), as_tuple(h_n)):
                np.testing.assert_allclose(a, b, **tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_training_never_chunks(backend):
    m = fastrnn.LSTM(2, 3, backend=backend, dtype=np.float64, seed=0)
    m.eval_chunk = 2
    x = np.random.default_rng(0).standard_normal((7, 2, 2))
    out, _ = m(x)
    d_x, _ = m.backward(np.ones_like(out))
    assert d_x.shape == x.shape


def peak_bytes(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_inference_over_100k_steps_needs_output_sized_memory():
    """T = 100000, B = 1, H = 32 (LSTM, float32): peak memory ~ the output (12.8 MB),
    not T times the gate width (4H) as an unchunked run needs."""
    backend = "numba" if "numba" in CPU_BACKENDS else "numpy"
    if backend == "numba":
        from fastrnn.backends import packed_numba
    T, I, H = 100_000, 8, 32
    if backend == "numpy":
        T = 10_000   # the reference runs ~6 us a step in Python
    x = np.random.default_rng(0).standard_normal((T, 1, I)).astype(np.float32)
    m = fastrnn.LSTM(I, H, backend=backend, seed=0).eval()
    m(x[:3000])   # compile and warm up outside the measurement
    (out, _), peak = peak_bytes(lambda: m(x))
    assert out.nbytes == T * H * 4
    assert peak < 1.25 * out.nbytes, (peak, out.nbytes)
    m.eval_chunk = 10 ** 9
    (out_full, _), peak_full = peak_bytes(lambda: m(x))
    if backend == "numba":   # float32: the packed loop projects a chunk of steps at a time
        assert peak_full < 1.25 * out.nbytes + 4 * packed_numba.CHUNK_FLOATS, peak_full
    else:
        assert peak_full > 4 * out.nbytes   # the projection alone is (T, 1, 4H)
    np.testing.assert_allclose(out, out_full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chunked_memory_on_every_backend(backend):
    T, H = 6000, 16
    x = np.random.default_rng(0).standard_normal((T, 1, 4)).astype(np.float32)
    m = fastrnn.GRU(4, H, backend=backend, seed=0, bidirectional=True).eval()
    m.eval_chunk = 500
    m(x[:600])
    (out, _), peak = peak_bytes(lambda: m(x))
    assert peak < 1.5 * out.nbytes, (peak, out.nbytes)


# Training: elements stored per step and sequence, per layer and direction
# (I is the layer's input width; the parameters are referenced, not counted).
TRAINING_ELEMENTS_PER_STEP = {
    "numpy": {"rnn_tanh": (1, 1), "rnn_relu": (1, 1), "lstm": (1, 7), "gru": (1, 5),
              "gru_reset_before": (1, 4)},
    "numba": {"rnn_tanh": (1, 1), "rnn_relu": (1, 1), "lstm": (1, 6), "gru": (1, 5),
              "gru_reset_before": (1, 4)},
    "cuda": {"rnn_tanh": (1, 1), "rnn_relu": (1, 1), "lstm": (1, 7), "gru": (1, 5),
             "gru_reset_before": (1, 5)},
}


def training_bytes_per_step(kind, backend, I, H, dtype=np.float32, num_layers=1,
                            bidirectional=False, B=4):
    """Measured bytes a train-mode forward keeps per time step (all layers and
    directions), from ``pending_nbytes()`` at two sequence lengths."""
    m = make_layer(kind, I, H, backend=backend, dtype=dtype, seed=0, num_layers=num_layers,
                   bidirectional=bidirectional)
    sizes = []
    for T in (64, 128):
        m(np.zeros((T, B, I), dtype))
        sizes.append(m.pending_nbytes())
    return (sizes[1] - sizes[0]) / 64


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_training_bytes_per_step(backend, kind):
    I, H, B, item = 5, 8, 4, 4
    per_x, per_h = TRAINING_ELEMENTS_PER_STEP[backend][kind]
    measured = training_bytes_per_step(kind, backend, I, H, B=B)
    assert measured == B * item * (per_x * I + per_h * H)
    # two layers, bidirectional: layer 1 reads the (T, B, 2H) output of layer 0, shared by
    # both of its directions; every direction keeps its own states and gates.
    measured = training_bytes_per_step(kind, backend, I, H, B=B, num_layers=2,
                                       bidirectional=True)
    assert measured == B * item * (I + 2 * H + 4 * per_h * H)


def test_pending_nbytes_is_zero_without_pending():
    m = fastrnn.LSTM(2, 3)
    assert m.pending_nbytes() == 0
    m.eval()(np.zeros((4, 1, 2), np.float32))
    assert m.pending_nbytes() == 0


# ------------------------------------------------------------------ threads

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_threads_on_separate_models_give_serial_results(backend):
    rng = np.random.default_rng(5)
    jobs = []
    for i, kind in enumerate(list(LAYERS) * 2):
        m = make_layer(kind, 3, 6, backend=backend, dtype=np.float32, seed=i,
                       bidirectional=bool(i % 2))
        x = rng.standard_normal((40, 4, 3)).astype(np.float32)
        jobs.append((m, x, rng.integers(0, 41, 4)))

    def work(job):
        m, x, lengths = job
        return run_train(m, x, lengths)

    serial = [work(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(work, jobs))
    for a_list, b_list in zip(serial, threaded):
        for a, b in zip(a_list, b_list):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_threads_share_one_model_in_eval_mode(backend):
    rng = np.random.default_rng(6)
    m = fastrnn.LSTM(3, 6, num_layers=2, bidirectional=True, backend=backend, seed=0).eval()
    m.eval_chunk = 16   # the chunked path too
    inputs = [(rng.standard_normal((int(T), 3, 3)).astype(np.float32), rng.integers(0, T + 1, 3))
              for T in rng.integers(5, 40, 12)]

    def work(item):
        out, (h, c) = m(item[0], lengths=item[1])
        return out, h, c

    serial = [work(item) for item in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(work, inputs))
    for a_tuple, b_tuple in zip(serial, threaded):
        for a, b in zip(a_tuple, b_tuple):
            np.testing.assert_array_equal(a, b)


# -------------------------------------------------------------- determinism

@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_same_call_twice_is_bitwise_identical(backend, kind):
    rng = np.random.default_rng(7)
    m = make_layer(kind, 5, 7, backend=backend, dtype=np.float32, seed=0, num_layers=2,
                   bidirectional=True)
    x = rng.standard_normal((30, 6, 5)).astype(np.float32)
    lengths = np.array([30, 0, 12, 1, 29, 30])
    d_out = rng.standard_normal((30, 6, 14)).astype(np.float32)
    first = run_train(m, x, lengths, d_out)
    second = run_train(m, x, lengths, d_out)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    m.eval()
    e1, e2 = m(x, lengths=lengths), m(x, lengths=lengths)
    np.testing.assert_array_equal(e1[0], e2[0])
    np.testing.assert_array_equal(e1[0], first[0])   # eval and train forward agree bitwise


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_kernels_accept_strided_x_and_fortran_weights(backend, kind):
    """Direct kernel calls (not only layers) with a strided x and Fortran-ordered
    weights give the contiguous result."""
    rng = np.random.default_rng(11)
    T, B, I, H = 4, 3, 5, 6
    G = (4 if kind == "lstm" else 3) * H
    big = rng.standard_normal((T, B, 2 * I))
    x = big[:, :, ::2]
    w_ih, w_hh = rng.standard_normal((G, I)), rng.standard_normal((G, H))
    b = rng.standard_normal(G)
    states = (rng.standard_normal((B, H)),) * (2 if kind == "lstm" else 1)
    fwd, _ = fastrnn.backends.get(backend).kernels(kind)
    want = fwd(np.ascontiguousarray(x), *states, w_ih, w_hh, b, b, training=False)
    got = fwd(x, *states, np.asfortranarray(w_ih), np.asfortranarray(w_hh), b, b,
              training=False)
    for a, c in zip(want[:-1], got[:-1]):
        np.testing.assert_allclose(c, a, rtol=1e-12, atol=1e-12)


def test_fortran_state_dict_and_gradcheck_with_fortran_input(backend):
    m = fastrnn.LSTM(3, 4, backend=backend, dtype=np.float64, seed=0)
    x = np.asfortranarray(np.random.default_rng(2).standard_normal((5, 2, 3)))
    out = m.eval()(x)[0]
    m2 = fastrnn.LSTM(3, 4, backend=backend, dtype=np.float64, seed=1)
    m2.load_state_dict({k: np.asfortranarray(v) for k, v in m.state_dict().items()})
    np.testing.assert_allclose(m2.eval()(x)[0], out, rtol=1e-12, atol=1e-12)
    assert fastrnn.gradcheck(m, x, max_elements=8).passed
