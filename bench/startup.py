"""Start-up cost of the numba backend: cold compile, then cache loads in new processes.

    python bench/startup.py

Runs three fresh Python processes against one new, empty NUMBA_CACHE_DIR:
1. ``fastrnn.warmup(dtypes=("float32",))`` with an empty cache (compiles everything);
2. the same call again (loads from the cache);
3. a first LSTM forward and backward without warm-up (loads what they need).
"""

import os
import subprocess
import sys
import tempfile

WARMUP = """
import time; t0 = time.perf_counter()
import fastrnn
t1 = time.perf_counter(); fastrnn.warmup(dtypes=("float32",)); t2 = time.perf_counter()
print(f"import {t1 - t0:.2f} s, warmup(float32, every cell) {t2 - t1:.2f} s")
"""
FIRST_CALL = """
import time; t0 = time.perf_counter()
import numpy as np, fastrnn
m = fastrnn.LSTM(32, 64, seed=0); x = np.ones((10, 4, 32), np.float32)
t1 = time.perf_counter(); out, _ = m(x); t2 = time.perf_counter(); m.backward(out)
t3 = time.perf_counter()
print(f"import {t1 - t0:.2f} s, first LSTM forward {t2 - t1:.2f} s, first backward {t3 - t2:.2f} s")
"""


def main():
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label, code in (("cold cache:  ", WARMUP), ("warm cache:  ", WARMUP),
                            ("no warm-up:  ", FIRST_CALL)):
            out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                 capture_output=True, text=True).stdout.strip()
            print(label + out)


if __name__ == "__main__":
    main()
