"""Running a benchmark: one worker process per engine (or every engine in this
process), verification, then the grid, engines taking turns point by point.

Protocol ``subprocess`` (the default): each engine lives in its own process
(:mod:`.worker`) with its own thread pools, started without the environment
variables that force old BLAS kernels (:data:`.machine.BLAS_OVERRIDES`), with
``OMP_WAIT_POLICY=PASSIVE`` and ONNX Runtime's spinning off; the engines are
timed one after the other at every point, in an order that rotates from point
to point, each after a short pause (:data:`.worker.SETTLE_S`) so that the
previous engine's idle threads have stopped spinning. Protocol ``inprocess``:
every engine in this process, runs interleaved (what ``pytest bench`` and the
tests use; on two cores a spinning pool of one engine slows the next one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np

from . import engines, machine, worker
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

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


class LocalWorker:
    """An engine in this process (protocol ``inprocess``)."""

    def __init__(self, name, threads, keep_blas_env=True):
        self.name, self.threads = name, threads
        self.engine = engines.engine(name)
        self.reason = self.engine.unavailable_reason()
        if self.reason is None:
            self.engine.setup(threads)

    def ask(self, op, **request):
        if op == "info":
            return {"absent": self.reason, "blas": machine.blas_info(),
                    "machine": machine.machine_info(), "modes": list(self.engine.modes),
                    "precision": self.engine.precision, "env": {}}
        if self.reason is not None:
            raise WorkerError(f"{self.name} is absent: {self.reason}")
        if op == "peak":
            return {"gflops": machine.gemm_peak(request["dtype"])}
        if op == "verify":
            ok, err = engines.verify(self.engine, request["cell"], request["mode"],
                                     request["dtype"], self.threads)
            return {"ok": ok, "err": err}
        if op == "verify_backend":
            ok, err = engines.verify_backend(self.name, request["cells"], request["dtype"])
            return {"ok": ok, "err": err}
        if op == "time":
            run = self.engine.runner(Case(**request["case"]), request["mode"], self.threads)
            return {"samples": worker.time_runs(run, request["repeats"], request["budget_s"])}
        raise WorkerError(f"unknown request {op!r}")

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


def run(names, cells, sizes, modes, dtype, repeats, budget_s, threads, protocol="subprocess",
        keep_blas_env=False, progress=None, log=print) -> Result:
    """Verify every engine of ``names``, then time the grid. Returns a :class:`Result`."""
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
        # Verification: every engine, cell kind and mode it offers.
        for name, w in list(workers.items()):
            is_fastrnn = name in engines.FASTRNN
            if is_fastrnn:
                ok, err = _verify_fastrnn(w, name, cells, dtype, protocol, threads)
                for cell in cells:
                    for mode in modes:
                        result.verified[(name, cell, mode)] = (ok, err)
                log(f"verify {name:<13} forward and gradients vs float64 reference: "
                    f"max rel err {err:.1e} -> {'ok' if ok else 'FAILED, not timed'}")
                result.failed_fastrnn |= not ok
                continue
            for cell in cells:
                for mode in modes:
                    if mode not in result.engines[name]["modes"]:
                        continue
                    try:
                        answer = w.ask(op="verify", cell=cell, mode=mode, dtype=dtype)
                        verdict = (answer["ok"], answer["err"])
                    except WorkerError as exc:
                        verdict = (False, float("nan"))
                        log(f"verify {name} {cell} {mode}: {exc}")
                    result.verified[(name, cell, mode)] = verdict
            errs = [v for k, v in result.verified.items() if k[0] == name]
            bad = [f"{c} {m}" for (n, c, m), (ok, _) in result.verified.items()
                   if n == name and not ok]
            worst = max((e for _, e in errs), default=float("nan"))
            label = f" ({result.engines[name]['precision']})" if result.engines[name][
                "precision"] else ""
            log(f"verify {name + label:<13} vs float64 reference: max rel err {worst:.1e} -> "
                + ("ok" if not bad else f"FAILED for {', '.join(bad)}: not timed there"))
        # The grid: at each point the engines take turns, in a rotating order.
        cases = [Case(c, T, B, I, H, dtype) for c in cells for (T, B, I, H) in sizes]
        work = [(case, mode) for case in cases for mode in modes]
        order = list(workers)
        for k, (case, mode) in enumerate(progress(work) if progress else work):
            turn = order[k % len(order):] + order[:k % len(order)] if order else []
            for name in turn:
                if not result.verified.get((name, case.cell, mode), (False,))[0]:
                    continue
                if name == "numpy" and case.T * case.B * case.H * case.I > 5e8:
                    continue   # the reference is the oracle, not a contender, at large sizes
                try:
                    samples = workers[name].ask(op="time", case=case.as_dict(), mode=mode,
                                                repeats=repeats, budget_s=budget_s)["samples"]
                except WorkerError as exc:
                    result.not_timed.setdefault(name, f"{case.label()} {mode}: {exc}")
                    log(f"{name} failed at {case.label()} {mode}: {exc}")
                    continue
                result.rows.append(_row(name, case, mode, samples,
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


def _row(name, case, mode, samples, precision):
    seconds = float(np.median(samples))
    return {"backend": name, "precision": precision, "cell": case.cell, "mode": mode,
            "T": case.T, "B": case.B, "I": case.I, "H": case.H, "dtype": case.dtype,
            "median_ms": seconds * 1e3, "samples": len(samples),
            "spread": float((np.max(samples) - np.min(samples)) / seconds) if samples else 0.0,
            "gflops": case.flops(mode) / seconds / 1e9}


def _relate(result: Result):
    """%peak and speedups. A rate above the measured peak means the peak measurement
    was disturbed: the peak is raised to the best rate seen, and the source says so."""
    best = max((r["gflops"] for r in result.rows), default=0.0)
    if best > result.peak:
        result.peak_source += f"; raised to the best rate measured in the grid ({best:.0f})"
        result.peak = best
    for r in result.rows:
        r["peak_fraction"] = r["gflops"] / result.peak if result.peak else None
    by_point = {}
    for r in result.rows:
        by_point.setdefault((r["cell"], r["mode"], r["T"], r["B"], r["I"], r["H"]), {})[
            r["backend"]] = r["median_ms"]
    for r in result.rows:
        times = by_point[(r["cell"], r["mode"], r["T"], r["B"], r["I"], r["H"])]
        # speedups of fastrnn's backends over the peers (above 1: fastrnn is faster)
        r["speedup_vs"] = {peer: times[peer] / r["median_ms"] for peer in times
                           if peer not in engines.FASTRNN} \
            if r["backend"] in engines.FASTRNN else {}
        r["speedup_vs_torch"] = r["speedup_vs"].get("torch")
