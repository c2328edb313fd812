"""What an idle, spinning BLAS pool does to the packed loops' split (docs/numba.md,
"The split yields to running threads"): the layer's inference timed alone, and right
after a multi-threaded NumPy matmul (whose OpenBLAS threads then spin for about 0.1 s),
with the packed loops as shipped (they check for a running thread and take the BLAS
loops), with the split forced (``packed_numba.threads``: no check), and with the BLAS
loops only. All in one process, as a user's would be.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/spinning_pools.py
        [--cells lstm] [--sizes 100x64x256x256] [--repeats 9]
"""

import argparse
import time

import numpy as np

import fastrnn
from fastrnn.backends import packed_numba
from fastrnn.backends._cblas import blas_get_threads


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", nargs="+", default=["lstm"])
    p.add_argument("--sizes", default="100x64x256x256", help="TxBxIxH,...")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512)).astype(np.float32)
    variants = {"shipped (check)": dict(threads=None, enabled=True),
                "split forced (no check)": dict(threads=blas_get_threads(), enabled=True),
                "BLAS loops": dict(threads=None, enabled=False)}
    for cell in args.cells:
        for size in args.sizes.split(","):
            T, B, I, H = (int(v) for v in size.split("x"))
            m = fastrnn.make_layer(cell, I, H, backend="numba", seed=0).eval()
            x = rng.standard_normal((T, B, I)).astype(np.float32)
            for name, setting in variants.items():
                packed_numba.threads, packed_numba.enabled = setting["threads"], \
                    setting["enabled"]
                m(x)
                row = []
                for before in ("alone", "after A @ A"):
                    samples = []
                    for _ in range(args.repeats):
                        if before == "alone":
                            time.sleep(0.3)          # any spinning pool has gone to sleep
                        else:
                            a @ a
                        t0 = time.perf_counter()
                        m(x)
                        samples.append(time.perf_counter() - t0)
                    row.append(f"{before} {np.median(samples) * 1e3:8.2f} ms")
                print(f"{cell:<8} {size}  {name:<24} " + "  ".join(row), flush=True)
    packed_numba.threads, packed_numba.enabled = None, True


if __name__ == "__main__":
    main()
