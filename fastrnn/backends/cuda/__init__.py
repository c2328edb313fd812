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

The LSTM's projection ``w_hr`` (torch's proj_size) runs stepwise: per step a second
GEMM ``h_t = m_t W_hr^T`` after the pointwise kernel, and a small kernel that masks
``h_t`` and ``out_t``. The persistent loop refuses it (NotImplementedError: it would
need a second grid barrier per step); ``"auto"`` runs it stepwise. The zoneout masks
of the contract (``zoneout_h``, ``zoneout_c``) have no kernels here: NotImplementedError.

Modules, one concern each:

=============  ===================================================================
``loader``     kernel sources and names; one module per unit and device (fatbin or
               NVRTC), memoized with ``cupy.memoize(for_each_device=True)``
``planner``    the persistent launch's geometry, or why it does not fit (pure
               arithmetic on a device's :class:`PersistentLimits`)
``runtime``    launches, GEMMs and device limits on CuPy's current device and
               stream; TF32 (:func:`allow_tf32`); availability
``checks``     argument checks of the kernel functions and of a launch
``loops``      the host loops of every cell: buffers, stepwise or persistent time
               loop, cache
``_cupy``      the optional CuPy import and the per-device memoizer
=============  ===================================================================

This module is their public face: the kernel functions of the contract, the
choice of algorithm, :func:`persistent_plan` for the current device and :func:`info`.
"""

from __future__ import annotations

from . import _cupy, loader, loops, runtime
from .loader import FATBIN_ARCHS, UNITS, csrc_dir, kernel_names, nvrtc_source
from .planner import PersistentLimits, PersistentPlan
from .planner import persistent_plan as _persistent_plan
from .runtime import allow_tf32, tf32_allowed, unavailable_reason

__all__ = [
    "ALGORITHMS", "FATBIN_ARCHS", "UNITS", "PersistentLimits", "PersistentPlan", "algorithm",
    "allow_tf32", "csrc_dir", "info", "kernel_names", "nvrtc_source", "persistent_plan",
    "set_algorithm", "tf32_allowed", "unavailable_reason", "xp",
    "rnn_tanh_forward", "rnn_tanh_backward", "rnn_relu_forward", "rnn_relu_backward",
    "lstm_forward", "lstm_backward", "gru_forward", "gru_backward",
]

#: The array module of this backend (``cupy``; ``None`` where CuPy is absent).
xp = _cupy.cupy


# ------------------------------------------------------------------ algorithm

ALGORITHMS = ("stepwise", "persistent", "auto")
_algorithm = "stepwise"   # read by every kernel function at its call


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


def persistent_plan(cell: str, B: int, H: int, dtype, backward: bool = False,
                    reset_after: bool = True, limits: PersistentLimits | None = None):
    """The persistent launch for this problem, or ``(None, why not)``.

    Returns ``(PersistentPlan, None)`` when it fits. ``limits`` defaults to
    those of the current device.
    """
    if limits is None:
        limits = runtime.current().persistent_limits()
    return _persistent_plan(cell, B, H, dtype, backward, reset_after, limits=limits)


def info(load: bool = False) -> dict:
    """Where this backend's kernels come from, for ``fastrnn info``.

    With ``load=True`` every unit is loaded on the current device first, so
    ``modules`` reports the real origin (fatbin path, or NVRTC and why).
    """
    folder = csrc_dir()
    reason = unavailable_reason()
    result = {
        "available": reason is None,
        "reason": reason,
        "cupy": getattr(_cupy.cupy, "__version__", None),
        "csrc": str(folder) if folder else None,
        "fatbins": sorted(p.name for p in folder.glob("*.fatbin")) if folder else [],
        "fatbin_archs": [f"sm_{a}" for a in FATBIN_ARCHS] + ["compute_90 (PTX)"],
        "tf32": tf32_allowed(),
        "algorithm": _algorithm,
    }
    if reason is None:
        device = _cupy.cupy.cuda.Device()
        props = _cupy.cupy.cuda.runtime.getDeviceProperties(device.id)
        name = props["name"]
        result["device"] = name.decode() if isinstance(name, bytes) else str(name)
        result["compute_capability"] = device.compute_capability
        if load:
            for unit in sorted(set(UNITS.values())):
                loader.loaded(unit)
    result["modules"] = {f"device {dev}: {unit}": origin
                         for (dev, unit), origin in sorted(loader.origins().items())}
    return result


# ------------------------------------------------------------------ the kernel functions

def _call(loop, dtype, *args):
    """Run ``loop`` of :mod:`.loops` in one runtime session, with the chosen algorithm."""
    with runtime.session(dtype) as rt:
        return loop(rt, _algorithm, *args)


def _refuse_zoneout(**masks):
    """NotImplementedError for any zoneout mask given: running without it would be
    silently wrong, so the call stops before any work."""
    given = [name for name, mask in masks.items() if mask is not None]
    if given:
        raise NotImplementedError(f"zoneout ({', '.join(given)}): the cuda backend has no "
                                  f"zoneout kernels; use backend='numba' or 'numpy'")


def rnn_tanh_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True,
                     zoneout_h=None):
    """Elman RNN with tanh on the GPU: ``h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``.

    Arrays are CuPy arrays; shapes, returns and masking follow :mod:`fastrnn.backends`.
    ``zoneout_h`` has no kernels here: NotImplementedError.
    """
    _refuse_zoneout(zoneout_h=zoneout_h)
    return _call(loops.rnn_forward, getattr(x, "dtype", None), "rnn_tanh", x, h0, w_ih, w_hh,
                 b_ih, b_hh, lengths, reverse, training)


def rnn_relu_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True,
                     zoneout_h=None):
    """Elman RNN with ReLU on the GPU: ``h_t = max(0, W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``."""
    _refuse_zoneout(zoneout_h=zoneout_h)
    return _call(loops.rnn_forward, getattr(x, "dtype", None), "rnn_relu", x, h0, w_ih, w_hh,
                 b_ih, b_hh, lengths, reverse, training)


def rnn_tanh_backward(d_out, d_h_n, cache):
    """Backward of :func:`rnn_tanh_forward`: ``(d_x, d_h0, d_w_ih, d_w_hh, d_b_ih, d_b_hh)``."""
    return _call(loops.rnn_backward, getattr(d_out, "dtype", None), d_out, d_h_n, cache)


def rnn_relu_backward(d_out, d_h_n, cache):
    """Backward of :func:`rnn_relu_forward`."""
    return _call(loops.rnn_backward, getattr(d_out, "dtype", None), d_out, d_h_n, cache)


def lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True,
                 w_hr=None, zoneout_h=None, zoneout_c=None):
    """LSTM on the GPU, PyTorch's gate order i, f, g, o; with ``w_hr`` (P, H) torch's
    LSTM with projections (``proj_size=P``), on the stepwise loop only.

    Equations
    ---------
    .. math::
        [a_i, a_f, a_g, a_o] = W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}
        c_t = \\sigma(a_f) c_{t-1} + \\sigma(a_i) \\tanh(a_g),\\quad
        m_t = \\sigma(a_o) \\tanh(c_t),\\quad
        h_t = W_{hr} m_t \\ (\\text{or } m_t \\text{ without } W_{hr})

    Arrays are CuPy arrays; shapes, returns and masking follow :mod:`fastrnn.backends`
    (with ``w_hr``: h0, h_n, out and w_hh have P columns, c0 and c_n keep H). The
    zoneout masks have no kernels here: NotImplementedError.
    """
    _refuse_zoneout(zoneout_h=zoneout_h, zoneout_c=zoneout_c)
    return _call(loops.lstm_forward, getattr(x, "dtype", None), x, h0, c0, w_ih, w_hh, b_ih,
                 b_hh, lengths, reverse, training, w_hr)


def lstm_backward(d_out, d_h_n, d_c_n, cache):
    """Backward of :func:`lstm_forward`: ``(d_x, d_h0, d_c0, d_w_ih, d_w_hh, d_b_ih, d_b_hh)``,
    and ``d_w_hr`` last when the forward call had ``w_hr``."""
    return _call(loops.lstm_backward, getattr(d_out, "dtype", None), d_out, d_h_n, d_c_n, cache)


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True,
                reset_after=True, zoneout_h=None):
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
    ``zoneout_h`` has no kernels here: NotImplementedError.
    """
    _refuse_zoneout(zoneout_h=zoneout_h)
    return _call(loops.gru_forward, getattr(x, "dtype", None), x, h0, w_ih, w_hh, b_ih, b_hh,
                 lengths, reverse, training, reset_after)


def gru_backward(d_out, d_h_n, cache):
    """Backward of :func:`gru_forward`: ``(d_x, d_h0, d_w_ih, d_w_hh, d_b_ih, d_b_hh)``."""
    return _call(loops.gru_backward, getattr(d_out, "dtype", None), d_out, d_h_n, cache)
