"""The packed time loops (fastrnn.backends.packed_numba, float32 LSTM and GRU): the
LLVM micro-kernel against NumPy's matmul for every row count, in the host's vector
width and in the AVX2 one; the panel layout against its definition; and the whole
forward (inference, and training with the gradients of its cache) against the float64
NumPy reference, on one thread and split over threads by hidden units (forced on small
problems), with lengths, both directions, sizes that leave partial tiles, and no biases;
and when the split yields to another running thread."""

import time

import numpy as np
import pytest

from conftest import random_lengths, wait_until_no_other_thread_runs

pk = pytest.importorskip("fastrnn.backends.packed_numba")
from fastrnn.backends import _hotpool  # noqa: E402
from fastrnn.backends import numba_cpu as nb  # noqa: E402
from fastrnn.backends import packed_bptt as pb  # noqa: E402
import fastrnn  # noqa: E402
from fastrnn.backends import reference as ref  # noqa: E402

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _panels(kind, H):
    """Panels of the packed loop: units per panel VW (gated cells) or RNN_NV VW (RNN)."""
    return -(-H // (pk.VW if GATES[kind] > 1 else pk.RNN_NV * pk.VW))


@pytest.fixture(params=[1, 2, 3, "panels", "ahead", "fused", "rows"],
                ids=lambda p: p if isinstance(p, str) else f"{p}threads")
def threads(request, monkeypatch):
    """Force the split over ``threads`` (hidden-unit panels), whatever the size, the
    projection by chunks of steps (a GEMM each); "panels": one thread, each chunk projected
    by the micro-kernel from W_ih's panels; "ahead": one thread, its input projection computed
    ahead by another (a ring of two slots where the chunks are short: ``chunk``);
    "fused": the inputs projected step by step by the micro-kernel, split over three
    threads by hidden units; "rows": fused and split by batch rows over up to three
    threads, one row each at least. Returns the mode and the (thread count, by rows,
    fused) ``_run`` was called with."""
    nthreads = {"fused": 3}.get(request.param, request.param)
    nthreads = nthreads if isinstance(nthreads, int) else 1
    monkeypatch.setattr(pk, "threads", nthreads)
    monkeypatch.setattr(pk, "ahead", request.param == "ahead")
    monkeypatch.setattr(pk, "panel_chunks", request.param == "panels")
    monkeypatch.setattr(pk, "rows", request.param == "rows")
    monkeypatch.setattr(pk, "fused", request.param in ("fused", "rows"))
    monkeypatch.setattr(pk, "ROWS_MIN", 1)
    monkeypatch.setattr(pk, "MIN_SPLIT_STEP_WORK", 0)
    monkeypatch.setattr(pk, "RNN_MIN_H", 1)
    if request.param == "rows":
        monkeypatch.setattr(pk, "blas_get_threads", lambda: 3)
    return request.param, _spy_run(monkeypatch)


def _spy_run(monkeypatch):
    """The (thread count, by rows, fused) of every ``_run`` call from now on."""
    calls = []
    real = pk._run

    def spy(n, *args, by_rows=False, panels_ih=None):
        calls.append((n, by_rows, panels_ih is not None))
        return real(n, *args, by_rows=by_rows, panels_ih=panels_ih)

    monkeypatch.setattr(pk, "_run", spy)
    return calls


@pytest.mark.parametrize("VW", sorted({pk.VW, 8}))
@pytest.mark.parametrize("NV", [3, 4])
def test_microkernel_matches_matmul_for_every_row_count(VW, NV):
    """Every row count, with the k loop in halves (small tiles of a small batch) or not."""
    import numba
    MR = {(16, 4): 6, (16, 3): 8, (8, 4): 2, (8, 3): 3}[VW, NV]
    mk = pk.microkernel(MR, NV, VW)

    @numba.njit
    def call(mr, a, a_off, lda, p, p_off, K, c, c_off, ldc, cv, acc, halves, pf_off=0, pf_n=0):
        mk(mr, a, a_off, lda, p, p_off, K, c, c_off, ldc, cv, acc, halves, pf_off, pf_n)

    rng = np.random.default_rng(VW * NV)
    K, NR = 13, NV * VW
    a = rng.standard_normal((MR + 2, K)).astype(np.float32)
    panel = rng.standard_normal((2, K, NR)).astype(np.float32)
    for mr, halves, pf_n in [(mr, h, n) for mr in range(1, MR + 1) for h in (False, True)
                             for n in (0, 5, 100)]:
        cv = VW + 3                                  # vectors land cv apart
        c = np.full((MR + 1, 2 + NV * cv), np.nan, np.float32)
        # (prefetching lines of the other panel, or of fewer lines than k steps, or more,
        # changes no result)
        call(mr, a, 1 * K, K, panel, 1 * K * NR, K, c, 2, c.shape[1], cv, False, halves, 0,
             pf_n)
        want = a[1:1 + mr] @ panel[1]
        for v in range(NV):
            got = c[:mr, 2 + v * cv:2 + v * cv + VW]
            np.testing.assert_allclose(got, want[:, v * VW:(v + 1) * VW], rtol=1e-5, atol=1e-5)
        assert np.isnan(c[mr:]).all(), "rows past mr were written"
        # accumulate: a second block of k adds onto what c holds
        before = c.copy()
        call(mr, a, 1 * K + 3, K, panel, (1 * K + 3) * NR, K - 3, c, 2, c.shape[1], cv, True,
             halves)
        extra = a[1:1 + mr, 3:] @ panel[1, 3:]
        for v in range(NV):
            sl = np.s_[:mr, 2 + v * cv:2 + v * cv + VW]
            np.testing.assert_allclose(c[sl], before[sl] + extra[:, v * VW:(v + 1) * VW],
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gates", [3, 4])
def test_pack_layout(gates):
    H, K = 21, 5
    w = np.arange(gates * H * K, dtype=np.float32).reshape(gates * H, K)
    p = pk.pack(w, gates)
    U = -(-H // pk.VW)
    assert p.shape == (U, K, gates * pk.VW)
    for u in range(U):
        for g in range(gates):
            for j in range(pk.VW):
                n = u * pk.VW + j
                want = w[g * H + n] if n < H else np.zeros(K, np.float32)
                np.testing.assert_array_equal(p[u, :, g * pk.VW + j], want)


@pytest.mark.parametrize("H", [5, 64, 69, 130])
def test_pack_layout_rnn(H):
    """The RNN's panels: RNN_NV vectors of consecutive units each, zeros past H."""
    K = 3
    w = np.arange(H * K, dtype=np.float32).reshape(H, K)
    p = pk.pack(w, 1)
    NR = pk.RNN_NV * pk.VW
    assert p.shape == (-(-H // NR), K, NR)
    for u in range(p.shape[0]):
        for j in range(NR):
            n = u * NR + j
            want = w[n] if n < H else np.zeros(K, np.float32)
            np.testing.assert_array_equal(p[u, :, j], want)


def _forward(kind, backend, x, states, w, lengths, reverse, training):
    fwd = getattr(backend, f"{kind}_forward")
    return fwd(x, *states, *w, lengths=lengths, reverse=reverse, training=training)


@pytest.mark.parametrize("kind", list(GATES))
@pytest.mark.parametrize("B,H", [(1, 5), (7, 16), (13, 37), (3, 130)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [None, 1, 2, 4], ids=["whole", "chunk1", "chunk2", "chunk4"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_packed_forward_matches_the_float64_reference(threads, kind, B, H, reverse, bias,
                                                      chunk, training, monkeypatch):
    """``chunk``: steps of input projection computed at a time (None: all six; 4: a short
    last chunk). In
    training, the cache the packed forward leaves goes through numba_cpu's backward:
    every gradient against the reference's."""
    mode, counts = threads
    rng = np.random.default_rng(B * 100 + H)
    T, I, G = 6, 4, GATES[kind] * H
    lengths = random_lengths(rng, T, B)
    x = rng.standard_normal((T, B, I))
    states = [0.5 * rng.standard_normal((B, H)) for _ in range(2 if kind == "lstm" else 1)]
    # W_hh ~ U(-0.6, 0.6) up to H = 37; at H = 130 that makes the ReLU RNN's state grow
    # by orders of magnitude over six steps, so its range shrinks as 1 / sqrt(H) there.
    s_hh = 0.6 * min(1.0, np.sqrt(37 / H))
    w = [rng.uniform(-0.6, 0.6, (G, I)), rng.uniform(-s_hh, s_hh, (G, H))]
    w += [rng.uniform(-0.6, 0.6, G), rng.uniform(-0.6, 0.6, G)] if bias else [None, None]
    f32 = [None if a is None else a.astype(np.float32) for a in [x] + states + w]
    x32, states32, w32 = f32[0], f32[1:1 + len(states)], f32[1 + len(states):]
    if chunk:
        monkeypatch.setattr(pk, "CHUNK_FLOATS", chunk * B * G)
    got = _forward(kind, nb, x32, states32, w32, lengths, reverse, training)
    want = _forward(kind, ref, x, states, w, lengths, reverse, training)
    if mode == "rows":
        assert counts == [(min(3, B), B > 1, True)], counts
    else:
        nthreads = {"fused": 3}.get(mode, mode)
        nthreads = nthreads if isinstance(nthreads, int) else 1
        assert counts == [(min(nthreads, _panels(kind, H)), False, mode == "fused")], counts
    for g, e in zip(got[:-1], want[:-1]):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5)
    if not training:
        assert got[-1] is None
        return
    d_out = rng.standard_normal((T, B, H))
    d_states = [rng.standard_normal((B, H)) for _ in states]
    got_grads = getattr(nb, f"{kind}_backward")(d_out.astype(np.float32),
                                                *(d.astype(np.float32) for d in d_states),
                                                got[-1])
    want_grads = getattr(ref, f"{kind}_backward")(d_out, *d_states, want[-1])
    assert len(got_grads) == len(want_grads)
    for g, e in zip(got_grads, want_grads):
        assert (g is None) == (e is None)
        if g is not None:
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_only_float32_forwards_of_two_steps_take_the_packed_loop(monkeypatch):
    calls = []
    real = pk.run   # (nthreads, cell, x, w_ih, w_hh, bias, b_hn, lengths, reverse, training, ...)
    monkeypatch.setattr(pk, "run",
                        lambda *a: calls.append((a[2].dtype, a[2].shape[0], a[9])) or real(*a))
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        for T in (1, 3):
            x = rng.standard_normal((T, 2, 4)).astype(dtype)
            h = np.zeros((2, 5), dtype)
            w = [rng.standard_normal(s).astype(dtype) for s in ((20, 4), (20, 5), (20,), (20,))]
            nb.lstm_forward(x, h, h, *w, training=False)
            nb.lstm_forward(x, h, h, *w, training=True)
    assert calls == [(np.float32, 3, False), (np.float32, 3, True)]


def _spinning_thread():
    """A thread that spins (nogil) until the returned ``stop()`` is called: what an idle
    BLAS pool looks like from /proc after a parallel call; returns once /proc shows it
    running."""
    import threading
    import time

    import numba

    from fastrnn.backends._simd import load_acquire, store_release

    @numba.njit(nogil=True)
    def spin(flag):
        while load_acquire(flag, 0) == 0:
            pass

    @numba.njit(nogil=True)
    def release(flag):
        store_release(flag, 0, 1)

    flag = np.zeros(1, np.int64)
    spin(np.ones(1, np.int64))                    # compiled before the thread starts
    t = threading.Thread(target=spin, args=(flag,))
    t.start()
    deadline = time.monotonic() + 5
    while not pk._other_threads_running():        # until /proc shows it running
        if time.monotonic() > deadline:
            release(flag)
            t.join()
            raise AssertionError("the spinning thread never showed as running")
        time.sleep(0.01)

    def stop():
        release(flag)
        t.join()
    return stop


def test_the_split_yields_to_a_running_thread(monkeypatch):
    """Where another thread of the process runs (a spinning BLAS pool), a forward big
    enough to split runs the BLAS loops instead (0); alone, it splits; below the split
    threshold one packed thread runs either way; a forced thread count is kept."""
    monkeypatch.setattr(pk, "threads", None)
    monkeypatch.setattr(pk, "blas_get_threads", lambda: 2)
    monkeypatch.setattr(pk, "MIN_SPLIT_STEP_WORK", 1000)
    H = 4 * pk.VW
    x = np.zeros((5, 8, 3), np.float32)
    wait_until_no_other_thread_runs()
    assert pk.threads_for(x, 4, H) == 2
    stop = _spinning_thread()
    try:
        assert pk.threads_for(x, 4, H) == 0
        assert pk.threads_for(x[:, :1], 4, 8) == 1              # 1 x 32 x 8 < 1000
        monkeypatch.setattr(pk, "threads", 2)
        assert pk.threads_for(x, 4, H) == 2
        assert pk.threads_for(x.astype(np.float64), 4, H) == 0
        assert pk.threads_for(x[:1], 4, H) == 0
        assert pk.threads_for(x, 1, pk.RNN_MIN_H - 1) == 0         # a narrow RNN
        assert pk.threads_for(x, 1, pk.RNN_MIN_H) == 1
    finally:
        stop()


def test_the_projection_runs_ahead_only_on_an_idle_core(monkeypatch):
    """A one-thread loop whose projection comes from the micro-kernel projects ahead on
    another core in an inference where the BLAS has two threads, the sequence makes two
    chunks and no other thread runs; else chunk by chunk on the loop's thread ("panels"),
    training included. Wide inputs go to the GEMM: on the BLAS's threads, or on one next
    to a running thread in an inference. ``ahead`` True or False forces it."""
    monkeypatch.setattr(pk, "ahead", None)
    monkeypatch.setattr(pk, "blas_get_threads", lambda: 2)
    small = dict(T=200, B=1, I=64, G=256, gates=4)                 # LSTM 200x1x64x64
    wide = dict(T=100, B=4, I=1024, G=512, gates=4)                # I = 8 H, 210M
    assert wide["T"] * wide["B"] * wide["G"] * wide["I"] > pk.PANELS_MAX_WORK
    wait_until_no_other_thread_runs()
    assert pk._projection(**small, training=False) == "ahead"
    assert pk._projection(**small, training=True) == "panels"
    assert pk._projection(**{**small, "T": 2}, training=False) == "panels"    # one chunk
    assert 200 * 256 * 16 < pk.AHEAD_MIN_WORK
    assert pk._projection(**{**small, "I": 16}, training=False) == "panels"   # too small
    assert pk._projection(**wide, training=False) == "blas"
    assert pk._projection(**{**wide, "I": 256}, training=False) == "ahead"   # I = 2 H
    stop = _spinning_thread()
    try:
        assert pk._projection(**small, training=False) == "panels"
        assert pk._projection(**wide, training=False) == "alone"
        assert pk._projection(**wide, training=True) == "blas"
        monkeypatch.setattr(pk, "ahead", True)
        assert pk._projection(**small, training=False) == "ahead"
        assert pk._projection(**wide, training=True) == "ahead"
    finally:
        stop()
    monkeypatch.setattr(pk, "ahead", False)
    assert pk._projection(**small, training=False) == "panels"
    monkeypatch.setattr(pk, "ahead", None)
    monkeypatch.setattr(pk, "blas_get_threads", lambda: 1)
    assert pk._projection(**small, training=False) == "panels"
    assert pk._projection(**wide, training=False) == "blas"


def test_the_projector_and_the_loop_give_the_same_bits(monkeypatch):
    """Projected ahead by the worker, in chunks of a few steps, or chunk by chunk on the
    loop's thread, the micro-kernel sums each projection in the same order: the two
    modes' outputs are equal bitwise, for a last chunk of one or two rows too (where the
    k loop in halves would sum otherwise), and with inputs wide enough for several blocks
    of k (chunks under and over ``KC_WIDE_ROWS`` rows take blocks of different sizes). A
    loop that chose to project ahead but finds the pool taken projects its chunks itself,
    with the same bits."""
    rng = np.random.default_rng(5)
    modes = []
    real = pk._loop

    def spy(nthreads, mode, *args):
        modes.append(mode)
        return real(nthreads, mode, *args)

    monkeypatch.setattr(pk, "_loop", spy)
    monkeypatch.setattr(pk, "threads", 1)
    monkeypatch.setattr(pk, "panel_chunks", True)
    monkeypatch.setattr(pk, "AHEAD_MIN_ROWS", 1)
    monkeypatch.setattr(pk, "AHEAD_CHUNKS", 4)
    monkeypatch.setattr(pk, "fused", False)
    for kind, I, H in (("lstm", 6, 37), ("gru", 6, 37), ("rnn_tanh", 6, 70),
                       ("lstm", 300, 20)):
        m = fastrnn.make_layer(kind, I, H, backend="numba", seed=1).eval()
        for T, B in ((17, 1), (10, 2), (9, 5), (12, 8)):
            x = rng.standard_normal((T, B, I)).astype(np.float32)
            got = {}
            for mode in ("ahead", "panels", "taken"):
                monkeypatch.setattr(pk, "ahead", mode != "panels")
                del modes[:]
                if mode == "taken":
                    with _hotpool._loop_lock:
                        got[mode] = m(x)[0]
                else:
                    got[mode] = m(x)[0]
                assert modes == [{"taken": "panels"}.get(mode, mode)]
            np.testing.assert_array_equal(got["ahead"], got["panels"])
            np.testing.assert_array_equal(got["taken"], got["panels"])


def test_small_projections_come_from_w_ihs_panels(monkeypatch):
    """A one-thread loop whose input projection has at most ``PANELS_MAX_WORK``
    multiply-adds, or whose inputs are at most ``AHEAD_MAX_INPUTS`` times its hidden units,
    projects with the micro-kernel (``"panels"`` or ``"ahead"``), in training too (so that
    the train and eval forwards agree bitwise); ``panel_chunks`` forces it either way; and
    the loop then runs ``PROJ_PANELS`` with W_ih packed."""
    monkeypatch.setattr(pk, "ahead", False)
    small = dict(T=200, B=1, I=256, G=256, gates=4)                # I = 4 H, 13M
    assert 200 * 256 * 256 > pk.PANELS_MAX_WORK >= 50 * 256 * 256
    for training in (False, True):
        assert pk._projection(**small, training=training) == "blas"
        assert pk._projection(**{**small, "T": 50}, training=training) == "panels"
        assert pk._projection(**{**small, "I": 128}, training=training) == "panels"
    monkeypatch.setattr(pk, "panel_chunks", False)
    assert pk._projection(**{**small, "T": 50}, training=False) == "blas"
    monkeypatch.setattr(pk, "panel_chunks", True)
    assert pk._projection(**small, training=False) == "panels"
    # end to end: the loop's projection mode and W_ih's panels
    monkeypatch.setattr(pk, "panel_chunks", None)
    seen = []
    real = pk.cell_thread

    def spy(*args):
        seen.append((args[-5], args[-3].shape))
        return real(*args)

    monkeypatch.setattr(pk, "cell_thread", spy)
    H = 2 * pk.VW
    m = fastrnn.LSTM(16, H, backend="numba", seed=0).eval().freeze()
    m(np.ones((5, 1, 16), np.float32))
    U = H // pk.VW
    assert seen == [(pk.PROJ_PANELS, (U, 16, 4 * pk.VW))]


AVX2_CHILD = """
import json
import numpy as np
from fastrnn.backends import numba_cpu as nb, packed_bptt as pb, packed_numba as pk
from fastrnn.backends import reference as ref
rng = np.random.default_rng(7)
errs, grad_errs, packed_backwards = {}, {}, []
real = pb.run
pb.run = lambda *args: packed_backwards.append(args[0]) or real(*args)
f32 = lambda a: a.astype(np.float32)


def grad_err(kind, x, states, w, lengths, d_out, d_states):
    # a training step's largest gradient error against the float64 reference's
    got = getattr(nb, kind + "_forward")(f32(x), *map(f32, states), *map(f32, w),
                                         lengths=lengths, training=True)
    want = getattr(ref, kind + "_forward")(x, *states, *w, lengths=lengths, training=True)
    got = getattr(nb, kind + "_backward")(f32(d_out), *map(f32, d_states), got[-1])
    want = getattr(ref, kind + "_backward")(d_out, *d_states, want[-1])
    return max(float(np.abs(g - e).max() / (1 + np.abs(e).max())) for g, e in zip(got, want))


for kind, gates, H in (("lstm", 4, 37), ("gru", 3, 37), ("rnn_tanh", 1, 70),
                      ("rnn_relu", 1, 37)):
    T, B, I = 5, 7, 6
    x = rng.standard_normal((T, B, I))
    states = [0.5 * rng.standard_normal((B, H)) for _ in range(2 if kind == "lstm" else 1)]
    w = [rng.uniform(-0.5, 0.5, s) / (1 + (gates == 1) * H ** 0.5)
         for s in ((gates * H, I), (gates * H, H), (gates * H,), (gates * H,))]
    lengths = np.array([5, 3, 0, 5, 1, 4, 2])
    got = getattr(nb, kind + "_forward")(f32(x), *map(f32, states), *map(f32, w),
                                         lengths=lengths, training=False)
    want = getattr(ref, kind + "_forward")(x, *states, *w, lengths=lengths, training=False)
    errs[kind] = max(float(np.abs(g - e).max()) for g, e in zip(got[:-1], want[:-1]))
    d_out, d_states = rng.standard_normal((T, B, H)), [np.ones((B, H)) for _ in states]
    grad_errs[kind] = grad_err(kind, x, states, w, lengths, d_out, d_states)
# split over two threads, inputs and units of whole 32-unit panels: d_x, d_W_ih and d_W_hh
# from the micro-kernels (the strided one: tiles of 2 rows), forced (off by default with
# AVX2), biases summed in the passes
micro_default = [pb.micro_input_grads, pb.micro_weight_grads]
# k in halves only where twice the tile's accumulators still fit 16 registers (_simd.split_k)
halves = {"lstm": [bool(pk.split_k(B, 4, pk.MR_LSTM)) for B in (1, 2, 64)],
          "gru": [bool(pk.split_k(B, 3, pk.MR_GRU)) for B in (1, 2, 3, 64)]}
pb.micro_input_grads = pb.micro_weight_grads = True
pk.threads = 2
for kind, gates in (("lstm", 4), ("gru", 3)):
    T, B, I, H = 6, 9, 32, 64
    x = rng.standard_normal((T, B, I))
    states = [0.5 * rng.standard_normal((B, H)) for _ in range(2 if kind == "lstm" else 1)]
    w = [rng.uniform(-0.3, 0.3, s) for s in ((gates * H, I), (gates * H, H), (gates * H,),
                                              (gates * H,))]
    lengths = np.array([6, 3, 0, 6, 1, 4, 2, 5, 6])
    d_out, d_states = rng.standard_normal((T, B, H)), [np.ones((B, H)) for _ in states]
    grad_errs[kind + " split"] = grad_err(kind, x, states, w, lengths, d_out, d_states)
print(json.dumps({"VW": pk.VW, "MR": [pk.MR_LSTM, pk.MR_GRU], "errs": errs,
                  "micro_default": micro_default, "halves": halves,
                  "grad_errs": grad_errs, "packed_backwards": packed_backwards}))
"""


@pytest.mark.slow
def test_the_avx2_configuration_end_to_end(tmp_path):
    """The packed loops as an AVX2-only CPU gets them (8-lane vectors, tiles of 2 and 3
    rows; the RNN at H = 70 over three 32-unit panels), forward and backward
    (:mod:`.packed_bptt`, 32-unit panels of W_hh^T; split over two threads, ``d_x`` and the
    weights' gradients from the micro-kernels, forced: by default OpenBLAS's GEMMs with
    AVX2): Numba compiling for Haswell on this host, in a process with its own cache."""
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CACHE_DIR=str(tmp_path),
               NUMBA_CPU_FEATURES="+64bit,+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt,+sse4.2,"
                                  "+cx16,+movbe,+lzcnt,+sse,+sse2,+sse3,+ssse3,+sse4.1")
    run = subprocess.run([sys.executable, "-c", AVX2_CHILD], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["VW"] == 8 and result["MR"] == [2, 3], result
    assert result["micro_default"] == [False, False], result   # OpenBLAS's GEMMs there
    # the LSTM's 2-row tile in halves would keep 16 accumulators: spilled, 4x slower
    assert result["halves"] == {"lstm": [True, False, False],
                                "gru": [True, True, False, False]}, result
    assert set(result["errs"]) == {"lstm", "gru", "rnn_tanh", "rnn_relu"}, result
    for kind, err in result["errs"].items():
        assert err < 2e-5, (kind, result)
    # packed_bptt, 32-unit panels: one thread each, then the two split backwards
    assert result["packed_backwards"] == [1, 1, 1, 1, 2, 2], result
    assert {"lstm split", "gru split"} <= set(result["grad_errs"]), result
    for kind, err in result["grad_errs"].items():
        assert err < 1e-5, (kind, result)


@pytest.mark.skipif(pk.VW != 16, reason="the host has no AVX-512: 256-bit vectors are its widest")
def test_the_pointwise_passes_use_the_widest_vectors():
    """``wide_vectors()`` makes LLVM vectorize the packed loops' pointwise passes with
    512-bit vectors on AVX-512 hosts, where its tuning prefers 256-bit ones (zmm registers
    in the code; none without the mark)."""
    H, B, T = 32, 2, 2
    a = pk.aligned_empty((B, 4 * H))
    xw = np.zeros((T, B, 4 * H), np.float32)
    bias = np.zeros(4 * H, np.float32)
    cs = np.zeros((2, B, H), np.float32)
    out = np.zeros((T, B, H), np.float32)
    lengths = np.full(B, T, np.int64)
    # with the mark and, as the control, with a no-op in its place
    import numba
    no_mark = numba.njit(lambda: None)
    unmarked = _fresh(pk._lstm_block, wide_vectors=no_mark,
                      _carry=_fresh(pk._carry, wide_vectors=no_mark))
    asm = {}
    for name, f in (("marked", _fresh(pk._lstm_block)), ("unmarked", unmarked)):
        f(a, H, xw, 0, 0, bias, cs, cs.copy(), 0, 1, out, 0, lengths, 0, H, 0, B)
        asm[name] = f.inspect_asm(f.signatures[0])
    if "zmm" in asm["unmarked"]:
        pytest.skip("this CPU's LLVM tuning already chooses 512-bit vectors")
    assert "zmm" in asm["marked"]


def _fresh(dispatcher, **names):
    """``dispatcher``'s function compiled anew as the package compiles it (its jit options
    but the cache: a function loaded from Numba's cache has no assembly to show), with
    ``names`` in place of the globals of those names its code reads."""
    import types

    import numba
    py = dispatcher.py_func
    if names:
        py = types.FunctionType(py.__code__, {**py.__globals__, **names})
    return numba.njit(**{k: v for k, v in pk._jit.keywords.items() if k != "cache"})(py)


def _own_code(dispatcher):
    """The machine code of ``dispatcher``'s one compiled function itself (not its
    CPython wrapper, not the runtime's helpers that the module also holds)."""
    import re
    own, keep = [], False
    for line in dispatcher.inspect_asm(dispatcher.signatures[0]).splitlines():
        label = re.match(r"^([\w.$]+):$", line)
        if label and not label.group(1).startswith(".L"):
            keep = label.group(1).startswith("_Z") and "cpython" not in label.group(1)
        elif keep:
            own.append(line)
    return "\n".join(own)


def test_the_per_step_passes_keep_no_reference_counts():
    """The pointwise passes that the packed loops call at every step (forward and
    backward) make no NRT reference-count calls: a call from them to a function that takes
    arrays (``_carry``, ``_store_gate`` before they were inlined) left an atomic increment
    and decrement per array argument at every call, about 110 of the LSTM's 300 ns a step
    at B = 1, H = 64. The control (``_carry`` called, not inlined) has them."""
    H, B, T, Hp = 32, 2, 3, 32
    f32 = np.float32
    a, bias = np.zeros((B, 4 * Hp), f32), np.zeros(4 * H, f32)
    xw, out = np.zeros((T, B, 4 * H), f32), np.zeros((T, B, H), f32)
    cs, hs = np.zeros((2, B, H), f32), np.zeros((T + 1, B, H), f32)
    gates, hns = np.zeros((T, B, 4 * H), f32), np.zeros((T, B, H), f32)
    lengths = np.full(B, T, np.int64)
    d_out, d_h, d_c = np.zeros((T, B, H), f32), np.zeros((B, H), f32), np.zeros((B, H), f32)
    d_a, d_b = np.zeros((T, B, 4 * H), f32), np.zeros(4 * H, f32)   # (biases summed)
    calls = {
        pk._lstm_block: (a, Hp, xw, 0, 0, bias, cs, hs, 0, 1, out, 0, lengths, 0, H, 0, B),
        pk._gru_block: (a, Hp, xw, 0, 0, bias, bias, hs, 0, 1, out, 0, lengths, 0, H, 0, B),
        pk._rnn_block: (a, xw, 0, bias, hs, 0, 1, out, 0, lengths, 0, H, 0, B, False),
        pk._lstm_gates: (a, Hp, xw, 0, 0, bias, 0, lengths, 0, H, 0, B, gates),
        pk._gru_gates: (a, Hp, xw, 0, 0, bias, bias, 0, lengths, 0, H, 0, B, gates, hns),
        pb._lstm_units: (gates, hs, 1, 0, d_out, d_h, d_c, d_a, d_b, lengths, 0, H),
        pb._gru_units: (gates, hns, hs, 1, 0, d_out, d_h, d_a, d_a, d_b, d_b, lengths, 0, H),
        pb._rnn_units: (hs, 1, 0, d_out, d_h, d_a, d_b, lengths, False, 0, H),
    }
    for dispatcher, args in calls.items():
        f = _fresh(dispatcher)
        f(*args)
        assert "NRT_incref" not in _own_code(f), dispatcher.__name__
    f = _fresh(pk._lstm_block, _carry=_fresh(pk._carry))    # _carry called: the control
    f(*calls[pk._lstm_block])
    assert "NRT_incref" in _own_code(f)


def test_wide_products_prefetch_the_next_panel_block():
    """A product of ``KC_WIDE_ROWS`` rows or more prefetches into L2, spread over its row
    tiles, the panel block it reads next (the next k block of the panel, else the next
    panel in the order it runs them, serpentine included), none after its last; fewer rows
    prefetch nothing. The compiled product issues ``prefetcht1`` and its sums are the
    matmul's, with k blocks and without."""
    NR, K = 4 * pk.VW, 300
    nb_ = pk._next_block
    assert nb_(2, 0, 128, K, NR, True, 3) == ((2 * K + 128) * NR, 128 * NR // 16)
    assert nb_(2, 256, 128, K, NR, True, 3) == (3 * K * NR, 128 * NR // 16)
    assert nb_(2, 256, 128, K, NR, True, 1) == (1 * K * NR, 128 * NR // 16)
    assert nb_(2, 256, 128, K, NR, False, 3) == (0, 0)          # the last panel
    assert nb_(2, 0, 512, K, NR, True, 3) == (3 * K * NR, K * NR // 16)
    assert pk._prefetch_plan(False, 2, 0, 128, K, NR, 6, True, 3) == (0, 0)   # few rows
    for tiles in (1, 5, 6, 11):      # the tiles' lines cover the whole next block
        start, per = pk._prefetch_plan(True, 2, 0, 128, K, NR, tiles, True, 3)
        lines = 128 * NR // 16
        assert start == (2 * K + 128) * NR and per * tiles >= lines > per * (tiles - 1)

    rng = np.random.default_rng(5)
    H, B = 3 * pk.VW, pk.KC_WIDE_ROWS + 5
    f = _fresh(pk._recurrent)
    for K in (300, pk.KC_WIDE + 88):                     # one k block, and two
        w = rng.standard_normal((4 * H, K)).astype(np.float32)
        panels = pk.pack(w, 4)
        U = panels.shape[0]
        hs = rng.standard_normal((1, B, K)).astype(np.float32)
        a = pk.aligned_empty((B, NR * U))
        for backwards in (False, True):
            a[:] = np.nan
            f(panels, hs, 0, a, pk.VW, U * pk.VW, 0, U, backwards, 0, B)
            got = np.concatenate([a[:, g * U * pk.VW:g * U * pk.VW + H] for g in range(4)],
                                 axis=1)
            np.testing.assert_allclose(got, hs[0] @ w.T, rtol=1e-4, atol=2e-3)
    assert "prefetcht1" in f.inspect_asm(f.signatures[0])


def test_a_failing_thread_releases_the_loop_and_raises(monkeypatch):
    """A pool thread that fails sets the loop's counters to RELEASE (so that the loop
    waiting on it runs out instead of hanging) and its error reaches the caller."""
    counters = pk.flags(2)

    def fail():
        raise RuntimeError("pool thread failed")

    def here(go, gen):                 # the loop's own thread, waiting on the job's
        _hotpool.publish(go, gen)
        deadline = time.monotonic() + 10
        while counters[0] != pk.RELEASE:
            assert time.monotonic() < deadline, "the failed job did not release the loop"

    with pytest.raises(RuntimeError, match="pool thread failed"):
        pk.with_pool(counters, [(fail,)], here)
    assert (counters == pk.RELEASE).all()
    # end to end: the projector of a loop that projects ahead fails on the first chunk it
    # computes (the loop's second: the loop projects the first itself)
    monkeypatch.setattr(pk, "ahead", True)
    monkeypatch.setattr(pk, "threads", 1)
    monkeypatch.setattr(pk, "project_ahead", lambda *args: fail())
    rng = np.random.default_rng(0)
    T, B, I, H = 9, 3, 4, 16
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = np.zeros((B, H), np.float32)
    w_ih, w_hh = (rng.standard_normal((4 * H, n)).astype(np.float32) for n in (I, H))
    with pytest.raises(RuntimeError, match="pool thread failed"):
        nb.lstm_forward(x, h0, h0, w_ih, w_hh, None, None, training=False)


def test_a_loop_that_projects_ahead_projects_its_first_chunk_itself(monkeypatch):
    """The loop computes its first chunk of projections before its steps (it never waits
    for the worker to start): with a worker that computes nothing, a one-chunk sequence
    projected ahead still gives the loop's own result (before, it waited forever)."""
    import threading
    monkeypatch.setattr(pk, "ahead", True)
    monkeypatch.setattr(pk, "threads", 1)
    monkeypatch.setattr(pk, "project_ahead", lambda *args: None)
    rng = np.random.default_rng(0)
    T, B, I, H = 5, 1, 4, 16
    assert pk._ahead_chunk(T, B, 4 * H) >= T            # one chunk: the loop's own
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = np.zeros((B, H), np.float32)
    w_ih, w_hh = (rng.standard_normal((4 * H, n)).astype(np.float32) for n in (I, H))
    got = []
    t = threading.Thread(target=lambda: got.append(
        nb.lstm_forward(x, h0, h0, w_ih, w_hh, None, None, training=False)), daemon=True)
    t.start()
    t.join(60)
    assert got, "the loop waited for a worker that never projects"
    monkeypatch.setattr(pk, "ahead", False)
    monkeypatch.setattr(pk, "panel_chunks", True)
    want = nb.lstm_forward(x, h0, h0, w_ih, w_hh, None, None, training=False)
    for a, b in zip(got[0][:3], want[:3]):
        np.testing.assert_array_equal(a, b)


def test_the_running_task_count_survives_a_closed_descriptor():
    """``/proc/loadavg`` is read from a descriptor kept open; closed behind the module's
    back, the read fails once (the caller then looks at the threads themselves) and the
    next call opens it again."""
    import os
    if not os.path.exists("/proc/loadavg"):
        pytest.skip("no /proc/loadavg here")
    assert pk._running_tasks() >= 1
    os.close(pk._loadavg_fd)
    with pytest.raises(OSError):
        pk._running_tasks()
    assert pk._loadavg_fd is None
    assert pk._running_tasks() >= 1 and pk._loadavg_fd is not None
    assert pk._other_threads_running() in (False, True)


@pytest.mark.parametrize("fused", [False, True])
def test_a_split_projects_on_one_blas_thread_each(monkeypatch, fused):
    """A split whose threads project with GEMMs runs them with the BLAS single-threaded
    (two threads' GEMMs would otherwise share one OpenBLAS pool); a fused split, which
    calls no BLAS, leaves the BLAS's threads alone."""
    import contextlib
    entered = []

    @contextlib.contextmanager
    def spy():
        entered.append(True)
        yield

    monkeypatch.setattr(pk, "_single_threaded_blas", spy)
    monkeypatch.setattr(pk, "threads", 2)
    monkeypatch.setattr(pk, "fused", fused)
    monkeypatch.setattr(pk, "rows", False)
    rng = np.random.default_rng(4)
    T, B, H = 3, 4, 2 * pk.VW
    x = rng.standard_normal((T, B, H)).astype(np.float32)
    h0 = np.zeros((B, H), np.float32)
    w_ih, w_hh = (0.3 * rng.standard_normal((4 * H, H)).astype(np.float32) for _ in range(2))
    got = nb.lstm_forward(x, h0, h0, w_ih, w_hh, None, None, training=False)[0]
    want = ref.lstm_forward(x.astype(np.float64), h0, h0, w_ih, w_hh, None, None,
                            training=False)[0]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert entered == ([] if fused else [True])


def test_loops_that_need_the_pool_at_once_take_turns(monkeypatch):
    """Split loops started from several threads at once: one has the pool at a time, the
    others run alone on their callers' threads (none waits for a worker that another
    loop holds); every result is right. And while the pool is taken, a split runs alone."""
    import threading
    monkeypatch.setattr(pk, "threads", 2)
    monkeypatch.setattr(pk, "MIN_SPLIT_STEP_WORK", 0)
    modes = []
    real = pk._loop

    def spy(nthreads, mode, *args):
        modes.append((nthreads, mode))
        return real(nthreads, mode, *args)

    monkeypatch.setattr(pk, "_loop", spy)
    rng = np.random.default_rng(3)
    T, B, I, H = 12, 5, 6, 4 * pk.VW
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = np.zeros((B, H), np.float32)
    w_ih, w_hh = (0.3 * rng.standard_normal((4 * H, n)).astype(np.float32) for n in (I, H))
    want = ref.lstm_forward(x.astype(np.float64), h0, h0, w_ih, w_hh, None, None,
                            training=False)[0]
    with _hotpool._loop_lock:                            # another thread's loop has the pool
        got = nb.lstm_forward(x, h0, h0, w_ih, w_hh, None, None, training=False)[0]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert modes == [(1, "alone")]
    outs, errors = [], []

    def worker():
        try:
            for _ in range(5):
                outs.append(nb.lstm_forward(x, h0, h0, w_ih, w_hh, None, None,
                                            training=False)[0])
        except Exception as exc:                   # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a loop waited forever"
    assert not errors and len(outs) == 20
    for got in outs:
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert {m for m in modes[1:]} <= {(2, "split"), (1, "alone")}


def test_the_rows_split_only_where_it_pays(monkeypatch):
    """A fused loop with ROWS_MIN rows and ROWS_MIN_WORK multiply-adds a step a thread for
    two threads, packed weights within its share of L2 and no other running thread
    splits the rows; a loop that is not fused, fewer rows, a lighter step, bigger weights,
    a one-thread BLAS or a running thread do not; ``rows`` forces it (rows alone)."""
    monkeypatch.setattr(pk, "rows", None)             # auto, the default
    monkeypatch.setattr(pk, "blas_get_threads", lambda: 2)
    monkeypatch.setattr(pk, "l2_bytes", lambda: 2 << 20)
    x = np.zeros((5, 2 * pk.ROWS_MIN, 128), np.float32)
    wait_until_no_other_thread_runs()
    assert pk._rows_for(x, 4, 128, True) == 2
    assert pk._rows_for(x, 3, 128, True) == 2
    assert pk._rows_for(x, 4, 128, True, training=True) == 0   # a training forward
    assert pk._rows_for(x, 4, 128, False) == 0              # not fused
    assert pk._rows_for(x[:, :2 * pk.ROWS_MIN - 1], 4, 128, True) == 0
    assert pk._rows_for(x, 1, 128, True) == 0        # RNN: 8 x 128 x 256 < ROWS_MIN_WORK
    assert pk._rows_for(np.zeros((5, 32, 128), np.float32), 1, 128, True) == 2
    assert pk._rows_for(np.zeros((5, 16, 256), np.float32), 3, 256, True) == 2  # 1.5 MB
    assert pk._rows_for(np.zeros((5, 16, 256), np.float32), 4, 256, True) == 0  # 2 MB
    monkeypatch.setattr(pk, "l2_bytes", lambda: 1 << 20)
    assert pk._rows_for(np.zeros((5, 16, 256), np.float32), 3, 256, True) == 0
    stop = _spinning_thread()
    try:
        assert pk._rows_for(x, 4, 128, True) == 0
        monkeypatch.setattr(pk, "rows", True)
        assert pk._rows_for(x, 1, 128, True) == 2
        assert pk._rows_for(x, 1, 128, True, training=True) == 2   # forced: training too
        assert pk._rows_for(x, 1, 128, False) == 0
    finally:
        stop()
    monkeypatch.setattr(pk, "rows", None)
    monkeypatch.setattr(pk, "blas_get_threads", lambda: 1)
    assert pk._rows_for(x, 4, 128, True) == 0


def test_the_loop_is_fused_by_the_shapes_alone(monkeypatch):
    """Inference of FUSED_MIN_ROWS rows is fused where its shapes split it (by units:
    MIN_SPLIT_STEP_WORK; by rows: _rows_fit) or the BLAS has one thread, whatever the
    threads running; training only where they split it by units, with two BLAS threads;
    ``ahead`` forced never; ``fused`` forces either way."""
    monkeypatch.setattr(pk, "fused", None)
    monkeypatch.setattr(pk, "ahead", False)
    monkeypatch.setattr(pk, "blas_get_threads", lambda: 2)
    monkeypatch.setattr(pk, "l2_bytes", lambda: 2 << 20)
    x = np.zeros((5, pk.FUSED_MIN_ROWS, 128), np.float32)
    assert pk._fused_for(x, 4, 128, False)                  # split by rows
    assert not pk._fused_for(x[:, :-1], 4, 128, False)      # 15 rows
    assert not pk._fused_for(x, 1, 128, False)      # RNN: 16 x 128 x 256 < 2 ROWS_MIN_WORK
    assert pk._fused_for(np.zeros((5, 32, 128), np.float32), 1, 128, False)
    wide = np.zeros((5, 16, 2048), np.float32)      # 2.1 MB of weights, 262K a step's product
    assert not pk._fused_for(wide, 4, 64, False)            # no split: projects on the BLAS
    assert pk._fused_for(np.zeros((5, 16, 8), np.float32), 4, 512, False)    # split by units
    assert not pk._fused_for(x, 4, 128, True)               # training: not by rows
    assert pk._fused_for(np.zeros((5, 16, 8), np.float32), 4, 512, True)     # by units
    stop = _spinning_thread()
    try:
        assert pk._fused_for(x, 4, 128, False)              # running threads change nothing
    finally:
        stop()
    monkeypatch.setattr(pk, "blas_get_threads", lambda: 1)
    assert pk._fused_for(wide, 4, 64, False)
    assert not pk._fused_for(np.zeros((5, 16, 8), np.float32), 4, 512, True)  # training
    monkeypatch.setattr(pk, "ahead", True)
    assert not pk._fused_for(x, 4, 128, False)
    monkeypatch.setattr(pk, "fused", True)
    assert pk._fused_for(x[:, :1], 1, 8, True)
    monkeypatch.setattr(pk, "fused", False)
    assert not pk._fused_for(x, 4, 128, False)


def test_a_fused_inference_splits_the_rows_before_the_units(monkeypatch):
    """Where both splits apply, ``run`` splits the rows (no barrier); where the packed
    weights do not fit, the units. A training forward splits the units either way."""
    monkeypatch.setattr(pk, "fused", None)
    monkeypatch.setattr(pk, "rows", None)
    monkeypatch.setattr(pk, "threads", None)
    monkeypatch.setattr(pk, "MIN_SPLIT_STEP_WORK", 0)
    monkeypatch.setattr(pk, "blas_get_threads", lambda: 2)
    monkeypatch.setattr(pk, "l2_bytes", lambda: 2 << 20)
    calls = _spy_run(monkeypatch)
    rng = np.random.default_rng(2)
    for H, want in ((64, (2, True, True)), (320, (2, False, True))):   # 320 KB, 2.9 MB
        G = 4 * H
        x = rng.standard_normal((3, 16, 256)).astype(np.float32)
        h0 = np.zeros((16, H), np.float32)
        w = [(0.1 * rng.standard_normal(s)).astype(np.float32)
             for s in ((G, 256), (G, H), (G,), (G,))]
        wait_until_no_other_thread_runs()
        calls.clear()
        got = nb.lstm_forward(x, h0, h0, *w, training=False)[0]
        assert calls == [want], (H, calls)
        want_out = ref.lstm_forward(x.astype(np.float64), h0, h0, *w, training=False)[0]
        np.testing.assert_allclose(got, want_out, rtol=2e-5, atol=2e-5)
        wait_until_no_other_thread_runs()
        calls.clear()                           # training: fused, split by units, never rows
        got = nb.lstm_forward(x, h0, h0, *w, training=True)[0]
        assert calls == [(2, False, True)], (H, calls)
        np.testing.assert_allclose(got, want_out, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("B,I", [(16, 40), (13, 40), (40, 300)])
def test_threads_do_not_change_the_bits(monkeypatch, kind, B, I):
    """The hidden-unit split (2 and 3 threads), projecting ahead, projecting the chunks
    from W_ih's panels, the fused loop (one and
    three threads) and its rows split (two and three threads, whose rows start inside
    the micro-kernel's tiles) give the one-thread loop's results (each chunk projected by a
    GEMM) bitwise, so that a
    call's bits do not depend on the threads it got (README: the same call twice is
    bitwise identical). At 40 rows and 300 inputs one thread's products run in blocks of
    KC_WIDE inputs, a rows split's (fewer than KC_WIDE_ROWS rows each) in blocks of KC."""
    monkeypatch.setattr(pk, "MIN_SPLIT_STEP_WORK", 0)
    monkeypatch.setattr(pk, "ROWS_MIN", 1)
    monkeypatch.setattr(pk, "blas_get_threads", lambda: 3)
    rng = np.random.default_rng(11)
    T, H = 7, 3 * pk.VW
    G = GATES[kind] * H
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = (0.5 * rng.standard_normal((B, H))).astype(np.float32)
    w = [(0.3 * rng.standard_normal(s)).astype(np.float32) for s in ((G, I), (G, H), (G,), (G,))]
    states = [h0, h0] if kind == "lstm" else [h0]
    outs = {}
    for name, threads, ahead, fused, rows in (
            ("one", 1, False, False, False), ("two", 2, False, False, False),
            ("three", 3, False, False, False), ("ahead", 1, True, False, False),
            ("panels", 1, False, False, False),
            ("fused", 1, False, True, False), ("fused3", 3, False, True, False),
            ("rows", 1, False, True, True), ("rows2", 1, False, True, True)):
        monkeypatch.setattr(pk, "threads", threads)
        monkeypatch.setattr(pk, "ahead", ahead)
        monkeypatch.setattr(pk, "panel_chunks", name == "panels")
        monkeypatch.setattr(pk, "fused", fused)
        monkeypatch.setattr(pk, "rows", rows)
        if name == "rows2":
            monkeypatch.setattr(pk, "blas_get_threads", lambda: 2)
        outs[name] = _forward(kind, nb, x, states, w, None, False, False)[:-1]
    for name in ("two", "three", "ahead"):
        for got, want in zip(outs[name], outs["one"]):
            np.testing.assert_array_equal(got, want)
    # The micro-kernel's projections: the GEMM's sums with I < 512, where its tiles do not
    # split k (_simd.split_k: with AVX-512, never at these rows). With AVX2 (VW 8) whether
    # OpenBLAS's Haswell kernels sum k in the same order is not checked: a tolerance there
    for name in ("panels", "fused", "fused3", "rows", "rows2"):
        for got, want in zip(outs[name], outs["one"]):
            if pk.VW == 8 or pk.split_k(B, 4, pk.MR_LSTM) or pk.split_k(B, 3, pk.MR_GRU):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_fused_inference_equals_the_training_forward_bitwise(monkeypatch, kind):
    """Inference is fused from 16 rows, training is not (``_fused_for``): the micro-kernel
    and OpenBLAS's GEMM both sum each projection in the order of k, so the eval and train
    forwards agree bitwise (README: determinism), with fewer than 512 inputs: from there
    OpenBLAS (SkylakeX kernels) sums k in blocks and the last bits differ
    (docs/hardening.md). The fused forward against the float64 reference too."""
    rng = np.random.default_rng(5)
    T, B, I, H = 9, 16, 300, 2 * pk.VW + 3      # I > KC: the projection in blocks of k
    G = GATES[kind] * H
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = (0.5 * rng.standard_normal((B, H))).astype(np.float32)
    w = [(0.3 * rng.standard_normal(s)).astype(np.float32) for s in ((G, I), (G, H), (G,), (G,))]
    states = [h0, h0] if kind == "lstm" else [h0]
    monkeypatch.setattr(pk, "fused", True)
    eval_out = _forward(kind, nb, x, states, w, None, False, False)
    monkeypatch.setattr(pk, "fused", False)
    train_out = _forward(kind, nb, x, states, w, None, False, True)
    for got, want in zip(eval_out[:-1], train_out[:-1]):
        if pk.VW == 8 or pk.split_k(B, 4, pk.MR_LSTM) or pk.split_k(B, 3, pk.MR_GRU):  # AVX2
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(got, want)
    f64 = [x.astype(np.float64)] + [a.astype(np.float64) for a in states + w]
    ref_out = _forward(kind, ref, f64[0], f64[1:1 + len(states)], f64[1 + len(states):], None,
                       False, False)
    for got, want in zip(eval_out[:-1], ref_out[:-1]):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
