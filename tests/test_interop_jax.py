"""fastrnn.jax against JAX's own autodiff of a lax.scan reference (the oracle)."""


import numpy as np
import pytest

from conftest import random_lengths, require


def jax_or_skip():
    return require("jax")


def reference(jax, cell, x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, reset_after):
    """The cell's equations in jax.numpy over lax.scan, masked like fastrnn (the oracle)."""
    jnp = jax.numpy
    sig = jax.nn.sigmoid
    T = x.shape[0]
    b_ih = 0 if b_ih is None else b_ih
    b_hh = 0 if b_hh is None else b_hh

    def step(carry, inputs):
        x_t, t = inputs
        a_x = x_t @ w_ih.T + b_ih
        h = carry[0]
        if cell == "lstm":
            c = carry[1]
            i, f, g, o = jnp.split(a_x + h @ w_hh.T + b_hh, 4, axis=-1)
            c_new = sig(f) * c + sig(i) * jnp.tanh(g)
            new = (sig(o) * jnp.tanh(c_new), c_new)
        elif cell == "gru":
            x_r, x_z, x_n = jnp.split(a_x, 3, axis=-1)
            W_r, W_z, W_n = jnp.split(w_hh, 3, axis=0)
            b_r, b_z, b_n = jnp.split(b_hh if np.ndim(b_hh) else jnp.zeros(w_hh.shape[0]), 3)
            r = sig(x_r + h @ W_r.T + b_r)
            z = sig(x_z + h @ W_z.T + b_z)
            if reset_after:
                n = jnp.tanh(x_n + r * (h @ W_n.T + b_n))
            else:
                n = jnp.tanh(x_n + (r * h) @ W_n.T + b_n)
            new = ((1 - z) * n + z * h,)
        else:
            act = jnp.tanh if cell == "rnn_tanh" else jax.nn.relu
            new = (act(a_x + h @ w_hh.T + b_hh),)
        active = (t < lengths)[:, None]
        carry = tuple(jnp.where(active, n_, o_) for n_, o_ in zip(new, carry))
        return carry, jnp.where(active, new[0], 0)

    finals, out = jax.lax.scan(step, tuple(states), (x, jnp.arange(T)), reverse=reverse)
    return (out,) + finals


#: (cell, bias, reverse, reset_after, lengths, backend): every cell kind and GRU form,
#: both directions, with and without bias and lengths. The kernels themselves are
#: tested per backend elsewhere; here one case runs on the numpy backend.
CASES = [("rnn_tanh", True, False, True, True, "auto"),
         ("rnn_relu", False, True, True, False, "numpy"),
         ("lstm", True, True, True, True, "auto"),
         ("gru", True, False, True, False, "auto"),
         ("gru", True, True, False, True, "auto")]


@pytest.mark.parametrize("cell,bias,reverse,reset_after,with_lengths,backend", CASES)
def test_jit_and_grad_match_lax_scan(cell, bias, reverse, reset_after, with_lengths, backend):
    jax = jax_or_skip()
    import fastrnn.jax as fj
    with jax.enable_x64(True):
        jnp = jax.numpy
        rng = np.random.default_rng(len(cell) * 10 + reverse + 2 * bias)
        T, B, I, H = 5, 3, 4, 3
        G = {"lstm": 4, "gru": 3}.get(cell, 1) * H
        S = 2 if cell == "lstm" else 1
        x = jnp.asarray(rng.standard_normal((T, B, I)))
        states = [jnp.asarray(rng.standard_normal((B, H))) for _ in range(S)]
        weights = [jnp.asarray(rng.uniform(-0.6, 0.6, s)) for s in [(G, I), (G, H)]]
        biases = [jnp.asarray(rng.uniform(-0.6, 0.6, (G,))) for _ in range(2)] if bias \
            else [None, None]
        lengths = random_lengths(rng, T, B) if with_lengths else np.full(B, T)
        w_out = [jnp.asarray(rng.standard_normal((T, B, H)))] + \
            [jnp.asarray(rng.standard_normal((B, H))) for _ in range(S)]
        options = {"reset_after": reset_after} if cell == "gru" else {}
        fn = getattr(fj, cell)

        def ours(x, states, weights, biases):
            return fn(x, *states, *weights, *biases, lengths=jnp.asarray(lengths),
                      reverse=reverse, backend=backend, **options)

        def ref(x, states, weights, biases):
            return reference(jax, cell, x, states, *weights, *biases, jnp.asarray(lengths),
                             reverse, reset_after)

        args = (x, states, weights, [b for b in biases if b is not None])
        def call(f):
            return lambda x, s, w, b: f(x, s, w, b + [None] * (2 - len(b)))

        def outputs_and_grads(f):
            """Outputs and the gradients of every input, one compilation."""
            def value(*a):
                outs = call(f)(*a)
                return sum((o * w).sum() for o, w in zip(outs, w_out)), outs
            (_, outs), grads = jax.jit(jax.value_and_grad(value, argnums=(0, 1, 2, 3),
                                                          has_aux=True))(*args)
            return jax.tree_util.tree_leaves(outs), jax.tree_util.tree_leaves(grads)

        got, g_ours = outputs_and_grads(ours)
        want, g_ref = outputs_and_grads(ref)
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
        for a, b in zip(g_ours, g_ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-11)


def test_float32_and_vmap():
    jax = jax_or_skip()
    import fastrnn.jax as fj
    jnp = jax.numpy
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 4, 3, 2)), dtype=jnp.float32)
    h0 = jnp.zeros((3, 5), jnp.float32)
    w_ih = jnp.asarray(rng.uniform(-0.5, 0.5, (15, 2)), dtype=jnp.float32)
    w_hh = jnp.asarray(rng.uniform(-0.5, 0.5, (15, 5)), dtype=jnp.float32)
    batched = jax.vmap(lambda x: fj.gru(x, h0, w_ih, w_hh)[1])(x)
    for k in range(2):
        want = reference(jax, "gru", x[k], (h0,), w_ih, w_hh, None, None,
                         jnp.full(3, 4), False, True)[1]
        np.testing.assert_allclose(np.asarray(batched[k]), np.asarray(want), rtol=1e-5,
                                   atol=1e-6)


def test_rejections_name_the_argument():
    jax = jax_or_skip()
    import fastrnn.jax as fj
    jnp = jax.numpy
    x = jnp.zeros((4, 2, 3), jnp.float32)
    h = jnp.zeros((2, 5), jnp.float32)
    w_ih, w_hh = jnp.zeros((20, 3), jnp.float32), jnp.zeros((20, 5), jnp.float32)
    b = jnp.zeros((20,), jnp.float32)
    calls = [(lambda: fj.lstm(x[0], h, h, w_ih, w_hh), ValueError, "x"),
             (lambda: fj.lstm(x.astype(jnp.int32), h, h, w_ih, w_hh), TypeError, "dtype"),
             (lambda: fj.lstm(x, h[:1], h, w_ih, w_hh), ValueError, "h0"),
             (lambda: fj.lstm(x, h, h[:, :2], w_ih, w_hh), ValueError, "c0"),
             (lambda: fj.lstm(x, h, h, w_ih[:4], w_hh), ValueError, "w_ih"),
             (lambda: fj.lstm(x, h, h, w_ih, w_hh[:, :2]), ValueError, "w_hh"),
             (lambda: fj.lstm(x, h, h, w_ih, w_hh, b), ValueError, "b_ih and b_hh"),
             (lambda: fj.lstm(x, h, h, w_ih, w_hh, b, b[:3]), ValueError, "b_hh"),
             (lambda: fj.lstm(x, h, h, w_ih, w_hh, lengths=jnp.zeros(3, int)), ValueError,
              "lengths"),
             (lambda: fj.lstm(x, h, h, w_ih, w_hh, reverse=1), TypeError, "reverse"),
             (lambda: fj.lstm(x, h, h, w_ih, w_hh, backend="nope"), ValueError, "backend"),
             (lambda: fj.gru(x, h, w_ih[:15], w_hh[:15], reset_after=0), TypeError,
              "reset_after")]
    for call, exc, word in calls:
        with pytest.raises(exc, match=word):
            call()
