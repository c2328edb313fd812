"""Parts of the packed loops (fastrnn/backends/packed_numba.py) timed alone, the probes
behind session 7's choices:

* ``pointwise``: ns per (row, unit) of the LSTM's and GRU's fused pointwise pass, as
  shipped (``_simd.wide_vectors()``: 512-bit vectors where the CPU has them) and compiled
  without that mark (LLVM's own choice, 256-bit on AVX-512 Xeons);
* ``product``: ns per step of the LSTM's recurrent product at B = 1, H = 64, the panels
  in serpentine order (as shipped) and always first to last;
* ``gc``: the median and the slowest of 3000 GRU 200x1x64x64 inference calls, and the
  full collections among them, with Python's collector as it is and after
  ``gc.freeze()``, each in a fresh process;
* ``split``: where the time of a fused loop split over two threads by hidden units goes
  (LSTM and GRU, 100x64x256x256 and 100x64x512x512): the loop as shipped; the same with
  its barrier released in advance (counters at ``RELEASE``: both threads run their steps
  without waiting, over states the other has or has not written yet, which costs the
  same); each thread's loop alone on the caller's core; and the products alone (the
  micro-kernel over thread 0's panels of W_ih and W_hh, every step), with their
  GFLOP/s. The differences: pointwise = alone - products; running beside the other
  thread = no barrier - the slower alone; the barrier = shipped - no barrier;
* ``overhead``: where a B = 1 call's fixed cost goes (LSTM and GRU 200x1x64x64
  inference), each level timed alone, interleaved call by call (3000 rounds, medians):
  the layer; its backend kernel through the contract's checks; the raw kernel; the
  packed loop's entry (``packed_numba.run``); the same with ``W_hh`` packed already
  (``_run``); the loop with its buffers (``_loop``; in the projection mode the call takes,
  and at this size it packs W_ih at every call); the compiled loop alone
  (``cell_thread``, buffers and W_ih's panels made once). Each difference is one level's
  cost. Also a frozen copy of the layer (``Module.freeze``: W_hh and W_ih packed once, no
  contract checks), and the
  check for other running threads (``_other_threads_running``) that split-size and fused
  calls make;
* ``malloc``: an LSTM training step at 50x16x128x128 (forward time), in fresh processes,
  after a first call fused or not (``packed_numba.fused`` for that call only), with glibc's
  mmap threshold left dynamic and fixed (``MALLOC_MMAP_THRESHOLD_``): why training
  forwards were not fused before the kernels' buffers came from a pool (session 10,
  ``fastrnn.backends._workspace``);
* ``projection``: a chunk's input projection through the micro-kernel on one thread (W_ih
  packed) against OpenBLAS's GEMM on its threads and on one: the micro-kernel projection
  of one-thread loops, tried in session 9 and not kept, kept in session 12 up to
  ``packed_numba.PANELS_MAX_WORK`` multiply-adds (``PROJ_PANELS``);
* ``worker``: a ``fastrnn bench`` worker's LSTM 100x64x256x256 training step, as its first
  request and after its info and verification requests, with glibc's malloc thresholds
  dynamic and fixed (``fastrnn.bench.worker.MALLOC_ENV``, which every worker gets).

* ``pool``: a no-op job's round trip through the loops' worker pool and through a
  ``concurrent.futures`` pool, and a frozen LSTM 2x1x64x64 call projecting ahead against
  projecting its chunk itself (session 13's change);
* ``training``: a training step's forward and backward timed apart (LSTM, GRU, RNN at
  100x64x512x512, 100x64x256x256 and 50x16x128x128, each in a fresh process with
  ``fastrnn bench``'s malloc settings), with the GFLOP/s of each half's products, and
  OpenBLAS's GEMMs of the backward's whole-sequence ``d_W_ih`` and ``d_x`` on its threads
  (the rate of the large GEMMs on this machine);
* ``epochs``: an RNN 50x16x128x128 training step, in 40 windows of one second each,
  alternately with the BLAS on its threads and on one (``threadpoolctl``): on the 2-core
  KVM guest of session 14, the forward (one thread) ran up to 1.8x slower in some windows
  where OpenBLAS's pool spun on the other core, never with nothing there (scratch runs
  that timed one way throughout saw such slow windows in stretches of 10-30 s). Two
  virtual CPUs that the host puts on one core's two hardware threads for a while would do
  this, and would explain the spread between runs minutes apart (every engine 1.17-1.38x
  slower, geometric means, in one of session 14's runs than in session 13's);
* ``dx``: a split backward's ``d_x`` by the micro-kernel against OpenBLAS's GEMM
  (``packed_bptt.micro_input_grads``), the backward timed call by call in one process,
  the two alternating ABBA (both see the same noise), with the thread counts the backwards
  ran on: LSTM, GRU, RNN at 100x64x256x256 and 100x64x512x512; and the product alone at
  the LSTM's shapes, one thread's half of the rows, in GFLOP/s a core;
* ``dw``: the same for a split backward's ``d_W_ih`` and ``d_W_hh`` by the strided
  micro-kernel against OpenBLAS (``packed_bptt.micro_weight_grads``), and the products
  alone on two threads, each its half of the rows (gates), at the LSTM's and GRU's shapes;
* ``bwdpass``: the LSTM's backward pointwise pass (``packed_bptt._lstm_units``) over one
  thread's half of the units at 100x64 and H = 256, 512, its arrays from memory (100
  steps) and in cache (4), with the biases' sums and without; and the column-sum pass over
  one thread's block of ``d_a`` that the sums replaced (session 16);
* ``halves``: the LSTM's micro-kernel product at B = 64 with its k loop in halves and in
  one loop, in GFLOP/s a core, and what ``_simd.split_k`` chooses there: with Numba
  compiling for Haswell (``NUMBA_CPU_NAME=haswell``, ``NUMBA_CPU_FEATURES`` without
  AVX-512), the halves' spill that session 16 fixed.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/packed_parts.py \
        [--parts pointwise product gc split overhead malloc projection worker pool
         training epochs dx dw bwdpass halves]

Medians of 30 timed loops (pointwise, product). Numbers go to stdout; session 7's run is
``bench/results/2026-12-04-packed-parts-session7.txt``.
"""

import argparse
import subprocess
import sys
import time
import types

import numba
import numpy as np

from fastrnn.backends import _hotpool
from fastrnn.backends import packed_numba as pk
from fastrnn.backends._numba_math import FASTMATH
from fastrnn.bench.worker import time_runs


def _median_s(fn, repeats=30):
    return float(np.median(time_runs(fn, repeats, None, warmup=1)))


def _pass_loop(block, gru):
    """A compiled loop of ``block`` over ``n`` steps (the LSTM's or the GRU's pass)."""
    if gru:
        def loop(a, Hp, xw, bias, cs, hs, out, lengths, n):
            for k in range(n):
                block(a, Hp, xw, k, 0, bias, bias, hs, k & 1, 1 - (k & 1), out, k, lengths, 0,
                      hs.shape[2], 0, a.shape[0])
    else:
        def loop(a, Hp, xw, bias, cs, hs, out, lengths, n):
            for k in range(n):
                block(a, Hp, xw, k, 0, bias, cs, hs, k & 1, 1 - (k & 1), out, k, lengths, 0,
                      hs.shape[2], 0, a.shape[0])
    return numba.njit(fastmath=FASTMATH)(loop)


def _unmarked(dispatcher):
    """``dispatcher``'s function compiled with ``wide_vectors`` a no-op (and ``_carry``,
    which it calls, likewise)."""
    plain = {**dispatcher.py_func.__globals__, "wide_vectors": numba.njit(lambda: None)}
    plain["_carry"] = numba.njit(types.FunctionType(pk._carry.py_func.__code__, plain))
    return numba.njit(fastmath=FASTMATH, error_model="numpy")(
        types.FunctionType(dispatcher.py_func.__code__, plain))


def pointwise():
    rng = np.random.default_rng(0)
    for cell, gates, block in (("lstm", 4, pk._lstm_block), ("gru", 3, pk._gru_block)):
        for B, H, T in ((1, 64, 2000), (8, 32, 2000), (16, 128, 200), (64, 512, 10)):
            Hp = -(-H // pk.VW) * pk.VW
            a = pk.aligned_empty((B, gates * Hp))
            a[:] = rng.standard_normal(a.shape)
            xw = rng.standard_normal((T, B, gates * H)).astype(np.float32)
            bias = np.zeros(gates * H, np.float32)
            cs = rng.standard_normal((2, B, H)).astype(np.float32)
            hs = cs.copy()
            out = np.zeros((T, B, H), np.float32)
            lengths = np.full(B, T, np.int64)
            ns = {}
            for name, fn in (("512-bit", block), ("LLVM's choice", _unmarked(block))):
                loop = _pass_loop(fn, gates == 3)
                s = _median_s(lambda: loop(a, Hp, xw, bias, cs, hs, out, lengths, T))
                ns[name] = s / (T * B * H) * 1e9
            print(f"pointwise {cell} B={B:<3} H={H:<4} ns per unit: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in ns.items()), flush=True)


def product():
    H, B, T = 64, 1, 2000
    rng = np.random.default_rng(0)
    panels = pk.pack((0.1 * rng.standard_normal((4 * H, H))).astype(np.float32), 4)
    U = panels.shape[0]
    hs = rng.standard_normal((2, B, H)).astype(np.float32)
    a = pk.aligned_empty((B, panels.shape[2] * U))

    @numba.njit(fastmath=FASTMATH)
    def steps(panels, hs, a, n, serpentine):
        for k in range(n):
            pk._recurrent(panels, hs, k & 1, a, pk.VW, U * pk.VW, 0, U,
                          serpentine and k % 2 == 1, 0, B)

    for name, serpentine in (("serpentine", True), ("first to last", False)):
        s = _median_s(lambda: steps(panels, hs, a, T, serpentine))
        print(f"product lstm B=1 H=64 ns per step, {name}: {s / T * 1e9:.0f}", flush=True)


_GC_CHILD = r"""
import gc, sys, time
import numpy as np
import fastrnn
m = fastrnn.GRU(64, 64, backend="numba").eval()
x = np.random.default_rng(0).standard_normal((200, 1, 64)).astype(np.float32)
for _ in range(50):
    m(x)
if sys.argv[1] == "gc.freeze()":
    gc.freeze()
full = gc.get_stats()[2]["collections"]
samples = []
for _ in range(3000):
    t0 = time.perf_counter()
    m(x)
    samples.append(time.perf_counter() - t0)
print(f"gc GRU 200x1x64x64 x3000, collector {sys.argv[1]}: median "
      f"{np.median(samples) * 1e3:.3f} ms, slowest {max(samples) * 1e3:.2f} ms, "
      f"full collections {gc.get_stats()[2]['collections'] - full}")
"""


def collector():
    """Each variant in a fresh process (what a process has loaded decides how long a full
    collection takes)."""
    for name in ("as is", "gc.freeze()"):
        print(subprocess.run([sys.executable, "-c", _GC_CHILD, name], check=True,
                             capture_output=True, text=True).stdout.strip(), flush=True)


def split():
    from fastrnn.backends._cblas import gemm_for
    rng = np.random.default_rng(0)
    for cell, code, T, B, I, H in (("lstm", pk.LSTM, 100, 64, 256, 256),
                                   ("gru", pk.GRU, 100, 64, 256, 256),
                                   ("lstm", pk.LSTM, 100, 64, 512, 512),
                                   ("gru", pk.GRU, 100, 64, 512, 512)):
        gates = abs(code)
        G = gates * H
        x = rng.standard_normal((T, B, I)).astype(np.float32)
        w_ih = (0.1 * rng.standard_normal((G, I))).astype(np.float32)
        w_hh = (0.1 * rng.standard_normal((G, H))).astype(np.float32)
        bias = np.zeros(G, np.float32)
        lengths = np.full(B, T, np.int64)
        hs = rng.standard_normal((2, B, H)).astype(np.float32)
        cs = hs.copy()
        out = np.empty((T, B, H), np.float32)
        none = np.empty((0, 0, 0), np.float32)
        panels, panels_ih = pk.pack(w_hh, gates), pk.pack(w_ih, gates)
        U, _, NR = panels.shape
        args = (code, bias, bias, lengths, False, False, hs, cs, out, none, none)
        whole = _median_s(lambda: pk._loop(2, "split", x, w_ih, panels, panels_ih, *args), 7)
        real_flags = pk.flags
        pk.flags = lambda n: np.full(max(n, 1) * pk.FLAG_STRIDE, pk.RELEASE, np.int64)
        try:
            free = _median_s(lambda: pk._loop(2, "split", x, w_ih, panels, panels_ih, *args), 7)
        finally:
            pk.flags = real_flags
        xw = pk.aligned_empty((2, 1, B, NR * U))
        a = pk.aligned_empty((B, NR * U))
        released = np.full(2 * pk.FLAG_STRIDE, pk.RELEASE, np.int64)
        call = (gemm_for(x.dtype), x.reshape(T * B, I), w_ih, panels) + args + (xw, a, released)
        alone = [_median_s(lambda: pk.cell_thread(*call, tid, 2, pk.PROJ_FUSED, False,
                                                  panels_ih, _hotpool.tickets, 0), 7)
                 for tid in (0, 1)]
        PU, Hp = pk._panel_units(gates), U * pk._panel_units(gates)
        u1 = U // 2

        @numba.njit(fastmath=FASTMATH)
        def products(panels, panels_ih, x, hs, a, ax, T):
            for k in range(T):
                pk._recurrent(panels_ih, x, k, ax, PU, Hp, 0, u1, k % 2 == 0, 0, B)
                pk._recurrent(panels, hs, k % 2, a, PU, Hp, 0, u1, k % 2 == 1, 0, B)

        prod = _median_s(lambda: products(panels, panels_ih, x, hs, a, xw[0, 0], T), 7)
        flop = 2 * T * B * gates * (u1 * PU) * (I + H)
        print(f"split {cell} {T}x{B}x{I}x{H}, 2 threads by units, ms: shipped {whole * 1e3:.2f}, "
              f"no barrier {free * 1e3:.2f}, thread 0 alone {alone[0] * 1e3:.2f}, thread 1 "
              f"alone {alone[1] * 1e3:.2f}, thread 0's products {prod * 1e3:.2f} "
              f"({flop / prod / 1e9:.0f} GFLOP/s a core); pointwise "
              f"{(alone[0] - prod) * 1e3:.2f}, beside the other thread "
              f"{(free - max(alone)) * 1e3:.2f}, barrier {(whole - free) * 1e3:.2f}",
              flush=True)


def overhead():
    import gc

    import fastrnn
    from fastrnn.backends import numba_cpu as nb
    from fastrnn.backends._cblas import gemm_for
    gc.freeze()                      # a full collection (~24 ms) would land in some level
    T, B, I, H = 200, 1, 64, 64
    for cell, code in (("lstm", pk.LSTM), ("gru", pk.GRU)):
        gates = abs(code)
        m = fastrnn.make_layer(cell, I, H, backend="numba", seed=0).eval()
        x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
        fwd, _ = m._kernels()
        w_ih, w_hh, b_ih, b_hh = m._weights_of("_l0")
        h0 = np.zeros((B, H), np.float32)
        states = (h0, h0) if cell == "lstm" else (h0,)
        raw = getattr(nb, f"{cell}_forward")
        bias, b_hn = nb._gru_biases(b_ih, b_hh, H, x.dtype) if cell == "gru" else \
            (nb._bias(b_ih, b_hh, 4 * H, x.dtype),) * 2
        lengths = np.full(B, T, np.int64)
        hs, cs = np.zeros((2, B, H), np.float32), np.zeros((2, B, H), np.float32)
        out, none = np.empty((T, B, H), np.float32), np.empty((0, 0, 0), np.float32)
        args = (code, bias, b_hn, lengths, False, False, hs, cs, out, none, none)
        panels = pk.pack(w_hh, gates)
        U, _, NR = panels.shape
        G = w_ih.shape[0]
        # the levels below _run in the mode the shipped call takes at this size, with the
        # buffers _loop makes for it (made once here); the compiled loop alone projecting
        # its chunks itself where the call projects ahead (the same loop, but for the
        # projector on the other core, which it would wait for here)
        mode = pk._projection(T, B, I, G, gates, False)
        alone = "panels" if mode == "ahead" else mode
        proj, xw, w_proj, panels_ih = pk._projection_buffers(1, alone, x, w_ih, panels, None,
                                                             gates)
        call = (gemm_for(x.dtype), x.reshape(T * B, I), w_proj, panels) + args + (
            xw, pk.aligned_empty((B, NR * U)), pk.flags(2), 0, 1, proj, False, panels_ih,
            _hotpool.tickets, 0)
        frozen = m.freeze()
        levels = {
            "layer": lambda: m(x),
            "frozen layer": lambda: frozen(x),
            "kernel with the contract's checks": lambda: fwd(x, *states, w_ih, w_hh, b_ih,
                                                             b_hh, lengths=None,
                                                             reverse=False, training=False),
            "raw kernel": lambda: raw(x, *states, w_ih, w_hh, b_ih, b_hh, lengths=None,
                                      reverse=False, training=False),
            "packed_numba.run": lambda: pk.run(1, code, x, w_ih, w_hh, *args[1:]),
            "_run (W_hh packed)": lambda: pk._run(1, x, w_ih, panels, *args),
            "_loop": lambda: pk._loop(1, mode, x, w_ih, panels, None, *args),
            "cell_thread": lambda: pk.cell_thread(*call),
        }
        samples = {k: [] for k in levels}
        for f in levels.values():
            for _ in range(30):
                f()
        for _ in range(3000):
            for k, f in levels.items():
                t0 = time.perf_counter()
                f()
                samples[k].append(time.perf_counter() - t0)
        med = {k: float(np.median(v)) * 1e6 for k, v in samples.items()}
        names = [k for k in med if k != "frozen layer"]
        steps = ", ".join(f"{a} - {b} {med[a] - med[b]:.1f}" for a, b in zip(names, names[1:]))
        probe = float(np.median(time_runs(pk._other_threads_running, 3000, None))) * 1e6
        tasks = float(np.median(time_runs(pk._running_tasks, 3000, None))) * 1e6
        print(f"overhead {cell} {T}x{B}x{I}x{H} inference, us: "
              + ", ".join(f"{k} {v:.1f}" for k, v in med.items()) + f"; differences: {steps}; "
              f"(split sizes and fused calls also look for running threads: {probe:.1f}, of which "
              f"the /proc/loadavg read {tasks:.1f})",
              flush=True)


_MALLOC_CHILD = r"""
import sys, time
import numpy as np
import fastrnn
from fastrnn.backends import packed_numba as pk
m = fastrnn.make_layer("lstm", 128, 128, backend="numba", seed=0).train()
x = np.random.default_rng(0).standard_normal((50, 16, 128)).astype(np.float32)
d_out = np.random.default_rng(1).standard_normal((50, 16, 128)).astype(np.float32)
pk.fused = sys.argv[1] == "fused"
m(x)
m.backward(d_out)
pk.fused = None
forwards = []
for _ in range(15):
    t0 = time.perf_counter()
    m(x)
    forwards.append(time.perf_counter() - t0)
    m.backward(d_out)
print(f"{np.median(forwards) * 1e3:.3f}")
"""


def malloc():
    import os
    for env_name, extra in (("dynamic", {}), ("MALLOC_MMAP_THRESHOLD_=64MB",
                                              {"MALLOC_MMAP_THRESHOLD_": str(64 << 20)})):
        got = {first: [] for first in ("fused", "unfused")}
        for _ in range(3):
            for first in got:
                out = subprocess.run([sys.executable, "-c", _MALLOC_CHILD, first], check=True,
                                     capture_output=True, text=True,
                                     env={**os.environ, **extra}).stdout
                got[first].append(float(out.strip().splitlines()[-1]))
        print(f"malloc lstm 50x16x128x128 training forward ms, threshold {env_name}: "
              + ", ".join(f"first call {k} {np.median(v):.3f}" for k, v in got.items()),
              flush=True)


def pool():
    """A one-store job's round trip through the loops' pool
    (:mod:`fastrnn.backends._hotpool`, published from compiled code that then waits off the
    GIL for the job, as a loop's first thread does) and through a
    ``concurrent.futures`` pool (what the loops used before session 13); then a frozen
    LSTM at T = 2, B = 1, 64x64 (almost nothing but fixed costs), projecting ahead
    against projecting its chunk itself: the cost of starting and ending the projector."""
    import concurrent.futures
    import fastrnn

    flag = np.zeros(1, np.int64)

    def job():
        flag[0] = 1

    @numba.njit(nogil=True)
    def here(go, gen, flag):
        """A loop's first thread: publish, then wait off the GIL until the job has run."""
        _hotpool.publish(go, gen)
        while _hotpool.read(flag, 0) == 0:
            pass

    def hot():
        flag[0] = 0
        _hotpool.run([job], lambda go, gen: here(go, gen, flag))

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    round_trips = {"hot pool": hot,
                   "concurrent.futures": lambda: executor.submit(job).result()}
    print("pool: no-op job round trip, us: " + ", ".join(
        f"{name} {_median_s(f, 3000) * 1e6:.1f}" for name, f in round_trips.items()))
    executor.shutdown()
    m = fastrnn.make_layer("lstm", 64, 64, backend="numba", seed=0).eval().freeze()
    x = np.random.default_rng(0).standard_normal((2, 1, 64)).astype(np.float32)
    times = {}
    for mode, ahead in (("ahead", True), ("on its thread", False)) * 2:
        pk.ahead, pk.threads = ahead, 1
        times.setdefault(mode, []).append(_median_s(lambda: m(x), 3000))
    pk.ahead, pk.threads = None, None
    print("pool: frozen LSTM 2x1x64x64, us: " + ", ".join(
        f"projecting {name} {min(t) * 1e6:.1f}" for name, t in times.items()))


def projection():
    from threadpoolctl import threadpool_limits

    @numba.njit(fastmath=FASTMATH, nogil=True)
    def micro(panels, x3, a, PU, cv, U, rows):
        pk._recurrent(panels, x3, 0, a, PU, cv, 0, U, False, 0, rows)

    rng = np.random.default_rng(0)
    for gates, rows, I, H in ((4, 200, 64, 64), (3, 200, 64, 64), (4, 1000, 32, 32),
                              (3, 1000, 32, 32), (4, 50, 128, 128), (4, 1000, 64, 64)):
        G = gates * H
        x = rng.standard_normal((rows, I)).astype(np.float32)
        w = rng.standard_normal((G, I)).astype(np.float32)
        panels = pk.pack(w, gates)
        U, PU = panels.shape[0], pk._panel_units(gates)
        a = pk.aligned_empty((rows, panels.shape[2] * U))
        o = np.empty((rows, G), np.float32)
        us = {"micro-kernel": _median_s(lambda: micro(panels, x.reshape(1, rows, I), a, PU,
                                                      U * PU, U, rows), 100)}
        us["BLAS"] = _median_s(lambda: np.matmul(x, w.T, out=o), 100)
        with threadpool_limits(1, user_api="blas"):
            us["BLAS one thread"] = _median_s(lambda: np.matmul(x, w.T, out=o), 100)
        print(f"projection {rows} rows x {I} inputs x {G} columns "
              f"({rows * G * I / 1e6:.2f}M multiply-adds), us: "
              + ", ".join(f"{k} {v * 1e6:.1f}" for k, v in us.items()), flush=True)


_WORKER_CHILD = r"""
import sys
from fastrnn.bench.cases import Case
from fastrnn.bench import worker
from fastrnn.bench.runner import ProcessWorker
if sys.argv[2] == "dynamic":
    worker.MALLOC_ENV.clear()
w = ProcessWorker("numba", 2, False)
case = Case("lstm", 100, 64, 256, 256, "float32").as_dict()
if sys.argv[1] == "after":
    w.ask(op="info")
    w.ask(op="verify_backend", cells=["lstm", "gru", "rnn_tanh"], dtype="float32")
samples = [s for _ in range(2)
           for s in w.ask(op="time", case=case, mode="training", repeats=3)["samples"]]
w.close()
print(" ".join(f"{s * 1e3:.1f}" for s in samples))
"""


def worker():
    import os

    from fastrnn.bench.worker import MALLOC_ENV
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    for name in ("dynamic", "fixed"):
        for history in ("alone", "after"):
            out = subprocess.run([sys.executable, "-c", _WORKER_CHILD, history, name],
                                 check=True, capture_output=True, text=True, env=env).stdout
            print(f"worker lstm 100x64x256x256 training ms, malloc thresholds {name}, "
                  f"{'after info and verification' if history == 'after' else 'first request'}:"
                  f" {out.strip()}", flush=True)


def _training_model(cell, T, B, I, H):
    from fastrnn.bench import engines
    from fastrnn.bench.cases import Case
    case = Case(cell, T, B, I, H, "float32")
    x, d_out, _ = engines.inputs(case)
    _, model = engines.fastrnn_runner(case, "numba", "training", x, d_out)
    return model, x, d_out


def _halves(model, x, d_out, seconds):
    """Medians of a training step's forward and backward, timed call by call for about
    ``seconds``."""
    f, b = [], []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(f) < 3:
        t0 = time.perf_counter()
        model(x)
        t1 = time.perf_counter()
        model.backward(d_out)
        f.append(t1 - t0)
        b.append(time.perf_counter() - t1)
    return float(np.median(f)), float(np.median(b))


_TRAINING_CHILD = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from packed_parts import _halves, _median_s, _training_model
from fastrnn.backends import cell_kind
cell, T, B, I, H = sys.argv[2], *map(int, sys.argv[3:])
model, x, d_out = _training_model(cell, T, B, I, H)
for _ in range(3):
    model(x)
    model.backward(d_out)
fwd, bwd = _halves(model, x, d_out, 3.0)
G = cell_kind(cell).gates * H
flop = 2 * T * B * G * (I + H)            # the forward's products
# the backward's whole-sequence GEMMs, by OpenBLAS on its threads
rng = np.random.default_rng(0)
d_a = rng.standard_normal((T * B, G)).astype(np.float32)
xs = rng.standard_normal((T * B, I)).astype(np.float32)
w = rng.standard_normal((G, I)).astype(np.float32)
gemm = _median_s(lambda: (d_a.T @ xs, d_a @ w), 7)
print(f"training {cell} {T}x{B}x{I}x{H}, ms: step {(fwd + bwd) * 1e3:.2f} "
      f"({3 * flop / (fwd + bwd) / 1e9:.0f} GFLOP/s), forward {fwd * 1e3:.2f} "
      f"({flop / fwd / 1e9:.0f}), backward {bwd * 1e3:.2f} "
      f"({2 * flop / bwd / 1e9:.0f}); OpenBLAS's d_W_ih and d_x GEMMs "
      f"{gemm * 1e3:.2f} ({4 * T * B * G * I / gemm / 1e9:.0f} GFLOP/s)", flush=True)
"""


def training():
    import os

    from fastrnn.bench.worker import MALLOC_ENV
    env = dict(os.environ)                      # fastrnn bench's malloc settings
    for key, value in MALLOC_ENV.items():
        env.setdefault(key, value)
    here = os.path.dirname(os.path.abspath(__file__))
    for T, B, I, H in ((100, 64, 512, 512), (100, 64, 256, 256), (50, 16, 128, 128)):
        for cell in ("lstm", "gru", "rnn_tanh"):
            subprocess.run([sys.executable, "-c", _TRAINING_CHILD, here, cell, str(T), str(B),
                            str(I), str(H)], check=True, env=env)


def epochs():
    from threadpoolctl import threadpool_limits
    model, x, d_out = _training_model("rnn_tanh", 50, 16, 128, 128)
    for _ in range(5):
        model(x)
        model.backward(d_out)
    rows = []
    for _ in range(40):
        shared = _halves(model, x, d_out, 1.0)
        with threadpool_limits(1, user_api="blas"):
            alone = _halves(model, x, d_out, 1.0)
        rows.append(shared + alone)
        print("epochs rnn_tanh 50x16x128x128 training, ms forward+backward: BLAS on "
              f"{pk._blas_threads()} threads {shared[0] * 1e3:.2f}+{shared[1] * 1e3:.2f}, on "
              f"one {alone[0] * 1e3:.2f}+{alone[1] * 1e3:.2f}", flush=True)
    rows = np.array(rows)
    for name, col in (("BLAS's threads", 0), ("one BLAS thread", 2)):
        f = rows[:, col]
        print(f"epochs {name}: forward from {f.min() * 1e3:.2f} to {f.max() * 1e3:.2f} ms; "
              f"{int(np.sum(f > 1.3 * f.min()))} of {len(f)} windows over 1.3x the fastest",
              flush=True)


#: The backward A/Bs' sizes (T, B, I, H) and calls per cell (``dx``, ``dw``).
BACKWARD_SIZES = ((100, 64, 256, 256, 40), (100, 64, 512, 512, 16))


def _abba_backward(flag, what, sizes=BACKWARD_SIZES):
    """A training step's backward timed call by call in one process, ``packed_bptt``'s
    ``flag`` off (OpenBLAS) and on (the micro-kernel) alternating ABBA, so that both see
    the same noise; the thread counts the backwards ran on."""
    from fastrnn.backends import packed_bptt as pb
    for T, B, I, H, calls in sizes:
        for cell in ("lstm", "gru", "rnn_tanh"):
            model, x, d_out = _training_model(cell, T, B, I, H)
            for _ in range(2):
                model(x)
                model.backward(d_out)
            times = {True: [], False: []}
            threads = []
            real_run = pb.run

            def spy(nthreads, *args):
                threads.append(nthreads)
                return real_run(nthreads, *args)

            pb.run = spy
            try:
                for i in range(calls):          # ABBA: neither way always runs first
                    micro = i % 4 in (0, 3)
                    setattr(pb, flag, micro)
                    model(x)
                    t0 = time.perf_counter()
                    model.backward(d_out)
                    times[micro].append(time.perf_counter() - t0)
            finally:
                setattr(pb, flag, True)
                pb.run = real_run
            blas, micro = np.array(times[False]), np.array(times[True])
            pairs = blas / micro
            print(f"{what} {cell} {T}x{B}x{I}x{H} backward on {sorted(set(threads))} threads, "
                  f"ms: {what} by OpenBLAS {np.median(blas) * 1e3:.2f}, by the micro-kernel "
                  f"{np.median(micro) * 1e3:.2f}; speed-up, median of the pairs "
                  f"{np.median(pairs):.3f}", flush=True)


def dx():
    from threadpoolctl import threadpool_limits

    from fastrnn.backends import packed_bptt as pb
    _abba_backward("micro_input_grads", "d_x")
    for T, B, I, H, _ in BACKWARD_SIZES:
        # the product alone, one thread's half of the rows: d_a (T B, G) times W_ih (G, I)
        G = 4 * H
        rng = np.random.default_rng(0)
        d_a = rng.standard_normal((T * B, G)).astype(np.float32)
        w = rng.standard_normal((G, I)).astype(np.float32)
        panels = pk.pack_t(w)
        d_x = pk.aligned_empty((T * B, I))
        half = T * B // 2
        micro_s = _median_s(lambda: pb._input_grads(panels, d_a, d_x, 0, half), 9)
        with threadpool_limits(1, user_api="blas"):
            blas_s = _median_s(lambda: np.matmul(d_a[:half], w, out=d_x[:half]), 9)
        flop = 2 * half * G * I
        print(f"dx product {half}x{G}x{I} (LSTM's d_x, one thread's half), GFLOP/s a core: "
              f"micro-kernel {flop / micro_s / 1e9:.0f}, OpenBLAS on one thread "
              f"{flop / blas_s / 1e9:.0f}", flush=True)


def dw():
    import threading

    from threadpoolctl import threadpool_limits

    from fastrnn.backends import packed_bptt as pb
    _abba_backward("micro_weight_grads", "d_W")
    for T, B, I, H, gates in ((100, 64, 256, 256, 4), (100, 64, 256, 256, 3),
                              (100, 64, 512, 512, 4), (100, 64, 512, 512, 3)):
        # the products alone, both matrices, each thread its half of the rows (gates)
        G = gates * H
        rng = np.random.default_rng(0)
        d_a = rng.standard_normal((T * B, G)).astype(np.float32)
        x = rng.standard_normal((T * B, I)).astype(np.float32)
        h = rng.standard_normal((T * B, H)).astype(np.float32)
        d_wi, d_wh = np.empty((G, I), np.float32), np.empty((G, H), np.float32)

        def micro(tid):
            c0, c1 = G * tid // 2, G * (tid + 1) // 2
            pb._weight_grads(d_a, x, d_wi, c0, c1)
            pb._weight_grads(d_a, h, d_wh, c0, c1)

        def blas(tid):
            c0, c1 = G * tid // 2, G * (tid + 1) // 2
            np.matmul(d_a[:, c0:c1].T, x, out=d_wi[c0:c1])
            np.matmul(d_a[:, c0:c1].T, h, out=d_wh[c0:c1])

        def both(fn):
            threads = [threading.Thread(target=fn, args=(tid,)) for tid in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        with threadpool_limits(1, user_api="blas"):
            micro_s = _median_s(lambda: both(micro), 9)
            blas_s = _median_s(lambda: both(blas), 9)
        flop = 2 * T * B * G * (I + H)
        print(f"dw products {G}x{T * B}x({I}+{H}) (d_W_ih and d_W_hh, two threads), ms: "
              f"micro-kernel {micro_s * 1e3:.2f} ({flop / micro_s / 1e9:.0f} GFLOP/s), OpenBLAS "
              f"on one thread each {blas_s * 1e3:.2f} ({flop / blas_s / 1e9:.0f})", flush=True)


def bwdpass():
    from fastrnn.backends import packed_bptt as pb
    from fastrnn.backends.numba_cpu import _bias_grads

    @numba.njit(nogil=True)
    def passes(gates, cs, d_out, d_h, d_c, d_a, d_b, lengths, n0, n1):
        T = d_out.shape[0]
        for k in range(T):
            pb._lstm_units(gates, cs, T - 1 - k, 0, d_out, d_h, d_c, d_a, d_b, lengths, n0, n1)

    rng = np.random.default_rng(0)
    for H in (256, 512):
        B, G = 64, 4 * H
        for T, where in ((100, "from memory"), (4, "in cache")):
            gates = rng.uniform(0, 1, (T, B, G)).astype(np.float32)
            cs = rng.standard_normal((T + 1, B, H)).astype(np.float32)
            d_out = rng.standard_normal((T, B, H)).astype(np.float32)
            d_h, d_c = np.zeros((B, H), np.float32), np.zeros((B, H), np.float32)
            d_a, lengths = np.empty((T, B, G), np.float32), np.full(B, T, np.int64)
            ns = {}
            for name, d_b in (("no bias sums", np.zeros(0, np.float32)),
                              ("bias sums", np.zeros(G, np.float32))):
                s = _median_s(lambda: passes(gates, cs, d_out, d_h, d_c, d_a, d_b, lengths,
                                             0, H // 2), 15)
                ns[name] = s / (T * B * H // 2) * 1e9
            print(f"bwdpass lstm 100x64 H={H}, half the units on one thread, arrays {where}, "
                  f"ns per unit: " + ", ".join(f"{k} {v:.2f}" for k, v in ns.items())
                  + f"; the pass over 100 steps {ns['bias sums'] * 100 * B * H / 2e6:.2f} ms"
                  if T == 100 else f"bwdpass lstm 100x64 H={H}, arrays {where}, ns per unit: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in ns.items()), flush=True)
        # the pass the sums replaced: one thread's column block of the whole d_a
        d_a = rng.standard_normal((100 * B, G)).astype(np.float32)
        d_b = np.empty(G // 2, np.float32)
        s = _median_s(lambda: _bias_grads(d_a[:, :G // 2], d_a[:, :G // 2], d_b, d_b), 15)
        print(f"bwdpass lstm 100x64 H={H}: the biases' column sums over one thread's block "
              f"of d_a afterwards, ms: {s * 1e3:.2f}", flush=True)


def halves():
    VW, MR, NR = pk.VW, pk.MR_LSTM, 4 * pk.VW
    K, B, U, reps = 256, 64, 8, 50
    rng = np.random.default_rng(0)
    hs = rng.standard_normal((1, B, K)).astype(np.float32)
    panels = pk.aligned_empty((U, K, NR))
    panels[:] = rng.standard_normal(panels.shape)
    a = pk.aligned_empty((B, U * NR))

    @numba.njit(nogil=True)
    def products(hs, panels, a, halves):
        for _ in range(reps):
            for u in range(U):
                for b0 in range(0, B, MR):
                    pk._MK_LSTM(min(MR, B - b0), hs, b0 * K, K, panels, u * K * NR, K, a,
                                b0 * a.shape[1] + u * NR, a.shape[1], VW, False, halves, 0, 0)

    rates = {}
    for on in (True, False):
        s = _median_s(lambda: products(hs, panels, a, on), 7)
        rates[on] = 2 * B * K * U * NR * reps / s / 1e9
    print(f"halves lstm product B={B} K={K}, {VW}-lane vectors, tiles of {MR} rows, GFLOP/s "
          f"a core: k in halves {rates[True]:.0f}, in one loop {rates[False]:.0f} (split_k "
          f"chooses halves here: {bool(pk.split_k(B, 4, MR))})", flush=True)


PARTS = {"pointwise": pointwise, "product": product, "gc": collector, "split": split,
         "overhead": overhead, "malloc": malloc, "projection": projection,
         "worker": worker, "pool": pool, "training": training, "epochs": epochs,
         "dx": dx, "dw": dw, "bwdpass": bwdpass, "halves": halves}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    for part in p.parse_args().parts:
        PARTS[part]()


if __name__ == "__main__":
    main()
