"""ONNX RNN, LSTM and GRU nodes to fastrnn layers, and fastrnn layers to ONNX graphs.

ONNX's conventions (opset 14+), mapped here once:

* W (D, G, I), R (D, G, H), B (D, 2G) = [Wb, Rb] per direction;
  gates LSTM i, o, f, c and GRU z, r, h (:data:`fastrnn.interop._gates.ONNX`).
* ``direction``: forward, reverse (fastrnn ``reverse=True``) or bidirectional.
* GRU ``linear_before_reset=1`` is fastrnn's (and torch's) ``reset_after=True``;
  the ONNX default 0 is ``reset_after=False``.
* ``layout=0``: X (T, B, I), Y (T, D, B, H), Y_h (D, B, H); ``layout=1``:
  X (B, T, I), Y (B, T, D, H), Y_h (B, D, H).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import layers
from ._gates import ONNX as PERM, cell_of, family, from_torch_order, is_cell, to_torch_order

_OPS = {"RNN": "rnn", "LSTM": "lstm", "GRU": "gru"}
_DEFAULT_ACTIVATIONS = {"lstm": ["sigmoid", "tanh", "tanh"], "gru": ["sigmoid", "tanh"],
                        "rnn": ["tanh"]}
_GATES = {"rnn": 1, "lstm": 4, "gru": 3}
_ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}


def _load(model_or_path):
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        return onnx.load(os.fspath(model_or_path))
    raise TypeError(f"model_or_path must be an onnx.ModelProto or a path, got "
                    f"{type(model_or_path).__name__}")


def _constants(graph):
    """Arrays of the graph's initializers and Constant nodes, by name."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
    return values


def _parse(node, name, constants):
    """(cell, layer kwargs, state dict) for one RNN/LSTM/GRU node; raises naming what fails."""
    kind = _OPS[node.op_type]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    where = f"node {name!r} ({node.op_type})"

    def text(v):
        return v.decode() if isinstance(v, bytes) else str(v)

    direction = text(attrs.get("direction", "forward"))
    if direction not in ("forward", "reverse", "bidirectional"):
        raise ValueError(f"{where}: attribute direction={direction!r} is not one of "
                         f"'forward', 'reverse', 'bidirectional'")
    if "clip" in attrs:
        raise ValueError(f"{where}: attribute clip={attrs['clip']} (cell clipping) is not "
                         f"supported by fastrnn")
    if attrs.get("input_forget", 0):
        raise ValueError(f"{where}: attribute input_forget=1 (coupled input and forget "
                         f"gates) is not supported by fastrnn")
    layout = int(attrs.get("layout", 0))
    if layout not in (0, 1):
        raise ValueError(f"{where}: attribute layout={layout} must be 0 or 1")
    inputs = list(node.input) + [""] * 8

    def const(i, label):
        key = inputs[i]
        if key not in constants:
            raise ValueError(f"{where}: input {label} ({key!r}) must be an initializer or a "
                             f"Constant: fastrnn needs the weights when the layer is built")
        return constants[key]

    W, R = const(1, "W"), const(2, "R")
    Bias = const(3, "B") if inputs[3] else None
    if kind == "lstm" and inputs[7]:
        P = const(7, "P")
        if np.any(P != 0):
            raise ValueError(f"{where}: input P (peephole weights) is not supported by "
                             f"fastrnn (only all-zero P is)")
    D = 2 if direction == "bidirectional" else 1
    n = _GATES[kind]
    if W.ndim != 3 or W.shape[0] != D or W.shape[1] % n:
        raise ValueError(f"{where}: input W has shape {W.shape}, expected "
                         f"({D}, {n}*hidden_size, input_size) for direction={direction!r}")
    H, I = W.shape[1] // n, W.shape[2]
    if "hidden_size" in attrs and int(attrs["hidden_size"]) != H:
        raise ValueError(f"{where}: attribute hidden_size={attrs['hidden_size']} does not "
                         f"match W of shape {W.shape}")
    if R.shape != (D, n * H, H):
        raise ValueError(f"{where}: input R has shape {R.shape}, expected {(D, n * H, H)}")
    if Bias is not None and Bias.shape != (D, 2 * n * H):
        raise ValueError(f"{where}: input B has shape {Bias.shape}, expected "
                         f"{(D, 2 * n * H)}")
    dtype = np.dtype(W.dtype)
    if dtype not in _ELEM:
        raise TypeError(f"{where}: weights of dtype {dtype}; fastrnn supports float32 and "
                        f"float64")
    acts = [text(a).lower() for a in attrs.get("activations", [])] or \
        _DEFAULT_ACTIVATIONS[kind] * D
    per = len(_DEFAULT_ACTIVATIONS[kind])
    if len(acts) != per * D:
        raise ValueError(f"{where}: attribute activations has {len(acts)} entries, expected "
                         f"{per * D}")
    cell = kind
    if kind == "rnn" and acts in (["tanh"] * D, ["relu"] * D):
        cell = f"rnn_{acts[0]}"
    elif acts != _DEFAULT_ACTIVATIONS[kind] * D:
        allowed = "Tanh or Relu (the same for both directions)" if kind == "rnn" else \
            ", ".join(a.capitalize() for a in _DEFAULT_ACTIVATIONS[kind])
        raise ValueError(f"{where}: attribute activations={acts} is not supported; fastrnn "
                         f"computes {allowed}")
    kwargs = {"bias": Bias is not None, "batch_first": layout == 1,
              "bidirectional": D == 2, "reverse": direction == "reverse", "dtype": dtype}
    if kind == "rnn":
        kwargs["nonlinearity"] = cell[4:]
    if kind == "gru":
        kwargs["reset_after"] = bool(attrs.get("linear_before_reset", 0))
    perm = PERM[kind]
    G = n * H
    state = {}
    for d in range(D):
        sfx = "_reverse" if d else ""
        state[f"weight_ih_l0{sfx}"] = to_torch_order(W[d], perm)
        state[f"weight_hh_l0{sfx}"] = to_torch_order(R[d], perm)
        if Bias is not None:
            state[f"bias_ih_l0{sfx}"] = to_torch_order(Bias[d, :G], perm)
            state[f"bias_hh_l0{sfx}"] = to_torch_order(Bias[d, G:], perm)
    return cell, I, H, kwargs, state


def from_onnx(model_or_path, *, backend="auto"):
    """``{node_name: fastrnn layer}`` for every RNN, LSTM and GRU node of an ONNX model.

    Nodes without a name are called ``"{op_type}_{index}"`` (index in the
    graph's node list). Each layer has one layer, the node's direction
    (``reverse=True`` for ``direction="reverse"``), ``batch_first`` for
    ``layout=1``, the weights' dtype and ``bias=False`` when B is absent.
    Run it on ONNX-shaped inputs with :func:`onnx_inputs`; convert its
    outputs with :func:`onnx_outputs`.

    Everything is checked before any layer is built: W, R (and B, P) must
    be initializers or Constants; ``clip``, ``input_forget=1``, non-zero
    peepholes ``P`` and activations other than the defaults (RNN: Tanh or
    Relu) raise ValueError naming the node and the attribute.
    """
    model = _load(model_or_path)
    constants = _constants(model.graph)
    parsed = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type in _OPS and node.domain in ("", "ai.onnx"):
            name = node.name or f"{node.op_type}_{i}"
            parsed[name] = _parse(node, name, constants)
    result = {}
    for name, (cell, I, H, kwargs, state) in parsed.items():
        cls = {"lstm": layers.LSTM, "gru": layers.GRU}.get(family(cell), layers.RNN)
        layer = cls(I, H, backend=backend, seed=0, **kwargs)
        layer.load_state_dict(state)
        result[name] = layer
    return result


def onnx_inputs(layer, x, sequence_lens=None, initial_h=None, initial_c=None):
    """The keyword arguments of ``layer(**kw)`` for an ONNX node's inputs.

    ``x`` is the node's X (layout 0: (T, B, I); layout 1: (B, T, I), which
    :func:`from_onnx` made ``batch_first``); ``sequence_lens`` (B,) becomes
    ``lengths``; ``initial_h``/``initial_c`` ((D, B, H), or (B, D, H) for
    layout 1) become ``hx`` (a missing one of the LSTM pair is zeros).
    Returns ``{"x": ..., "hx": ..., "lengths": ...}``.
    """
    cell = cell_of(layer)
    if initial_c is not None and cell != "lstm":
        raise ValueError(f"initial_c is only an input of an LSTM node, not of a {cell} layer")

    def state(s):
        if s is None:
            return None
        s = np.asarray(s)
        if s.ndim != 3:
            raise ValueError(f"initial states must have 3 dimensions, got shape {s.shape}")
        return np.ascontiguousarray(s.transpose(1, 0, 2)) if layer.batch_first else s

    hx = state(initial_h)
    if cell == "lstm" and (initial_h is not None or initial_c is not None):
        c = state(initial_c)
        ref = hx if hx is not None else c
        zero = np.zeros_like(ref)
        hx = (zero if hx is None else hx, zero if c is None else c)
    lengths = None if sequence_lens is None else np.asarray(sequence_lens)
    return {"x": np.asarray(x), "hx": hx, "lengths": lengths}


def onnx_outputs(layer, out, h_n):
    """fastrnn's ``out, h_n`` as the ONNX node's ``Y, Y_h`` (LSTM: ``Y, Y_h, Y_c``).

    Layout 0 (``batch_first=False``): Y (T, D, B, H), Y_h (D, B, H); layout 1:
    Y (B, T, D, H), Y_h (B, D, H). For one-layer batched layers only (what
    :func:`from_onnx` builds).
    """
    D, H = layer.num_directions, layer.hidden_size
    states = h_n if isinstance(h_n, tuple) else (h_n,)
    out = np.asarray(out)
    if out.ndim != 3:
        raise ValueError(f"out must have 3 dimensions (batched), got shape {out.shape}")
    a, b = out.shape[:2]
    if layer.batch_first:
        Y = out.reshape(a, b, D, H)
        finals = tuple(np.asarray(s).transpose(1, 0, 2) for s in states)
    else:
        Y = out.reshape(a, b, D, H).transpose(0, 2, 1, 3)
        finals = tuple(np.asarray(s) for s in states)
    return (Y,) + finals


def to_onnx(model, path=None, *, sequence_lens=False, initial_state=False, opset=17):
    """An ONNX model computing a fastrnn RNN, LSTM or GRU layer; written to ``path`` if given.

    Graph inputs: ``X`` (the layer's input layout: (T, B, I), or (B, T, I)
    with ``batch_first``), then with ``sequence_lens=True`` ``sequence_lens``
    (int32 (B,)), with ``initial_state=True`` ``initial_h`` (and ``initial_c``)
    (L*D, B, H). Outputs ``Y`` (fastrnn's ``out`` layout), ``h_n`` (and
    ``c_n``), (L*D, B, H). One ONNX node per layer; T and B are dynamic.

    The model has the layer's dtype; ONNX Runtime's CPU kernels run float32
    only (export ``layer.copy(dtype=np.float32)``).

    Difference: a sequence of length 0 gives ``h_n = h0`` in fastrnn and
    zeros in ONNX Runtime (the same only when the initial state is zero).
    Returns the ``onnx.ModelProto``.
    """
    cell = cell_of(model)
    if is_cell(model):
        raise TypeError(f"model must be a fastrnn RNN, LSTM or GRU layer, got "
                        f"{type(model).__name__}")
    if any(getattr(model, "_zoneout", ())):
        raise ValueError(f"zoneout={model.zoneout!r}: ONNX's {cell_of(model).upper()} has no "
                         f"zoneout (it changes eval mode too)")
    kind = family(cell)
    op = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}[kind]
    dtype = np.dtype(model.dtype)
    elem = _ELEM[dtype]
    L, D, H = model.num_layers, model.num_directions, model.hidden_size
    perm = PERM[kind]
    params = {k: np.asarray(v.get() if hasattr(v, "get") else v)
              for k, v in model.state_dict().items()}
    direction = "bidirectional" if D == 2 else ("reverse" if model.reverse else "forward")
    S = 2 if kind == "lstm" else 1

    inputs = [helper.make_tensor_value_info(
        "X", elem, ["B", "T", model.input_size] if model.batch_first
        else ["T", "B", model.input_size])]
    if sequence_lens:
        inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["B"]))
    state_names = ("initial_h", "initial_c")[:S]
    if initial_state:
        inputs += [helper.make_tensor_value_info(s, elem, [L * D, "B", H]) for s in state_names]
    nodes, inits = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    const("reshape_tbd", np.array([0, 0, -1], dtype=np.int64))
    if initial_state:
        const("axis0", np.array([0], dtype=np.int64))
    cur = "X"
    if model.batch_first:
        nodes.append(helper.make_node("Transpose", ["X"], ["X_tbi"], perm=[1, 0, 2]))
        cur = "X_tbi"
    finals = [[] for _ in range(S)]
    for layer in range(L):
        sfx = ("", "_reverse")[:D]
        W = np.stack([from_torch_order(params[f"weight_ih_l{layer}{s}"], perm) for s in sfx])
        R = np.stack([from_torch_order(params[f"weight_hh_l{layer}{s}"], perm) for s in sfx])
        node_in = [cur, const(f"W_l{layer}", W), const(f"R_l{layer}", R)]
        if model.bias:
            Bias = np.stack([np.concatenate([
                from_torch_order(params[f"bias_ih_l{layer}{s}"], perm),
                from_torch_order(params[f"bias_hh_l{layer}{s}"], perm)]) for s in sfx])
            node_in.append(const(f"B_l{layer}", Bias))
        else:
            node_in.append("")
        node_in.append("sequence_lens" if sequence_lens else "")
        if initial_state:
            const(f"start_l{layer}", np.array([layer * D], dtype=np.int64))
            const(f"end_l{layer}", np.array([(layer + 1) * D], dtype=np.int64))
        for s in state_names:
            if initial_state:
                nodes.append(helper.make_node(
                    "Slice", [s, f"start_l{layer}", f"end_l{layer}", "axis0"],
                    [f"{s}_l{layer}"]))
                node_in.append(f"{s}_l{layer}")
            else:
                node_in.append("")
        outs = [f"Y_l{layer}", f"Y_h_l{layer}", f"Y_c_l{layer}"][:1 + S]
        attrs = {"hidden_size": H, "direction": direction}
        if kind == "gru":
            attrs["linear_before_reset"] = int(model.reset_after)
        if kind == "rnn":
            attrs["activations"] = ["Relu" if cell == "rnn_relu" else "Tanh"] * D
        nodes.append(helper.make_node(op, node_in, outs, name=f"{op.lower()}_l{layer}", **attrs))
        for f, o in zip(finals, outs[1:]):
            f.append(o)
        # Y (T, D, B, H) -> (T, B, D, H) -> (T, B, D*H): the next layer's input.
        nodes.append(helper.make_node("Transpose", [outs[0]], [f"Y_tbdh_l{layer}"],
                                      perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [f"Y_tbdh_l{layer}", "reshape_tbd"],
                                      [f"Y_tbh_l{layer}"]))
        cur = f"Y_tbh_l{layer}"
    if model.batch_first:
        nodes.append(helper.make_node("Transpose", [cur], ["Y"], perm=[1, 0, 2]))
    else:
        nodes.append(helper.make_node("Identity", [cur], ["Y"]))
    out_names = ("h_n", "c_n")[:S]
    for f, name in zip(finals, out_names):
        nodes.append(helper.make_node("Concat", f, [name], axis=0) if L > 1
                     else helper.make_node("Identity", f, [name]))
    y_shape = ["B", "T", D * H] if model.batch_first else ["T", "B", D * H]
    outputs = [helper.make_tensor_value_info("Y", elem, y_shape)]
    outputs += [helper.make_tensor_value_info(n, elem, [L * D, "B", H]) for n in out_names]
    graph = helper.make_graph(nodes, f"fastrnn_{cell}", inputs, outputs, inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                   producer_name="fastrnn")
    onnx_model.ir_version = 8
    onnx.checker.check_model(onnx_model)
    if path is not None:
        onnx.save(onnx_model, os.fspath(path))
    return onnx_model
