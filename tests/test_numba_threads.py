"""The numba backend's time loops split over threads by batch rows: forced to split
on small problems, every cell kind agrees with torch (float64, lengths, both
directions, two layers, training), the split really ran, and OpenBLAS's thread
count is restored afterwards, also when several calls overlap."""

import threading

import numpy as np
import pytest

from conftest import TORCH_KINDS, random_lengths, torch_or_skip

nb = pytest.importorskip("fastrnn.backends.numba_cpu")


@pytest.fixture
def forced_split(monkeypatch):
    if nb.blas_set_threads is None:
        pytest.skip("the BLAS is not OpenBLAS: loops are never split")
    monkeypatch.setattr(nb, "row_threads", 3)
    monkeypatch.setattr(nb, "MIN_ROWS_PER_THREAD", 1)
    monkeypatch.setattr(nb, "MIN_SPLIT_WORK", 0)
    splits = []
    real = nb._over_rows

    def spy(loop, B, work, *args):
        splits.append(nb._threads_for(B, work))
        return real(loop, B, work, *args)

    monkeypatch.setattr(nb, "_over_rows", spy)
    return splits


@pytest.mark.parametrize("kind", TORCH_KINDS + ["gru_reset_before"])
def test_split_loops_match_the_oracles(forced_split, kind):
    from test_torch import run_both
    rng = np.random.default_rng(55)
    lengths = random_lengths(rng, 6, 7)
    before = nb.blas_get_threads()
    if kind == "gru_reset_before":   # torch has no reset-before GRU: finite differences
        import fastrnn
        from conftest import make_layer
        m = make_layer(kind, 3, 4, num_layers=2, bidirectional=True, backend="numba",
                       dtype=np.float64, seed=1)
        report = fastrnn.gradcheck(m, rng.standard_normal((6, 7, 3)), lengths=lengths,
                                   max_elements=6)
        assert report.passed, str(report)
    else:
        torch = torch_or_skip()
        ours, theirs = run_both(torch, kind, 6, 7, 3, 4, 2, True, False, True, lengths,
                                "numba", np.float64, seed=3)
        for name in ours:
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-9, atol=1e-11,
                                       err_msg=f"{kind} {name}")
    assert forced_split and max(forced_split) == 3, forced_split
    assert nb.blas_get_threads() == before


def test_overlapping_calls_restore_the_blas_threads(forced_split):
    import fastrnn
    before = nb.blas_get_threads()
    m = fastrnn.LSTM(8, 16, backend="numba", seed=0).eval()
    x = np.random.default_rng(0).standard_normal((30, 12, 8)).astype(np.float32)
    want = m(x)[0]
    errors = []

    def worker():
        try:
            for _ in range(5):
                np.testing.assert_array_equal(m(x)[0], want)
        except AssertionError as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert nb.blas_get_threads() == before


def test_small_problems_are_not_split():
    assert nb._threads_for(1, 1 << 30) == 1                     # one row
    assert nb._threads_for(64, 10) == 1                         # too little work
    assert nb.row_threads == 1 and nb._threads_for(64, 1 << 30) == 1   # off by default
