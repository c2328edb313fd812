"""The packed loops' worker pool (fastrnn/backends/_hotpool.py): jobs start when their
generation is published, from compiled code or after ``here``; a sleeping worker is
woken; errors reach the caller; the workers stay off the caller's CPU, out of the check
for other running threads, and out of a forked child."""

import faulthandler
import os
import threading
import time

import numba
import numpy as np
import pytest
from conftest import wait_until_no_other_thread_runs

from fastrnn.backends import _hotpool


@numba.njit(nogil=True)
def _publish_then_wait(go, gen, seen):
    """A loop's first thread: publish, then wait (off the GIL) for the job to run."""
    _hotpool.publish(go, gen)
    while _hotpool.read(seen, 0) < 1:
        pass


@pytest.fixture(autouse=True)
def _no_hang():
    """A lost wake-up or a join that never ends spins in compiled code, where pytest
    cannot interrupt it: dump the threads and fail the run instead."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _until_asleep(w, timeout=10.0):
    end = time.monotonic() + timeout
    while not w.asleep:
        assert time.monotonic() < end, "the worker never slept"
        time.sleep(0.001)


def test_jobs_start_when_their_generation_is_published(monkeypatch):
    """``here`` publishing from compiled code starts the job while it waits; a worker
    asleep (no spin) is woken by its assignment, every time (a lost wake-up would hang
    here, the job assigned but published where nothing can wake the worker)."""
    for spin in (1000.0, 0.0):
        monkeypatch.setattr(_hotpool, "spin_us", spin)
        for i in range(50):
            seen = np.zeros(1, np.int64)
            ran = []

            def job(seen=seen, ran=ran):
                ran.append(threading.get_native_id())
                seen[0] = 1

            if spin == 0.0 and i % 10 == 0:
                _until_asleep(_hotpool.worker(0))
            _hotpool.run([job], lambda go, gen, seen=seen: _publish_then_wait(go, gen, seen))
            assert len(ran) == 1 and ran[0] != threading.get_native_id()


def test_a_here_that_never_publishes_still_gets_its_jobs_run():
    ran = []
    _hotpool.run([lambda: ran.append(1), lambda: ran.append(2)], lambda go, gen: None)
    assert sorted(ran) == [1, 2]


def test_errors_reach_the_caller():
    """A job's error is raised after every job has ended; ``here``'s error calls
    ``on_error`` (which must let the jobs end) and is raised."""
    ran = []

    def fail():
        raise ValueError("job failed")

    with pytest.raises(ValueError, match="job failed"):
        _hotpool.run([fail, lambda: ran.append(1)], lambda go, gen: None)
    assert ran == [1]
    released = []

    def here(go, gen):
        raise KeyError("here failed")

    with pytest.raises(KeyError, match="here failed"):
        _hotpool.run([lambda: ran.append(2)], here, on_error=lambda: released.append(1))
    assert released == [1] and ran == [1, 2]
    _hotpool.run([lambda: ran.append(3)], lambda go, gen: None)    # the pool still works
    assert ran[-1] == 3


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity")
def test_workers_run_off_the_callers_cpu():
    """A job runs with the caller's CPU out of its worker's affinity (kept while the
    caller stays there), and with none taken out where the caller's CPU is unknown."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("one CPU: there is no other to move to")
    seen = []
    for cpu in sorted(allowed)[:2]:
        _hotpool.run([lambda: seen.append(os.sched_getaffinity(0))], lambda go, gen: None,
                     cpu)
        assert seen[-1] == allowed - {cpu}
        assert _hotpool.worker(0).off == cpu
    _hotpool.run([lambda: seen.append(os.sched_getaffinity(0))], lambda go, gen: None, None)
    assert seen[-1] == allowed - {cpu}                   # unknown: left as it was


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity")
def test_the_caller_moves_its_worker_off_its_cpu_before_the_job_starts():
    """The caller sets the worker's affinity as it assigns the job, before it publishes
    it: a worker spinning on the CPU its caller has just moved to leaves it at once, not
    only when it gets to run there (session 15: calls that shared a CPU took 3-7 ms
    instead of 1.2)."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("one CPU: there is no other to move to")
    w = _hotpool.worker(0)
    seen = []

    def here(go, gen):          # before the generation is published
        seen.append(os.sched_getaffinity(w.thread.native_id))

    for cpu in sorted(allowed)[:2] + sorted(allowed)[:1]:
        _hotpool.run([lambda: None], here, cpu)
        assert seen[-1] == allowed - {cpu}


def test_spinning_workers_are_not_other_running_threads(monkeypatch):
    """A worker spinning for its next job is this module's own: the loops' check for
    other running threads (which sends split loops to the BLAS loops) leaves it out."""
    monkeypatch.setattr(_hotpool, "spin_us", 60e6)
    _hotpool.run([lambda: None], lambda go, gen: None)
    w = _hotpool.worker(0)
    wait_until_no_other_thread_runs()
    assert _hotpool.awake() >= 1 and not w.asleep   # still spinning, and not counted
    monkeypatch.setattr(_hotpool, "spin_us", 0.0)
    _hotpool.run([lambda: None], lambda go, gen: None)
    _until_asleep(w)
    assert _hotpool.awake() == 0


def test_a_skipped_join_leaves_no_stale_error_or_job():
    """A job's error belongs to its generation: a caller that never joined it (an
    interrupt between joins) does not hand it to the next call, whose job still runs."""
    w = _hotpool.worker(0)

    def fail():
        raise ValueError("old")

    with _hotpool._run_lock:
        _hotpool._generation += 1
        gen = _hotpool._generation
        w.assign(gen, fail, None)
        _hotpool.publish(_hotpool.tickets, gen)
        end = time.monotonic() + 10
        while _hotpool.read(w.state, _hotpool.DONE) < gen:     # ran, never joined
            assert time.monotonic() < end
            time.sleep(0.001)
    assert w.error[0] == gen
    ran = []
    _hotpool.run([lambda: ran.append(1)], lambda go, gen: None)
    assert ran == [1] and w.error == (0, None)


def test_no_job_starts_before_its_generation_is_published(monkeypatch):
    """A worker spinning for a job does not start the one assigned to it until ``here``
    publishes its generation."""
    monkeypatch.setattr(_hotpool, "spin_us", 1e6)
    for _ in range(5):
        ran, before = [], []

        def here(go, gen, ran=ran, before=before):
            time.sleep(0.02)
            before.append(list(ran))
            _hotpool.publish(go, gen)

        _hotpool.run([lambda ran=ran: ran.append(1)], here)
        assert before == [[]] and ran == [1]


def test_a_worker_running_a_job_is_not_counted_as_spinning(monkeypatch):
    """``awake()`` counts the workers spinning for a job (the flag set in compiled code):
    not one running a job, nor one asleep."""
    monkeypatch.setattr(_hotpool, "spin_us", 60e6)
    w = _hotpool.worker(0)
    during = []
    _hotpool.run([lambda: during.append(int(w.state[_hotpool.SPINNING]))], lambda go, gen: None)
    assert during == [0]
    end = time.monotonic() + 10
    while not w.state[_hotpool.SPINNING]:        # spinning for the next job now
        assert time.monotonic() < end
        time.sleep(0.001)
    assert _hotpool.awake() >= 1
    monkeypatch.setattr(_hotpool, "spin_us", 0.0)
    _hotpool.run([lambda: None], lambda go, gen: None)
    _until_asleep(w)
    assert not w.state[_hotpool.SPINNING]


def test_the_spin_setting_is_checked_and_the_pool_stops_at_exit():
    """``FASTRNN_SPIN_US`` must be a number of microseconds (named in the error); after
    the workers stop at exit, a loop that would split runs on its caller's thread, right."""
    import subprocess
    import sys
    env = {**os.environ, "FASTRNN_SPIN_US": "soon"}
    bad = subprocess.run([sys.executable, "-c", "import fastrnn.backends._hotpool"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "FASTRNN_SPIN_US" in bad.stderr
    code = """
import numpy as np, fastrnn
from fastrnn.backends import _hotpool, packed_numba as pk
pk.threads, pk.MIN_SPLIT_STEP_WORK = 2, 0
m = fastrnn.make_layer("lstm", 8, 2 * pk.VW, backend="numba", seed=0).eval()
x = np.random.default_rng(0).standard_normal((6, 4, 8)).astype(np.float32)
want = m(x)[0]
_hotpool._stop_workers()
assert not _hotpool.available()
np.testing.assert_array_equal(m(x)[0], want)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
@pytest.mark.parametrize("held", [False, True])
def test_a_forked_child_starts_its_own_workers(held):
    """``held``: the fork comes while another thread of the parent runs a loop on the
    workers (their locks held): the child's loops must not wait for that thread, which
    does not exist there."""
    _hotpool.run([lambda: None], lambda go, gen: None)          # the parent has a worker
    locks = [_hotpool._run_lock, _hotpool._loop_lock] if held else []
    for lock in locks:
        lock.acquire()
    pid = None
    try:
        pid = os.fork()
    finally:
        if pid != 0:
            for lock in locks:
                lock.release()
    if pid == 0:                                                # the child
        code = 1
        try:
            ran = []

            def loop():
                assert _hotpool.take()
                try:
                    _hotpool.run([lambda: ran.append(1)], lambda go, gen: None)
                finally:
                    _hotpool.release()

            t = threading.Thread(target=loop, daemon=True)
            t.start()
            t.join(20)
            code = 0 if ran == [1] else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_pooled_runs_split_with_the_workers_or_alone_without_them():
    """``pooled(split, alone)``: ``split`` while this loop has the workers (taken, and given
    back after, even when it fails); ``alone`` where another loop has them."""
    seen = []

    def split():
        seen.append(("split", _hotpool._loop_lock.locked()))
        return "split"

    assert _hotpool.pooled(split, lambda: "alone") == "split"
    assert seen == [("split", True)] and not _hotpool._loop_lock.locked()
    with _hotpool._loop_lock:                      # another loop has the workers
        assert _hotpool.pooled(split, lambda: "alone") == "alone"
    assert len(seen) == 1

    def failing():
        raise RuntimeError("split failed")

    with pytest.raises(RuntimeError, match="split failed"):
        _hotpool.pooled(failing, lambda: "alone")
    assert not _hotpool._loop_lock.locked()


def test_a_failing_job_calls_on_error_from_its_worker():
    """``run``'s ``on_error`` is called by the job that fails, in its worker, while the
    caller's ``here`` still runs (a loop's thread waiting on the failed one), and the
    job's error is raised."""
    released = threading.Event()
    where = []

    def fail():
        raise RuntimeError("job failed")

    def on_error():
        where.append(threading.get_native_id())
        released.set()

    def here(go, gen):
        _hotpool.publish(go, gen)
        assert released.wait(10)                     # let go by the failing job

    with pytest.raises(RuntimeError, match="job failed"):
        _hotpool.run([fail], here, None, on_error)
    assert where and where[0] != threading.get_native_id()
