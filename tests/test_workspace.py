"""The pool of large buffers (fastrnn.backends._workspace): arrays like np.empty's, a
block back in the pool only when the last array made from it dies, reused by the next
request of its size, the idle cap, clear(), threads, and a training step that runs on
the blocks its previous step returned."""

import threading

import numpy as np
import pytest

from fastrnn.backends import _workspace as ws

pytest.importorskip("numba")


@pytest.fixture(autouse=True)
def empty_pool():
    ws.clear()
    yield
    ws.clear()


def test_arrays_are_like_np_empty():
    big = ws.empty((3, ws.MIN_BYTES // 4), np.float32)
    assert big.shape == (3, ws.MIN_BYTES // 4) and big.dtype == np.float32
    assert big.flags.c_contiguous and big.flags.writeable
    big[...] = 2.5
    assert big.sum() == 2.5 * big.size
    small = ws.empty((4, 5), np.float64)
    assert small.base is None and small.shape == (4, 5)          # plain np.empty
    assert ws.empty((ws.MIN_BYTES,), "u1").shape == (ws.MIN_BYTES,)


def test_a_block_returns_when_its_last_array_dies_and_is_reused():
    a = ws.empty((ws.GRAIN + 1,), np.uint8)          # rounds up to two grains
    address = a.ctypes.data
    view = a[10:20]
    del a
    assert ws.idle_bytes() == 0                       # the view keeps it
    view[:] = 7
    del view
    assert ws.idle_bytes() == 2 * ws.GRAIN
    b = ws.empty((2 * ws.GRAIN // 4,), np.float32)    # another size in the same blocks
    assert b.ctypes.data == address and ws.idle_bytes() == 0
    c = ws.empty((2 * ws.GRAIN // 4,), np.float32)    # b is in use: a new block
    assert c.ctypes.data != address


def test_the_idle_cap_and_clear(monkeypatch):
    monkeypatch.setattr(ws, "MAX_IDLE_BYTES", 3 * ws.GRAIN)
    arrays = [ws.empty((ws.GRAIN,), np.uint8) for _ in range(5)]
    del arrays
    assert ws.idle_bytes() == 3 * ws.GRAIN
    import fastrnn
    assert fastrnn.release_buffers() == 3 * ws.GRAIN
    assert ws.idle_bytes() == 0 and fastrnn.release_buffers() == 0


def test_threads_never_share_a_block():
    live, errors = [], []

    def work(seed):
        try:
            rng = np.random.default_rng(seed)
            for _ in range(200):
                a = ws.empty((ws.MIN_BYTES * int(rng.integers(1, 4)),), np.uint8)
                a[0] = seed
                live.append(a)
                if a[0] != seed:                      # pragma: no cover - reported below
                    errors.append("shared")
                live.remove(a)
        except Exception as exc:                      # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    addresses = [ws.empty((ws.MIN_BYTES,), np.uint8) for _ in range(3)]
    assert len({a.ctypes.data for a in addresses}) == 3


def test_a_training_step_reuses_the_blocks_of_the_one_before(monkeypatch):
    import fastrnn
    layer = fastrnn.make_layer("lstm", 64, 128, backend="numba", seed=0).train()
    x = np.random.default_rng(0).standard_normal((50, 32, 64)).astype(np.float32)
    d = np.ones((50, 32, 128), np.float32)
    layer(x)
    layer.backward(d)
    assert ws.idle_bytes() > 0                        # the step's blocks are back
    made = []
    real = ws._new_block
    monkeypatch.setattr(ws, "_new_block", lambda size: made.append(size) or real(size))
    layer.zero_grad()
    out = layer(x)[0]
    d_x = layer.backward(d)[0]
    assert made == []                                 # every block came from the pool
    ref = fastrnn.make_layer("lstm", 64, 128, backend="numpy", seed=0, dtype=np.float64).train()
    want = ref(x.astype(np.float64))[0]
    want_d_x = ref.backward(d.astype(np.float64))[0]
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_x, want_d_x, rtol=1e-4, atol=1e-4)
    for name, g in layer.grads.items():
        np.testing.assert_allclose(g, ref.grads[name], rtol=1e-4, atol=1e-3)
