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


def release_buffers():
    """Free the idle memory blocks the numba backend keeps for its large buffers (gate
    caches, states, gradients: :mod:`fastrnn.backends._workspace`, at most 512 MB idle),
    e.g. after training. Blocks still in use return to the pool when their arrays die.
    Returns the bytes freed."""
    from .backends import _workspace
    return _workspace.clear()


__all__ = ["RNN", "LSTM", "GRU", "gradcheck", "GradcheckReport", "backends", "warmup",
           "release_buffers", "__version__"]
__all__ += ["RNNCell", "LSTMCell", "GRUCell", "attention", "make_layer", "make_cell"]
__all__ += ["Linear", "Embedding", "losses", "optim", "tbptt", "truncated_bptt", "diagnostics",
            "clip_grad_norm_", "clip_grad_value_"]


# Interop (docs/interop.md): fastrnn.interop imports no framework; each function
# imports its own when called.
from .interop import from_keras, from_onnx, from_torch, onnx_inputs, to_onnx  # noqa: E402


__all__ += ["from_torch", "from_keras", "from_onnx", "onnx_inputs", "to_onnx",
            "LayerNormLSTM", "LayerNormGRU"]
