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


def torch_or_skip():
    """torch is the independent oracle: skipped where absent, but never in CI."""
    try:
        import torch
    except ImportError:
        if os.environ.get("CI"):
            raise RuntimeError("torch must be installed in CI (pip install '.[test]')") from None
        pytest.skip("torch is not installed")
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


def random_lengths(rng, T, B, allow_zero=True):
    lengths = rng.integers(0 if allow_zero else 1, T + 1, size=B)
    lengths[rng.integers(B)] = T  # at least one full sequence, as torch's packing requires
    return lengths
