"""fastrnn: fused RNN, LSTM and GRU kernels (forward and BPTT) for NumPy pipelines.

Layers follow ``torch.nn.RNN/LSTM/GRU`` (argument names, parameter names and
shapes, gate order); kernels run on the ``numpy`` reference, ``numba`` (CPU)
or ``cuda`` backends, which share one contract (:mod:`fastrnn.backends`).
"""

from . import backends
from .gradcheck import GradcheckReport, gradcheck
from .layers import GRU, LSTM, RNN, make_layer
from .layernorm import LayerNormGRU, LayerNormLSTM  # noqa: F401
from . import attention
from .cells import GRUCell, LSTMCell, RNNCell, make_cell
from . import diagnostics, losses, optim, tbptt
from .clip import clip_grad_norm_, clip_grad_value_
from .nn import Embedding, Linear
from .tbptt import truncated_bptt

__version__ = "0.1.0"   # the one place: pyproject.toml reads it from here


def warmup(backend="auto", dtypes=("float32", "float64"), cells=None):
    """Compile (or load from the on-disk cache) a backend's kernels now.

    The numba backend compiles on first use and caches the machine code
    (``NUMBA_CACHE_DIR`` moves the cache); calling this at start-up takes
    that cost out of the first real call. Other backends have nothing to do.
    Returns the name of the backend warmed up.
    """
    b = backends.get(backend)
    if hasattr(b.module, "warmup"):
        b.module.warmup(dtypes=dtypes, cells=cells)
    return b.name

__all__ = ["RNN", "LSTM", "GRU", "gradcheck", "GradcheckReport", "backends", "warmup",
           "__version__"]
__all__ += ["RNNCell", "LSTMCell", "GRUCell", "attention", "make_layer", "make_cell"]
__all__ += ["Linear", "Embedding", "losses", "optim", "tbptt", "truncated_bptt", "diagnostics",
            "clip_grad_norm_", "clip_grad_value_"]


# Interop (docs/interop.md): each function imports its framework only when called.

def from_torch(module, **kwargs):
    """The fastrnn layer or cell equivalent to a ``torch.nn`` RNN/LSTM/GRU (or ``*Cell``)."""
    from .interop import from_torch as f
    return f(module, **kwargs)


def from_keras(layer, **kwargs):
    """The fastrnn layer equivalent to a Keras SimpleRNN/LSTM/GRU or Bidirectional layer."""
    from .interop import from_keras as f
    return f(layer, **kwargs)


def from_onnx(model_or_path, **kwargs):
    """``{node_name: layer}`` for every RNN, LSTM and GRU node of an ONNX model."""
    from .interop import from_onnx as f
    return f(model_or_path, **kwargs)


def onnx_inputs(layer, x, sequence_lens=None, initial_h=None, initial_c=None):
    """``layer(**kw)`` arguments from an ONNX node's X, sequence_lens and initial states."""
    from .interop import onnx_inputs as f
    return f(layer, x, sequence_lens, initial_h, initial_c)


def to_onnx(model, path=None, **kwargs):
    """An ONNX model (``onnx.ModelProto``) of a fastrnn layer, written to ``path`` if given."""
    from .interop import to_onnx as f
    return f(model, path, **kwargs)


__all__ += ["from_torch", "from_keras", "from_onnx", "onnx_inputs", "to_onnx"]
