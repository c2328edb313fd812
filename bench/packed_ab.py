"""A/B of the numba backend's packed loops (fastrnn.backends.packed_numba),
each timing in a fresh process, the two variants alternating, so that neither inherits
the other's idle thread pools (OpenBLAS's spin after a call, and the packed loops have
threads too).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/packed_ab.py [--rounds 3]
        [--compare blas|threads|ahead|fused|panels|rows|affinity|frozen|bptt|REV] [--pause S]
        [--mode inference|training] [--cells lstm gru]
        [--sizes 100x64x512x512,...] [--calls 9] [--freeze]

``--compare blas`` (default): the BLAS loops (numba_cpu, ``packed_numba.enabled = False``)
against the packed loops. ``--compare threads``: the packed loops on one thread against
two, the split forced at every size (``MIN_SPLIT_STEP_WORK = 0``): what
``MIN_SPLIT_STEP_WORK`` was set from. ``--compare ahead``: one-thread loops (forced) never
projecting ahead (``packed_numba.ahead = False``: each chunk before its steps, on the
loop's thread by the micro-kernel or on the BLAS's threads, by the shapes) against always
projected ahead on another core by the micro-kernel (``True``). ``--compare fused``: the
loops never fused against always fused (``packed_numba.fused``). ``--compare panels``:
one-thread loops projecting with OpenBLAS's GEMM (``packed_numba.panel_chunks = False``)
against the micro-kernel from W_ih's panels where the shapes choose it, as shipped.
``--compare rows``: the shipped rules against the batch rows split wherever it can run
(``packed_numba.rows = True``, no hidden-unit split). ``--compare affinity``: the pool
threads left on any CPU (``_current_cpu`` answers None) against kept off their caller's
(``_hotpool.Worker._pin_off``), best seen with ``--pause 0.2``. ``--compare frozen``: an
eval-mode layer (weights packed at every call) against its frozen copy (``Module.freeze``:
packed once). ``--compare bptt`` (with ``--mode training``): numba_cpu's backward loops
(``packed_bptt.enabled = False``) against the packed backward. ``--compare REV`` (a git
revision): the whole package at REV (checked out into a temporary git worktree) against
the working tree, each as shipped: how session 6's kernel changes were judged.

Per point and round, each variant's process times the layer's inference (``--freeze``: a
frozen copy's, as ``fastrnn bench`` times fastrnn), or a training step (forward and
backward; the packed loops run its forward) with ``--mode training`` (median of
``--calls``, 9 by default, after a tenth as many warm-up calls, one at least; at B = 1, 9
calls a process could not resolve a 1.1x gain that 2000 did: session 12); the table shows
the median over rounds, the ratio (above 1: the second variant is faster) and each
round's ratio.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from fastrnn.bench import FULL_GRID

CHILD = r"""
import json, sys, time
cell, T, B, I, H, variant, mode = sys.argv[1], *map(int, sys.argv[2:6]), *sys.argv[6:8]
pause, calls, freeze = float(sys.argv[8]), int(sys.argv[9]), sys.argv[10] == "1"
if variant.startswith("tree:"):           # a checkout to import fastrnn from, not the install
    sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__]
    sys.path.insert(0, variant[5:])
import numpy as np
import fastrnn
from fastrnn.backends import packed_numba
if variant == "blas":
    packed_numba.enabled = False
elif variant.startswith("ahead "):             # "ahead off" / "ahead on", one thread
    packed_numba.ahead = variant == "ahead on"
    packed_numba.threads = 1
elif variant.startswith("fused "):              # "fused off" / "fused on"
    packed_numba.fused = variant == "fused on"
elif variant == "panels off":               # small one-thread loops project with a GEMM
    packed_numba.panel_chunks = False
elif variant == "rows on":                  # the rows split wherever it can run
    packed_numba.rows = True
    packed_numba.MIN_SPLIT_STEP_WORK = 1 << 62
elif variant == "bptt off":                 # numba_cpu's backward loops
    from fastrnn.backends import packed_bptt
    packed_bptt.enabled = False
elif variant == "affinity off":             # pool threads left where the OS puts them
    packed_numba._current_cpu = lambda: None
elif variant.endswith((" thread", " threads")):    # "1 thread" / "2 threads": split forced
    packed_numba.threads = int(variant.split()[0])
    packed_numba.MIN_SPLIT_STEP_WORK = 0
m = fastrnn.make_layer(cell, I, H, backend="numba", seed=0)
m = m.train() if mode == "training" else m.eval()
if variant == "frozen" or freeze:           # weights packed once (Module.freeze)
    m = m.freeze()
x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
d_out = np.random.default_rng(1).standard_normal((T, B, H)).astype(np.float32)


def step():
    m(x)
    if mode == "training":
        m.backward(d_out)


for _ in range(max(1, calls // 10)):
    step()
times = []
for _ in range(calls):
    time.sleep(pause)
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
print(json.dumps(float(np.median(times))))
"""


#: ``--compare`` name: the two variants of CHILD it times, in the table's order.
PAIRS = {"blas": ("blas", "packed"), "threads": ("1 thread", "2 threads"),
         "ahead": ("ahead off", "ahead on"), "fused": ("fused off", "fused on"),
         "panels": ("panels off", "shipped"),
         "rows": ("shipped", "rows on"), "affinity": ("affinity off", "shipped"),
         "frozen": ("shipped", "frozen"), "bptt": ("bptt off", "shipped")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compare", default="blas",
                   help=f"{', '.join(PAIRS)} or a git revision")
    p.add_argument("--pause", type=float, default=0.0,
                   help="seconds of sleep before each timed call (fastrnn bench pauses 0.2 s "
                        "between rounds: --compare affinity shows only with a pause)")
    p.add_argument("--mode", choices=["inference", "training"], default="inference")
    p.add_argument("--cells", nargs="+", default=["lstm", "gru"])
    p.add_argument("--sizes", default=None, help="TxBxIxH,... (default: fastrnn bench's grid)")
    p.add_argument("--calls", type=int, default=9, help="timed calls per process")
    p.add_argument("--freeze", action="store_true",
                   help="time frozen copies (Module.freeze), as fastrnn bench does")
    args = p.parse_args()
    if args.freeze and args.mode == "training":
        p.error("--freeze times inference: a frozen module does not train")
    if args.freeze and args.compare == "frozen":
        p.error("--compare frozen times an eval-mode module against its frozen copy: "
                "without --freeze")
    if args.calls < 1:
        p.error(f"--calls must be at least 1, got {args.calls}")
    if args.compare == "frozen" and args.mode == "training":
        p.error("--compare frozen times inference: a frozen module does not train")
    if args.compare == "bptt" and args.mode != "training":
        p.error("--compare bptt times the backward: use --mode training")
    sizes = FULL_GRID if args.sizes is None else \
        [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    names = {"blas": "BLAS loops", "packed": "packed"}
    worktree = None
    if args.compare in PAIRS:
        first, second = PAIRS[args.compare]
    else:
        worktree = tempfile.mkdtemp(prefix="packed_ab_")
        subprocess.run(["git", "worktree", "add", "--detach", worktree, args.compare],
                       check=True, capture_output=True)
        root = subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True,
                              capture_output=True, text=True).stdout.strip()
        first, second = f"tree:{worktree}", f"tree:{root}"
        names = {first: args.compare, second: "working tree"}
    try:
        _compare(args, sizes, first, second, names)
    finally:
        if worktree:
            subprocess.run(["git", "worktree", "remove", "--force", worktree], check=True)


def _compare(args, sizes, first, second, names):
    env = dict(os.environ)
    for cell in args.cells:
        for T, B, I, H in sizes:
            times = {first: [], second: []}
            for r in range(args.rounds):
                for variant in ((first, second) if r % 2 == 0 else (second, first)):
                    out = subprocess.run([sys.executable, "-c", CHILD, cell, str(T), str(B),
                                          str(I), str(H), variant, args.mode, str(args.pause),
                                          str(args.calls), str(int(args.freeze))],
                                         capture_output=True,
                                         text=True, check=True, env=env).stdout
                    times[variant].append(json.loads(out.strip().splitlines()[-1]))
            a, b = (float(np.median(times[k])) * 1e3 for k in (first, second))
            rounds = " ".join(f"{x / y:.2f}" for x, y in zip(times[first], times[second]))
            print(f"{cell:<5} {args.mode} {T}x{B}x{I}x{H}: {names.get(first, first)} {a:9.3f} ms  "
                  f"{names.get(second, second)} {b:9.3f} ms  speed-up {a / b:5.2f}  "
                  f"(rounds: {rounds})", flush=True)


if __name__ == "__main__":
    main()
