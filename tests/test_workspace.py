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


@pytest.mark.parametrize("nbytes", [ws.MIN_BYTES, ws.MIN_BYTES + 1, 3 << 20, (52 << 20) + 7,
                                    10 ** 9 + 3])
def test_block_sizes_waste_at_most_an_eighth(nbytes):
    size = ws.block_size(nbytes)
    assert nbytes <= size <= nbytes * 9 // 8 + 1
    assert ws.block_size(size) == size


def test_a_block_returns_when_its_last_array_dies_and_is_reused():
    a = ws.empty((3 << 20,), np.uint8)
    size = ws.block_size(3 << 20)
    address = a.ctypes.data
    view = a[10:20]
    del a
    assert ws.idle_bytes() == 0                       # the view keeps it
    view[:] = 7
    del view
    assert ws.idle_bytes() == size
    b = ws.empty(((3 << 20) // 4,), np.float32)       # the same bytes, another dtype
    assert b.ctypes.data == address and ws.idle_bytes() == 0
    c = ws.empty(((3 << 20) // 4,), np.float32)       # b is in use: a new block
    assert c.ctypes.data != address


def test_the_idle_cap_frees_the_blocks_idle_longest(monkeypatch):
    size = ws.block_size(2 << 20)
    monkeypatch.setattr(ws, "MAX_IDLE_BYTES", 3 * size)
    arrays = [ws.empty((2 << 20,), np.uint8) for _ in range(5)]
    addresses = [a.ctypes.data for a in arrays]
    while arrays:                                     # returned in order: 0 first
        arrays.pop(0)
    assert ws.idle_bytes() == 3 * size
    taken = [ws.empty((2 << 20,), np.uint8) for _ in range(3)]    # the last returned first
    assert [a.ctypes.data for a in taken] == addresses[:1:-1]      # 4, 3, 2: 0 and 1 freed
    del taken
    import fastrnn
    assert fastrnn.release_buffers() == 3 * size                   # (taken, back again)
    assert ws.idle_bytes() == 0 and fastrnn.release_buffers() == 0


GC_CHILD = """
import gc, sys
from fastrnn.backends import _workspace as ws
a = ws.empty((1 << 20,), "float32")
b = ws.empty((1 << 20,), "float32")
gc.disable()
gc.collect()
cycle = [b]
cycle.append(cycle)
del b, cycle
gc.set_threshold(int(sys.argv[1]))
gc.enable()
del a             # its block goes back; a collection there may free b's cycle, b's too
gc.disable()
gc.collect()
assert ws.idle_bytes() == 2 * ws.block_size(4 << 20)
print("ok")
"""


def test_a_collection_inside_a_return_does_not_deadlock():
    """A block's finalizer can run inside another pool call, on the thread holding the
    pool's lock (a garbage collection freeing a cycle that held an array): it must not take
    the lock (an earlier version deadlocked here, with thresholds around 6)."""
    import subprocess
    import sys
    for threshold in range(1, 12):
        run = subprocess.run([sys.executable, "-c", GC_CHILD, str(threshold)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and run.stdout.strip() == "ok", (threshold, run.stderr)


def test_threads_never_share_a_block():
    """Threads taking and dropping blocks of three sizes at once: each fills its array with
    its own value, lets the others run, and finds its values intact."""
    import time
    errors = []

    def work(seed):
        try:
            rng = np.random.default_rng(seed)
            for _ in range(100):
                a = ws.empty((ws.MIN_BYTES * int(rng.integers(1, 4)),), np.uint8)
                a[::4096] = seed
                time.sleep(0)
                if not (a[::4096] == seed).all():
                    errors.append(f"thread {seed}: a block shared")
                    return
        except Exception as exc:                      # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


FORK_CHILD = """
import os
import numpy as np
from fastrnn.backends import _workspace as ws
a = ws.empty((2 << 20,), np.uint8)
del a
with ws._lock:                                    # another thread holds it at the fork
    pid = os.fork()
    if pid == 0:
        ok = ws.idle_bytes() == 0 and ws.empty((2 << 20,), np.uint8).size == 2 << 20
        os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
print(os.WEXITSTATUS(status))
"""


def test_a_forked_child_starts_with_a_free_pool():
    """In a process of its own (forking this one, with other libraries' threads, could
    hang): the child of a fork made while the pool's lock was held allocates anyway."""
    import os
    import subprocess
    import sys
    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    run = subprocess.run([sys.executable, "-c", FORK_CHILD], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "0", run.stderr


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
