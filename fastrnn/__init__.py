"""fastrnn: fused RNN, LSTM and GRU kernels (forward and BPTT) for NumPy pipelines.

Layers follow ``torch.nn.RNN/LSTM/GRU`` (argument names, parameter names and
shapes, gate order); kernels run on the ``numpy`` reference, ``numba`` (CPU)
or ``cuda`` backends, which share one contract (:mod:`fastrnn.backends`).
"""

from . import backends
from .gradcheck import GradcheckReport, gradcheck
from .layers import GRU, LSTM, RNN
from . import attention
from .cells import GRUCell, LSTMCell, RNNCell
from . import diagnostics, losses, optim, tbptt
from .clip import clip_grad_norm_, clip_grad_value_
from .nn import Embedding, Linear
from .tbptt import truncated_bptt

__version__ = "0.1.0"

__all__ = ["RNN", "LSTM", "GRU", "gradcheck", "GradcheckReport", "backends", "__version__"]
__all__ += ["RNNCell", "LSTMCell", "GRUCell", "attention"]
__all__ += ["Linear", "Embedding", "losses", "optim", "tbptt", "truncated_bptt", "diagnostics",
            "clip_grad_norm_", "clip_grad_value_"]
