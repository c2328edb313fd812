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


def environment(engine: str, threads: int, keep_blas_env: bool) -> dict:
    """The environment of a worker process."""
    from .machine import BLAS_OVERRIDES
    env = dict(os.environ)
    if not keep_blas_env:
        for key in BLAS_OVERRIDES:
            env.pop(key, None)
    # Idle OpenMP threads (torch's) sleep instead of spinning.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["OMP_NUM_THREADS"] = str(threads)
    env["OPENBLAS_NUM_THREADS"] = str(threads)
    if engine == "jax":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                            f"{'true' if threads > 1 else 'false'} "
                            f"intra_op_parallelism_threads={threads}").strip()
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def time_runs(run, repeats: int, budget_s: float | None, warmup: int = 2) -> list[float]:
    """Seconds of ``repeats`` calls of ``run`` after ``warmup`` calls; stops early
    (after at least 3) when ``budget_s`` is spent."""
    for _ in range(warmup):
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


def serve(name: str, threads: int, stdin=sys.stdin, stdout=sys.stdout) -> None:
    from . import engines, machine
    from .cases import Case

    eng = engines.engine(name)
    cached = [None, None]     # (key, runner) of the last point timed
    reason = eng.unavailable_reason()
    if reason is None:
        eng.setup(threads)
    for line in stdin:
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "quit":
                break
            if op == "info":
                info = machine.machine_info()
                answer = {"absent": reason, "blas": machine.blas_info(), "machine": info,
                          "modes": list(eng.modes), "precision": eng.precision,
                          "variants": list(eng.variants),
                          "env": {k: os.environ.get(k) for k in machine.BLAS_OVERRIDES}}
            elif reason is not None:
                answer = {"error": f"{name} is absent: {reason}"}
            elif op == "peak":
                answer = {"gflops": machine.gemm_peak(request["dtype"])}
            elif op == "verify":
                ok, err = engines.verify(eng, request["kind"], request["mode"],
                                         request["dtype"], threads)
                answer = {"ok": ok, "err": err}
            elif op == "verify_backend":
                ok, err = engines.verify_backend(name, request["cells"], request["dtype"])
                answer = {"ok": ok, "err": err}
            elif op == "time":
                key = (json.dumps(request["case"], sort_keys=True), request["mode"])
                fresh = cached[0] != key
                if fresh:   # the same point again (a later round): same runner
                    cached[:] = [None, None]   # free the old runner before building
                    cached[:] = [key, eng.runner(Case(**request["case"]), request["mode"],
                                                 threads)]
                run = cached[1]
                time.sleep(SETTLE_S)
                samples = time_runs(run, request["repeats"], request.get("budget_s"),
                                    warmup=2 if fresh else 1)
                answer = {"samples": samples}
            else:
                answer = {"error": f"unknown request {op!r}"}
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
