import os

import pytest

import fastrnn

CPU_BACKENDS = [b for b in fastrnn.backends.available() if b != "cuda"]
#: Test kinds: every cell kind of the registry, plus the GRU's reset-before form.
#: Each maps to (registry kind, extra constructor options).
KINDS = {**{k: (k, {}) for k in fastrnn.backends.CELLS},
         "gru_reset_before": ("gru", {"reset_after": False})}
LAYERS = KINDS   # name kept for the tests that import it
#: The kinds torch has (it has no reset-before GRU).
TORCH_KINDS = list(fastrnn.backends.CELLS)


def require(*modules):
    """Import ``modules`` (optional packages the tests use as oracles): skipped where one
    is absent, but never in CI, where a missing one is an error (`.ci/run` sets CI=1).
    Returns the first module, or all of them for several."""
    import importlib
    loaded = []
    for name in modules:
        try:
            loaded.append(importlib.import_module(name))
        except ImportError:
            if os.environ.get("CI"):
                raise RuntimeError(f"{name} must be installed in CI "
                                   f"(pip install '.[test]')") from None
            pytest.skip(f"{name} is not installed")
    return loaded[0] if len(loaded) == 1 else tuple(loaded)


def torch_or_skip():
    """torch is the independent oracle."""
    torch = require("torch")
    torch.set_num_threads(1)
    return torch


def make_layer(kind, I, H, **kwargs):
    cell, extra = KINDS[kind]
    return fastrnn.make_layer(cell, I, H, **extra, **kwargs)


def make_cell(kind, I, H, **kwargs):
    cell, extra = KINDS[kind]
    return fastrnn.make_cell(cell, I, H, **extra, **kwargs)


def n_states(kind):
    return fastrnn.backends.state_count(KINDS[kind][0])


def torch_class(torch, kind, suffix=""):
    """torch's layer (suffix "") or cell (suffix "Cell") class and its options for ``kind``."""
    entry = fastrnn.backends.CELLS[kind]
    return getattr(torch.nn, entry.family + suffix), entry.constructor_options()


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def wait_until_no_other_thread_runs(timeout=10.0):
    """Until the packed loops' check for other running threads finds none: an earlier
    test's BLAS call may have left OpenBLAS's pool spinning (~0.1 s)."""
    import time

    from fastrnn.backends import packed_numba
    end = time.monotonic() + timeout
    while packed_numba._other_threads_running():
        assert time.monotonic() < end, f"another thread of the test process ran for {timeout} s"
        time.sleep(0.05)


def random_lengths(rng, T, B, allow_zero=True):
    lengths = rng.integers(0 if allow_zero else 1, T + 1, size=B)
    lengths[rng.integers(B)] = T  # at least one full sequence, as torch's packing requires
    return lengths
