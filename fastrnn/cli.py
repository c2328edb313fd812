"""The ``fastrnn`` command: ``bench`` (verify, then time), ``check`` (gradchecks), ``info``."""

from __future__ import annotations

import argparse
import sys

import numpy as np

import fastrnn
from fastrnn import backends
from fastrnn import bench

ALL_CELLS = tuple(backends.CELLS)


# -------------------------------------------------------------------- info

def cmd_info(args) -> int:
    info = bench.machine_info()
    print(f"fastrnn {fastrnn.__version__}")
    for key in ("python", "platform", "cpu", "cores", "numpy", "numba", "torch", "onnxruntime",
                "openvino", "jax", "cupy"):
        print(f"  {key:<11} {info[key] if info[key] is not None else 'not installed'}")
    print("BLAS and OpenMP pools of this process (threadpoolctl):")
    for pool in bench.blas_info():
        print(f"  {pool['internal_api']} {pool['version']} ({pool['user_api']}): "
              f"{pool['architecture'] or '-'} kernels, {pool['num_threads']} threads, "
              f"{pool['prefix']}")
    warning = bench.blas_warning()
    if warning:
        print(f"  warning: {warning}")
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
    if "numba" not in absent:
        from fastrnn.backends import packed_numba
        print(f"  numba packed loops: {packed_numba.describe()}")
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
                    {"bias": False, "batch_first": True}, {"reverse": True, "lengths": True}]
        zoneout = (0.3, 0.5) if backends.state_count(cell) == 2 else 0.3
        variants += [{"zoneout": zoneout, "bidirectional": True, "num_layers": 2,
                      "lengths": True}]
        if cell in ("lstm", "gru"):
            variants += [{"layernorm": True, "bidirectional": True, "num_layers": 2,
                          "lengths": True}]
        if cell == "lstm":
            variants += [{"proj_size": 2, "bidirectional": True, "num_layers": 2,
                          "lengths": True}]
        if cell == "gru":
            variants += [{"reset_after": False}, {"reset_after": False, "lengths": True,
                                                  "bidirectional": True}]
        for options in variants:
            yield cell, options


def _build(cell, I, H, backend, dtype, options):
    """A check configuration's layer; ``lengths`` in ``options`` is for the call,
    ``layernorm`` picks fastrnn.LayerNormLSTM / LayerNormGRU."""
    options = {k: v for k, v in options.items() if k != "lengths"}
    if options.pop("layernorm", False):
        cls = {"lstm": fastrnn.LayerNormLSTM, "gru": fastrnn.LayerNormGRU}[cell]
        return cls(I, H, backend=backend, dtype=dtype, seed=0, **options)
    return bench.build_layer(cell, I, H, backend, dtype, **options)


def cmd_check(args) -> int:
    from tqdm import tqdm
    names = args.backends or backends.available()
    rows, failed, refused = [], 0, []
    configs = [(b, c, o) for b in names for c, o in check_configs(args.cells)]
    for backend, cell, options in tqdm(configs, desc="gradcheck", disable=not sys.stderr.isatty()):
        rng = np.random.default_rng(0)
        T, B, I, H = 5, 3, 3, 4
        try:
            model = _build(cell, I, H, backend, np.float64, options)
        except NotImplementedError as exc:   # an option this backend has no kernels for
            refused.append(f"{backend} {cell}: {exc}")
            continue
        x = rng.standard_normal((B, T, I) if model.batch_first else (T, B, I))
        lengths = np.array([5, 2, 0]) if options.get("lengths") else None
        report = fastrnn.gradcheck(model, x, lengths=lengths)
        worst = max(e.max_abs for e in report.errors.values())
        opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
        rows.append((backend, cell, opts, worst, report.passed))
        failed += not report.passed
    print(f"{'backend':<8} {'cell':<9} {'options':<70} {'max abs err':>11}  ok")
    for backend, cell, opts, worst, ok in rows:
        print(f"{backend:<8} {cell:<9} {opts:<70} {worst:11.2e}  {'yes' if ok else 'NO'}")
    for line in refused:
        print(f"not run (no kernels): {line}")
    print(f"{len(rows) - failed} passed, {failed} failed, {len(refused)} not run")
    return 1 if failed else 0


# ------------------------------------------------------------------- bench

def positive_int(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def peer_list(text):
    """argparse type: comma-separated peer names."""
    names = [t for t in text.split(",") if t]
    for name in names:
        if name not in bench.PEERS:
            raise argparse.ArgumentTypeError(f"--vs takes peers from {', '.join(bench.PEERS)}, "
                                             f"got {name!r}")
    return names


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

    from fastrnn.bench import report, runner

    available = backends.available()
    names = args.backends or [b for b in bench.FASTRNN if b in available]
    for name in names:
        if name not in available:
            print(f"backend {name!r} is not available: {backends.why_absent()[name]}",
                  file=sys.stderr)
            return 2
    peers = [] if args.no_torch else list(args.vs)
    sizes = args.sizes or (bench.QUICK_GRID if args.quick else bench.FULL_GRID)
    repeats = args.repeats or (5 if args.quick else 15)
    budget = 3.0 if args.quick else 20.0
    warning = bench.blas_warning()
    if warning and not args.keep_blas_env and args.protocol == "subprocess":
        print(f"note: {warning} The benchmark workers run without them.", file=sys.stderr)
    elif warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{bench.machine.cpu_name()}, {bench.machine_info()['cores']} cores; {args.dtype}; "
          f"{args.threads} threads per engine; protocol {args.protocol}")
    result = runner.run(names + peers, args.cells, sizes, args.modes, args.dtype, repeats,
                        budget, args.threads, args.protocol, args.keep_blas_env,
                        progress=lambda work: tqdm(work, desc="bench", unit="point"),
                        variants=args.variants, passes=args.passes)
    blas = next((p for e in result.engines.values() for p in e.get("blas", [])
                 if p["user_api"] == "blas"), None)
    if blas:
        print(f"BLAS: {blas['internal_api']} {blas['version']} ({blas['architecture']} kernels, "
              f"{blas['num_threads']} threads); GEMM peak {result.peak:.0f} GFLOP/s "
              f"({result.peak_source})")
    shown = [p for p in peers if any(p in r["speedup_vs"] for r in result.rows)]
    report.print_table(result.rows, shown)
    ours = [n for n in names + peers if n in bench.OURS and n != "numpy"] or names
    for backend in ours:
        summary = report.summarize(result.rows, backend, shown)
        if summary:
            print(summary)
    for name, why in result.not_timed.items():
        print(f"not timed: {name}: {why}")
    if args.json:
        report.write_json(args.json, result, " ".join(sys.argv), args.threads, args.protocol)
        print(f"wrote {args.json}")
    if args.plot and result.rows:
        report.plot(result.rows, args.plot)
        print(f"wrote {args.plot}")
    return 1 if result.failed_fastrnn else 0   # a fastrnn backend failed verification


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
    b.add_argument("--backends", nargs="+", choices=bench.FASTRNN,
                   help="fastrnn backends to time (default: every one available)")
    b.add_argument("--vs", type=peer_list, default=list(bench.PEERS),
                   help=f"peers, comma-separated (default: {','.join(bench.PEERS)}); "
                        "an absent one is reported")
    b.add_argument("--protocol", choices=("subprocess", "inprocess"), default="subprocess",
                   help="one process per engine, taking turns (default), or all in this one")
    b.add_argument("--variants", nargs="+", choices=tuple(bench.VARIANTS), default=[],
                   help="also time these LSTM variants: proj (proj_size=H/2), layernorm "
                        "(LayerNormLSTM)")
    b.add_argument("--keep-blas-env", action="store_true",
                   help="keep OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE in the workers")
    b.add_argument("--modes", nargs="+", choices=("inference", "training"),
                   default=["inference", "training"])
    b.add_argument("--sizes", type=parse_sizes, help="TxBxIxH,... e.g. 100x64x256x256")
    b.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    b.add_argument("--repeats", type=positive_int, help="timed runs per contender (median taken)")
    b.add_argument("--passes", type=positive_int, default=1,
                   help="time the whole grid this many times over, each pass with --repeats "
                        "runs (about N times the run time); a row's median pools every pass, "
                        "so that a machine that runs slow for seconds at a time spreads that "
                        "over the grid")
    b.add_argument("--threads", type=positive_int, default=None,
                   help="threads of every engine (default: cores)")
    b.add_argument("--no-torch", action="store_true", help="time no peer (same as --vs '')")
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
