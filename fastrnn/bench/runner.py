"""Running a benchmark: one worker process per engine (or every engine in this
process), verification, then the grid, engines taking turns point by point.

Protocol ``subprocess`` (the default): each engine lives in its own process
(:mod:`.worker`) with its own thread pools, started without the environment
variables that force old BLAS kernels (:data:`.machine.BLAS_OVERRIDES`), with
``OMP_WAIT_POLICY=PASSIVE`` and ONNX Runtime's spinning off; the engines are
timed one after the other at every point, in an order that rotates from point
to point, each after a short pause (:data:`.worker.SETTLE_S`), and every other
worker process is stopped (SIGSTOP, SIGCONT after) while one engine is timed:
an idle pool that spins anyway cannot take a core from it. (Even so, on the
2-core machine of December 2026 every engine measured up to 1.4x slower at LSTM
100x64x512x512 in a run with five peers than beside one: compare ratios within
one run, not times across runs.) Protocol ``inprocess``:
every engine in this process, runs interleaved (what ``pytest bench`` and the
tests use; on two cores a spinning pool of one engine slows the next one).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np

from . import engines, report, worker
from .cases import Case


class WorkerError(RuntimeError):
    pass


class ProcessWorker:
    """An engine in its own process."""

    def __init__(self, name, threads, keep_blas_env):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastrnn.bench.worker", name, str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=worker.environment(name, threads, keep_blas_env))

    def ask(self, **request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"the {self.name} worker exited (code {self.proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise WorkerError(answer["error"])
        return answer

    def pause(self):
        """Stop the process (every thread of it) until :meth:`resume`."""
        if _CAN_STOP and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        if _CAN_STOP and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


_CAN_STOP = hasattr(signal, "SIGSTOP")


@contextlib.contextmanager
def _alone(workers, name):
    """Every worker but ``name`` stopped (processes only), resumed on exit."""
    others = [w for n, w in workers.items() if n != name and hasattr(w, "pause")]
    for w in others:
        w.pause()
    try:
        yield
    finally:
        for w in others:
            w.resume()


class LocalWorker:
    """An engine in this process (protocol ``inprocess``): the worker's handler, called
    directly, without its pause before timing (the engines are interleaved here)."""

    def __init__(self, name, threads, keep_blas_env=True):
        self.name = name
        self.handler = worker.Handler(name, threads, settle_s=0.0)

    def ask(self, op, **request):
        answer = self.handler.handle(op, **request)
        if "error" in answer:
            raise WorkerError(answer["error"])
        return answer

    def close(self):
        pass


@dataclass
class Result:
    rows: list = field(default_factory=list)
    #: engine -> why it was not timed (absent, failed verification, crashed)
    not_timed: dict = field(default_factory=dict)
    #: (engine, cell, mode) -> (passed, worst relative error)
    verified: dict = field(default_factory=dict)
    engines: dict = field(default_factory=dict)
    peak: float = 0.0
    peak_source: str = ""
    failed_fastrnn: bool = False


#: Rounds per point: the engines take turns this many times, each round timing
#: ``repeats / ROUNDS`` runs; a noisy spell of the machine then spreads over all of
#: them instead of landing on one.
ROUNDS = 3


def run(names, cells, sizes, modes, dtype, repeats, budget_s, threads, protocol="subprocess",
        keep_blas_env=False, progress=None, log=print, variants=(), passes=1) -> Result:
    """Verify every engine of ``names``, then time the grid (``cells`` x ``sizes``, and
    each of ``variants`` x ``sizes``) ``passes`` times over: an engine's row at a point is
    the median of its samples from every pass (:data:`ROUNDS` spreads a noisy spell of the
    machine over the engines within a point; passes spread one that lasts longer than a
    point over the grid). Returns a :class:`Result`."""
    from .cases import VARIANTS
    kinds = list(cells) + [f"{VARIANTS[v]}:{v}" for v in variants]
    make = ProcessWorker if protocol == "subprocess" else LocalWorker
    result = Result()
    workers = {}
    try:
        for name in names:
            workers[name] = make(name, threads, keep_blas_env)
        for name, w in list(workers.items()):
            info = w.ask(op="info")
            result.engines[name] = info
            if info["absent"]:
                result.not_timed[name] = f"absent: {info['absent']}"
                log(f"{name:<13} absent: {info['absent']}")
                del workers[name]
        # The peak from the process whose BLAS fastrnn's numba kernels use.
        for name in ("numba", "numpy"):
            if name in workers:
                result.peak = workers[name].ask(op="peak", dtype=dtype)["gflops"]
                result.peak_source = f"numpy GEMM in the {name} worker, best of 5 (1024^3, 2048^3)"
                break
        # Verification: every engine, kind and mode it offers. fastrnn's backends get
        # the stronger check (lengths, bidirectional, states) for the plain kinds.
        for name, w in list(workers.items()):
            info = result.engines[name]
            own = [k for k in kinds if k.partition(":")[2] in info["variants"]]
            if name in engines.FASTRNN:
                ok, err = _verify_fastrnn(w, name, cells, dtype, protocol, threads)
                for cell in cells:
                    for mode in modes:
                        result.verified[(name, cell, mode)] = (ok, err)
                log(f"verify {name:<13} forward and gradients vs float64 reference: "
                    f"max rel err {err:.1e} -> {'ok' if ok else 'FAILED, not timed'}")
                result.failed_fastrnn |= not ok
                own = [k for k in own if ":" in k]
                if not own:
                    continue
            for kind in own:
                for mode in modes:
                    if mode not in info["modes"]:
                        continue
                    try:
                        answer = w.ask(op="verify", kind=kind, mode=mode, dtype=dtype)
                        verdict = (answer["ok"], answer["err"])
                    except WorkerError as exc:
                        verdict = (False, float("nan"))
                        log(f"verify {name} {kind} {mode}: {exc}")
                    result.verified[(name, kind, mode)] = verdict
                    if name in engines.FASTRNN:
                        result.failed_fastrnn |= not verdict[0]
            errs = [v for k, v in result.verified.items() if k[0] == name]
            bad = [f"{c} {m}" for (n, c, m), (ok, _) in result.verified.items()
                   if n == name and not ok]
            worst = max((e for _, e in errs), default=float("nan"))
            label = f" ({result.engines[name]['precision']})" if result.engines[name][
                "precision"] else ""
            which = ", ".join(sorted({k for (n, k, _) in result.verified if n == name}))
            log(f"verify {name + label:<13} ({which}) vs float64 reference: max rel err "
                f"{worst:.1e} -> "
                + ("ok" if not bad else f"FAILED for {', '.join(bad)}: not timed there"))
        # The grid, ``passes`` times over: at each point the engines take turns, in a
        # rotating order; each engine's samples of a point pool over the passes.
        cases = [Case(c, T, B, I, H, dtype) for c in cells for (T, B, I, H) in sizes]
        cases += [Case(VARIANTS[v], T, B, I, H, dtype, v) for v in variants
                  for (T, B, I, H) in sizes]
        work = [(case, mode) for case in cases for mode in modes]
        order = list(workers)
        rounds = min(ROUNDS, repeats)
        pooled, failed = {}, set()      # (point, engine) -> samples; the engines that failed
        visits = [(p, k) for p in range(passes) for k in range(len(work))]
        for p, k in (progress(visits) if progress else visits):
            case, mode = work[k]
            shift = (k + p) % len(order) if order else 0
            turn = [name for name in order[shift:] + order[:shift]
                    if result.verified.get((name, case.kind, mode), (False,))[0]
                    # the reference is the oracle, not a contender, at large sizes
                    and not (name == "numpy" and case.T * case.B * case.H * case.I > 5e8)]
            for r in range(rounds):
                for name in (turn if r % 2 == 0 else turn[::-1]):
                    if (k, name) in failed:
                        continue
                    try:
                        with _alone(workers, name):
                            pooled.setdefault((k, name), []).extend(workers[name].ask(
                                op="time", case=case.as_dict(), mode=mode,
                                repeats=-(-repeats // rounds),
                                budget_s=None if budget_s is None else
                                budget_s / rounds)["samples"])
                    except WorkerError as exc:
                        result.not_timed.setdefault(name, f"{case.label()} {mode}: {exc}")
                        log(f"{name} failed at {case.label()} {mode}: {exc}")
                        failed.add((k, name))
        for k, (case, mode) in enumerate(work):
            for name in order:
                if (k, name) in pooled and (k, name) not in failed:
                    result.rows.append(_row(name, case, mode, pooled[(k, name)],
                                            result.engines[name]["precision"]))
    finally:
        for w in workers.values():
            w.close()
    _relate(result)
    return result


def _verify_fastrnn(w, name, cells, dtype, protocol, threads):
    """fastrnn's own backends get the stronger check (lengths, bidirectional, states)."""
    answer = w.ask(op="verify_backend", cells=list(cells), dtype=dtype)
    return answer["ok"], answer["err"]


#: A row is *noisy* where the middle half of its samples (first to third quartile) spans
#: more than this fraction of its median: the machine ran at two speeds during the point
#: (this guest's slow stretches, README), and the row's ratios are less certain.
NOISY_IQR = 0.2


def _row(name, case, mode, samples, precision):
    seconds = float(np.median(samples))
    q1, q3 = (float(q) for q in np.percentile(samples, [25, 75]))
    return {"backend": name, "precision": precision, "cell": case.cell, "kind": case.kind,
            "variant": case.variant, "mode": mode,
            "T": case.T, "B": case.B, "I": case.I, "H": case.H, "dtype": case.dtype,
            "median_ms": seconds * 1e3, "samples": len(samples),
            "spread": float((np.max(samples) - np.min(samples)) / seconds) if samples else 0.0,
            "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "noisy": (q3 - q1) / seconds > NOISY_IQR,
            "gflops": case.flops(mode) / seconds / 1e9}


def _relate(result: Result):
    """%peak and speedups. A rate above the measured peak means the peak measurement
    was disturbed: the peak is raised to the best rate seen, and the source says so."""
    # bf16 rows are not float32 work: they do not move the float32 peak
    best = max((r["gflops"] for r in result.rows if r["precision"] in (None, "f32")),
               default=0.0)
    if best > result.peak:
        result.peak_source += f"; raised to the best rate measured in the grid ({best:.0f})"
        result.peak = best
    for r in result.rows:
        r["peak_fraction"] = r["gflops"] / result.peak if result.peak else None
    by_point = {}
    for r in result.rows:
        by_point.setdefault(report.point(r), {})[r["backend"]] = r["median_ms"]
    for r in result.rows:
        times = by_point[report.point(r)]
        # speedups of fastrnn's engines over the peers (above 1: fastrnn is faster)
        r["speedup_vs"] = {peer: times[peer] / r["median_ms"] for peer in times
                           if peer not in engines.OURS} \
            if r["backend"] in engines.OURS else {}
        r["speedup_vs_torch"] = r["speedup_vs"].get("torch")
