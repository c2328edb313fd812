"""One benchmark worker process: one engine, its own thread pools, requests as JSON
lines on stdin, answers as JSON lines on stdout.

``fastrnn bench`` starts one worker per engine (``python -m fastrnn.bench.worker
ENGINE THREADS``) and sends them the points in turn, so that only one engine is
busy at any moment and no engine's idle, spinning threads share a process with
the engine being timed. Requests: ``{"op": "info"}``, ``{"op": "peak", "dtype"}``,
``{"op": "verify", "kind", "mode", "dtype"}``, ``{"op": "verify_backend", "cells",
"dtype"}`` (fastrnn's backends), ``{"op": "time", "case", "mode",
"repeats", "budget_s"}``, ``{"op": "quit"}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

#: Seconds a worker waits before it starts timing: the previous engine's pool
#: threads, in another process, stop spinning within this time.
SETTLE_S = 0.2
#: Seconds of warm-up calls after that pause, before the timed calls (at least the
#: warm-up's count of calls): the first milliseconds after an idle pause run slow for
#: every engine on this kind of machine (a virtual CPU woken from idle: NumPy's own
#: 200x64x256 GEMM took 203-214 us first, 63-68 second, 62-65 after; ``python
#: bench/wake.py``, ``bench/results/2026-12-05-packed-parts-session9.txt``),
#: and a point whose call takes 1 ms would otherwise time that wake-up, not the engine.
WARMUP_S = 0.02


#: glibc malloc's thresholds, fixed in every worker: left dynamic, the mmap threshold
#: rises with the largest block freed so far, and whether a training step's large buffers
#: (tens of MB) come back from the heap or from fresh pages at every call then depends on
#: what the process allocated before. The same fastrnn worker timed an LSTM
#: 100x64x256x256 training step at 96-111 ms as its first request, at 175-224 ms after its
#: ``info`` and verification requests, and at 94-109 ms after them with these two set
#: (``python bench/packed_parts.py --parts worker``, two runs in
#: ``bench/results/2026-12-05-packed-parts-session9.txt``).
#: Every engine's worker gets them (PyTorch's CPU tuning guide recommends jemalloc or
#: tcmalloc for its training, for the same reason).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def environment(engine: str, threads: int, keep_blas_env: bool) -> dict:
    """The environment of a worker process."""
    from .machine import BLAS_OVERRIDES
    env = dict(os.environ)
    if not keep_blas_env:
        for key in BLAS_OVERRIDES:
            env.pop(key, None)
    # Idle OpenMP threads (torch's) sleep instead of spinning.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # glibc's malloc with fixed thresholds (MALLOC_ENV), so that an engine's large
    # per-call buffers come back from the heap instead of fresh pages.
    for key, value in MALLOC_ENV.items():
        env.setdefault(key, value)
    env["OMP_NUM_THREADS"] = str(threads)
    env["OPENBLAS_NUM_THREADS"] = str(threads)
    if engine == "jax":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                            f"{'true' if threads > 1 else 'false'} "
                            f"intra_op_parallelism_threads={threads}").strip()
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def time_runs(run, repeats: int, budget_s: float | None, warmup: int = 2,
              warmup_s: float = 0.0) -> list[float]:
    """Seconds of ``repeats`` calls of ``run`` after ``warmup`` calls, and more until
    ``warmup_s`` seconds have passed; stops early (after at least 3) when ``budget_s``
    is spent."""
    start = time.perf_counter()
    for _ in range(warmup):
        run()
    while time.perf_counter() - start < warmup_s:
        run()
    samples = []
    start = time.perf_counter()
    for k in range(repeats):
        t0 = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t0)
        if budget_s is not None and k >= 2 and time.perf_counter() - start > budget_s:
            break
    return samples


class Handler:
    """One engine and its answers to requests: what a worker process serves, and what
    the ``inprocess`` protocol calls directly."""

    def __init__(self, name: str, threads: int, settle_s: float = SETTLE_S):
        from . import engines
        self.name, self.threads, self.settle_s = name, threads, settle_s
        self.engine = engines.engine(name)
        self.reason = self.engine.unavailable_reason()
        self._cached = (None, None)    # (key, runner) of the last point timed
        if self.reason is None:
            self.engine.setup(threads)

    def handle(self, op: str, **request) -> dict:
        """The answer to one request; an answer with "error" for a failed one."""
        from . import engines, machine
        from .cases import Case
        if op == "info":
            return {"absent": self.reason, "blas": machine.blas_info(),
                    "machine": machine.machine_info(), "modes": list(self.engine.modes),
                    "precision": self.engine.precision, "variants": list(self.engine.variants),
                    "env": {k: os.environ.get(k) for k in machine.BLAS_OVERRIDES}}
        if self.reason is not None:
            return {"error": f"{self.name} is absent: {self.reason}"}
        if op == "peak":
            return {"gflops": machine.gemm_peak(request["dtype"])}
        if op == "verify":
            ok, err = engines.verify(self.engine, request["kind"], request["mode"],
                                     request["dtype"], self.threads)
            return {"ok": ok, "err": err}
        if op == "verify_backend":
            ok, err = engines.verify_backend(self.name, request["cells"], request["dtype"])
            return {"ok": ok, "err": err}
        if op == "time":
            key = (json.dumps(request["case"], sort_keys=True), request["mode"])
            fresh = self._cached[0] != key
            if fresh:   # a later round of the same point reuses its runner
                self._cached = (None, None)   # free the old runner before building
                self._cached = (key, self.engine.runner(Case(**request["case"]),
                                                        request["mode"], self.threads))
            time.sleep(self.settle_s)
            return {"samples": time_runs(self._cached[1], request["repeats"],
                                         request.get("budget_s"), warmup=2 if fresh else 1,
                                         warmup_s=WARMUP_S)}
        return {"error": f"unknown request {op!r}"}


def serve(name: str, threads: int, stdin=sys.stdin, stdout=sys.stdout) -> None:
    handler = Handler(name, threads)
    for line in stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            break
        try:
            answer = handler.handle(**request)
        except Exception as exc:  # reported to the parent, which reports it to the user
            answer = {"error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc(limit=5)}
        stdout.write(json.dumps(answer) + "\n")
        stdout.flush()


def main():
    # Answers go to a private copy of stdout; whatever a library prints goes to stderr.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.argv[1], int(sys.argv[2]), sys.stdin, answers)


if __name__ == "__main__":
    main()
