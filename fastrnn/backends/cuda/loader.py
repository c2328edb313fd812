"""The kernel loader: the sources of ``csrc/``, the names of their kernels, and one module per
unit and device, from the fatbin when it has code for the device, else from NVRTC.

A *unit* is one source file, ``csrc/fastrnn_{unit}.cu``: the family of its cells in the
registry (``rnn`` for ``rnn_tanh`` and ``rnn_relu``, ``lstm``, ``gru``). A kernel is
``fastrnn_{cell}_{stage}_{f32|f64}``, its stage one of :data:`STAGES` (plus the GRU's and
the LSTM's :data:`EXTRA_STAGES`).

Modules are memoized per device with ``cupy.memoize(for_each_device=True)``:
``cupy.RawModule(path=...)`` on the fatbin built by CMake when it holds SASS for the
device's compute capability, else NVRTC on the shipped source with its headers inlined
(so that they are part of CuPy's compile-cache key). Every kernel of a unit is fetched
at load time, so a fatbin that fails to load (a driver older than the toolkit that built
it) falls back to NVRTC right there, never mid-loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastrnn.backends import CELLS, cell_kind

from ._cupy import cupy, per_device

#: Architectures the CMake build puts SASS for in every fatbin (plus compute_90 PTX).
FATBIN_ARCHS = ("80", "86", "89", "90")

#: Kernel name suffix of each float dtype.
SUFFIXES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}

#: Stages every cell has: stepwise and persistent; forward with and without cache; backward.
STAGES = tuple(f"{loop}{kind}" for loop in ("", "persist_")
               for kind in ("fwd_train", "fwd_infer", "bwd"))

#: Stages of one cell only (stepwise): the GRU's reset_after=False path (two kernels per
#: step), the masking passes of the LSTM's projection ``w_hr`` (torch's proj_size).
EXTRA_STAGES = {"gru": ("rb_rz_fwd", "rb_n_fwd", "rb_n_bwd", "rb_r_bwd"),
                "lstm": ("proj_fwd", "proj_bwd")}


def unit_of(cell: str) -> str:
    """The source file of ``cell``'s kernels: ``csrc/fastrnn_{unit_of(cell)}.cu``."""
    return cell_kind(cell).family.lower()


#: Unit of each cell of the registry.
UNITS = {cell: unit_of(cell) for cell in CELLS}


def kernel_name(cell: str, stage: str, suffix: str) -> str:
    """The ``extern "C"`` name of one kernel, e.g. ``fastrnn_lstm_persist_bwd_f32``."""
    return f"fastrnn_{cell}_{stage}_{suffix}"


def kernel_names(unit: str) -> list[str]:
    """Every ``extern "C"`` kernel of ``csrc/fastrnn_{unit}.cu``."""
    cells = [cell for cell, cell_unit in UNITS.items() if cell_unit == unit]
    return [kernel_name(cell, stage, suffix) for cell in cells
            for stage in STAGES + EXTRA_STAGES.get(cell, ())
            for suffix in SUFFIXES.values()]


def csrc_dir() -> Path | None:
    """Folder of the kernel sources (and fatbins, in an installed package)."""
    package = Path(__file__).resolve().parents[2]   # fastrnn/
    for folder in (package / "csrc", package.parent / "csrc"):  # installed, source checkout
        if (folder / "fastrnn_common.cuh").is_file():
            return folder
    return None


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


@dataclass(frozen=True)
class LoadedUnit:
    """The kernels of one unit on one device, and where they came from (for ``info()``)."""

    functions: dict   # kernel name -> cupy.RawKernel
    origin: str       # "fatbin <path>" or "NVRTC from <path> (why not the fatbin)"


def load(unit: str, compute_capability: str, raw_module) -> LoadedUnit:
    """Load ``unit`` with ``raw_module`` (``cupy.RawModule``): fatbin when it has SASS for
    ``compute_capability`` and loads, else NVRTC."""
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
            raw = raw_module(path=str(fatbin))
            # get_function loads the module now, so a bad fatbin fails here, not mid-loop.
            return LoadedUnit({n: raw.get_function(n) for n in names}, f"fatbin {fatbin}")
        except Exception as exc:  # noqa: BLE001 - e.g. a driver older than the toolkit
            why = f"the fatbin failed to load: {type(exc).__name__}: {exc}"
    raw = raw_module(code=nvrtc_source(unit, folder), options=("-std=c++17",))
    return LoadedUnit({n: raw.get_function(n) for n in names},
                      f"NVRTC from {folder / f'fastrnn_{unit}.cu'} ({why})")


# What has been loaded where, for info(); the cache itself is cupy.memoize's.
_origins: dict = {}   # (device id, unit) -> origin


@per_device
def loaded(unit: str) -> LoadedUnit:
    """``unit`` on the current device, loaded at its first use there."""
    device = cupy.cuda.Device()
    result = load(unit, device.compute_capability, cupy.RawModule)
    _origins[(device.id, unit)] = result.origin
    return result


def origins() -> dict:
    """``{(device id, unit): origin}`` of every unit loaded so far."""
    return dict(_origins)
