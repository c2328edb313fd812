"""Worker threads that stay awake for a moment after each job: the pool of the packed
loops' threads (:func:`.packed_numba.with_pool`).

Why: a thread blocked on a lock or a condition takes tens of microseconds to run again
once woken, where the CPUs are virtual most of all: a no-op job's round trip through a
``concurrent.futures`` pool took 47 us on a 2-core KVM guest, against a B = 1 LSTM call of
about 240 us (scratch probes), and the projector of a loop that projects ahead on the other core
(:func:`.packed_numba.project_ahead`) cost more to start than it saved. So a worker here,
after its job, spins on its job counter in compiled code (without the GIL) for
:data:`spin_us` microseconds before it sleeps; a job posted meanwhile starts within a
microsecond or so. A loop's calls from a timing loop, or the forward and backward of a
training step, come back to back and find it awake.

The spin is short on purpose: a pool that spins long after its last call (OpenBLAS's for
about 0.1 s, OpenMP's and ONNX Runtime's by default) takes a core from whatever runs next
in the process (docs/numba.md). Set :data:`spin_us` (or ``FASTRNN_SPIN_US`` before the
import) to 0 for workers that sleep at once.

A worker runs one job at a time, posted by one caller at a time (the packed loops enter
through :func:`pooled`, which takes the workers first); :func:`thread_ids` lets the loops' check for
other running threads (:func:`.packed_numba._other_threads_running`) leave its spinning
workers out.
"""

from __future__ import annotations

import atexit
import functools
import os
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._simd import FLAG_STRIDE, load_acquire, store_release, wait_for

#: The longest spin :data:`spin_us` may ask for (an hour).
MAX_SPIN_US = 3.6e9
#: Microseconds a worker spins for its next job before it sleeps.
spin_us = os.environ.get("FASTRNN_SPIN_US", "300")
try:
    spin_us = float(spin_us)
    if not 0 <= spin_us <= MAX_SPIN_US:
        raise ValueError
except ValueError:
    raise ValueError(f"FASTRNN_SPIN_US must be a number of microseconds from 0 to "
                     f"{MAX_SPIN_US:g}, got {spin_us!r}") from None


@intrinsic
def _monotonic_ns(typingctx):
    """CLOCK_MONOTONIC in nanoseconds, from libc's ``clock_gettime`` (a vDSO call on
    Linux, tens of nanoseconds)."""
    sig = types.int64()

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        timespec = ir.LiteralStructType([i64, i64])
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(32), [ir.IntType(32), timespec.as_pointer()]),
            "clock_gettime")
        ts = cgutils.alloca_once(builder, timespec)
        builder.call(fn, [ir.Constant(ir.IntType(32), 1), ts])     # CLOCK_MONOTONIC
        sec = builder.load(builder.gep(ts, [ir.Constant(ir.IntType(32), 0),
                                            ir.Constant(ir.IntType(32), 0)]))
        nsec = builder.load(builder.gep(ts, [ir.Constant(ir.IntType(32), 0),
                                             ir.Constant(ir.IntType(32), 1)]))
        return builder.add(builder.mul(sec, ir.Constant(i64, 1_000_000_000)), nsec)

    return sig, codegen


#: Where a worker's ``state`` holds the generation assigned to it, the last one it ran,
#: and 1 while it spins for a job (each on its own cache line).
ASSIGNED, DONE, SPINNING = 0, FLAG_STRIDE, 2 * FLAG_STRIDE


@numba.njit(cache=True, nogil=True)
def wait_job(go, state, done, ns):
    """The generation assigned to a worker (``state[ASSIGNED]``, past ``done``) once it is
    published (``go[0]``), or 0 after ``ns`` nanoseconds of spinning. The worker is marked
    spinning meanwhile (:func:`awake`). A generation published without a job for this
    worker keeps it here, in compiled code, off the GIL."""
    store_release(state, SPINNING, 1)
    deadline = _monotonic_ns() + ns
    n = 0
    while True:
        assigned = load_acquire(state, ASSIGNED)
        if assigned > done and load_acquire(go, 0) >= assigned:
            store_release(state, SPINNING, 0)
            return assigned
        n += 1
        if n % 64 == 0 and _monotonic_ns() > deadline:
            store_release(state, SPINNING, 0)
            return 0


@numba.njit(cache=True, nogil=True)
def read(state, i):
    """``state[i]``, read with acquire."""
    return load_acquire(state, i)


@numba.njit(cache=True, nogil=True)
def write(state, i, value):
    """``state[i] = value``, written with release."""
    store_release(state, i, value)


#: The workers' shared ticket: a caller publishes a generation of jobs as
#: ``tickets[0] = gen`` (:func:`publish`), from compiled code where it can (see
#: :func:`run`).
tickets = np.zeros(FLAG_STRIDE, np.int64)
_generation = 0


@numba.njit(cache=True, nogil=True)
def publish(go, gen):
    """``go[0] = gen`` with release (``gen`` 0: nothing): what a loop's first thread calls
    as it starts, with the GIL released (:func:`run`)."""
    if gen > 0:
        store_release(go, 0, gen)


class Worker:
    """A daemon thread that runs the job assigned to it for a generation once the
    generation is published, then spins for the next (:data:`spin_us`), then sleeps."""

    def __init__(self, index):
        self.state = np.zeros(3 * FLAG_STRIDE, np.int64)
        self.lock = threading.Lock()
        self.next = (0, None)                          # (generation, job)
        self.error = (0, None)                         # (generation, its job's error)
        self.asleep = self.stopping = False
        self.wake = threading.Event()
        # the CPU out of its affinity, and the CPUs it may use (the creator's, which a new
        # thread inherits; None: affinity unknown or unsettable, left alone)
        self.off = self.allowed = None
        if hasattr(os, "sched_setaffinity"):
            try:
                self.allowed = os.sched_getaffinity(0)
            except OSError:            # (a sandbox that hides it): run wherever it is
                pass
        self.thread = threading.Thread(target=self._main, name=f"fastrnn-packed-{index}",
                                       daemon=True)
        self.thread.start()

    def assign(self, gen, job, cpu):
        """Run ``job()`` once generation ``gen`` is published, off ``cpu`` (the caller's,
        None: anywhere). Callers hold ``_run_lock`` (:func:`run`): the affinity and ``off``
        are theirs to set."""
        self._pin_off(cpu)
        with self.lock:
            self.next = (gen, job)
        write(self.state, ASSIGNED, gen)   # after the job (release)
        if self.asleep:                # (_main: it sets ``asleep``, then looks again)
            self.wake.set()

    def join(self, gen):
        """Wait until generation ``gen``'s job (or a later one) has run; its error, or
        None."""
        wait_for(self.state, DONE, gen)
        with self.lock:
            failed, error = self.error
            if failed <= gen:
                self.error = (0, None)
        return error if failed == gen else None

    def _pin_off(self, cpu):
        """Keep this worker off ``cpu`` (the caller's): the loops' threads wait on each
        other, and a pool thread woken onto its caller's CPU shared it for the whole call
        (:func:`.packed_numba.with_pool`). Set once and kept while the callers stay on that
        CPU: setting and restoring it at every job cost 7 us of a B = 1 call (a scratch
        probe). Set by the caller, as it assigns the job, not by the worker as it starts
        it: a caller that had moved onto the worker's CPU (the scheduler moves a thread
        between calls, after a pause most of all) otherwise shared that CPU with the worker
        spinning there for its job, until the worker got to run and moved itself; in
        ``fastrnn bench``'s workers, LSTM 50x16x128x128 calls took 3-7 ms instead of 1.2
        in the turns' first calls, most of them (21 of 32 in one worker) calls whose caller
        changed CPUs (session 15, ``bench/probe_cpus``;
        ``bench/results/2026-12-06-probe-cpus-session15.txt``)."""
        if cpu is None or cpu == self.off or self.allowed is None:
            return
        if self.allowed - {cpu}:
            try:
                os.sched_setaffinity(self.thread.native_id, self.allowed - {cpu})
                self.off = cpu
            except OSError:            # (the CPUs allowed changed): run wherever it is
                self.allowed = None

    def _main(self):
        done = 0
        while not self.stopping:
            gen = wait_job(tickets, self.state, done, _spin_ns())
            if gen == 0:
                # Asleep, then look again for a job assigned: an assign() that came
                # before this look sees ``asleep`` and wakes it. (Its generation is
                # published later, from compiled code, which cannot wake it: never sleep
                # with a job assigned.)
                self.asleep = True
                if read(self.state, ASSIGNED) <= done and not self.stopping:
                    self.wake.wait()
                self.wake.clear()
                self.asleep = False
                continue
            with self.lock:
                assigned, job = self.next
                if assigned != gen:            # a later assignment (a join skipped):
                    continue                   # it waits for its own publication
                self.next = (0, None)
            try:
                job()
            except BaseException as exc:       # the caller's join() returns it
                with self.lock:
                    self.error = (gen, exc)
            job = None                         # the call's buffers go back to the pool now
            done = gen
            write(self.state, DONE, gen)


def _spin_ns():
    """:data:`spin_us` in nanoseconds, within [0, ``MAX_SPIN_US``] (anything else: 0)."""
    try:
        return int(min(max(float(spin_us), 0.0), MAX_SPIN_US) * 1e3)
    except (TypeError, ValueError):
        return 0


_workers: list[Worker] = []
_lock = threading.Lock()
#: One caller of :func:`run` at a time (the loops take the workers first, :func:`pooled`:
#: this one makes the generations and their publication safe for any caller).
_run_lock = threading.Lock()
#: Held by the loop that has the workers (:func:`take`, :func:`release`).
_loop_lock = threading.Lock()
#: True once the workers have stopped at exit: callers must not use the pool then
#: (:func:`available`).
stopped = False


def available():
    """Whether the pool can take jobs (not after its workers stopped at exit)."""
    return not stopped


def take():
    """Whether the calling loop may use the workers: they run (not stopped at exit) and no
    other loop has them. True: they are this loop's until it calls :func:`release`. A loop
    that finds them taken runs on its caller's thread alone: two loops' threads would only
    take turns on the same cores."""
    return available() and _loop_lock.acquire(blocking=False)


def release():
    """The workers, which :func:`take` gave this loop, back to the next loop."""
    _loop_lock.release()


def pooled(split, alone):
    """``split()`` with the workers this loop's (:func:`take`, then :func:`release`), or
    ``alone()`` on the caller's thread where another loop has them or they have stopped:
    how a loop that would use the workers is entered."""
    if not take():
        return alone()
    try:
        return split()
    finally:
        release()


def worker(i):
    """The ``i``-th worker, started on first use (again, where its thread has died)."""
    with _lock:
        while len(_workers) <= i:
            _workers.append(Worker(len(_workers)))
        if not _workers[i].thread.is_alive():
            _workers[i] = Worker(i)
        return _workers[i]


def awake():
    """How many workers are spinning for a job right now (runnable, if not running)."""
    return sum(int(w.state[SPINNING]) for w in _workers)


def thread_ids():
    """The native thread ids of the workers started so far."""
    return {w.thread.native_id for w in _workers}


def run(jobs, here, cpu=None, on_error=None):
    """``here(tickets, gen)`` on the calling thread while each job of ``jobs`` (callables)
    runs on a worker, off ``cpu``; the jobs start once ``gen`` is published: ``here``
    should call :func:`publish` ``(tickets, gen)`` from compiled code, with the GIL
    released, so that the workers, taking the GIL to start their jobs, never wait for it
    (a thread that waits for the GIL sleeps, and wakes tens of microseconds late); where it
    has not, it is published after ``here`` returns. Every job is waited for; a job's
    error, or ``here``'s, is raised. ``on_error()`` is called by each thread that fails, a
    job's worker or this one, before its error goes on: it must let the other threads end
    (the loops' threads wait on each other at every step), and may run more than once."""
    with _run_lock:
        _run(jobs, here, cpu, on_error)


def _run(jobs, here, cpu, on_error):
    global _generation
    if stopped:
        raise RuntimeError("fastrnn's worker pool has stopped (the interpreter is exiting)")
    _generation += 1
    gen = _generation
    if on_error is not None:
        jobs = [functools.partial(_failing_calls, on_error, job) for job in jobs]
    assigned = []
    try:
        for job in jobs:
            w = worker(len(assigned))
            w.assign(gen, job, cpu)
            assigned.append(w)
        here(tickets, gen)
    except BaseException:
        if on_error is not None:
            on_error()
        publish(tickets, gen)
        for w in assigned:
            w.join(gen)
        raise
    publish(tickets, gen)
    errors = [e for e in [w.join(gen) for w in assigned] if e is not None]
    if errors:
        raise errors[0]


def _failing_calls(on_error, job):
    """``job()``, and ``on_error()`` first if it fails (in the worker: the threads waiting
    on this job must be let go now, not when the caller joins it)."""
    try:
        job()
    except BaseException:
        on_error()
        raise


def _forget_workers():
    """In a forked child: the parent's workers do not exist there, and its locks are free
    (a thread of the parent may have held one at the fork: the child would wait for it
    forever)."""
    global _lock, _run_lock, _loop_lock
    _workers.clear()
    tickets[:] = 0
    _lock, _run_lock, _loop_lock = threading.Lock(), threading.Lock(), threading.Lock()


def _stop_workers():
    """At exit: the workers leave their loops (a daemon thread coming back from compiled
    code while the interpreter finalizes is a known way to crash at exit); later calls run
    on their caller's thread alone (:func:`available`)."""
    global stopped
    stopped = True
    for w in list(_workers):
        w.stopping = True
        w.wake.set()
    for w in list(_workers):
        w.thread.join(1.0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)
atexit.register(_stop_workers)
