"""CuPy, imported once for the whole backend, and its per-device memoizer.

``cupy`` is None where CuPy cannot be imported; :data:`IMPORT_ERROR` says why,
so that ``import fastrnn.backends.cuda`` works on any machine and
``unavailable_reason()`` can tell the user what is missing.
"""

from __future__ import annotations

try:
    import cupy
    IMPORT_ERROR = None
except ImportError as exc:  # the usual case on a CPU-only machine
    cupy, IMPORT_ERROR = None, f"cupy is not installed ({exc}); pip install 'fastrnn[cuda]'"
except Exception as exc:  # noqa: BLE001 - a broken CUDA install must not break `import fastrnn`
    cupy, IMPORT_ERROR = None, f"cupy failed to import: {type(exc).__name__}: {exc}"


def per_device(function):
    """Memoize ``function`` per argument and current device, as CuPy does its own kernels
    (``cupy.memoize(for_each_device=True)``).

    Without CuPy nothing can call it (the backend is unavailable), so it stays as it is.
    Two threads that ask for the same entry at once may both compute it; the last one is
    kept, which is harmless for what is memoized here (loaded kernels, device limits).
    """
    if cupy is None:
        return function
    return cupy.memoize(for_each_device=True)(function)
