"""The machine a benchmark ran on: CPU, versions, the BLAS in use (threadpoolctl),
environment variables that force an older BLAS kernel, and the GEMM peak."""

from __future__ import annotations

import os
import platform
import time

import numpy as np

import fastrnn

#: Environment variables that make OpenBLAS pick its kernels by hand. Set on this
#: project's machines for old OpenBLAS builds, they force AVX2 kernels on AVX-512
#: CPUs (float32 GEMM 104 instead of 426 GFLOP/s there); a user's machine has
#: neither, so benchmark workers run without them (``fastrnn bench --keep-blas-env``
#: keeps them).
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

#: OpenBLAS kernel families that use AVX-512, and those that use at most AVX2.
_AVX512_KERNELS = {"skylakex", "cooperlake", "sapphirerapids", "zen4", "zen5"}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def blas_info() -> list[dict]:
    """Every BLAS/OpenMP pool loaded in this process (threadpoolctl): library,
    version, kernel architecture, threads."""
    from threadpoolctl import threadpool_info
    keys = ("user_api", "internal_api", "prefix", "version", "architecture", "num_threads",
            "threading_layer")
    return [{k: pool.get(k) for k in keys} for pool in threadpool_info()]


def blas_warning(info=None) -> str | None:
    """A warning when an environment variable forces an older BLAS kernel than the
    CPU supports, else None."""
    forced = {k: os.environ[k] for k in BLAS_OVERRIDES if k in os.environ}
    if not forced:
        return None
    info = blas_info() if info is None else info
    archs = {(p.get("architecture") or "").lower() for p in info if p["internal_api"] == "openblas"}
    if "avx512f" in cpu_flags() and archs and not archs & _AVX512_KERNELS:
        settings = ", ".join(f"{k}={v}" for k, v in forced.items())
        return (f"{settings} forces OpenBLAS onto its {'/'.join(sorted(archs))} kernels on a CPU "
                f"with AVX-512: GEMMs run several times slower than they can. Unset "
                f"{' and '.join(forced)} to measure what a user's machine does "
                f"(`env -u {' -u '.join(forced)} ...`).")
    return None


def versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__,
           "fastrnn": fastrnn.__version__}
    for module in ("numba", "torch", "onnxruntime", "openvino", "jax", "cupy"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
            out[module] = None
    return out


def machine_info() -> dict:
    info = {"platform": platform.platform(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "backends": fastrnn.backends.available(), **versions()}
    if "cuda" in info["backends"]:
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
    return info


def gemm_rate(m, n, k, dtype="float32", repeats=5) -> float:
    """Best GFLOP/s of numpy's (m, k) @ (k, n) over ``repeats`` runs after a warm-up."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    out = np.empty((m, n), dtype)
    np.matmul(a, b, out=out)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * n * k / best / 1e9


def gemm_peak(dtype="float32", shapes=((1024, 1024, 1024), (2048, 2048, 2048)),
              repeats=5) -> float:
    """The machine's GEMM peak: the best rate over ``shapes`` (m, n, k), each the best
    of ``repeats`` runs. Best, not median: on a shared machine a median measures the
    neighbours, and a low peak turns into percentages above 100."""
    return max(gemm_rate(m, n, k, dtype, repeats) for m, n, k in shapes)
