"""The ``fastrnn`` command: ``bench`` (verify, then time), ``check`` (gradchecks), ``info``."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import fastrnn
from fastrnn import backends
from fastrnn import bench as B

ALL_CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


# -------------------------------------------------------------------- info

def cmd_info(args) -> int:
    info = B.machine_info()
    print(f"fastrnn {fastrnn.__version__}")
    for key in ("python", "platform", "cpu", "cores", "numpy", "scipy", "numba", "torch", "cupy"):
        print(f"  {key:<9} {info[key] if info[key] is not None else 'not installed'}")
    print("backends:")
    absent = backends.why_absent()
    for name in ("numba", "numpy", "cuda"):
        if name in absent:
            print(f"  {name:<6} absent: {absent[name]}")
        else:
            line = f"  {name:<6} available"
            if name == backends.auto_name():
                line += " (backend='auto' picks it)"
            print(line)
    from fastrnn.backends import cuda
    details = cuda.info(load="cuda" not in absent)
    fatbins = ", ".join(details["fatbins"]) or "none installed (no nvcc at build time)"
    print(f"  cuda kernel sources: {details['csrc']}; fatbins: {fatbins}")
    for unit, origin in details.get("modules", {}).items():
        print(f"  cuda {unit}: {origin}")
    print(f"  cuda time loop: {details['algorithm']} (fastrnn.backends.cuda.set_algorithm)")
    return 0


# ------------------------------------------------------------------- check

def check_configs(cells):
    """Every cell kind and option, on a small problem."""
    for cell in cells:
        variants = [{}, {"bidirectional": True, "num_layers": 2}, {"lengths": True},
                    {"bias": False, "batch_first": True}]
        if cell == "gru":
            variants += [{"reset_after": False}, {"reset_after": False, "lengths": True,
                                                  "bidirectional": True}]
        for options in variants:
            yield cell, options


def _build(cell, I, H, backend, dtype, options):
    """A check configuration's layer; ``lengths`` in ``options`` is for the call."""
    options = {k: v for k, v in options.items() if k != "lengths"}
    return B.build_layer(cell, I, H, backend, dtype, **options)


def cmd_check(args) -> int:
    from tqdm import tqdm
    names = args.backends or backends.available()
    rows, failed = [], 0
    configs = [(b, c, o) for b in names for c, o in check_configs(args.cells)]
    for backend, cell, options in tqdm(configs, desc="gradcheck", disable=not sys.stderr.isatty()):
        rng = np.random.default_rng(0)
        T, Bsz, I, H = 5, 3, 3, 4
        model = _build(cell, I, H, backend, np.float64, options)
        x = rng.standard_normal((Bsz, T, I) if model.batch_first else (T, Bsz, I))
        lengths = np.array([5, 2, 0]) if options.get("lengths") else None
        report = fastrnn.gradcheck(model, x, lengths=lengths)
        worst = max(e.max_abs for e in report.errors.values())
        opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
        rows.append((backend, cell, opts, worst, report.passed))
        failed += not report.passed
    print(f"{'backend':<8} {'cell':<9} {'options':<52} {'max abs err':>11}  ok")
    for backend, cell, opts, worst, ok in rows:
        print(f"{backend:<8} {cell:<9} {opts:<52} {worst:11.2e}  {'yes' if ok else 'NO'}")
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


# ------------------------------------------------------------------- bench

def verify_backend(backend, cells, dtype) -> tuple[bool, float]:
    """Outputs, final states and every gradient (input, initial states, parameters)
    of ``backend`` against the float64 reference, with lengths, bidirectional."""
    worst = 0.0
    rng = np.random.default_rng(1)
    T, Bsz, I, H = 7, 4, 5, 6
    x = rng.standard_normal((T, Bsz, I))
    lengths = np.array([7, 3, 5, 1])
    tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-9
    for cell in cells:
        ref = _build(cell, I, H, "numpy", np.float64, {"bidirectional": True})
        model = ref.copy(backend=backend, dtype=dtype)
        results = []
        for m in (ref, model):
            xp = m._xp
            out, states = m(xp.asarray(x.astype(m.dtype)), lengths=lengths)
            states = states if isinstance(states, tuple) else (states,)
            d_out = xp.asarray(np.ones(out.shape, dtype=m.dtype))
            d_states = tuple(xp.asarray(np.full(s.shape, 0.5, dtype=m.dtype)) for s in states)
            d_x, d_hx = m.backward(d_out, d_states if len(states) == 2 else d_states[0])
            d_hx = d_hx if isinstance(d_hx, tuple) else (d_hx,)
            grads = [out, *states, d_x, *d_hx] + [m.grads[k] for k in sorted(m.grads)]
            results.append([np.asarray(g.get() if hasattr(g, "get") else g, dtype=np.float64)
                            for g in grads])
        for a, b in zip(*results):
            err = float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(a)))))
            worst = max(worst, err)
    return worst <= tol, worst


def positive_int(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text):
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def parse_sizes(text):
    sizes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"--sizes takes TxBxIxH items separated by commas, "
                                             f"got {item!r}")
        sizes.append(tuple(int(p) for p in parts))
    return sizes


def cmd_bench(args) -> int:
    from tqdm import tqdm

    dtype = args.dtype
    available = backends.available()
    names = args.backends or [b for b in ("numpy", "numba", "cuda") if b in available]
    for name in names:
        if name not in available:
            print(f"backend {name!r} is not available: {backends.why_absent()[name]}",
                  file=sys.stderr)
            return 2
    sizes = args.sizes or (B.QUICK_GRID if args.quick else B.FULL_GRID)
    repeats = args.repeats or (5 if args.quick else 15)
    budget = 3.0 if args.quick else 20.0
    torch = None
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(args.threads)
        except ImportError:
            print("torch is not installed: timing fastrnn alone", file=sys.stderr)

    info = B.machine_info()
    peak = B.gemm_peak(dtype)
    print(f"{info['cpu']}, {info['cores']} cores; numpy {dtype} GEMM peak "
          f"{peak:.0f} GFLOP/s; torch threads {args.threads if torch else '-'}")

    timed = []
    for name in names:
        ok, err = verify_backend(name, args.cells, dtype)
        print(f"verify {name:<6} forward and gradients vs float64 reference: "
              f"max rel err {err:.1e} -> {'ok' if ok else 'FAILED, not timed'}")
        if ok:
            timed.append(name)

    rows = []
    cases = [B.Case(c, T, Bsz, I, H, dtype) for c in args.cells for (T, Bsz, I, H) in sizes]
    work = [(case, mode) for case in cases for mode in args.modes]
    for case, mode in tqdm(work, desc="bench", unit="point"):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((case.T, case.B, case.I)).astype(dtype)
        d_out = rng.standard_normal((case.T, case.B, case.H)).astype(dtype)
        runners, state = {}, None
        for name in timed:
            if name == "numpy" and case.T * case.B * case.H * case.I > args.max_reference_work:
                continue  # the reference is the oracle, not a contender, at large sizes
            runners[name], model = B.fastrnn_runner(case, name, mode, x, d_out)
            if state is None:
                state = model.state_dict()
                state = {k: (v.get() if hasattr(v, "get") else v) for k, v in state.items()}
        if state is None:
            state = B.make_layer(case, "numpy").state_dict()
        if torch is not None:
            runners["torch"] = B.torch_runner(case, mode, x, d_out, state)
            if "cuda" in timed and torch.cuda.is_available():
                runners["cudnn"] = B.torch_runner(case, mode, x, d_out, state, device="cuda")
        medians = B.time_interleaved(runners, repeats, budget_s=budget)
        base = medians.get("torch")
        for name, seconds in medians.items():
            gflops = case.flops(mode) / seconds / 1e9
            rows.append({"backend": name, "cell": case.cell, "mode": mode, "T": case.T,
                         "B": case.B, "I": case.I, "H": case.H, "dtype": dtype,
                         "median_ms": seconds * 1e3, "gflops": gflops,
                         "peak_fraction": gflops / peak,
                         "speedup_vs_torch": (base / seconds) if base else None})

    print_table(rows)
    summary = summarize(rows)
    if summary:
        print(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "gemm_peak_gflops": peak, "torch_threads": args.threads,
                       "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
                       "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0 if len(timed) == len(names) else 1   # a backend that failed verification


def print_table(rows):
    print(f"{'backend':<7} {'cell':<8} {'mode':<9} {'T':>5} {'B':>4} {'I':>5} {'H':>5} "
          f"{'median ms':>10} {'GFLOP/s':>8} {'%peak':>6} {'vs torch':>8}")
    for r in rows:
        speed = f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] else "-"
        print(f"{r['backend']:<7} {r['cell']:<8} {r['mode']:<9} {r['T']:>5} {r['B']:>4} "
              f"{r['I']:>5} {r['H']:>5} {r['median_ms']:>10.3f} {r['gflops']:>8.1f} "
              f"{100 * r['peak_fraction']:>5.0f}% {speed:>8}")


def summarize(rows, backend="numba"):
    """Geometric-mean speedups over torch, per mode, for ``backend``."""
    lines = []
    for mode in ("training", "inference"):
        s = [r["speedup_vs_torch"] for r in rows if r["backend"] == backend and
             r["mode"] == mode and r["speedup_vs_torch"]]
        if s:
            lines.append(f"{backend} {mode}: geometric-mean speedup over torch "
                         f"{float(np.exp(np.mean(np.log(s)))):.2f}x, min {min(s):.2f}x "
                         f"({len(s)} points)")
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'fastrnn[plot]'") from None
    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sel = [r for r in rows if r["mode"] == mode]
        labels = sorted({(r["cell"], r["T"], r["B"], r["I"], r["H"]) for r in sel},
                        key=lambda k: (k[0], -k[2] * k[4]))
        names = sorted({r["backend"] for r in sel})
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            vals = []
            for lab in labels:
                match = [r for r in sel if r["backend"] == name and
                         (r["cell"], r["T"], r["B"], r["I"], r["H"]) == lab]
                vals.append(match[0]["gflops"] if match else 0)
            ax.bar(np.arange(len(labels)) + k * width, vals, width, label=name)
        ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2)
        ax.set_xticklabels([f"{c}\n{T}x{Bs}x{I}x{H}" for c, T, Bs, I, H in labels],
                           fontsize=7, rotation=45, ha="right")
        ax.set_ylabel("GFLOP/s (GEMM flops / median time)")
        ax.set_yscale("log")
        ax.set_title(f"{mode} ({rows[0]['dtype']}), T x B x I x H")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -------------------------------------------------------------------- main

def add_cuda_algorithm(parser):
    from fastrnn.backends import cuda
    parser.add_argument("--cuda-algorithm", choices=cuda.ALGORITHMS, default=None,
                        help="time loop of the cuda backend (default: stepwise; see docs/cuda.md)")


def build_parser():
    p = argparse.ArgumentParser(prog="fastrnn", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="verify each backend, then time it against PyTorch")
    b.add_argument("--quick", action="store_true", help="a small grid, about a minute")
    b.add_argument("--cells", nargs="+", choices=ALL_CELLS, default=["lstm", "gru", "rnn_tanh"])
    b.add_argument("--backends", nargs="+", choices=("numpy", "numba", "cuda"))
    b.add_argument("--modes", nargs="+", choices=("inference", "training"),
                   default=["inference", "training"])
    b.add_argument("--sizes", type=parse_sizes, help="TxBxIxH,... e.g. 100x64x256x256")
    b.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    b.add_argument("--repeats", type=positive_int, help="timed runs per contender (median taken)")
    b.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: cores)")
    b.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    b.add_argument("--max-reference-work", type=positive_float, default=5e8,
                   help="skip the numpy reference above this T*B*I*H")
    b.add_argument("--json", metavar="FILE", help="write machine info and rows as JSON")
    add_cuda_algorithm(b)
    b.add_argument("--plot", metavar="FILE.png", help="draw the comparison (needs matplotlib)")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("check", help="gradcheck every cell and option on every backend")
    c.add_argument("--backends", nargs="+", choices=("numpy", "numba", "cuda"))
    c.add_argument("--cells", nargs="+", choices=ALL_CELLS, default=list(ALL_CELLS))
    add_cuda_algorithm(c)
    c.set_defaults(func=cmd_check)

    i = sub.add_parser("info", help="versions, backends, and why a backend is absent")
    i.set_defaults(func=cmd_info)
    return p


def main(argv=None) -> int:
    # Idle OpenMP threads (torch's) spin for a while by default and steal the cores
    # from whatever runs next in the same process; interleaved timings need them asleep.
    import os
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", 1) is None:
        args.threads = os.cpu_count() or 1
    if getattr(args, "cuda_algorithm", None):
        from fastrnn.backends import cuda
        cuda.set_algorithm(args.cuda_algorithm)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
