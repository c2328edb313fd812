"""The packed time loops (fastrnn.backends.packed_numba, float32 LSTM and GRU): the
LLVM micro-kernel against NumPy's matmul for every row count, in the host's vector
width and in the AVX2 one; the panel layout against its definition; and the whole
inference against the float64 NumPy reference, on one thread and split over
threads by hidden units (forced on small problems), with lengths, both directions,
sizes that leave partial tiles, and no biases."""

import numpy as np
import pytest

from conftest import random_lengths

pk = pytest.importorskip("fastrnn.backends.packed_numba")
from fastrnn.backends import numba_cpu as nb  # noqa: E402
from fastrnn.backends import reference as ref  # noqa: E402

GATES = {"lstm": 4, "gru": 3}


@pytest.fixture(params=[1, 2, 3], ids=lambda p: f"{p}threads")
def threads(request, monkeypatch):
    """Force the split over ``threads`` (hidden-unit panels), whatever the size."""
    monkeypatch.setattr(pk, "threads", request.param)
    monkeypatch.setattr(pk, "MIN_SPLIT_STEP_WORK", 0)
    counts = []
    real = pk._run

    def spy(nthreads, *args):
        counts.append(nthreads)
        return real(nthreads, *args)

    monkeypatch.setattr(pk, "_run", spy)
    return request.param, counts


@pytest.mark.parametrize("VW", sorted({pk.VW, 8}))
@pytest.mark.parametrize("NV", [3, 4])
def test_microkernel_matches_matmul_for_every_row_count(VW, NV):
    import numba
    MR = {(16, 4): 6, (16, 3): 8, (8, 4): 2, (8, 3): 3}[VW, NV]
    mk = pk.microkernel(MR, NV, VW)

    @numba.njit
    def call(mr, a, a_off, lda, p, p_off, K, c, c_off, ldc, cv, acc=False):
        mk(mr, a, a_off, lda, p, p_off, K, c, c_off, ldc, cv, acc)

    rng = np.random.default_rng(VW * NV)
    K, NR = 13, NV * VW
    a = rng.standard_normal((MR + 2, K)).astype(np.float32)
    panel = rng.standard_normal((2, K, NR)).astype(np.float32)
    for mr in range(1, MR + 1):
        cv = VW + 3                                  # vectors land cv apart
        c = np.full((MR + 1, 2 + NV * cv), np.nan, np.float32)
        call(mr, a, 1 * K, K, panel, 1 * K * NR, K, c, 2, c.shape[1], cv)
        want = a[1:1 + mr] @ panel[1]
        for v in range(NV):
            got = c[:mr, 2 + v * cv:2 + v * cv + VW]
            np.testing.assert_allclose(got, want[:, v * VW:(v + 1) * VW], rtol=1e-5, atol=1e-5)
        assert np.isnan(c[mr:]).all(), "rows past mr were written"
        # accumulate: a second block of k adds onto what c holds
        before = c.copy()
        call(mr, a, 1 * K + 3, K, panel, (1 * K + 3) * NR, K - 3, c, 2, c.shape[1], cv, True)
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


def _forward(kind, backend, x, states, w, lengths, reverse, training):
    fwd = getattr(backend, f"{kind}_forward")
    return fwd(x, *states, *w, lengths=lengths, reverse=reverse, training=training)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("B,H", [(1, 5), (7, 16), (13, 37)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [None, 1, 2], ids=["whole", "chunk1", "chunk2"])
def test_packed_inference_matches_the_float64_reference(threads, kind, B, H, reverse, bias,
                                                        chunk, monkeypatch):
    """``chunk``: steps of input projection computed at a time (None: all six)."""
    nthreads, counts = threads
    rng = np.random.default_rng(B * 100 + H)
    T, I, G = 6, 4, GATES[kind] * H
    lengths = random_lengths(rng, T, B)
    x = rng.standard_normal((T, B, I))
    states = [0.5 * rng.standard_normal((B, H)) for _ in range(2 if kind == "lstm" else 1)]
    w = [rng.uniform(-0.6, 0.6, (G, I)), rng.uniform(-0.6, 0.6, (G, H))]
    w += [rng.uniform(-0.6, 0.6, G), rng.uniform(-0.6, 0.6, G)] if bias else [None, None]
    f32 = [None if a is None else a.astype(np.float32) for a in [x] + states + w]
    x32, states32, w32 = f32[0], f32[1:1 + len(states)], f32[1 + len(states):]
    if chunk:
        monkeypatch.setattr(pk, "CHUNK_FLOATS", chunk * B * G)
    got = _forward(kind, nb, x32, states32, w32, lengths, reverse, False)
    want = _forward(kind, ref, x, states, w, lengths, reverse, False)
    assert got[-1] is None
    for g, e in zip(got[:-1], want[:-1]):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5)
    assert counts == [min(nthreads, -(-H // pk.VW))], counts


def test_only_float32_inference_takes_the_packed_loop(monkeypatch):
    calls = []
    real = pk.lstm_forward
    monkeypatch.setattr(pk, "lstm_forward", lambda *a: calls.append(a[0].dtype) or real(*a))
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((3, 2, 4)).astype(dtype)
        h = np.zeros((2, 5), dtype)
        w = [rng.standard_normal(s).astype(dtype) for s in ((20, 4), (20, 5), (20,), (20,))]
        nb.lstm_forward(x, h, h, *w, training=False)
        nb.lstm_forward(x, h, h, *w, training=True)     # training: numba_cpu's loops
    assert calls == [np.float32]


AVX2_CHILD = """
import json
import numpy as np
from fastrnn.backends import numba_cpu as nb, packed_numba as pk, reference as ref
rng = np.random.default_rng(7)
errs = {}
for kind, gates in (("lstm", 4), ("gru", 3)):
    T, B, I, H = 5, 7, 6, 21
    x = rng.standard_normal((T, B, I))
    states = [0.5 * rng.standard_normal((B, H)) for _ in range(2 if kind == "lstm" else 1)]
    w = [rng.uniform(-0.5, 0.5, s) for s in ((gates * H, I), (gates * H, H), (gates * H,),
                                              (gates * H,))]
    lengths = np.array([5, 3, 0, 5, 1, 4, 2])
    f32 = lambda a: a.astype(np.float32)
    got = getattr(nb, kind + "_forward")(f32(x), *map(f32, states), *map(f32, w),
                                         lengths=lengths, training=False)
    want = getattr(ref, kind + "_forward")(x, *states, *w, lengths=lengths, training=False)
    errs[kind] = max(float(np.abs(g - e).max()) for g, e in zip(got[:-1], want[:-1]))
print(json.dumps({"VW": pk.VW, "MR": [pk.MR_LSTM, pk.MR_GRU], "errs": errs}))
"""


@pytest.mark.slow
def test_the_avx2_configuration_end_to_end(tmp_path):
    """The packed loops as an AVX2-only CPU gets them (8-lane vectors, tiles of 2 and 3
    rows): Numba compiling for Haswell on this host, in a process with its own cache."""
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
    for kind, err in result["errs"].items():
        assert err < 2e-5, (kind, result)
