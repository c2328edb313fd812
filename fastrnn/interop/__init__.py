"""Interop with PyTorch, Keras and ONNX: importers, exporters and gate mappings.

Importing this package imports no framework; each function imports its own
when called. See docs/interop.md.
"""

from __future__ import annotations


def from_torch(module, **kwargs):
    """See :func:`fastrnn.interop._torch.from_torch`."""
    from ._torch import from_torch as f
    return f(module, **kwargs)


def to_torch(layer, **kwargs):
    """See :func:`fastrnn.interop._torch.to_torch`."""
    from ._torch import to_torch as f
    return f(layer, **kwargs)


def from_keras(layer, **kwargs):
    """See :func:`fastrnn.interop._keras.from_keras`."""
    from ._keras import from_keras as f
    return f(layer, **kwargs)


def from_onnx(model_or_path, **kwargs):
    """See :func:`fastrnn.interop._onnx.from_onnx`."""
    from ._onnx import from_onnx as f
    return f(model_or_path, **kwargs)


def onnx_inputs(layer, x, sequence_lens=None, initial_h=None, initial_c=None):
    """See :func:`fastrnn.interop._onnx.onnx_inputs`."""
    from ._onnx import onnx_inputs as f
    return f(layer, x, sequence_lens, initial_h, initial_c)


def onnx_outputs(layer, out, h_n):
    """See :func:`fastrnn.interop._onnx.onnx_outputs`."""
    from ._onnx import onnx_outputs as f
    return f(layer, out, h_n)


def to_onnx(model, path=None, **kwargs):
    """See :func:`fastrnn.interop._onnx.to_onnx`."""
    from ._onnx import to_onnx as f
    return f(model, path, **kwargs)


__all__ = ["from_torch", "to_torch", "from_keras", "from_onnx", "onnx_inputs", "onnx_outputs",
           "to_onnx"]
