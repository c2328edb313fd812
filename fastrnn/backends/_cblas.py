"""NumPy's own BLAS, callable from Numba kernels.

Numba's ``np.dot`` calls SciPy's BLAS. With NumPy's wheels that is a second
OpenBLAS, with its own thread pool, beside the one NumPy uses: two pools of
spinning threads on the same cores slow both down (measured here: up to 10x
on a 2-core machine), and SciPy's build was also 15-50% slower on the
recurrent GEMM shapes (M = batch rows). So the Numba kernels call NumPy's
CBLAS ``?gemm`` directly, through a ctypes function passed as an argument
(which keeps ``cache=True`` working). SciPy's BLAS is the second choice.
"""

from __future__ import annotations

import ctypes
import importlib

import numpy as np

# (symbol, integer type): ILP64 builds first (NumPy's wheels), then LP64.
_CANDIDATES = [("scipy_cblas_{}gemm64_", ctypes.c_int64), ("cblas_{}gemm64_", ctypes.c_int64),
               ("scipy_cblas_{}gemm", ctypes.c_int32), ("cblas_{}gemm", ctypes.c_int32)]
_HOSTS = [("numpy", "numpy._core._multiarray_umath"), ("scipy", "scipy.linalg.cython_blas")]

CblasRowMajor, CblasNoTrans, CblasTrans = 101, 111, 112


def _lookup():
    for host, module_name in _HOSTS:
        try:
            handle = ctypes.CDLL(importlib.import_module(module_name).__file__)
        except (ImportError, OSError):
            continue
        for pattern, integer in _CANDIDATES:
            try:
                funcs = [getattr(handle, pattern.format(p)) for p in "sd"]
            except AttributeError:
                continue
            for func, real in zip(funcs, (ctypes.c_float, ctypes.c_double)):
                func.restype = None
                func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer,
                                 integer, real, ctypes.c_void_p, integer, ctypes.c_void_p,
                                 integer, real, ctypes.c_void_p, integer]
            return funcs[0], funcs[1], f"{host}'s BLAS ({pattern.format('s')})"
    return None, None, None


SGEMM, DGEMM, DESCRIPTION = _lookup()


def gemm_for(dtype):
    """The ctypes ``?gemm`` for ``dtype`` (float32 or float64)."""
    return SGEMM if np.dtype(dtype) == np.float32 else DGEMM
