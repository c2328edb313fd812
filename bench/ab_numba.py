"""Interleaved A/B of the numba backend: a git revision's ``numba_cpu.py`` against the
working tree's, on the layers, in one process.

    python bench/ab_numba.py REV eval|train [--cells lstm gru rnn_tanh]

The revision's module is loaded as a second backend (``numba_ab``) for the run and removed
afterwards; both layers get the same weights, their outputs are compared first, then the
two are timed in alternating order (medians of 9). This is how every kernel change in
docs/numba.md was judged: on a noisy machine, times taken minutes apart differ more than
the changes do. Unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE first where they are set.
"""

import argparse
import os
import subprocess
import time

import numpy as np

import fastrnn
import fastrnn.backends as backends
from fastrnn.bench import FULL_GRID

HERE = os.path.dirname(os.path.abspath(fastrnn.backends.__file__))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("rev")
    p.add_argument("mode", choices=["eval", "train"])
    p.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn_tanh"])
    args = p.parse_args()
    src = subprocess.run(["git", "show", f"{args.rev}:fastrnn/backends/numba_cpu.py"],
                         capture_output=True, text=True, check=True).stdout
    path = os.path.join(HERE, "numba_ab.py")
    with open(path, "w") as f:
        f.write(src)
    backends._MODULES["numba_ab"] = "fastrnn.backends.numba_ab"
    backends.NAMES = tuple(backends._MODULES)
    rng = np.random.default_rng(0)
    try:
        for cell in args.cells:
            for T, B, I, H in FULL_GRID:
                layers = {b: fastrnn.make_layer(cell, I, H, backend=b, seed=0)
                          for b in ("numba_ab", "numba")}
                x = rng.standard_normal((T, B, I)).astype(np.float32)

                def run(m):
                    if args.mode == "eval":
                        return m.eval()(x)[0]
                    out, _ = m.train()(x)
                    m.backward(out)
                    return out
                np.testing.assert_allclose(run(layers["numba"]), run(layers["numba_ab"]),
                                           atol=1e-5)
                times = {b: [] for b in layers}
                for r in range(9):
                    for b in (("numba_ab", "numba") if r % 2 == 0 else ("numba", "numba_ab")):
                        t0 = time.perf_counter()
                        run(layers[b])
                        times[b].append(time.perf_counter() - t0)
                old, new = (float(np.median(times[b])) for b in ("numba_ab", "numba"))
                print(f"{cell:<8} {args.mode} {T}x{B}x{I}x{H}: {args.rev} {old * 1e3:8.3f} ms  "
                      f"working tree {new * 1e3:8.3f} ms  speed-up {old / new:5.2f}", flush=True)
    finally:
        os.remove(path)


if __name__ == "__main__":
    main()
