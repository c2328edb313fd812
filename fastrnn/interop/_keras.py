"""Keras 3 recurrent layers (any backend) to fastrnn layers.

Keras' conventions, mapped here once: kernels are (I, G) and recurrent
kernels (H, G), i.e. transposed; gates LSTM i, f, c, o (torch's order) and
GRU z, r, h (:data:`fastrnn.interop._gates.KERAS`); one bias (G,) that
acts as ``b_ih`` (``b_hh = 0``), except the GRU with ``reset_after=True``,
whose bias (2, G) is ``[b_ih, b_hh]``. Inputs are batch-major: the layers
come back with ``batch_first=True``.
"""

from __future__ import annotations

import numpy as np

from .. import layers
from ._gates import KERAS as PERM, to_torch_order

_DTYPES = {"float32": np.float32, "float64": np.float64}


def _keras():
    import keras
    return keras


def _parse(layer, ignore_dropout, where):
    """(cls, constructor kwargs, {name suffix-less: array}, go_backwards) of one layer."""
    keras = _keras()
    kinds = ((keras.layers.LSTM, "lstm"), (keras.layers.GRU, "gru"),
             (keras.layers.SimpleRNN, "rnn"))
    kind = next((k for cls, k in kinds if isinstance(layer, cls)), None)
    if kind is None:
        raise TypeError(f"{where} must be a keras.layers.SimpleRNN, LSTM, GRU or a "
                        f"Bidirectional around one, got {type(layer).__name__}")
    if not layer.built:
        raise ValueError(f"{where} is not built: call it once, or layer.build(input_shape), "
                         f"so that its weights exist")
    cfg = layer.get_config()
    activation = cfg.get("activation")
    if kind == "rnn":
        if activation not in ("tanh", "relu"):
            raise ValueError(f"{where}: activation={activation!r} is not supported; fastrnn's "
                             f"SimpleRNN equivalent computes 'tanh' or 'relu'")
    else:
        if activation != "tanh":
            raise ValueError(f"{where}: activation={activation!r} is not supported; fastrnn "
                             f"computes 'tanh'")
        if cfg.get("recurrent_activation") != "sigmoid":
            raise ValueError(f"{where}: recurrent_activation="
                             f"{cfg.get('recurrent_activation')!r} is not supported; fastrnn "
                             f"computes 'sigmoid'")
    for option in ("dropout", "recurrent_dropout"):
        if cfg.get(option, 0) and not ignore_dropout:
            raise ValueError(f"{where}: {option}={cfg[option]} is not supported by fastrnn; "
                             f"pass ignore_dropout=True to drop it (exact at inference)")
    dtype = _DTYPES.get(str(layer.dtype))
    if dtype is None:
        raise TypeError(f"{where}: dtype={layer.dtype!r}; fastrnn supports float32 and "
                        f"float64")
    cell = layer.cell

    def numpy(variable):   # through the backend tensor: works with every Keras backend
        return np.asarray(keras.ops.convert_to_numpy(variable.value))

    kernel, recurrent = numpy(cell.kernel), numpy(cell.recurrent_kernel)
    H = recurrent.shape[0]
    perm = PERM[kind]
    state = {"weight_ih": to_torch_order(kernel.T, perm),
             "weight_hh": to_torch_order(recurrent.T, perm)}
    use_bias = bool(cfg.get("use_bias", True))
    kwargs = {"bias": use_bias, "dtype": dtype}
    if kind == "rnn":
        kwargs["nonlinearity"] = activation
    if kind == "gru":
        kwargs["reset_after"] = bool(cfg.get("reset_after", True))
    if use_bias:
        b = numpy(cell.bias)
        if kind == "gru" and kwargs["reset_after"]:
            b_ih, b_hh = b[0], b[1]
        else:
            b_ih, b_hh = b, np.zeros_like(b)
        state["bias_ih"], state["bias_hh"] = to_torch_order(b_ih, perm), to_torch_order(b_hh, perm)
    cls = {"lstm": layers.LSTM, "gru": layers.GRU}.get(kind, layers.RNN)
    return cls, kernel.shape[0], H, kwargs, state, bool(cfg.get("go_backwards", False))


def from_keras(layer, *, backend="auto", ignore_dropout=False):
    """The fastrnn layer equivalent to a Keras ``SimpleRNN``, ``LSTM``, ``GRU`` or
    ``Bidirectional`` around one (Keras 3, any backend).

    Returns a one-layer ``fastrnn.RNN/LSTM/GRU`` with ``batch_first=True``,
    the weights copied, the layer's dtype, GRU ``reset_after`` as in Keras,
    and ``reverse=True`` for ``go_backwards=True``. Keras returns a
    ``go_backwards`` layer's sequence output in processing order, i.e.
    flipped in time: fastrnn's ``out[:, ::-1]`` is Keras' output, while
    ``h_n`` is Keras' final state as it is. A ``Bidirectional`` layer
    (``merge_mode="concat"``) becomes ``bidirectional=True``, the backward
    layer's weights under the ``_reverse`` names; its outputs are Keras'.

    Masks: fastrnn's ``lengths`` is a right-padded Keras mask,
    ``lengths = mask.sum(1)``: the final states agree, and the sequence
    outputs agree with ``zero_output_for_mask=True`` (fastrnn outputs 0 at
    padded steps; Keras' default repeats the previous output there).

    Rejected, naming the option (ValueError, nothing built): activations
    other than Keras' defaults (SimpleRNN: 'tanh' or 'relu'), ``dropout`` or
    ``recurrent_dropout`` unless ``ignore_dropout=True``, another
    ``merge_mode``, unbuilt layers; TypeError for another layer class
    (``keras.layers.RNN(cell)`` included) or a dtype other than
    float32/float64. ``return_sequences``, ``return_state``, ``unroll`` and
    ``stateful`` change what Keras returns or keeps, not what is computed:
    fastrnn always returns ``out, h_n``, and a stateful layer's state is the
    ``hx`` you pass.
    """
    keras = _keras()
    if isinstance(layer, keras.layers.Bidirectional):
        if layer.merge_mode != "concat":
            raise ValueError(f"merge_mode={layer.merge_mode!r} is not supported: fastrnn's "
                             f"bidirectional output is the concatenation (merge_mode='concat')")
        fwd = _parse(layer.forward_layer, ignore_dropout, "forward_layer")
        bwd = _parse(layer.backward_layer, ignore_dropout, "backward_layer")
        if fwd[5] or not bwd[5]:
            raise ValueError("go_backwards: the forward layer of a Bidirectional must run "
                             "forward and the backward layer backward")
        if (fwd[0], fwd[1], fwd[2], fwd[3]) != (bwd[0], bwd[1], bwd[2], bwd[3]):
            raise ValueError(f"backward_layer must have the forward layer's class and options "
                             f"to form one fastrnn layer; got {fwd[3]} and {bwd[3]}")
        cls, I, H, kwargs, state, _ = fwd
        state = dict(state, **{k + "_reverse": v for k, v in bwd[4].items()})
        options = {"bidirectional": True}
    else:
        cls, I, H, kwargs, state, go_backwards = _parse(layer, ignore_dropout, "layer")
        options = {"reverse": go_backwards}
    model = cls(I, H, **kwargs, **options, batch_first=True, backend=backend, seed=0)
    model.load_state_dict({k.replace("_reverse", "") + "_l0" + ("_reverse" if
                           k.endswith("_reverse") else ""): v for k, v in state.items()})
    return model
