"""The packed backward (fastrnn.backends.packed_bptt, float32 LSTM, reset-after GRU and
RNN): W_hh^T's panels against their definition; every gradient against the float64
NumPy reference's, on one thread and split over threads by hidden units (forced on small
problems), with lengths, both directions, partial panels and no biases; which backwards
take it; a failing thread; and a loop that finds the pool taken."""

import numpy as np
import pytest

from conftest import random_lengths

pk = pytest.importorskip("fastrnn.backends.packed_numba")
from fastrnn.backends import _hotpool  # noqa: E402
from fastrnn.backends import numba_cpu as nb  # noqa: E402
from fastrnn.backends import packed_bptt as pb  # noqa: E402
from fastrnn.backends import reference as ref  # noqa: E402

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
#: Hidden units per panel of W_hh^T.
PU = pk.RNN_NV * pk.VW


def _spy_pack_t(monkeypatch):
    """The shapes of the arrays ``packed_numba.pack_t`` packs from now on."""
    shapes = []
    real = pk.pack_t
    monkeypatch.setattr(pk, "pack_t", lambda w: shapes.append(w.shape) or real(w))
    return shapes


def _spy(monkeypatch):
    """The thread counts of every ``packed_bptt.run`` call from now on."""
    calls = []
    real = pb.run

    def spy(nthreads, *args):
        calls.append(nthreads)
        return real(nthreads, *args)

    monkeypatch.setattr(pb, "run", spy)
    return calls


@pytest.mark.parametrize("K,N", [(3, PU), (5, 2 * PU + 7), (2, 1)])
def test_pack_t_layout(K, N):
    """P[u, k, j] = W[k, u PU + j], zeros past N: pack(W.T, 1) without the transpose."""
    w = np.arange(K * N, dtype=np.float32).reshape(K, N) + 1
    panels = pk.pack_t(w)
    assert panels.shape == (-(-N // PU), K, PU)
    assert panels.ctypes.data % 64 == 0
    for u in range(panels.shape[0]):
        for k in range(K):
            for j in range(PU):
                want = w[k, u * PU + j] if u * PU + j < N else 0
                assert panels[u, k, j] == want
    np.testing.assert_array_equal(panels, pk.pack(np.ascontiguousarray(w.T), 1))


def _case(kind, B, H, bias, rng, T=6, I=5):
    G = GATES[kind] * H
    x = rng.standard_normal((T, B, I))
    states = [0.5 * rng.standard_normal((B, H)) for _ in range(2 if kind == "lstm" else 1)]
    s = 0.6 / np.sqrt(H)            # keeps the ReLU RNN's state bounded over six steps
    w = [rng.uniform(-0.6, 0.6, (G, I)), rng.uniform(-s, s, (G, H))]
    w += [rng.uniform(-0.6, 0.6, G), rng.uniform(-0.6, 0.6, G)] if bias else [None, None]
    return x, states, w


def _train(backend, kind, x, states, w, lengths, reverse, d_out, d_states):
    fwd = getattr(backend, f"{kind}_forward")
    res = fwd(x, *states, *w, lengths=lengths, reverse=reverse, training=True)
    return getattr(backend, f"{kind}_backward")(d_out, *d_states, res[-1])


@pytest.mark.parametrize("kind", list(GATES))
@pytest.mark.parametrize("B,H", [(1, PU), (7, PU + 3), (13, 2 * PU + 9)])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_backward_matches_the_float64_reference(monkeypatch, kind, B, H, threads,
                                                       reverse, bias):
    """Forced to ``threads`` (at most one a panel of PU units), lengths from 0 to T."""
    monkeypatch.setattr(pk, "threads", threads)
    calls = _spy(monkeypatch)
    _against_the_reference(kind, B, H, bias, np.random.default_rng(B * 1000 + H), 6, 5,
                           reverse)
    assert calls == [min(threads, -(-H // PU))], calls


def _against_the_reference(kind, B, H, bias, rng, T, I, reverse):
    """A random case's float32 training step (forward and backward) on this backend against
    the float64 reference's, lengths from 0 to T: every gradient within 1e-4."""
    x, states, w = _case(kind, B, H, bias, rng, T, I)
    lengths = random_lengths(rng, T, B)
    d_out = rng.standard_normal((T, B, H))
    d_states = [rng.standard_normal((B, H)) for _ in states]
    f32 = lambda a: None if a is None else a.astype(np.float32)  # noqa: E731
    got = _train(nb, kind, f32(x), [f32(s) for s in states], [f32(a) for a in w], lengths,
                 reverse, f32(d_out), [f32(d) for d in d_states])
    want = _train(ref, kind, x, states, w, lengths, reverse, d_out, d_states)
    assert len(got) == len(want)
    for g, e in zip(got, want):
        assert (g is None) == (e is None)
        if g is not None:
            assert g.dtype == np.float32 and g.shape == e.shape
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", list(GATES))
@pytest.mark.parametrize("B,I", [(7, PU), (13, 2 * PU)])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("reverse", [False, True])
def test_split_backward_input_gradients_from_the_micro_kernel(monkeypatch, kind, B, I,
                                                              threads, reverse):
    """Inputs of whole panels of units, split over threads: ``d_x`` comes from the
    micro-kernel (W_ih packed by ``pack_t``; T B rows not a multiple of its tiles or of
    ``DX_ROWS``, split between threads anywhere), and every gradient matches the float64
    reference's."""
    monkeypatch.setattr(pk, "threads", threads)
    packed_shapes = _spy_pack_t(monkeypatch)
    H = 3 * PU - 5
    _against_the_reference(kind, B, H, True, np.random.default_rng(B * 100 + I), 11, I, reverse)
    assert (GATES[kind] * H, I) in packed_shapes           # W_ih packed for d_x


@pytest.mark.parametrize("r0,r1", [(0, 77), (5, 70), (33, 34), (40, 40)])
def test_input_grads_product_writes_its_rows_only(r0, r1):
    """``_input_grads`` alone: rows [r0, r1) of ``d_a W_ih`` (blocks of ``DX_ROWS`` from r0,
    partial tiles), every other row of ``d_x`` untouched."""
    rng = np.random.default_rng(r0 * 100 + r1)
    G, I = 3 * PU + 16, 2 * PU
    d_a = rng.standard_normal((77, G)).astype(np.float32)
    w = rng.standard_normal((G, I)).astype(np.float32)
    d_x = np.full((77, I), np.nan, np.float32)
    pb._input_grads(pk.pack_t(w), d_a, d_x, r0, r1)
    np.testing.assert_allclose(d_x[r0:r1], d_a[r0:r1].astype(np.float64) @ w, rtol=1e-5,
                               atol=1e-4)
    assert np.isnan(d_x[:r0]).all() and np.isnan(d_x[r1:]).all()


def test_input_grads_flag_off_keeps_the_gemm(monkeypatch):
    """``micro_input_grads`` False: a split backward leaves W_ih unpacked (OpenBLAS's GEMM
    for ``d_x``), with the same gradients."""
    monkeypatch.setattr(pk, "threads", 2)
    monkeypatch.setattr(pb, "micro_input_grads", False)
    packed_shapes = _spy_pack_t(monkeypatch)
    H = 2 * PU
    _against_the_reference("lstm", 7, H, True, np.random.default_rng(3), 5, PU, False)
    assert packed_shapes == [(4 * H, H)]                    # W_hh only


@pytest.mark.parametrize("R,c0,c1", [(300, 0, 37), (130, 5, 23), (77, 9, 10), (40, 12, 12)])
@pytest.mark.parametrize("N", [PU, 2 * PU])
def test_weight_grads_product_writes_its_rows_only(R, c0, c1, N):
    """``_weight_grads`` alone: rows [c0, c1) of ``d_a^T x`` (``d_a`` and ``x`` read in
    place, rows past and short of ``DW_ROWS``, partial tiles, a start off the tiles),
    every other row of ``d_w`` untouched."""
    rng = np.random.default_rng(R + c0 + N)
    G = 3 * pk.MR_LSTM + 5 + c1
    d_a = rng.standard_normal((R, G)).astype(np.float32)
    x = rng.standard_normal((R, N)).astype(np.float32)
    d_w = np.full((G, N), np.nan, np.float32)
    pb._weight_grads(d_a, x, d_w, c0, c1)
    want = d_a[:, c0:c1].T.astype(np.float64) @ x
    np.testing.assert_allclose(d_w[c0:c1], want, rtol=1e-5, atol=1e-4)
    assert np.isnan(d_w[:c0]).all() and np.isnan(d_w[c1:]).all()


@pytest.mark.parametrize("kind", list(GATES))
def test_split_backward_weight_gradients_from_the_micro_kernel(monkeypatch, kind):
    """Inputs and hidden units of whole panels, split over two and three threads: ``d_W_ih``
    and ``d_W_hh`` from the strided micro-kernel (``micro_weight_grads``, as shipped) and
    from OpenBLAS's GEMM (the flag off) match the float64 reference's and each other (at
    this size to the bit: both sum each element over k in order, with FMAs; not asserted,
    OpenBLAS's kernels may block k otherwise); the micro-kernel's are the same bits
    whichever thread has a row (each element summed in one order), and so are the biases'
    (summed by the passes, each thread its units')."""
    calls = _spy(monkeypatch)
    H, I, B, T = 3 * PU, PU, 9, 15
    monkeypatch.setattr(pk, "threads", 2)
    for micro in (True, False):
        monkeypatch.setattr(pb, "micro_weight_grads", micro)
        _against_the_reference(kind, B, H, True, np.random.default_rng(21), 7, I, True)
    x, states, w = _case(kind, B, H, True, np.random.default_rng(4), T, I)
    rng = np.random.default_rng(5)
    d_out = rng.standard_normal((T, B, H)).astype(np.float32)
    d_states = [rng.standard_normal((B, H)).astype(np.float32) for _ in states]
    f32 = [a.astype(np.float32) for a in [x] + states + w]
    grads = {}
    for micro, threads in ((True, 2), (True, 3), (False, 2)):
        monkeypatch.setattr(pb, "micro_weight_grads", micro)
        monkeypatch.setattr(pk, "threads", threads)
        res = getattr(nb, f"{kind}_forward")(*f32, training=True)
        grads[micro, threads] = getattr(nb, f"{kind}_backward")(d_out, *d_states, res[-1])[-4:]
    assert calls == [2, 2, 2, 3, 2], calls
    for a, b in zip(grads[True, 2], grads[True, 3]):          # d_W_ih, d_W_hh, the biases
        np.testing.assert_array_equal(a, b)
    for a, b in zip(grads[True, 2][:2], grads[False, 2][:2]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_which_backwards_take_the_packed_loop(monkeypatch):
    """float32 only, from one panel's units (H < PU: numba_cpu's loops), not disabled,
    not with the LSTM's projection or the reset-before GRU, and numba_cpu's loops while
    another thread of the process runs and the split would apply."""
    calls = _spy(monkeypatch)
    rng = np.random.default_rng(5)

    def backward(kind, H, dtype=np.float32, **options):
        x, states, w = _case(kind, 4, H, True, rng, T=3)
        cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
        res = getattr(nb, f"{kind}_forward")(cast(x), *map(cast, states), *map(cast, w),
                                             training=True, **options)
        d = [np.ones((4, H), dtype) for _ in states]
        return getattr(nb, f"{kind}_backward")(np.ones((3, 4, H), dtype), *d, res[-1])

    for kind in GATES:
        backward(kind, PU)
        backward(kind, PU, np.float64)
        backward(kind, PU - 1)
    assert calls == [1] * 4
    backward("gru", PU, reset_after=False)
    assert calls == [1] * 4
    monkeypatch.setattr(pb, "enabled", False)
    backward("lstm", PU)
    assert calls == [1] * 4
    monkeypatch.setattr(pb, "enabled", True)
    # where the split would apply, another running thread sends it to numba_cpu's loops
    monkeypatch.setattr(pk, "MIN_SPLIT_STEP_WORK", 0)
    monkeypatch.setattr(pk, "blas_get_threads", lambda: 2)
    monkeypatch.setattr(pk, "_other_threads_running", lambda: True)
    backward("lstm", 2 * PU)
    assert calls == [1] * 4
    monkeypatch.setattr(pk, "_other_threads_running", lambda: False)
    backward("lstm", 2 * PU)
    assert calls == [1] * 4 + [2]


def _trained(kind, B, H, seed, T=4):
    """A float32 training forward of ``kind`` (its results, the cache last)."""
    x, states, w = _case(kind, B, H, True, np.random.default_rng(seed), T=T)
    f32 = [None if a is None else a.astype(np.float32) for a in [x] + states + w]
    return getattr(nb, f"{kind}_forward")(*f32, training=True)


def _before_each_thread(monkeypatch, before):
    """``bptt_thread`` calling ``before(tid, nthreads)`` first, in each thread."""
    real = pb.bptt_thread

    def thread(*args):
        before(*args[-4:-2])          # (..., tid, nthreads, go, gen)
        return real(*args)

    monkeypatch.setattr(pb, "bptt_thread", thread)


def test_a_failing_thread_releases_the_loop_and_raises(monkeypatch):
    """A pool thread of the split that fails releases the thread waiting for it at the
    barrier, and its error reaches the caller."""
    monkeypatch.setattr(pk, "threads", 2)

    def fail(tid, nthreads):
        if tid == 1:
            raise RuntimeError("pool thread failed")

    _before_each_thread(monkeypatch, fail)
    res = _trained("lstm", 3, 2 * PU, 1)
    d = np.ones((3, 2 * PU), np.float32)
    with pytest.raises(RuntimeError, match="pool thread failed"):
        nb.lstm_backward(np.ones((4, 3, 2 * PU), np.float32), d, d, res[-1])
    assert not _hotpool._loop_lock.locked()


def test_a_split_finding_the_pool_taken_runs_alone(monkeypatch):
    """While another loop holds the packed loops' pool, a split backward runs on its
    caller's thread, with the same result."""
    monkeypatch.setattr(pk, "threads", 2)
    seen = []
    _before_each_thread(monkeypatch, lambda tid, nthreads: seen.append((tid, nthreads)))
    res = _trained("gru", 5, 2 * PU, 2)
    d_out, d_h = np.ones((4, 5, 2 * PU), np.float32), np.ones((5, 2 * PU), np.float32)
    split = nb.gru_backward(d_out, d_h, res[-1])
    assert sorted(seen) == [(0, 2), (1, 2)]
    seen.clear()
    with _hotpool._loop_lock:
        alone = nb.gru_backward(d_out, d_h, res[-1])
    assert seen == [(0, 1)]
    for a, b in zip(split, alone):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bias_gradients_sum_a_shared_gate_gradient_once():
    """``_bias_grads``: the column sums of both gate gradients; where they are the same
    array (column block), the second bias gets a copy of the first's sums; where they differ
    (the GRU, or other columns), its own."""
    from fastrnn.backends.numba_cpu import _bias_grads
    a = np.random.default_rng(0).standard_normal((50, 12)).astype(np.float32)
    other = a.copy()
    other[:, 3] += 1
    for d_a_x, d_a_h in ((a[:, :6], a[:, :6]), (a[:, :6], other[:, :6]), (a[:, :6], a[:, 6:]),
                         (a[:24, :6], a[::2, :6])):      # same start and shape, other rows
        d_b_ih, d_b_hh = np.full(6, np.nan, np.float32), np.full(6, np.nan, np.float32)
        _bias_grads(d_a_x, d_a_h, d_b_ih, d_b_hh)
        np.testing.assert_allclose(d_b_ih, d_a_x.sum(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(d_b_hh, d_a_h.sum(0), rtol=1e-5, atol=1e-5)
