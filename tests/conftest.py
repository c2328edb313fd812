import os

import numpy as np
import pytest

import fastrnn

CPU_BACKENDS = [b for b in fastrnn.backends.available() if b != "cuda"]
LAYERS = {"rnn_tanh": (fastrnn.RNN, {"nonlinearity": "tanh"}),
          "rnn_relu": (fastrnn.RNN, {"nonlinearity": "relu"}),
          "lstm": (fastrnn.LSTM, {}),
          "gru": (fastrnn.GRU, {}),
          "gru_reset_before": (fastrnn.GRU, {"reset_after": False})}


def torch_or_skip():
    """torch is the independent oracle: skipped where absent, but never in CI."""
    try:
        import torch
    except ImportError:
        if os.environ.get("CI"):
            raise RuntimeError("torch must be installed in CI (pip install '.[test]')")
        pytest.skip("torch is not installed")
    torch.set_num_threads(1)
    return torch


def make_layer(kind, I, H, **kwargs):
    cls, extra = LAYERS[kind]
    return cls(I, H, **extra, **kwargs)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def random_lengths(rng, T, B, allow_zero=True):
    lengths = rng.integers(0 if allow_zero else 1, T + 1, size=B)
    lengths[rng.integers(B)] = T  # at least one full sequence, as torch's packing requires
    return lengths
