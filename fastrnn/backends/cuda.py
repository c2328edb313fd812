"""The CUDA backend: cuBLAS GEMMs through CuPy and fused pointwise kernels from ``csrc/``.

Shapes, notation and the masking rule are those of :mod:`fastrnn.backends`.
Every kernel mirrors the NumPy reference (:mod:`fastrnn.backends.reference`):

* forward: the input projection of all steps is one GEMM; then, per step, the
  recurrent GEMM ``h_prev W_hh^T`` (cuBLAS, via ``cupy.matmul`` on the current
  stream) and ONE fused pointwise kernel (activations, state update, masking
  with ``lengths``, writes of ``out``, the state buffers and the cache). The
  GRU with ``reset_after=False`` needs two GEMMs and two kernels per step,
  because its candidate's GEMM input ``r * h_prev`` depends on ``r``;
* backward: per step one pointwise kernel writes the pre-activation
  gradients ``d_a``, then one GEMM ``d_a W_hh`` carries the state gradient to
  the step before; ``d_x``, ``d_w_ih`` and ``d_w_hh`` are whole-sequence GEMMs
  at the end. The state gradient before a step is ``d_h_carry + d_h_gemm``:
  inactive rows have ``d_a = 0`` (hence ``d_h_gemm = 0``) and keep their
  gradient in ``d_h_carry``, so no GEMM ever needs a mask.

Two algorithms run that loop (:func:`set_algorithm`):

* ``"stepwise"`` (the default): the loop above, two launches per step
  (cuBLAS, then the pointwise kernel), from Python;
* ``"persistent"``: the whole sequence in ONE cooperative launch per
  direction (``csrc/fastrnn_persist.cuh``). Each block keeps its slice of
  ``W_hh`` in shared memory for the whole sequence, forms its part of the
  recurrent product from the previous state in L2, runs the pointwise step of
  its own hidden units, then meets the other blocks at a grid barrier. It
  needs H a multiple of 16 bytes' worth of elements, the weight slice to fit
  in shared memory with one block per SM, and B * ceil(H / SMs) <= 8 * 256;
  the GRU with ``reset_after=False`` always runs stepwise (it would need two
  barriers per step). ``"auto"`` takes it wherever it fits;
  ``"persistent"`` raises where it does not, so nothing changes algorithm
  behind the caller's back. :func:`persistent_plan` says which and why.

Both algorithms write the same cache, so a forward of one may be followed by a
backward of the other.

Kernels come from one loader, memoized per device: ``cupy.RawModule(path=...)``
on the fatbin built by CMake when it holds code for the device's compute
capability, else NVRTC on the shipped sources with the header inlined (so it
is part of CuPy's cache key). :func:`info` says which one ran.

float32 GEMMs run without TF32 (``CUBLAS_COMPUTE_32F``) unless
:func:`allow_tf32` opts in; CuPy's global setting is restored after each call.
Set ``FASTRNN_CUDA_SYNC=1`` to synchronize after every kernel launch, so that
an asynchronous fault is reported with the name of the kernel that caused it.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastrnn.backends import gate_count

try:
    import cupy as _cupy
    _IMPORT_ERROR = None
except ImportError as exc:  # the usual case on a CPU-only machine
    _cupy, _IMPORT_ERROR = None, f"cupy is not installed ({exc}); pip install 'fastrnn[cuda]'"
except Exception as exc:  # noqa: BLE001 - a broken CUDA install must not break `import fastrnn`
    _cupy, _IMPORT_ERROR = None, f"cupy failed to import: {type(exc).__name__}: {exc}"

#: The array module of this backend (``cupy``; ``None`` where CuPy is absent).
xp = _cupy

#: Architectures the CMake build puts SASS for in every fatbin (plus compute_90 PTX).
FATBIN_ARCHS = ("80", "86", "89", "90")

#: Kernel source file (``csrc/fastrnn_{unit}.cu``) of each cell.
UNITS = {"rnn_tanh": "rnn", "rnn_relu": "rnn", "lstm": "lstm", "gru": "gru"}

_BLOCK = 256
_MAX_GRID = 65535  # the kernels loop with a grid stride, so any grid is correct
_SYNC = os.environ.get("FASTRNN_CUDA_SYNC", "") not in ("", "0")
_FLOATS = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


# ------------------------------------------------------------------ availability

def unavailable_reason() -> str | None:
    """Why this backend cannot run here, or None when it can."""
    if _cupy is None:
        return _IMPORT_ERROR
    try:
        count = _cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError: no driver, driver too old...
        return f"no CUDA device ({exc})"
    if count == 0:
        return "no CUDA device"
    if csrc_dir() is None:
        return "the kernel sources (fastrnn/csrc/*.cu) are not installed"
    return None


def csrc_dir() -> Path | None:
    """Folder of the kernel sources (and fatbins, in an installed package)."""
    package = Path(__file__).resolve().parent.parent
    for folder in (package / "csrc", package.parent / "csrc"):  # installed, source checkout
        if (folder / "fastrnn_common.cuh").is_file():
            return folder
    return None


# ------------------------------------------------------------------ TF32

_allow_tf32 = False


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
    # The switch is process-wide: one lock keeps threads from interleaving save/restore.
    with _precision_lock:
        saved = linalg.get_compute_type(np.float32)
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if _allow_tf32
                                else linalg.COMPUTE_TYPE_FP32)
        try:
            yield
        finally:
            linalg.set_compute_type(np.float32, saved)


_precision_lock = threading.RLock()


# ------------------------------------------------------------------ algorithm

ALGORITHMS = ("stepwise", "persistent", "auto")
_algorithm = "stepwise"


def set_algorithm(name: str) -> None:
    """Choose how the time loop runs: ``"stepwise"``, ``"persistent"`` or ``"auto"``.

    See the module docstring. ``"stepwise"`` is the default until the
    persistent kernels have been measured on a GPU (docs/cuda.md).
    """
    global _algorithm
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {name!r}")
    _algorithm = name


def algorithm() -> str:
    """The algorithm chosen by :func:`set_algorithm`."""
    return _algorithm


@dataclass(frozen=True)
class PersistentLimits:
    """What a persistent launch may use on one device."""

    sms: int                    # multiprocessors: at most one block each
    shared_bytes: int           # dynamic shared memory a block may opt in to
    threads: int = 256          # threads per block (FASTRNN_PERSIST_THREADS at most)
    min_split_vectors: int = 8  # a K split gets at least this many 16-byte vectors
    cooperative: bool = True    # the device can launch cooperative grids


@dataclass(frozen=True)
class PersistentPlan:
    """The geometry of one persistent launch (see csrc/fastrnn_persist.cuh)."""

    blocks: int
    threads: int
    J: int             # hidden units per block
    groups: int        # batch groups per block
    splits: int        # K splits per (unit, batch group)
    bt: int            # batches per thread: 1, 2, 4 or 8
    stride: int        # elements per shared weight row
    shared_bytes: int

    def geometry(self) -> tuple:
        """The J, groups, splits, bt, stride arguments of the kernels."""
        return self.J, self.groups, self.splits, self.bt, self.stride


def persistent_plan(cell: str, B: int, H: int, dtype, backward: bool = False,
                    reset_after: bool = True, limits: PersistentLimits | None = None):
    """The persistent launch for this problem, or ``(None, why not)``.

    Returns ``(PersistentPlan, None)`` when it fits. ``limits`` defaults to
    those of the current device.
    """
    if limits is None:
        limits = _runtime().persistent_limits()
    itemsize = np.dtype(dtype).itemsize
    width = 16 // itemsize
    gates = gate_count(cell)
    if cell == "gru" and not reset_after:
        return None, "the GRU with reset_after=False runs stepwise (two barriers per step)"
    if not limits.cooperative:
        return None, "the device cannot launch cooperative grids"
    if H % width:
        return None, f"H = {H} is not a multiple of {width} ({np.dtype(dtype).name} vectors)"
    J = -(-H // limits.sms)
    blocks = -(-H // J)
    K = gates * H if backward else H    # length of the dot products
    if B * J <= limits.threads:
        bt, groups = 1, B
        splits = max(1, min(limits.threads // (B * J),
                            K // width // limits.min_split_vectors))
    else:
        bt = 1 << math.ceil(math.log2(-(-B * J // limits.threads)))
        while J * -(-B // bt) > limits.threads:   # groups rounds up: J * groups must fit
            bt *= 2
        if bt > 8:
            return None, (f"B * ceil(H / SMs) = {B * J} is more than 8 batches for each "
                          f"of {limits.threads} threads")
        groups, splits = -(-B // bt), 1
    stride = ((K * itemsize + 127) // 128 * 128 + 16) // itemsize
    rows = J if backward else gates * J
    partial = (splits - 1) * J * groups * (1 if backward else gates) * bt
    shared = (rows * stride + partial) * itemsize
    shared = (shared + 15) // 16 * 16
    if shared > limits.shared_bytes:
        return None, (f"the weight slice needs {shared} bytes of shared memory per block, "
                      f"more than the {limits.shared_bytes} a block can have")
    return PersistentPlan(blocks, limits.threads, J, groups, splits, bt, stride, shared), None


def _plan(rt, cell, T, B, H, dtype, backward, reset_after=True):
    """The persistent plan to use, or None for the stepwise loop."""
    if _algorithm == "stepwise" or T == 0:
        return None
    plan, why = persistent_plan(cell, B, H, dtype, backward, reset_after,
                                rt.persistent_limits())
    if plan is None and _algorithm == "persistent":
        raise ValueError(f"the persistent algorithm cannot run {cell} with B={B}, H={H}, "
                         f"{np.dtype(dtype).name}: {why}; use set_algorithm('auto') or "
                         f"'stepwise'")
    return plan


# ------------------------------------------------------------------ loader

def kernel_names(unit: str) -> list[str]:
    """Every ``extern "C"`` kernel of ``csrc/fastrnn_{unit}.cu``."""
    passes = ("fwd_train", "fwd_infer", "bwd")
    cells = {"rnn": ("rnn_tanh", "rnn_relu"), "lstm": ("lstm",), "gru": ("gru",)}[unit]
    stems = [f"{c}_{kind}{p}" for c in cells for kind in ("", "persist_") for p in passes]
    if unit == "gru":
        stems += ["gru_rb_rz_fwd", "gru_rb_n_fwd", "gru_rb_n_bwd", "gru_rb_r_bwd"]
    return [f"fastrnn_{stem}_{suffix}" for stem in stems for suffix in ("f32", "f64")]


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def nvrtc_source(unit: str, folder: Path | None = None) -> str:
    """``csrc/fastrnn_{unit}.cu`` with its local headers inlined, for NVRTC.

    Inlining makes the header text part of the source, hence of CuPy's
    compile-cache key, and leaves NVRTC nothing to look up.
    """
    folder = folder or csrc_dir()
    if folder is None:
        raise FileNotFoundError("the fastrnn kernel sources (csrc/) are not installed")
    seen = set()

    def expand(name):
        if name in seen:  # include guards would drop it anyway
            return ""
        seen.add(name)
        text = (folder / name).read_text()
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(f"fastrnn_{unit}.cu")


_modules: dict = {}   # (device id, unit) -> (functions by name, origin)
_modules_lock = threading.Lock()


def _load(unit: str, compute_capability: str):
    """Load ``unit`` for the current device: fatbin when it has our SASS, else NVRTC."""
    folder = csrc_dir()
    if folder is None:
        raise RuntimeError("the fastrnn kernel sources (csrc/) are not installed")
    names = kernel_names(unit)
    fatbin = folder / f"fastrnn_{unit}.fatbin"
    if not fatbin.is_file():
        why = "no fatbin installed"
    elif compute_capability not in FATBIN_ARCHS:
        why = f"the fatbin has no sm_{compute_capability} code"
    else:
        try:
            raw = _cupy.RawModule(path=str(fatbin))
            # get_function loads the module now, so a bad fatbin fails here, not mid-loop.
            return {n: raw.get_function(n) for n in names}, f"fatbin {fatbin}"
        except Exception as exc:  # noqa: BLE001 - e.g. a driver older than the toolkit
            why = f"the fatbin failed to load: {type(exc).__name__}: {exc}"
    raw = _cupy.RawModule(code=nvrtc_source(unit, folder), options=("-std=c++17",))
    return ({n: raw.get_function(n) for n in names},
            f"NVRTC from {folder / f'fastrnn_{unit}.cu'} ({why})")


def _functions(unit: str) -> dict:
    device = _cupy.cuda.Device()  # the current device, looked up at every call
    key = (device.id, unit)
    entry = _modules.get(key)
    if entry is None:
        with _modules_lock:
            entry = _modules.get(key)
            if entry is None:
                entry = _modules[key] = _load(unit, device.compute_capability)
    return entry[0]


def info(load: bool = False) -> dict:
    """Where this backend's kernels come from, for ``fastrnn info``.

    With ``load=True`` every unit is loaded on the current device first, so
    ``modules`` reports the real origin (fatbin path, or NVRTC and why).
    """
    folder = csrc_dir()
    result = {
        "available": unavailable_reason() is None,
        "reason": unavailable_reason(),
        "cupy": getattr(_cupy, "__version__", None),
        "csrc": str(folder) if folder else None,
        "fatbins": sorted(p.name for p in folder.glob("*.fatbin")) if folder else [],
        "fatbin_archs": [f"sm_{a}" for a in FATBIN_ARCHS] + ["compute_90 (PTX)"],
        "tf32": _allow_tf32,
        "algorithm": _algorithm,
    }
    if result["available"]:
        device = _cupy.cuda.Device()
        props = _cupy.cuda.runtime.getDeviceProperties(device.id)
        name = props["name"]
        result["device"] = name.decode() if isinstance(name, bytes) else str(name)
        result["compute_capability"] = device.compute_capability
        if load:
            for unit in sorted(set(UNITS.values())):
                _functions(unit)
    result["modules"] = {f"device {dev}: {unit}": origin
                         for (dev, unit), (_, origin) in sorted(_modules.items())}
    return result


# ------------------------------------------------------------------ runtimes

class _Runtime:
    """How the host loop reaches the device: an array module, kernel launches, GEMMs.

    Launch arguments are Python ints (passed as C ``int``) or C-contiguous
    arrays of the kernel's float dtype or int32; both are checked here, since
    a wrong pointer type corrupts memory silently.
    """

    xp = None

    @staticmethod
    def _check(name, args):
        dtype = np.dtype(np.float32 if name.endswith("_f32") else np.float64)
        for position, a in enumerate(args):
            if isinstance(a, int):
                continue
            if not a.flags.c_contiguous or a.dtype not in (dtype, np.int32, np.uint32):
                raise TypeError(f"{name}: argument {position} must be a C-contiguous "
                                f"{dtype}, int32 or uint32 array, got {a.dtype} with strides "
                                f"{a.strides}")
        return args

    def launch(self, unit: str, name: str, n: int, *args) -> None:
        """A stepwise kernel over n = B * H elements."""
        self._check(name, args)
        if n > 0:
            self._launch(unit, name, n, args)

    def launch_persistent(self, unit: str, name: str, plan: PersistentPlan, steps: int,
                          B: int, H: int, reverse: int, *args) -> None:
        """A persistent kernel: its geometry arguments, then ``args``.

        The last of ``args`` is the grid barrier's arrival counter, zeroed
        (:func:`_barrier`).
        """
        if plan.J * plan.groups * plan.splits > plan.threads:
            raise ValueError(f"{name}: the plan needs {plan.J * plan.groups * plan.splits} "
                             f"threads per block, more than the {plan.threads} launched")
        args = (steps, B, H, *plan.geometry(), int(reverse), *args)
        self._check(name, args)
        self._launch_persistent(unit, name, plan, args)

    def _launch(self, unit, name, n, args):
        raise NotImplementedError

    def _launch_persistent(self, unit, name, plan, args):
        raise NotImplementedError

    def persistent_limits(self) -> PersistentLimits:
        raise NotImplementedError

    def matmul(self, a, b, out=None):
        return self.xp.matmul(a, b, out=out)


class _CupyRuntime(_Runtime):
    """CuPy: kernels and cuBLAS both run on the current stream, looked up at each call."""

    def __init__(self):
        self.xp = _cupy

    def _launch(self, unit, name, n, args):
        kernel = _functions(unit)[name]
        grid = min((n + _BLOCK - 1) // _BLOCK, _MAX_GRID)
        # Explicit int32: CuPy would pass a Python int as a 64-bit integer.
        kernel((grid,), (_BLOCK,), tuple(np.int32(a) if isinstance(a, int) else a for a in args))
        self._sync(name)

    def _launch_persistent(self, unit, name, plan, args):
        kernel = _functions(unit)[name]
        if kernel.max_dynamic_shared_size_bytes < plan.shared_bytes:
            kernel.max_dynamic_shared_size_bytes = plan.shared_bytes  # opt in past 48 KiB
        # Cooperative: every block of the grid is resident at once, or there is no launch,
        # so the grid barrier never waits for a block that is not running. CuPy shrinks a
        # cooperative grid that is too large, with a warning; a smaller grid would leave
        # units uncomputed, so that warning is an error here.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                kernel.kernel((plan.blocks,), (plan.threads,),
                              tuple(np.int32(a) if isinstance(a, int) else a for a in args),
                              shared_mem=plan.shared_bytes, enable_cooperative_groups=True)
            except Warning as exc:
                raise RuntimeError(f"{name}: the device cannot hold {plan.blocks} blocks of "
                                   f"{plan.threads} threads and {plan.shared_bytes} bytes of "
                                   f"shared memory at once ({exc}); use "
                                   f"set_algorithm('stepwise')") from exc
        self._sync(name)

    @staticmethod
    def _sync(name):
        if _SYNC:
            try:
                _cupy.cuda.get_current_stream().synchronize()
            except Exception as exc:
                raise RuntimeError(f"CUDA kernel {name} failed: {exc}") from exc

    def persistent_limits(self) -> PersistentLimits:
        device = _cupy.cuda.Device()
        limits = _limits.get(device.id)
        if limits is None:
            props = _cupy.cuda.runtime.getDeviceProperties(device.id)
            limits = PersistentLimits(sms=int(props["multiProcessorCount"]),
                                      shared_bytes=int(props["sharedMemPerBlockOptin"]),
                                      cooperative=bool(props.get("cooperativeLaunch", 1)))
            _limits[device.id] = limits
        return limits


_limits: dict = {}  # device id -> PersistentLimits


_cupy_runtime = None
_runtime_override = None  # tests run the host loop on a CPU emulation of the kernels


def _runtime() -> _Runtime:
    global _cupy_runtime
    if _runtime_override is not None:
        return _runtime_override
    if _cupy_runtime is None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"the cuda backend is not available: {reason}")
        _cupy_runtime = _CupyRuntime()
    return _cupy_runtime


@contextlib.contextmanager
def _session(dtype):
    rt = _runtime()
    if rt.xp is _cupy and _cupy is not None:
        with _gemm_precision(dtype):
            yield rt
    else:
        yield rt


# ------------------------------------------------------------------ validation

def _suffix(dtype) -> str:
    try:
        return _FLOATS[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"x must be float32 or float64, got {dtype}") from None


def _device_array(rt, name, a, shape, dtype):
    if not isinstance(a, rt.xp.ndarray):
        raise TypeError(f"{name} must be a {rt.xp.__name__}.ndarray, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype}, expected {dtype} (the dtype of x)")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    return rt.xp.ascontiguousarray(a)


def _check_forward(rt, x, states, w_ih, w_hh, b_ih, b_hh, gates):
    """Validate the forward arguments; return contiguous copies and T, B, I, H."""
    if not isinstance(x, rt.xp.ndarray):
        raise TypeError(f"x must be a {rt.xp.__name__}.ndarray, got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"x must have 3 dimensions (T, B, I), got shape {x.shape}")
    _suffix(x.dtype)
    T, B, I = x.shape
    h0 = states[0]
    if not isinstance(h0, rt.xp.ndarray):
        raise TypeError(f"h0 must be a {rt.xp.__name__}.ndarray, got {type(h0).__name__}")
    if h0.ndim != 2:
        raise ValueError(f"h0 must have 2 dimensions (B, H), got shape {h0.shape}")
    H = h0.shape[1]
    G = gates * H
    names = ("h0", "c0")[:len(states)]
    states = tuple(_device_array(rt, n, s, (B, H), x.dtype) for n, s in zip(names, states))
    w_ih = _device_array(rt, "w_ih", w_ih, (G, I), x.dtype)
    w_hh = _device_array(rt, "w_hh", w_hh, (G, H), x.dtype)
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih and b_hh must both be arrays or both be None")
    if b_ih is not None:
        b_ih = _device_array(rt, "b_ih", b_ih, (G,), x.dtype)
        b_hh = _device_array(rt, "b_hh", b_hh, (G,), x.dtype)
    return rt.xp.ascontiguousarray(x), states, w_ih, w_hh, b_ih, b_hh, (T, B, I, H)


def _lengths(rt, lengths, T, B):
    """lengths as a device int32 (B,) array; all T when None (every step active)."""
    if lengths is None:
        return rt.xp.full((B,), T, dtype=np.int32)
    if getattr(lengths, "dtype", np.dtype(np.float64)).kind not in "iu":
        raise TypeError(f"lengths must be an integer array, got "
                        f"{getattr(lengths, 'dtype', type(lengths).__name__)}")
    lengths = rt.xp.asarray(lengths)
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape (B,) = ({B},), got {tuple(lengths.shape)}")
    # Values outside [0, T] behave like 0 or T: the kernels only test t < lengths[b].
    return rt.xp.ascontiguousarray(lengths.clip(0, T).astype(np.int32))


def _check_backward(rt, cache, d_out, d_states):
    if cache is None:
        raise ValueError("cache is None: backward needs a forward call with training=True")
    x = cache["x"]
    T, B, _ = x.shape
    H = cache["hs"].shape[2]
    d_out = _device_array(rt, "d_out", d_out, (T, B, H), x.dtype)
    names = ("d_h_n", "d_c_n")
    return d_out, tuple(_device_array(rt, n, s, (B, H), x.dtype)
                        for n, s in zip(names, d_states))


# ------------------------------------------------------------------ shared maths

def _steps(T: int, reverse: bool) -> range:
    return range(T - 1, -1, -1) if reverse else range(T)


def _mode(training: bool) -> str:
    return "train" if training else "infer"


def _state_slots(rt, s0, T, r, training):
    """State buffers holding s0 where the first step reads it.

    Training keeps every state, ``[T + 1, B, H]`` (step t reads slot t + r and
    writes t + 1 - r); the persistent inference loop alternates two, ``[2, B, H]``.
    """
    slots = rt.xp.empty((T + 1 if training else 2,) + s0.shape, dtype=s0.dtype)
    slots[r * T if training else 0] = s0
    return slots


def _last_slot(T, r, training):
    """The slot of :func:`_state_slots` that holds the state after the last step."""
    return (1 - r) * T if training else T % 2


def _barrier(rt):
    """The arrival counter of a persistent launch's grid barrier."""
    return rt.xp.zeros((1,), dtype=np.uint32)


def _project(rt, x, w_ih, bias):
    """x W_ih^T + bias for every step at once: (T, B, G)."""
    T, B, I = x.shape
    xw = rt.matmul(x.reshape(T * B, I), w_ih.T).reshape(T, B, -1)
    if bias is not None:
        xw += bias
    return xw


def _param_grads(rt, d_a_x, d_a_h, x, h_prev, w_ih, has_bias):
    """Whole-sequence GEMMs: d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh (as the reference)."""
    T, B, I = x.shape
    G = d_a_x.shape[2]
    d_a_x2 = d_a_x.reshape(T * B, G)
    d_a_h2 = d_a_h.reshape(T * B, G)
    d_x = rt.matmul(d_a_x2, w_ih).reshape(T, B, I)
    d_w_ih = rt.matmul(d_a_x2.T, x.reshape(T * B, I))
    d_w_hh = rt.matmul(d_a_h2.T, h_prev.reshape(T * B, -1))
    if not has_bias:
        return d_x, d_w_ih, d_w_hh, None, None
    return d_x, d_w_ih, d_w_hh, d_a_x2.sum(axis=0), d_a_h2.sum(axis=0)


# ------------------------------------------------------------------ vanilla RNN

def _rnn_forward(rt, cell, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training):
    x, (h0,), w_ih, w_hh, b_ih, b_hh, (T, B, I, H) = _check_forward(
        rt, x, (h0,), w_ih, w_hh, b_ih, b_hh, 1)
    xp, r, sfx = rt.xp, int(reverse), _suffix(x.dtype)
    lens = _lengths(rt, lengths, T, B)
    xw = _project(rt, x, w_ih, None if b_ih is None else b_ih + b_hh)
    out = xp.empty((T, B, H), dtype=x.dtype)
    plan = _plan(rt, cell, T, B, H, x.dtype, backward=False)
    if plan is not None:
        hs = _state_slots(rt, h0, T, r, training)
        rt.launch_persistent("rnn", f"fastrnn_{cell}_persist_fwd_{_mode(training)}_{sfx}", plan,
                             T, B, H, r, lens, xw, w_hh, hs, out, _barrier(rt))
        h_n = hs[_last_slot(T, r, training)].copy()
    else:
        w_hh_t = w_hh.T
        hw = xp.empty((B, H), dtype=x.dtype)
        if training:
            hs = _state_slots(rt, h0, T, r, training)
            for t in _steps(T, reverse):
                rt.matmul(hs[t + r], w_hh_t, hw)
                rt.launch("rnn", f"fastrnn_{cell}_fwd_train_{sfx}", B * H, B, H, t, lens, xw[t],
                          hw, hs[t + r], hs[t + 1 - r], out[t])
            h_n = hs[_last_slot(T, r, training)].copy()
        else:
            h_n = h0.copy()
            for t in _steps(T, reverse):
                rt.matmul(h_n, w_hh_t, hw)
                rt.launch("rnn", f"fastrnn_{cell}_fwd_infer_{sfx}", B * H, B, H, t, lens, xw[t],
                          hw, h_n, h_n, out[t])
    if not training:
        return out, h_n, None
    cache = dict(cell=cell, x=x, hs=hs, w_ih=w_ih, w_hh=w_hh, has_bias=b_ih is not None,
                 lengths=lens, reverse=bool(reverse))
    return out, h_n, cache


def _rnn_backward(rt, d_out, d_h_n, cache):
    d_out, (d_h_n,) = _check_backward(rt, cache, d_out, (d_h_n,))
    x, hs, w_hh, lens, reverse = (cache[k] for k in ("x", "hs", "w_hh", "lengths", "reverse"))
    cell = cache["cell"]
    xp, r, sfx = rt.xp, int(reverse), _suffix(x.dtype)
    T, B, _ = x.shape
    H = hs.shape[2]
    d_a = xp.empty((T, B, H), dtype=x.dtype)
    d_h_carry = d_h_n.copy()
    plan = _plan(rt, cell, T, B, H, x.dtype, backward=True)
    if plan is not None:
        d_h_gemm = xp.empty((B, H), dtype=x.dtype)
        rt.launch_persistent("rnn", f"fastrnn_{cell}_persist_bwd_{sfx}", plan, T, B, H, r, lens,
                             w_hh, d_out, d_h_carry, hs, d_a, d_h_gemm, _barrier(rt))
    else:
        d_h_gemm = xp.zeros((B, H), dtype=x.dtype)
        for t in _steps(T, not reverse):
            rt.launch("rnn", f"fastrnn_{cell}_bwd_{sfx}", B * H, B, H, t, lens, d_out[t],
                      d_h_gemm, d_h_carry, hs[t + 1 - r], d_a[t])
            rt.matmul(d_a[t], w_hh, d_h_gemm)
    d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh = _param_grads(
        rt, d_a, d_a, x, hs[r:T + r], cache["w_ih"], cache["has_bias"])
    return d_x, d_h_carry + d_h_gemm, d_w_ih, d_w_hh, d_b_ih, d_b_hh


def rnn_tanh_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True):
    """Elman RNN with tanh on the GPU: ``h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``.

    Arrays are CuPy arrays; shapes, returns and masking follow :mod:`fastrnn.backends`.
    """
    with _session(getattr(x, "dtype", None)) as rt:
        return _rnn_forward(rt, "rnn_tanh", x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                            training)


def rnn_relu_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True):
    """Elman RNN with ReLU on the GPU: ``h_t = max(0, W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``."""
    with _session(getattr(x, "dtype", None)) as rt:
        return _rnn_forward(rt, "rnn_relu", x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                            training)


def rnn_tanh_backward(d_out, d_h_n, cache):
    """Backward of :func:`rnn_tanh_forward`: ``(d_x, d_h0, d_w_ih, d_w_hh, d_b_ih, d_b_hh)``."""
    with _session(getattr(d_out, "dtype", None)) as rt:
        return _rnn_backward(rt, d_out, d_h_n, cache)


def rnn_relu_backward(d_out, d_h_n, cache):
    """Backward of :func:`rnn_relu_forward`."""
    with _session(getattr(d_out, "dtype", None)) as rt:
        return _rnn_backward(rt, d_out, d_h_n, cache)


# ------------------------------------------------------------------ LSTM

def _lstm_forward(rt, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training):
    x, (h0, c0), w_ih, w_hh, b_ih, b_hh, (T, B, I, H) = _check_forward(
        rt, x, (h0, c0), w_ih, w_hh, b_ih, b_hh, 4)
    xp, r, sfx = rt.xp, int(reverse), _suffix(x.dtype)
    lens = _lengths(rt, lengths, T, B)
    xw = _project(rt, x, w_ih, None if b_ih is None else b_ih + b_hh)
    out = xp.empty((T, B, H), dtype=x.dtype)
    plan = _plan(rt, "lstm", T, B, H, x.dtype, backward=False)
    if training:
        hs, cs = _state_slots(rt, h0, T, r, True), _state_slots(rt, c0, T, r, True)
        gates = xp.empty((T, B, 4 * H), dtype=x.dtype)
        tanh_cs = xp.empty((T, B, H), dtype=x.dtype)
    if plan is not None and training:
        rt.launch_persistent("lstm", f"fastrnn_lstm_persist_fwd_train_{sfx}", plan, T, B, H, r,
                             lens, xw, w_hh, hs, cs, out, gates, tanh_cs, _barrier(rt))
    elif plan is not None:
        hs, c_n = _state_slots(rt, h0, T, r, False), c0.copy()   # c is updated in place
        rt.launch_persistent("lstm", f"fastrnn_lstm_persist_fwd_infer_{sfx}", plan, T, B, H, r,
                             lens, xw, w_hh, hs, c_n, out, _barrier(rt))
        return out, hs[_last_slot(T, r, False)].copy(), c_n, None
    else:
        w_hh_t = w_hh.T
        hw = xp.empty((B, 4 * H), dtype=x.dtype)
        if not training:
            h_n, c_n = h0.copy(), c0.copy()
            for t in _steps(T, reverse):
                rt.matmul(h_n, w_hh_t, hw)
                rt.launch("lstm", f"fastrnn_lstm_fwd_infer_{sfx}", B * H, B, H, t, lens, xw[t],
                          hw, h_n, c_n, h_n, c_n, out[t])
            return out, h_n, c_n, None
        for t in _steps(T, reverse):
            rt.matmul(hs[t + r], w_hh_t, hw)
            rt.launch("lstm", f"fastrnn_lstm_fwd_train_{sfx}", B * H, B, H, t, lens, xw[t], hw,
                      hs[t + r], cs[t + r], hs[t + 1 - r], cs[t + 1 - r], out[t], gates[t],
                      tanh_cs[t])
    cache = dict(x=x, hs=hs, cs=cs, gates=gates, tanh_cs=tanh_cs, w_ih=w_ih, w_hh=w_hh,
                 has_bias=b_ih is not None, lengths=lens, reverse=bool(reverse))
    last = _last_slot(T, r, True)
    return out, hs[last].copy(), cs[last].copy(), cache


def _lstm_backward(rt, d_out, d_h_n, d_c_n, cache):
    d_out, (d_h_n, d_c_n) = _check_backward(rt, cache, d_out, (d_h_n, d_c_n))
    x, hs, cs, w_hh, lens, reverse = (cache[k] for k in ("x", "hs", "cs", "w_hh", "lengths",
                                                          "reverse"))
    gates, tanh_cs = cache["gates"], cache["tanh_cs"]
    xp, r, sfx = rt.xp, int(reverse), _suffix(x.dtype)
    T, B, _ = x.shape
    H = hs.shape[2]
    d_a = xp.empty((T, B, 4 * H), dtype=x.dtype)
    d_h_carry, d_c = d_h_n.copy(), d_c_n.copy()
    plan = _plan(rt, "lstm", T, B, H, x.dtype, backward=True)
    if plan is not None:
        d_h_gemm = xp.empty((B, H), dtype=x.dtype)
        rt.launch_persistent("lstm", f"fastrnn_lstm_persist_bwd_{sfx}", plan, T, B, H, r, lens,
                             w_hh, d_out, d_h_carry, d_c, gates, tanh_cs, cs, d_a, d_h_gemm,
                             _barrier(rt))
    else:
        d_h_gemm = xp.zeros((B, H), dtype=x.dtype)
        for t in _steps(T, not reverse):
            rt.launch("lstm", f"fastrnn_lstm_bwd_{sfx}", B * H, B, H, t, lens, d_out[t],
                      d_h_gemm, d_h_carry, d_c, gates[t], tanh_cs[t], cs[t + r], d_a[t])
            rt.matmul(d_a[t], w_hh, d_h_gemm)
    d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh = _param_grads(
        rt, d_a, d_a, x, hs[r:T + r], cache["w_ih"], cache["has_bias"])
    return d_x, d_h_carry + d_h_gemm, d_c, d_w_ih, d_w_hh, d_b_ih, d_b_hh


def lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True):
    """LSTM on the GPU, PyTorch's gate order i, f, g, o.

    Equations
    ---------
    .. math::
        [a_i, a_f, a_g, a_o] = W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}
        c_t = \\sigma(a_f) c_{t-1} + \\sigma(a_i) \\tanh(a_g),\\quad
        h_t = \\sigma(a_o) \\tanh(c_t)

    Arrays are CuPy arrays; shapes, returns and masking follow :mod:`fastrnn.backends`.
    """
    with _session(getattr(x, "dtype", None)) as rt:
        return _lstm_forward(rt, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training)


def lstm_backward(d_out, d_h_n, d_c_n, cache):
    """Backward of :func:`lstm_forward`: ``(d_x, d_h0, d_c0, d_w_ih, d_w_hh, d_b_ih, d_b_hh)``."""
    with _session(getattr(d_out, "dtype", None)) as rt:
        return _lstm_backward(rt, d_out, d_h_n, d_c_n, cache)


# ------------------------------------------------------------------ GRU

def _gru_forward(rt, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training, reset_after):
    x, (h0,), w_ih, w_hh, b_ih, b_hh, (T, B, I, H) = _check_forward(
        rt, x, (h0,), w_ih, w_hh, b_ih, b_hh, 3)
    xp, r, sfx = rt.xp, int(reverse), _suffix(x.dtype)
    lens = _lengths(rt, lengths, T, B)
    out = xp.empty((T, B, H), dtype=x.dtype)
    hs = _state_slots(rt, h0, T, r, True) if training else None
    h = None if training else h0.copy()

    def states(t):  # (before, after) the step; one buffer updated in place in inference
        return (hs[t + r], hs[t + 1 - r]) if training else (h, h)

    gates = xp.empty((T, B, 3 * H), dtype=x.dtype) if training else None
    plan = _plan(rt, "gru", T, B, H, x.dtype, backward=False, reset_after=reset_after)
    if reset_after:
        if b_ih is None:
            xw, b_hn = _project(rt, x, w_ih, None), xp.zeros((H,), dtype=x.dtype)
        else:
            bias = b_ih.copy()
            bias[:2 * H] += b_hh[:2 * H]   # b_hn stays inside r * (.)
            xw, b_hn = _project(rt, x, w_ih, bias), xp.ascontiguousarray(b_hh[2 * H:])
        hns = xp.empty((T, B, H), dtype=x.dtype) if training else None
        if plan is not None and training:
            rt.launch_persistent("gru", f"fastrnn_gru_persist_fwd_train_{sfx}", plan, T, B, H,
                                 r, lens, xw, w_hh, b_hn, hs, out, gates, hns, _barrier(rt))
        elif plan is not None:
            slots = _state_slots(rt, h0, T, r, False)
            rt.launch_persistent("gru", f"fastrnn_gru_persist_fwd_infer_{sfx}", plan, T, B, H,
                                 r, lens, xw, w_hh, b_hn, slots, out, _barrier(rt))
            h = slots[_last_slot(T, r, False)].copy()
        else:
            w_hh_t = w_hh.T
            hw = xp.empty((B, 3 * H), dtype=x.dtype)
            for t in _steps(T, reverse):
                h_prev, h_next = states(t)
                rt.matmul(h_prev, w_hh_t, hw)
                if training:
                    rt.launch("gru", f"fastrnn_gru_fwd_train_{sfx}", B * H, B, H, t, lens,
                              xw[t], hw, b_hn, h_prev, h_next, out[t], gates[t], hns[t])
                else:
                    rt.launch("gru", f"fastrnn_gru_fwd_infer_{sfx}", B * H, B, H, t, lens,
                              xw[t], hw, b_hn, h_prev, h_next, out[t])
        extra = dict(hns=hns)
    else:
        xw = _project(rt, x, w_ih, None if b_ih is None else b_ih + b_hh)
        w_hrz_t, w_hn_t = w_hh[:2 * H].T, w_hh[2 * H:].T
        hw_rz = xp.empty((B, 2 * H), dtype=x.dtype)
        hw_n = xp.empty((B, H), dtype=x.dtype)
        rhs = xp.empty((T, B, H), dtype=x.dtype) if training else None
        step_gates = None if training else xp.empty((B, 3 * H), dtype=x.dtype)
        rh = None if training else xp.empty((B, H), dtype=x.dtype)
        for t in _steps(T, reverse):
            h_prev, h_next = states(t)
            g_t = gates[t] if training else step_gates
            rh_t = rhs[t] if training else rh
            rt.matmul(h_prev, w_hrz_t, hw_rz)
            rt.launch("gru", f"fastrnn_gru_rb_rz_fwd_{sfx}", B * H, B, H, xw[t], hw_rz, h_prev,
                      g_t, rh_t)
            rt.matmul(rh_t, w_hn_t, hw_n)
            rt.launch("gru", f"fastrnn_gru_rb_n_fwd_{sfx}", B * H, B, H, t, lens, xw[t], hw_n,
                      h_prev, g_t, h_next, out[t])
        extra = dict(rhs=rhs)
    if not training:
        return out, h, None
    cache = dict(x=x, hs=hs, gates=gates, w_ih=w_ih, w_hh=w_hh, has_bias=b_ih is not None,
                 lengths=lens, reverse=bool(reverse), reset_after=bool(reset_after), **extra)
    return out, hs[_last_slot(T, r, True)].copy(), cache


def _gru_backward(rt, d_out, d_h_n, cache):
    d_out, (d_h_n,) = _check_backward(rt, cache, d_out, (d_h_n,))
    x, hs, gates, w_ih, w_hh = (cache[k] for k in ("x", "hs", "gates", "w_ih", "w_hh"))
    lens, reverse, has_bias = cache["lengths"], cache["reverse"], cache["has_bias"]
    xp, r, sfx = rt.xp, int(reverse), _suffix(x.dtype)
    T, B, I = x.shape
    H = hs.shape[2]
    d_h_carry = d_h_n.copy()
    d_h_gemm = xp.zeros((B, H), dtype=x.dtype)
    if cache["reset_after"]:
        hns = cache["hns"]
        d_a_x = xp.empty((T, B, 3 * H), dtype=x.dtype)  # feeds W_ih, b_ih
        d_a_h = xp.empty((T, B, 3 * H), dtype=x.dtype)  # feeds W_hh, b_hh
        plan = _plan(rt, "gru", T, B, H, x.dtype, backward=True)
        if plan is not None:
            rt.launch_persistent("gru", f"fastrnn_gru_persist_bwd_{sfx}", plan, T, B, H, r,
                                 lens, w_hh, d_out, d_h_carry, gates, hns, hs, d_a_x, d_a_h,
                                 d_h_gemm, _barrier(rt))
        else:
            for t in _steps(T, not reverse):
                rt.launch("gru", f"fastrnn_gru_bwd_{sfx}", B * H, B, H, t, lens, d_out[t],
                          d_h_gemm, d_h_carry, gates[t], hns[t], hs[t + r], d_a_x[t], d_a_h[t])
                rt.matmul(d_a_h[t], w_hh, d_h_gemm)
        d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh = _param_grads(
            rt, d_a_x, d_a_h, x, hs[r:T + r], w_ih, has_bias)
        return d_x, d_h_carry + d_h_gemm, d_w_ih, d_w_hh, d_b_ih, d_b_hh
    # reset_before: the r and z blocks and the n block live in separate buffers, so that
    # each per-step GEMM reads one contiguous block.
    rhs = cache["rhs"]
    w_hrz, w_hn = w_hh[:2 * H], w_hh[2 * H:]
    d_a_rz = xp.empty((T, B, 2 * H), dtype=x.dtype)
    d_a_n = xp.empty((T, B, H), dtype=x.dtype)
    d_rh = xp.empty((B, H), dtype=x.dtype)
    for t in _steps(T, not reverse):
        rt.launch("gru", f"fastrnn_gru_rb_n_bwd_{sfx}", B * H, B, H, t, lens, d_out[t], d_h_gemm,
                  d_h_carry, gates[t], hs[t + r], d_a_rz[t], d_a_n[t])
        rt.matmul(d_a_n[t], w_hn, d_rh)
        rt.launch("gru", f"fastrnn_gru_rb_r_bwd_{sfx}", B * H, B, H, t, lens, d_rh, gates[t],
                  hs[t + r], d_h_carry, d_a_rz[t])
        rt.matmul(d_a_rz[t], w_hrz, d_h_gemm)
    d_a_rz2, d_a_n2 = d_a_rz.reshape(T * B, 2 * H), d_a_n.reshape(T * B, H)
    x2 = x.reshape(T * B, I)
    d_x = (rt.matmul(d_a_rz2, w_ih[:2 * H]) + rt.matmul(d_a_n2, w_ih[2 * H:])).reshape(T, B, I)
    d_w_ih = xp.concatenate([rt.matmul(d_a_rz2.T, x2), rt.matmul(d_a_n2.T, x2)])
    # W_hn's GEMM input is r * h_{t-1} (cached as rhs).
    d_w_hh = xp.concatenate([rt.matmul(d_a_rz2.T, hs[r:T + r].reshape(T * B, H)),
                             rt.matmul(d_a_n2.T, rhs.reshape(T * B, H))])
    d_b_ih = d_b_hh = None
    if has_bias:  # both biases enter the same pre-activations
        d_b_ih = xp.concatenate([d_a_rz2.sum(axis=0), d_a_n2.sum(axis=0)])
        d_b_hh = d_b_ih.copy()
    return d_x, d_h_carry + d_h_gemm, d_w_ih, d_w_hh, d_b_ih, d_b_hh


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True,
                reset_after=True):
    """GRU on the GPU, PyTorch's gate order r, z, n.

    Equations
    ---------
    .. math::
        r = \\sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr}),\\quad
        z = \\sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz})
        n = \\tanh(W_{in} x_t + b_{in} + r \\odot (W_{hn} h_{t-1} + b_{hn}))
            \\quad \\text{(reset_after=True)}
        n = \\tanh(W_{in} x_t + b_{in} + W_{hn} (r \\odot h_{t-1}) + b_{hn})
            \\quad \\text{(reset_after=False)}
        h_t = (1 - z) \\odot n + z \\odot h_{t-1}

    Arrays are CuPy arrays; shapes, returns and masking follow :mod:`fastrnn.backends`.
    """
    with _session(getattr(x, "dtype", None)) as rt:
        return _gru_forward(rt, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training,
                            reset_after)


def gru_backward(d_out, d_h_n, cache):
    """Backward of :func:`gru_forward`: ``(d_x, d_h0, d_w_ih, d_w_hh, d_b_ih, d_b_hh)``."""
    with _session(getattr(d_out, "dtype", None)) as rt:
        return _gru_backward(rt, d_out, d_h_n, cache)
