"""PyTorch modules to fastrnn layers and cells, and back."""

from __future__ import annotations

import numpy as np
import torch

from .. import cells, layers
from ._gates import cell_of, is_cell

_LAYERS = {"RNN_TANH": (layers.RNN, {"nonlinearity": "tanh"}),
           "RNN_RELU": (layers.RNN, {"nonlinearity": "relu"}),
           "LSTM": (layers.LSTM, {}), "GRU": (layers.GRU, {})}
_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _dtype_of(module):
    dtypes = {p.dtype for p in module.parameters()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
        raise TypeError(f"the module's parameters have dtype {sorted(map(str, dtypes))}; "
                        f"fastrnn supports float32 or float64 (call .float() or .double())")
    return _DTYPES[dtypes.pop()]


def _host_state_dict(module):
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def from_torch(module, *, backend="auto", ignore_dropout=False):
    """The fastrnn layer or cell equivalent to a ``torch.nn`` recurrent module.

    Takes ``torch.nn.RNN``, ``LSTM``, ``GRU`` (and their ``fastrnn.torch``
    subclasses) or ``torch.nn.RNNCell``, ``LSTMCell``, ``GRUCell``; returns
    ``fastrnn.RNN/LSTM/GRU`` or the matching cell with copies of the weights,
    the same options and dtype, on ``backend`` (move it with ``.to("cuda")``).

    ``dropout`` (between layers) and ``proj_size`` (LSTM projections) carry over;
    ``ignore_dropout=True`` sets dropout to 0 (exact at inference). Raises
    TypeError for another class or a dtype other than float32/float64.
    """
    if isinstance(module, torch.nn.RNNBase):
        if module.mode not in _LAYERS:
            raise TypeError(f"unsupported torch RNN mode {module.mode!r}")
        cls, extra = _LAYERS[module.mode]
        if module.mode == "GRU":
            extra = {"reset_after": getattr(module, "reset_after", True)}
        if getattr(module, "proj_size", 0):
            extra = {**extra, "proj_size": module.proj_size}
        if module.dropout and not ignore_dropout and module.num_layers > 1:
            extra = {**extra, "dropout": float(module.dropout)}
        layer = cls(module.input_size, module.hidden_size, module.num_layers, **extra,
                    bias=module.bias, batch_first=module.batch_first,
                    bidirectional=module.bidirectional, backend=backend,
                    dtype=_dtype_of(module), seed=0)
    elif isinstance(module, torch.nn.RNNCellBase):
        kind = type(module).__name__
        extra = {}
        if isinstance(module, torch.nn.RNNCell):
            cls, extra = cells.RNNCell, {"nonlinearity": module.nonlinearity}
        elif isinstance(module, torch.nn.LSTMCell):
            cls = cells.LSTMCell
        elif isinstance(module, torch.nn.GRUCell):
            cls = cells.GRUCell
        else:
            raise TypeError(f"unsupported torch cell class {kind}")
        layer = cls(module.input_size, module.hidden_size, module.bias, **extra,
                    backend=backend, dtype=_dtype_of(module), seed=0)
    else:
        raise TypeError(f"module must be a torch.nn.RNN, LSTM, GRU, RNNCell, LSTMCell or "
                        f"GRUCell, got {type(module).__name__}")
    layer.load_state_dict(_host_state_dict(module))
    return layer


def to_torch(layer, *, fused=False):
    """A torch module equivalent to a fastrnn layer or cell (weights copied, same dtype).

    ``fused=False`` gives ``torch.nn.RNN/LSTM/GRU`` (or the ``*Cell``);
    ``fused=True`` gives ``fastrnn.torch.RNN/LSTM/GRU``, which run fastrnn's
    kernels and can also hold a GRU with ``reset_after=False``. Raises
    ValueError naming ``reverse`` (torch has no reverse-only layer),
    ``reset_after`` (False, with ``fused=False``) or ``zoneout``.
    """
    cell = cell_of(layer)
    dtype = torch.float64 if layer.dtype == np.float64 else torch.float32
    cell_like = is_cell(layer)
    if any(getattr(layer, "_zoneout", ())):
        raise ValueError(f"zoneout={layer.zoneout!r} has no torch equivalent (it changes eval "
                         f"mode too); to export the weights alone, load its state_dict into a layer without zoneout")
    if cell == "gru" and not layer.reset_after and not (fused and not cell_like):
        raise ValueError("reset_after=False has no torch.nn equivalent; use "
                         "to_torch(layer, fused=True) for a layer (fastrnn.torch.GRU)")
    extra = {"nonlinearity": layer.nonlinearity} if cell.startswith("rnn") else {}
    if cell_like:
        if fused:
            raise ValueError("fused=True is for layers; fastrnn.torch has no cells")
        cls = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}.get(cell, torch.nn.RNNCell)
        module = cls(layer.input_size, layer.hidden_size, layer.bias, **extra, dtype=dtype)
    else:
        if layer.reverse:
            raise ValueError("reverse=True has no torch equivalent (torch runs a reverse "
                             "direction only inside bidirectional=True)")
        if fused:
            from .. import torch as fused_torch
            cls = {"lstm": fused_torch.LSTM, "gru": fused_torch.GRU}.get(cell, fused_torch.RNN)
            if cell == "gru":
                extra = {"reset_after": layer.reset_after}
            backend = layer.backend if layer.backend != "cuda" else "auto"
            extra["backend"] = backend
        else:
            cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(cell, torch.nn.RNN)
        if getattr(layer, "proj_size", 0):
            extra["proj_size"] = layer.proj_size
        module = cls(layer.input_size, layer.hidden_size, layer.num_layers, bias=layer.bias,
                     batch_first=layer.batch_first, bidirectional=layer.bidirectional,
                     dropout=getattr(layer, "dropout", 0.0), dtype=dtype, **extra)
    state = {k: torch.from_numpy(np.asarray(v.get() if hasattr(v, "get") else v))
             for k, v in layer.state_dict().items()}
    module.load_state_dict(state)
    return module
