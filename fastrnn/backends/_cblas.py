"""NumPy's own BLAS, callable from Numba kernels.

Numba's ``np.dot`` calls SciPy's BLAS. With NumPy's wheels that is a second
OpenBLAS, with its own thread pool, beside the one NumPy uses: two pools of
spinning threads on the same cores slow both down, and SciPy's build was
also slower on the recurrent GEMM shapes (M = batch rows; ``python
bench/micro.py`` compares the two). So the Numba kernels call NumPy's
CBLAS ``?gemm`` directly. SciPy's BLAS is the second choice.

The kernels receive the function's address as an integer (which keeps
``cache=True`` working: the address is an argument, not a compiled-in
constant) and call it through :data:`gemm_call_ilp64` or :data:`gemm_call_lp64`. Passing the ctypes function
object itself also works, but Numba's dispatcher then types it anew at every
call, which costs microseconds (``python bench/micro.py`` measures it): a
tenth of a cell step.
"""

from __future__ import annotations

import ctypes
import importlib

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# (symbol, integer type): ILP64 builds first (NumPy's wheels), then LP64.
_CANDIDATES = [("scipy_cblas_{}gemm64_", ctypes.c_int64), ("cblas_{}gemm64_", ctypes.c_int64),
               ("scipy_cblas_{}gemm", ctypes.c_int32), ("cblas_{}gemm", ctypes.c_int32)]
_HOSTS = [("numpy", "numpy._core._multiarray_umath"), ("numpy", "numpy.core._multiarray_umath"),
          ("scipy", "scipy.linalg.cython_blas")]

#: CBLAS enums: row-major order, and the two transposition flags the kernels pass.
CblasRowMajor, NO_TRANS, TRANS = 101, 111, 112


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
#: (address, ILP64?) of each ?gemm: what the Numba kernels take as ``gemm``.
_HANDLES = {}
if SGEMM is not None:
    ilp64 = SGEMM.argtypes[3] is ctypes.c_int64
    _HANDLES = {np.dtype(np.float32): (ctypes.cast(SGEMM, ctypes.c_void_p).value, ilp64),
                np.dtype(np.float64): (ctypes.cast(DGEMM, ctypes.c_void_p).value, ilp64)}


def gemm_for(dtype):
    """The ``gemm`` handle, ``(address, ilp64)``, of ``dtype`` (float32 or float64)."""
    return _HANDLES[np.dtype(dtype)]


def _make_gemm_call(width):
    @intrinsic
    def call(typingctx, addr, c, ta, tb, m, n, k, alpha, a_ptr, lda, b_ptr, ldb, beta, c_ptr,
             ldc):
        """Row-major ``?gemm`` at ``addr``: integers are passed as ``width``-bit C ints,
        alpha and beta in the precision of the output array ``c``."""
        sig = types.void(addr, c, ta, tb, m, n, k, alpha, a_ptr, lda, b_ptr, ldb, beta, c_ptr,
                         ldc)

        def codegen(context, builder, signature, args):
            (addr_v, _, ta_v, tb_v, m_v, n_v, k_v, alpha_v, a_v, lda_v, b_v, ldb_v, beta_v,
             c_v, ldc_v) = args
            i32, iw = ir.IntType(32), ir.IntType(width)
            real = ir.FloatType() if c.dtype == types.float32 else ir.DoubleType()
            ptr = ir.IntType(8).as_pointer()
            fnty = ir.FunctionType(ir.VoidType(), [i32, i32, i32, iw, iw, iw, real, ptr, iw,
                                                   ptr, iw, real, ptr, iw])
            fn = builder.inttoptr(addr_v, fnty.as_pointer())

            def integer(v, t):
                return builder.trunc(v, t) if v.type.width > t.width else \
                    builder.sext(v, t) if v.type.width < t.width else v

            def floating(v):
                return builder.fptrunc(v, real) if real != v.type else v

            builder.call(fn, [ir.Constant(i32, CblasRowMajor), integer(ta_v, i32),
                              integer(tb_v, i32), integer(m_v, iw), integer(n_v, iw),
                              integer(k_v, iw), floating(alpha_v), builder.inttoptr(a_v, ptr),
                              integer(lda_v, iw), builder.inttoptr(b_v, ptr),
                              integer(ldb_v, iw), floating(beta_v),
                              builder.inttoptr(c_v, ptr), integer(ldc_v, iw)])
            return context.get_dummy_value()

        return sig, codegen
    return call


gemm_call_ilp64 = _make_gemm_call(64)
gemm_call_lp64 = _make_gemm_call(32)


def _thread_control():
    """OpenBLAS's (get, set) number-of-threads functions in the library that holds
    ``?gemm``, or (None, None) for another BLAS."""
    for _, module_name in _HOSTS:
        try:
            handle = ctypes.CDLL(importlib.import_module(module_name).__file__)
        except (ImportError, OSError):
            continue
        for get_name, set_name in (("scipy_openblas_get_num_threads64_",
                                    "scipy_openblas_set_num_threads64_"),
                                   ("openblas_get_num_threads", "openblas_set_num_threads"),
                                   ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads")):
            try:
                get, put = getattr(handle, get_name), getattr(handle, set_name)
            except AttributeError:
                continue
            get.restype, get.argtypes = ctypes.c_int, []
            put.restype, put.argtypes = None, [ctypes.c_int]
            return get, put
    return None, None


#: OpenBLAS's thread count, read and set process-wide (None where the BLAS is not OpenBLAS).
blas_get_threads, blas_set_threads = _thread_control()
