"""Verify the cuda backend on a GPU and time it against torch's cuDNN path.

    python bench/gpu_vs_cudnn.py            # full grid, ~3-6 minutes on an H100
    python bench/gpu_vs_cudnn.py --quick    # a few points, ~1 minute
    python bench/gpu_vs_cudnn.py --sanitize # also compute-sanitizer over the GPU tests

Steps, each recorded in ``bench/results/<date>-<gpu>.json`` (rewritten after every
step, so a run cut short still leaves what it measured):

1. ``pytest tests/test_cuda.py`` (GPU tests included);
2. every output and gradient of every cell/option against the float64 NumPy
   reference, in float32 (pass: relative error <= 1e-5) and float64, with
   each algorithm of the time loop (``stepwise``; ``auto``, which is
   ``persistent`` wherever it fits);
3. median times (CUDA events, after warm-up, TF32 off in both) of one layer,
   one direction, T=100, B in {1, 16, 64, 256}, I=H in {128, 256, 512, 1024}:
   ``cuda`` is this backend's ``{cell}_forward``/``{cell}_backward``, once per
   algorithm (the row's ``algorithm`` says which ran: ``stepwise``,
   ``persistent``, or ``mixed`` when only one direction fitted); ``cudnn`` is
   ``torch.nn.{LSTM,GRU,RNN}`` on CUDA (inference: forward under no_grad;
   training: forward plus backward of ``out`` with parameter gradients).

With ``--sanitize``, step 1 is followed by compute-sanitizer's memcheck,
racecheck and synccheck over the float32 GPU reference tests (both algorithms).

Each step catches its own errors, so one failure does not hide the others.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
try:
    import fastrnn
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(REPO))
    import fastrnn
from fastrnn.backends import reference  # noqa: E402

CELLS = {"lstm": ("lstm", "LSTM"), "gru": ("gru", "GRU"), "rnn": ("rnn_tanh", "RNN")}
TOL32 = 1e-5


def log(*args):
    print(*args, flush=True)


def versions():
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "fastrnn": getattr(fastrnn, "__version__", None), "fastrnn_path": fastrnn.__file__}
    try:
        import cupy
        rt = cupy.cuda.runtime
        props = rt.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        info.update(cupy=cupy.__version__,
                    device=name.decode() if isinstance(name, bytes) else str(name),
                    compute_capability=cupy.cuda.Device().compute_capability,
                    cuda_driver_api=rt.driverGetVersion(), cuda_runtime=rt.runtimeGetVersion())
    except Exception as exc:  # noqa: BLE001
        info["cupy_error"] = repr(exc)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except Exception as exc:  # noqa: BLE001
        info["driver"] = f"unknown ({exc!r})"
    try:
        import torch
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    except Exception as exc:  # noqa: BLE001
        info["torch_error"] = repr(exc)
    return info


# ------------------------------------------------------------------ 1. pytest

def run_pytest(timeout):
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "tests/test_cuda.py", "-q", "-rs",
                              "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True,
                             timeout=timeout)
        text = out.stdout + out.stderr
        summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed)", line)]
        return {"returncode": out.returncode, "summary": summary[-1] if summary else None,
                "tail": text[-4000:]}
    except subprocess.TimeoutExpired as exc:
        return {"returncode": None, "summary": f"timed out after {timeout} s",
                "tail": (exc.stdout or b"")[-4000:].decode(errors="replace")
                if isinstance(exc.stdout, bytes) else str(exc.stdout)[-4000:]}


def run_sanitizer(timeout):
    """compute-sanitizer's memcheck, racecheck, synccheck over a few GPU tests."""
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        return {"skipped": "compute-sanitizer is not on PATH"}
    report = {}
    for tool in ("memcheck", "racecheck", "synccheck"):
        cmd = [exe, "--tool", tool, "--error-exitcode", "3", sys.executable, "-m", "pytest",
               "tests/test_cuda.py", "-q", "-p", "no:cacheprovider", "-k",
               "test_gpu_matches_reference and float32 and (lstm or gru)"]
        try:
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                 timeout=timeout)
            text = out.stdout + out.stderr
            summary = [line for line in text.splitlines() if "ERROR SUMMARY" in line]
            report[tool] = {"returncode": out.returncode,
                            "summary": summary[-1] if summary else None,
                            "tail": text[-2000:]}
        except subprocess.TimeoutExpired:
            report[tool] = {"returncode": None, "summary": f"timed out after {timeout} s"}
        log(f"{tool}: {report[tool]['summary']} (exit {report[tool]['returncode']})")
    return report


# ------------------------------------------------------------------ 2. accuracy

def compare_with_reference():
    from fastrnn.backends import cuda
    rows = []
    for algorithm in ("stepwise", "auto"):
        cuda.set_algorithm(algorithm)
        try:
            rows += [dict(row, algorithm=algorithm) for row in _compare_with_reference()]
        finally:
            cuda.set_algorithm("stepwise")
    return rows


def _compare_with_reference():
    import cupy

    from fastrnn.backends import cuda
    rows = []
    rng = np.random.default_rng(0)
    T, B, I, H = 12, 9, 20, 24
    cases = [("rnn_tanh", None), ("rnn_relu", None), ("lstm", None), ("gru", True), ("gru", False)]
    for cell, reset_after in cases:
        G = fastrnn.backends.gate_count(cell) * H
        S = fastrnn.backends.state_count(cell)
        for reverse in (False, True):
            for bias in (True, False):
                for use_lengths in (False, True):
                    k = 1 / np.sqrt(H)
                    x = rng.standard_normal((T, B, I))
                    states = [0.5 * rng.standard_normal((B, H)) for _ in range(S)]
                    w_ih, w_hh = rng.uniform(-k, k, (G, I)), rng.uniform(-k, k, (G, H))
                    b_ih = rng.uniform(-k, k, G) if bias else None
                    b_hh = rng.uniform(-k, k, G) if bias else None
                    lengths = None
                    if use_lengths:
                        lengths = rng.integers(0, T + 1, size=B)
                        lengths[0] = T
                    d_out = rng.standard_normal((T, B, H))
                    d_states = [rng.standard_normal((B, H)) for _ in range(S)]
                    extra = {} if reset_after is None else {"reset_after": reset_after}

                    def run(module, conv):
                        *outs, cache = getattr(module, f"{cell}_forward")(
                            conv(x), *map(conv, states), conv(w_ih), conv(w_hh),
                            None if b_ih is None else conv(b_ih),
                            None if b_hh is None else conv(b_hh),
                            lengths=lengths, reverse=reverse, training=True, **extra)
                        grads = getattr(module, f"{cell}_backward")(
                            conv(d_out), *map(conv, d_states), cache)
                        return outs + list(grads)

                    want = run(reference, lambda a: a)
                    for dtype in (np.float32, np.float64):
                        got = run(cuda, lambda a, dt=dtype: cupy.asarray(a.astype(dt)))
                        worst = 0.0
                        for g, w in zip(got, want):
                            if w is None:
                                assert g is None
                                continue
                            g = cupy.asnumpy(g).astype(np.float64)
                            worst = max(worst, float(np.abs(g - w).max()
                                                     / max(np.abs(w).max(), 1e-30)))
                        tol = TOL32 if dtype == np.float32 else 1e-10
                        rows.append(dict(cell=cell, reset_after=reset_after, reverse=reverse,
                                         bias=bias, lengths=use_lengths,
                                         dtype=np.dtype(dtype).name, max_rel_err=worst,
                                         ok=worst <= tol))
    return rows


# ------------------------------------------------------------------ 3. timing

def median_ms(fn, warmup, reps, event_pair):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = event_pair()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(end_elapsed(start, end))
    return statistics.median(times)


def end_elapsed(start, end):
    if hasattr(start, "elapsed_time"):     # torch.cuda.Event
        return start.elapsed_time(end)
    import cupy
    return cupy.cuda.get_elapsed_time(start, end)


def algorithm_used(cell_key, mode, B, H):
    """Which loop ``auto`` runs for this point: stepwise, persistent or mixed."""
    from fastrnn.backends import cuda
    cell = CELLS[cell_key][0]
    passes = (False,) if mode == "inference" else (False, True)
    fits = [cuda.persistent_plan(cell, B, H, np.float32, backward)[0] is not None
            for backward in passes]
    return "persistent" if all(fits) else "mixed" if any(fits) else "stepwise"


def cuda_case(cell_key, mode, T, B, I, H):
    """A closure running this backend once, and the events to time it."""
    import cupy

    from fastrnn.backends import cuda
    cell = CELLS[cell_key][0]
    G = fastrnn.backends.gate_count(cell) * H
    S = fastrnn.backends.state_count(cell)
    k = 1 / np.sqrt(H)
    uni = lambda *shape: cupy.random.uniform(-k, k, shape, dtype=cupy.float32)  # noqa: E731
    x = cupy.random.standard_normal((T, B, I), dtype=cupy.float32)
    states = [cupy.zeros((B, H), dtype=cupy.float32) for _ in range(S)]
    w_ih, w_hh, b_ih, b_hh = uni(G, I), uni(G, H), uni(G), uni(G)
    d_out = cupy.random.standard_normal((T, B, H), dtype=cupy.float32)
    d_states = [cupy.zeros((B, H), dtype=cupy.float32) for _ in range(S)]
    fwd = getattr(cuda, f"{cell}_forward")
    bwd = getattr(cuda, f"{cell}_backward")

    if mode == "inference":
        def step():
            fwd(x, *states, w_ih, w_hh, b_ih, b_hh, training=False)
    else:
        def step():
            *_, cache = fwd(x, *states, w_ih, w_hh, b_ih, b_hh, training=True)
            bwd(d_out, *d_states, cache)
    return step, lambda: (cupy.cuda.Event(), cupy.cuda.Event())


def cudnn_case(cell_key, mode, T, B, I, H):
    import torch
    module = getattr(torch.nn, CELLS[cell_key][1])(I, H).cuda()
    x = torch.randn(T, B, I, device="cuda")
    d_out = torch.randn(T, B, H, device="cuda")

    if mode == "inference":
        def step():
            with torch.no_grad():
                module(x)
    else:
        x.requires_grad_(True)

        def step():
            out, _ = module(x)
            out.backward(d_out)
    return step, lambda: (torch.cuda.Event(enable_timing=True),
                          torch.cuda.Event(enable_timing=True))


def timing(args, result, save, deadline):
    import cupy
    try:
        import torch
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        have_torch = torch.cuda.is_available() and torch.backends.cudnn.is_available()
    except Exception as exc:  # noqa: BLE001
        result["errors"].append(f"torch unavailable: {exc!r}")
        have_torch = False
    from fastrnn.backends import cuda
    cuda.allow_tf32(False)
    Bs, Hs = ((1, 64), (256, 512)) if args.quick else ((1, 16, 64, 256), (128, 256, 512, 1024))
    T = 100
    rows = result["rows"]
    for cell_key in CELLS:
        for mode in ("inference", "training"):
            for B in Bs:
                for H in Hs:
                    for backend, algorithm in (("cuda", "stepwise"), ("cuda", "auto"),
                                               ("cudnn", "cudnn")):
                        if backend == "cudnn" and not have_torch:
                            continue
                        if algorithm == "auto":
                            algorithm = algorithm_used(cell_key, mode, B, H)
                            if algorithm == "stepwise":
                                continue   # the same loop as the row before
                        row = dict(backend=backend, algorithm=algorithm, cell=cell_key,
                                   mode=mode, T=T, B=B, I=H, H=H, dtype="float32",
                                   median_ms=None)
                        if time.monotonic() > deadline:
                            row["error"] = "skipped: time budget spent"
                            rows.append(row)
                            continue
                        try:
                            if backend == "cuda":
                                cuda.set_algorithm("stepwise" if algorithm == "stepwise"
                                                   else "auto")
                            make = cuda_case if backend == "cuda" else cudnn_case
                            step, events = make(cell_key, mode, T, B, H, H)
                            row["median_ms"] = round(median_ms(step, args.warmup, args.reps,
                                                               events), 4)
                        except Exception as exc:  # noqa: BLE001
                            row["error"] = f"{type(exc).__name__}: {exc}"
                        finally:
                            cuda.set_algorithm("stepwise")
                        rows.append(row)
                        log(f"{backend:6s} {algorithm:10s} {cell_key:4s} {mode:9s} B={B:4d} "
                            f"H={H:5d} "
                            f"{row['median_ms'] if row['median_ms'] is not None else row}")
                        cupy.get_default_memory_pool().free_all_blocks()
                        if have_torch:
                            torch.cuda.empty_cache()
                save()


def speedups(rows):
    """cuDNN time / cuda time per point and algorithm (> 1: this backend is faster)."""
    times = {(r["backend"], r.get("algorithm"), r["cell"], r["mode"], r["B"], r["H"]):
             r["median_ms"] for r in rows}
    out = []
    for (backend, algorithm, cell, mode, B, H), ms in times.items():
        other = times.get(("cudnn", "cudnn", cell, mode, B, H))
        if backend == "cuda" and ms and other:
            out.append(dict(cell=cell, mode=mode, B=B, H=H, algorithm=algorithm,
                            speedup_vs_cudnn=round(other / ms, 3)))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few points, fewer repetitions")
    parser.add_argument("--budget", type=float, default=540,
                        help="seconds after which no new point is timed (default 540)")
    parser.add_argument("--skip-pytest", action="store_true")
    parser.add_argument("--sanitize", action="store_true",
                        help="also run compute-sanitizer (memcheck, racecheck, synccheck)")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: "
                        "bench/results/<date>-<gpu>.json)")
    args = parser.parse_args()
    args.warmup, args.reps = (2, 5) if args.quick else (3, 10)
    t0 = time.monotonic()
    deadline = t0 + args.budget

    info = versions()
    log(json.dumps(info, indent=1))
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", info.get("device", "unknown-gpu")).strip("-")
    path = args.out or REPO / "bench" / "results" / f"{datetime.date.today()}-{gpu}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
              "versions": info, "tf32": False, "errors": [], "rows": []}

    def save():
        result["speedups"] = speedups(result["rows"])
        result["elapsed_s"] = round(time.monotonic() - t0, 1)
        path.write_text(json.dumps(result, indent=1, default=str))

    try:
        from fastrnn.backends import cuda
        result["kernels"] = cuda.info(load=True)
        log("kernels:", json.dumps(result["kernels"]["modules"], indent=1))
    except Exception:  # noqa: BLE001
        result["errors"].append("loading kernels: " + traceback.format_exc())
    save()

    if not args.skip_pytest:
        log("== pytest tests/test_cuda.py")
        result["pytest"] = run_pytest(timeout=150 if args.quick else 240)
        log(result["pytest"]["summary"])
        save()
    if args.sanitize:
        log("== compute-sanitizer")
        result["sanitizer"] = run_sanitizer(timeout=120)
        save()

    log("== accuracy against the float64 reference")
    try:
        acc = compare_with_reference()
        result["accuracy"] = {"all_ok": all(r["ok"] for r in acc),
                              "worst_float32": max(r["max_rel_err"] for r in acc
                                                   if r["dtype"] == "float32"),
                              "rows": acc}
        log(f"all ok: {result['accuracy']['all_ok']}, worst float32 relative error "
            f"{result['accuracy']['worst_float32']:.3g}")
    except Exception:  # noqa: BLE001
        result["errors"].append("accuracy: " + traceback.format_exc())
        log(result["errors"][-1])
    save()

    log("== timing (median ms, CUDA events, TF32 off)")
    try:
        timing(args, result, save, deadline)
    except Exception:  # noqa: BLE001
        result["errors"].append("timing: " + traceback.format_exc())
        log(result["errors"][-1])
    save()
    for s in result["speedups"]:
        log(f"{s['cell']:4s} {s['mode']:9s} B={s['B']:4d} H={s['H']:5d} "
            f"cuda ({s['algorithm']}) is {s['speedup_vs_cudnn']:.2f}x cuDNN")
    log(f"wrote {path}")
    ok = (not result["errors"] and result.get("accuracy", {}).get("all_ok", False)
          and result.get("pytest", {"returncode": 0})["returncode"] == 0
          and all(r.get("returncode") == 0 for r in result.get("sanitizer", {}).values()
                  if isinstance(r, dict)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
