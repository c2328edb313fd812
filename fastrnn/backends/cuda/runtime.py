"""How the host loops reach the device: an array module, kernel launches, GEMMs; TF32.

:class:`Runtime` is what the loops of :mod:`.loops` call; :class:`CupyRuntime` runs it
on the current CuPy device and stream (tests substitute a runtime that runs the kernels
compiled for the CPU, :func:`current`). Kernel launches and ``cupy.matmul`` both use
CuPy's current stream at each call: the stream is never cached.

float32 GEMMs run without TF32 (``CUBLAS_COMPUTE_32F``) unless :func:`allow_tf32`
opts in; CuPy's global setting is restored after each call (:func:`session`).
``FASTRNN_CUDA_SYNC=1`` synchronizes after every kernel launch, so that an
asynchronous fault is reported with the name of the kernel that caused it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

import numpy as np

from . import checks, loader
from ._cupy import IMPORT_ERROR, cupy, per_device
from .planner import PersistentLimits, PersistentPlan

BLOCK = 256       # threads per block of the stepwise kernels
MAX_GRID = 65535  # the stepwise kernels loop with a grid stride, so any grid is correct
_SYNC = os.environ.get("FASTRNN_CUDA_SYNC", "") not in ("", "0")


def unavailable_reason() -> str | None:
    """Why this backend cannot run here, or None when it can."""
    if cupy is None:
        return IMPORT_ERROR
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError: no driver, driver too old...
        return f"no CUDA device ({exc})"
    if count == 0:
        return "no CUDA device"
    if loader.csrc_dir() is None:
        return "the kernel sources (fastrnn/csrc/*.cu) are not installed"
    return None


# ------------------------------------------------------------------ TF32

_allow_tf32 = False
# CuPy's switch is process-wide: one lock keeps threads from interleaving save/restore.
_precision_lock = threading.RLock()


def allow_tf32(allow: bool = True) -> None:
    """Let float32 GEMMs use TF32 tensor cores (faster, ~1e-3 relative error).

    Off by default: float32 results are then exact to float32 rounding.
    """
    global _allow_tf32
    _allow_tf32 = bool(allow)


def tf32_allowed() -> bool:
    """Whether :func:`allow_tf32` is in effect."""
    return _allow_tf32


@contextlib.contextmanager
def _gemm_precision(dtype):
    """Our float32 GEMMs run with TF32 as chosen here; CuPy's setting is restored after."""
    if dtype is None or np.dtype(dtype) != np.float32:
        yield
        return
    from cupy._core import _routines_linalg as linalg  # CuPy's own switch (cupy >= 8)
    with _precision_lock:
        saved = linalg.get_compute_type(np.float32)
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if _allow_tf32
                                else linalg.COMPUTE_TYPE_FP32)
        try:
            yield
        finally:
            linalg.set_compute_type(np.float32, saved)


# ------------------------------------------------------------------ runtimes

class StepKernel:
    """One stepwise kernel for one sequence: found once, called once per step.

    Its arguments are checked at the first call only: every later step of the
    sequence passes the same integers and slices ``[t]`` of the same C-contiguous
    buffers, which have the same dtype and contiguity.
    """

    __slots__ = ("name", "_launch", "_checked")

    def __init__(self, name, launch):
        self.name, self._launch, self._checked = name, launch, False

    def __call__(self, *args) -> None:
        if not self._checked:
            checks.launch_arguments(self.name, args)
            self._checked = True
        self._launch(args)


def _no_launch(args):
    """The launch of a kernel over no elements (B or H is 0)."""


class Runtime:
    """How the host loop reaches the device: an array module, kernel launches, GEMMs."""

    xp = None

    def kernel(self, unit: str, name: str, n: int) -> StepKernel:
        """The stepwise kernel ``name`` over n = B * H elements, for one sequence."""
        return StepKernel(name, self._step_launcher(unit, name, n) if n > 0 else _no_launch)

    def launch_persistent(self, unit: str, name: str, plan: PersistentPlan, steps: int,
                          B: int, H: int, reverse: int, *args) -> None:
        """A persistent kernel: its geometry arguments, then ``args``.

        The last of ``args`` is the grid barrier's arrival counter, zeroed.
        """
        if plan.J * plan.groups * plan.splits > plan.threads:
            raise ValueError(f"{name}: the plan needs {plan.J * plan.groups * plan.splits} "
                             f"threads per block, more than the {plan.threads} launched")
        args = (steps, B, H, *plan.geometry(), int(reverse), *args)
        checks.launch_arguments(name, args)
        self._launch_persistent(unit, name, plan, args)

    def _step_launcher(self, unit, name, n):
        """A function ``launch(args)`` running kernel ``name`` of ``unit`` over n elements."""
        raise NotImplementedError

    def _launch_persistent(self, unit, name, plan, args):
        raise NotImplementedError

    def persistent_limits(self) -> PersistentLimits:
        raise NotImplementedError

    def matmul(self, a, b, out=None):
        return self.xp.matmul(a, b, out=out)


def _int32(args):
    # Explicit int32: CuPy would pass a Python int as a 64-bit integer.
    return tuple(np.int32(a) if isinstance(a, int) else a for a in args)


class CupyRuntime(Runtime):
    """CuPy: kernels and cuBLAS both run on the current device and stream."""

    def __init__(self):
        self.xp = cupy

    def _step_launcher(self, unit, name, n):
        kernel = loader.loaded(unit).functions[name]   # the current device's
        grid, block = (min(-(-n // BLOCK), MAX_GRID),), (BLOCK,)

        def launch(args):
            kernel(grid, block, _int32(args))
            _sync(name)

        return launch

    def _launch_persistent(self, unit, name, plan, args):
        kernel = loader.loaded(unit).functions[name]
        if kernel.max_dynamic_shared_size_bytes < plan.shared_bytes:
            kernel.max_dynamic_shared_size_bytes = plan.shared_bytes  # opt in past 48 KiB
        # Cooperative: every block of the grid is resident at once, or there is no launch,
        # so the grid barrier never waits for a block that is not running. CuPy shrinks a
        # cooperative grid that is too large, with a warning; a smaller grid would leave
        # units uncomputed, so that warning is an error here.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                kernel.kernel((plan.blocks,), (plan.threads,), _int32(args),
                              shared_mem=plan.shared_bytes, enable_cooperative_groups=True)
            except Warning as exc:
                raise RuntimeError(f"{name}: the device cannot hold {plan.blocks} blocks of "
                                   f"{plan.threads} threads and {plan.shared_bytes} bytes of "
                                   f"shared memory at once ({exc}); use "
                                   f"set_algorithm('stepwise')") from exc
        _sync(name)

    def persistent_limits(self) -> PersistentLimits:
        return _device_limits()


def _sync(name):
    if _SYNC:
        try:
            cupy.cuda.get_current_stream().synchronize()
        except Exception as exc:
            raise RuntimeError(f"CUDA kernel {name} failed: {exc}") from exc


@per_device
def _device_limits() -> PersistentLimits:
    """The persistent-launch limits of the current device."""
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    return PersistentLimits(sms=int(props["multiProcessorCount"]),
                            shared_bytes=int(props["sharedMemPerBlockOptin"]),
                            cooperative=bool(props.get("cooperativeLaunch", 1)))


_cupy_runtime = None
_override = None  # tests run the host loop on a CPU emulation of the kernels


def current() -> Runtime:
    """The runtime the kernel functions use: CuPy's, unless a test put another in place."""
    global _cupy_runtime
    if _override is not None:
        return _override
    if _cupy_runtime is None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"the cuda backend is not available: {reason}")
        _cupy_runtime = CupyRuntime()
    return _cupy_runtime


@contextlib.contextmanager
def session(dtype):
    """The runtime for one kernel-function call, with the GEMM precision of :func:`allow_tf32`."""
    rt = current()
    if rt.xp is cupy and cupy is not None:
        with _gemm_precision(dtype):
            yield rt
    else:
        yield rt
