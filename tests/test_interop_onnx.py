"""fastrnn.from_onnx / onnx_inputs / to_onnx against ONNX Runtime (the oracle)."""

import io
import warnings

import numpy as np
import pytest

import fastrnn
from fastrnn.interop import onnx_outputs
from conftest import random_lengths, require, torch_or_skip


def onnx_or_skip():
    return require("onnx", "onnxruntime")


def session(ort, model):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


GATES = {"RNN": 1, "LSTM": 4, "GRU": 3}


def onnx_node_model(onnx, op, I, H, *, direction="forward", layout=0, bias=True, attrs=None,
                    seed=0, extra_inputs=None):
    """A one-node ONNX model with random weights in ONNX's own layout and gate order.

    Graph inputs X, sequence_lens, initial_h (and initial_c); outputs Y, Y_h (Y_c).
    """
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    D = 2 if direction == "bidirectional" else 1
    G = GATES[op] * H
    inits = [numpy_helper.from_array(rng.uniform(-0.6, 0.6, (D, G, I)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.uniform(-0.6, 0.6, (D, G, H)).astype(np.float32), "R")]
    if bias:
        inits.append(numpy_helper.from_array(rng.uniform(-0.6, 0.6, (D, 2 * G))
                                             .astype(np.float32), "B"))
    states = ["initial_h"] + (["initial_c"] if op == "LSTM" else [])
    node_in = ["X", "W", "R", "B" if bias else "", "sequence_lens"] + states
    for name, array in (extra_inputs or {}).items():   # e.g. P
        inits.append(numpy_helper.from_array(array, name))
        node_in += [""] * (7 - len(node_in)) + [name]
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    node = helper.make_node(op, node_in, outs, name="rnn0", hidden_size=H, direction=direction,
                            layout=layout, **(attrs or {}))
    tb = ["B", "T"] if layout else ["T", "B"]
    st = ["B", D, H] if layout else [D, "B", H]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, tb + [I]),
              helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["B"])]
    inputs += [helper.make_tensor_value_info(s, TensorProto.FLOAT, st) for s in states]
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs]
    graph = helper.make_graph([node], "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


NODE_CASES = [("LSTM", {}), ("GRU", {}), ("GRU", {"linear_before_reset": 1}),
              ("RNN", {}), ("RNN", {"activations": ["Relu"]})]


LAYOUTS = [("forward", 0, True), ("reverse", 0, True), ("reverse", 1, True),
           ("bidirectional", 0, False), ("bidirectional", 1, True)]


@pytest.mark.parametrize("op,attrs,direction,layout,bias", [
    (op, attrs, *case) for op, attrs in NODE_CASES for case in LAYOUTS
    # layout=1 runs on onnx's reference evaluator, which has no RNN Relu.
    if not (case[1] and "activations" in attrs)])
def test_from_onnx_matches_onnxruntime(backend, op, attrs, direction, layout, bias):
    onnx, ort = onnx_or_skip()
    I, H, T, B = 3, 4, 6, 3
    if direction == "bidirectional" and "activations" in attrs:
        attrs = {"activations": attrs["activations"] * 2}
    model = onnx_node_model(onnx, op, I, H, direction=direction, layout=layout, bias=bias,
                            attrs=attrs, seed=hash((op, direction, layout)) % 1000)
    layers = fastrnn.from_onnx(model, backend=backend)
    assert list(layers) == ["rnn0"]
    layer = layers["rnn0"].eval()
    assert layer.reverse == (direction == "reverse")
    assert layer.bidirectional == (direction == "bidirectional")
    assert layer.batch_first == bool(layout) and layer.bias == bias
    rng = np.random.default_rng(11)
    D = layer.num_directions
    x = rng.standard_normal((B, T, I) if layout else (T, B, I)).astype(np.float32)
    lens = random_lengths(rng, T, B, allow_zero=False).astype(np.int32)
    if layout:
        lens[:] = T   # the reference evaluator ignores sequence_lens
    states = [rng.standard_normal((B, D, H) if layout else (D, B, H)).astype(np.float32)
              for _ in range(2 if op == "LSTM" else 1)]
    feeds = {"X": x, "sequence_lens": lens, "initial_h": states[0]}
    if op == "LSTM":
        feeds["initial_c"] = states[1]
    if layout:
        # ONNX Runtime rejects layout=1; onnx's own reference evaluator implements it.
        from onnx.reference import ReferenceEvaluator
        expected = ReferenceEvaluator(model).run(None, feeds)
    else:
        expected = session(ort, model).run(None, feeds)
    kw = fastrnn.onnx_inputs(layer, x, lens, *states)
    out, h_n = layer(**kw)
    got = onnx_outputs(layer, out, h_n)
    for name, a, b in zip(["Y", "Y_h", "Y_c"], got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=name)


KINDS = {"rnn_tanh": (fastrnn.RNN, {}), "rnn_relu": (fastrnn.RNN, {"nonlinearity": "relu"}),
         "lstm": (fastrnn.LSTM, {}), "gru": (fastrnn.GRU, {}),
         "gru_reset_before": (fastrnn.GRU, {"reset_after": False})}


def export_cases(seed, n):
    rng = np.random.default_rng(seed)
    names = list(KINDS)
    for i in range(n):
        L = int(rng.integers(1, 3))
        direction = ["forward", "reverse", "bidirectional"][int(rng.integers(3))]
        if direction == "reverse":
            L = 1 if rng.integers(2) else L
        yield (names[i % len(names)], L, direction, bool(rng.integers(2)),
               bool(rng.integers(2)))


@pytest.mark.parametrize("case", list(export_cases(5, 15)))
def test_to_onnx_matches_onnxruntime(tmp_path, case):
    onnx, ort = onnx_or_skip()
    kind, L, direction, bias, batch_first = case
    cls, extra = KINDS[kind]
    layer = cls(3, 4, L, **extra, bias=bias, batch_first=batch_first,
                bidirectional=direction == "bidirectional", reverse=direction == "reverse",
                seed=int(np.random.default_rng(hash(case) % 2**32).integers(1000))).eval()
    rng = np.random.default_rng(21)
    T, B, D, H = 5, 4, layer.num_directions, 4
    x = rng.standard_normal((B, T, 3) if batch_first else (T, B, 3)).astype(np.float32)
    S = 2 if kind == "lstm" else 1
    path = tmp_path / "m.onnx"
    # Without sequence_lens or initial states: X -> Y, h_n (c_n).
    fastrnn.to_onnx(layer, path)
    got = session(ort, onnx.load(path)).run(None, {"X": x})
    out, s_n = layer(x)
    s_n = s_n if S == 2 else (s_n,)
    for name, a, b in zip(["Y", "h_n", "c_n"], (out, *s_n), got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=name)
    # With sequence_lens and initial states (lengths >= 1: see the length-0 test).
    model = fastrnn.to_onnx(layer, sequence_lens=True, initial_state=True)
    lens = random_lengths(rng, T, B, allow_zero=False)
    states = [rng.standard_normal((L * D, B, H)).astype(np.float32) for _ in range(S)]
    feeds = {"X": x, "sequence_lens": lens.astype(np.int32), "initial_h": states[0]}
    if S == 2:
        feeds["initial_c"] = states[1]
    got = session(ort, model).run(None, feeds)
    out, s_n = layer(x, tuple(states) if S == 2 else states[0], lengths=lens)
    s_n = s_n if S == 2 else (s_n,)
    for name, a, b in zip(["Y", "h_n", "c_n"], (out, *s_n), got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=name)
    # Round trip: every node comes back with the layer's weights.
    back = fastrnn.from_onnx(path)
    assert len(back) == L
    for k, node_layer in enumerate(back.values()):
        for name, value in node_layer.state_dict().items():
            np.testing.assert_array_equal(value, layer.params[name.replace("_l0", f"_l{k}")])


def test_length_zero_is_the_documented_difference():
    """ORT gives zeros for a sequence of length 0 where fastrnn gives h0 (docs/interop.md)."""
    onnx, ort = onnx_or_skip()
    layer = fastrnn.GRU(3, 4, seed=1).eval()
    x = np.random.default_rng(2).standard_normal((5, 2, 3)).astype(np.float32)
    h0 = np.full((1, 2, 4), 0.5, dtype=np.float32)
    lens = np.array([5, 0])
    out, h_n = layer(x, h0, lengths=lens)
    got = session(ort, fastrnn.to_onnx(layer, sequence_lens=True, initial_state=True)).run(
        None, {"X": x, "sequence_lens": lens.astype(np.int32), "initial_h": h0})
    np.testing.assert_allclose(got[0], out, rtol=1e-5, atol=2e-6)      # outputs: 0 in both
    np.testing.assert_allclose(got[1][:, 0], h_n[:, 0], rtol=1e-5, atol=2e-6)
    np.testing.assert_array_equal(h_n[:, 1], h0[:, 1])                 # fastrnn: h0
    np.testing.assert_array_equal(got[1][:, 1], 0)                     # ORT: zeros


def reject_cases(onnx):
    P = np.ones((1, 12), dtype=np.float32)
    return [
        (onnx_node_model(onnx, "LSTM", 3, 4, attrs={"clip": 1.0}), ValueError, "clip"),
        (onnx_node_model(onnx, "LSTM", 3, 4, attrs={"input_forget": 1}), ValueError,
         "input_forget"),
        (onnx_node_model(onnx, "LSTM", 3, 4, extra_inputs={"P": P}), ValueError, "P"),
        (onnx_node_model(onnx, "GRU", 3, 4, attrs={"activations": ["Sigmoid", "Relu"]}),
         ValueError, "activations"),
        (onnx_node_model(onnx, "RNN", 3, 4, attrs={"activations": ["Sigmoid"]}), ValueError,
         "activations"),
        (onnx_node_model(onnx, "RNN", 3, 4, direction="bidirectional",
                         attrs={"activations": ["Relu", "Tanh"]}), ValueError, "activations"),
        (onnx_node_model(onnx, "LSTM", 3, 4, direction="sideways"), ValueError,
         "direction"),
    ]


def test_from_onnx_rejections_name_the_attribute(tmp_path):
    onnx, _ = onnx_or_skip()
    for model, exc, word in reject_cases(onnx):
        before = model.SerializeToString()
        with pytest.raises(exc, match=word):
            fastrnn.from_onnx(model)
        assert model.SerializeToString() == before
    model = onnx_node_model(onnx, "GRU", 3, 4)
    next(a for a in model.graph.node[0].attribute if a.name == "hidden_size").i = 5
    with pytest.raises(ValueError, match="hidden_size"):
        fastrnn.from_onnx(model)
    model = onnx_node_model(onnx, "GRU", 3, 4)
    del model.graph.initializer[0]                    # W is no longer a constant
    with pytest.raises(ValueError, match="W"):
        fastrnn.from_onnx(model)
    with pytest.raises(TypeError, match="model_or_path"):
        fastrnn.from_onnx(42)
    # An all-zero P (some exporters write one) is no peephole: accepted.
    zero_p = onnx_node_model(onnx, "LSTM", 3, 4, extra_inputs={"P": np.zeros((1, 12),
                                                                              np.float32)})
    assert isinstance(fastrnn.from_onnx(zero_p)["rnn0"], fastrnn.LSTM)
    # A node without a name is called "{op_type}_{index}".
    unnamed = onnx_node_model(onnx, "RNN", 3, 4)
    unnamed.graph.node[0].name = ""
    assert list(fastrnn.from_onnx(unnamed)) == ["RNN_0"]
    # A path works as well as a ModelProto.
    path = tmp_path / "gru.onnx"
    onnx.save(onnx_node_model(onnx, "GRU", 3, 4), path)
    assert fastrnn.from_onnx(str(path))["rnn0"].reset_after is False


def test_onnx_inputs_and_to_onnx_rejections():
    onnx_or_skip()
    gru = fastrnn.GRU(3, 4)
    with pytest.raises(ValueError, match="initial_c"):
        fastrnn.onnx_inputs(gru, np.zeros((2, 1, 3), np.float32), None, None,
                            np.zeros((1, 1, 4), np.float32))
    with pytest.raises(ValueError, match="initial states"):
        fastrnn.onnx_inputs(gru, np.zeros((2, 1, 3), np.float32), None,
                            np.zeros((1, 4), np.float32))
    with pytest.raises(TypeError, match="layer"):
        fastrnn.to_onnx(fastrnn.GRUCell(3, 4))
    lstm = fastrnn.LSTM(3, 4)
    kw = fastrnn.onnx_inputs(lstm, np.zeros((2, 1, 3), np.float32), [2],
                             np.ones((1, 1, 4), np.float32))
    np.testing.assert_array_equal(kw["hx"][1], 0)     # a missing initial_c is zeros
    np.testing.assert_array_equal(kw["lengths"], [2])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_from_onnx_reads_torch_exports(kind):
    """Another producer's graphs: torch.onnx.export of a two-layer bidirectional layer."""
    onnx, _ = onnx_or_skip()
    torch = torch_or_skip()
    torch.manual_seed(5)
    t = getattr(torch.nn, kind)(3, 4, 2, bidirectional=True).eval()
    x = torch.randn(6, 2, 3)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(t, (x,), buffer, dynamo=False)
    layers = list(fastrnn.from_onnx(onnx.load_from_string(buffer.getvalue())).values())
    assert len(layers) == 2 and all(layer.bidirectional for layer in layers)
    h = x.numpy()
    for layer in layers:
        h, _ = layer.eval()(h)
    with torch.no_grad():
        expected = t(x)[0].numpy()
    np.testing.assert_allclose(h, expected, rtol=1e-5, atol=2e-6)
