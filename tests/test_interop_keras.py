"""fastrnn.from_keras against Keras 3 itself (the oracle; jax backend here, any works)."""

import os

import numpy as np
import pytest

import fastrnn
from fastrnn.interop._gates import KERAS, to_torch_order
from conftest import require


def keras_or_skip():
    """keras (on jax here)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    return require("keras")


#: Zero initializers: the tests set random weights anyway, and Keras' default
#: orthogonal initializer costs a QR compilation per layer.
FAST = {"kernel_initializer": "zeros", "recurrent_initializer": "zeros"}


def make(keras, kind, units, **kw):
    cls = {"rnn": keras.layers.SimpleRNN, "lstm": keras.layers.LSTM, "gru": keras.layers.GRU}
    return cls[kind](units, return_sequences=True, return_state=True, **FAST, **kw)


#: (kind, options, compare gradients too): gradients for one case of each kind and GRU
#: form (each jax.grad of a Keras layer compiles for a second or two).
CASES = [("rnn", {}, True), ("rnn", {"activation": "relu", "use_bias": False}, False),
         ("lstm", {"use_bias": False, "go_backwards": True}, True),
         ("gru", {}, True), ("gru", {"reset_after": False}, True),
         ("gru", {"use_bias": False}, False)]


def random_weights(keras, layer, seed):
    """Non-zero biases: Keras initializes them to zero, which would hide bias mistakes."""
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        v.assign(rng.uniform(-0.5, 0.5, v.shape).astype(np.float32))


def weights_of(keras, layer):
    return [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in layer.weights]


@pytest.mark.parametrize("kind,kw,grads", CASES)
def test_from_keras_matches_keras(kind, kw, grads):
    keras = keras_or_skip()
    import jax
    rng = np.random.default_rng(len(str(kw)) + len(kind))
    B, T, I, H = 3, 6, 4, 5
    layer = make(keras, kind, H, **kw)
    x = rng.standard_normal((B, T, I)).astype(np.float32)
    layer.build(x.shape)
    random_weights(keras, layer, 1)
    m = fastrnn.from_keras(layer)
    assert m.batch_first and m.reverse == kw.get("go_backwards", False)
    w = rng.standard_normal((B, T, H)).astype(np.float32)
    # Keras returns a go_backwards layer's sequence in processing order: flipped in time.
    w_keras = w[:, ::-1] if m.reverse else w

    # Keras' own layer, and jax's autodiff of it for L = sum(out * w): one compilation.
    tv = [v.value for v in layer.trainable_variables]
    ntv = [v.value for v in layer.non_trainable_variables]

    def loss(x, tv):
        outs = layer.stateless_call(tv, ntv, x)[0]
        return (outs[0] * w_keras).sum(), outs

    if grads:
        (_, expected), (d_x, d_tv) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                                                has_aux=True))(x, tv)
    else:
        _, expected = jax.jit(loss)(x, tv)
    out, s_n = m(x)
    s_n = s_n if isinstance(s_n, tuple) else (s_n,)
    np.testing.assert_allclose(out[:, ::-1] if m.reverse else out, np.asarray(expected[0]),
                               rtol=1e-5, atol=1e-5)
    for a, b in zip(s_n, expected[1:]):
        np.testing.assert_allclose(a[0], np.asarray(b), rtol=1e-5, atol=1e-5)
    if not grads:
        return
    ours, _ = m.backward(w)
    np.testing.assert_allclose(ours, np.asarray(d_x), rtol=1e-4, atol=1e-5)
    perm = KERAS[kind]
    for name, d_kernel in (("weight_ih_l0", d_tv[0]), ("weight_hh_l0", d_tv[1])):
        np.testing.assert_allclose(m.grads[name], to_torch_order(np.asarray(d_kernel).T, perm),
                                   rtol=1e-4, atol=1e-5)
    if m.bias:
        d_b = np.asarray(d_tv[2])
        d_b_ih = d_b[0] if d_b.ndim == 2 else d_b
        np.testing.assert_allclose(m.grads["bias_ih_l0"], to_torch_order(d_b_ih, perm),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_bidirectional(kind):
    keras = keras_or_skip()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    layer = keras.layers.Bidirectional(
        {"rnn": keras.layers.SimpleRNN, "lstm": keras.layers.LSTM,
         "gru": keras.layers.GRU}[kind](4, return_sequences=True, **FAST))
    layer.build(x.shape)
    random_weights(keras, layer, 2)
    m = fastrnn.from_keras(layer)
    assert m.bidirectional
    np.testing.assert_allclose(m(x)[0], np.asarray(layer(x)), rtol=1e-5, atol=1e-5)


def test_mask_is_lengths_with_zero_output_for_mask():
    keras = keras_or_skip()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 6, 4)).astype(np.float32)
    lengths = np.array([6, 2, 4])
    mask = np.arange(6)[None, :] < lengths[:, None]          # right-padded
    for go_backwards in (False, True):
        layer = make(keras, "lstm", 5, zero_output_for_mask=True, go_backwards=go_backwards)
        layer.build(x.shape)
        random_weights(keras, layer, 3)
        out_k, h_k, c_k = (np.asarray(a) for a in layer(x, mask=mask))
        m = fastrnn.from_keras(layer)
        out, (h_n, c_n) = m(x, lengths=lengths)
        np.testing.assert_allclose(h_n[0], h_k, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(c_n[0], c_k, rtol=1e-5, atol=1e-5)
        if not go_backwards:
            np.testing.assert_allclose(out, out_k, rtol=1e-5, atol=1e-5)
    # Keras' default repeats the previous output at masked steps; fastrnn outputs 0.
    layer = make(keras, "gru", 5)
    layer.build(x.shape)
    out_k = np.asarray(layer(x, mask=mask)[0])
    out = fastrnn.from_keras(layer)(x, lengths=lengths)[0]
    np.testing.assert_allclose(out_k[1, 2:], np.repeat(out_k[1, 1:2], 4, axis=0), atol=1e-6)
    np.testing.assert_array_equal(out[1, 2:], 0)


def test_from_keras_rejections_name_the_option():
    keras = keras_or_skip()
    x = np.zeros((1, 3, 2), np.float32)

    def built(layer):
        layer.build(x.shape)
        return layer

    lstm, gru, rnn = keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN
    cases = [
        (built(lstm(3, **FAST, activation="relu")), ValueError, "activation"),
        (built(gru(3, **FAST, recurrent_activation="hard_sigmoid")), ValueError,
         "recurrent_activation"),
        (built(rnn(3, **FAST, activation="sigmoid")), ValueError, "activation"),
        (built(gru(3, **FAST, dropout=0.2)), ValueError, "dropout"),
        (built(lstm(3, **FAST, recurrent_dropout=0.2)), ValueError, "recurrent_dropout"),
        (built(keras.layers.Bidirectional(gru(3, **FAST), merge_mode="sum")), ValueError,
         "merge_mode"),
        (lstm(3, **FAST), ValueError, "not built"),
        (built(keras.layers.RNN(keras.layers.LSTMCell(3, **FAST))), TypeError, "RNN"),
        (built(keras.layers.Dense(3)), TypeError, "Dense"),
        (built(lstm(3, **FAST, dtype="float16")), TypeError, "float16"),
        (built(keras.layers.Bidirectional(gru(3, **FAST, go_backwards=True),
                                          backward_layer=gru(3, **FAST))), ValueError,
         "go_backwards"),
        (built(keras.layers.Bidirectional(gru(3, **FAST), backward_layer=gru(
            3, **FAST, go_backwards=True, reset_after=False))), ValueError, "backward_layer"),
    ]
    for layer, exc, word in cases:
        before = weights_of(keras, layer)
        with pytest.raises(exc, match=word):
            fastrnn.from_keras(layer)
        for a, b in zip(weights_of(keras, layer), before):
            np.testing.assert_array_equal(a, b)
    # Dropout only acts in training: ignore_dropout=True drops it, exact at inference.
    layer = built(keras.layers.GRU(3, **FAST, dropout=0.2, return_sequences=True))
    layer(x)
    m = fastrnn.from_keras(layer, ignore_dropout=True)
    np.testing.assert_allclose(m(np.ones((1, 3, 2), np.float32))[0],
                               np.asarray(layer(np.ones((1, 3, 2), np.float32))),
                               rtol=1e-5, atol=1e-6)
