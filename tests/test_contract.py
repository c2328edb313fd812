"""The validated kernel boundary: every argument of every public kernel function,
on every CPU backend, gets a TypeError/ValueError that names it (never a crash or
garbage), and nothing is written."""

import numpy as np
import pytest

import fastrnn
from fastrnn import backends

T, B, I, H = 4, 3, 5, 6


def arguments(cell, dtype=np.float64):
    rng = np.random.default_rng(17)
    kind = backends.CELLS[cell]
    G = kind.gates * H
    names = ("x", "h0", "c0")[:1 + kind.states] + ("w_ih", "w_hh", "b_ih", "b_hh")
    shapes = {"x": (T, B, I), "h0": (B, H), "c0": (B, H), "w_ih": (G, I), "w_hh": (G, H),
              "b_ih": (G,), "b_hh": (G,)}
    return {n: rng.standard_normal(shapes[n]).astype(dtype) for n in names}


def call(fwd, args, **options):
    return fwd(*args.values(), **options)


@pytest.mark.parametrize("cell", list(backends.CELLS))
def test_valid_call_matches_unchecked(backend, cell):
    fwd, bwd = backends.get(backend).kernels(cell)
    raw_fwd, raw_bwd = backends.get(backend).raw_kernels(cell)
    args = arguments(cell)
    lengths = np.array([4, 1, 0])
    got = call(fwd, args, lengths=lengths)
    want = raw_fwd(*args.values(), lengths=lengths)
    S = backends.CELLS[cell].states
    for a, b in zip(got[:1 + S], want[:1 + S]):
        np.testing.assert_array_equal(a, b)
    d_out = np.ones((T, B, H))
    d_states = (np.ones((B, H)),) * S
    for a, b in zip(bwd(d_out, *d_states, got[-1]), raw_bwd(d_out, *d_states, want[-1])):
        if a is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cell", list(backends.CELLS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [False, True])
def test_results_are_new_arrays(backend, cell, dtype, training):
    """out, h_n (and c_n) share memory with nothing: each other, the arguments, the cache
    (a one-layer module hands the kernel's final states on as they are)."""
    fwd, _ = backends.get(backend).kernels(cell)
    args = arguments(cell, dtype)
    S = backends.CELLS[cell].states
    result = call(fwd, args, training=training)
    others = list(args.values()) + [v for v in _cache_arrays(result[-1])]
    for i, a in enumerate(result[:1 + S]):
        for b in list(result[:i]) + others:
            assert not np.shares_memory(a, b)


def _cache_arrays(cache):
    inner = getattr(cache, "inner", cache)
    values = inner.values() if isinstance(inner, dict) else inner or ()
    return [v for v in values if isinstance(v, np.ndarray)]


def _one_layer(kind, backend):
    if kind == "layernorm_lstm":
        return fastrnn.LayerNormLSTM(I, H, backend=backend, dtype=np.float32)
    return fastrnn.make_layer(kind, I, H, backend=backend, seed=0, dtype=np.float32)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "layernorm_lstm"])
@pytest.mark.parametrize("how", ["eval", "train", "chunked", "large"])
def test_a_one_layer_modules_states_are_its_own(backend, kind, how):
    """A one-layer module returns the kernel's final states as views: writing its output
    or calling it again (a training step's backward included) leaves them as they were;
    in eval mode, in training, over chunks of steps (``eval_chunk``), and with buffers
    from the pool of large blocks (``_workspace``: 1 MiB and more)."""
    m = _one_layer(kind, backend)
    m.train() if how == "train" else m.eval()
    if how == "chunked":
        m.eval_chunk = 2
    steps, rows = (700, 64) if how == "large" else (T, B)   # large: a 1.1 MB output
    x = np.random.default_rng(0).standard_normal((steps, rows, I)).astype(np.float32)
    out, states = m(x)
    states = states if isinstance(states, tuple) else (states,)
    kept = [s.copy() for s in states]
    out[...] = 7
    if how == "train":
        m.backward(np.ones_like(out))
    m(x[::-1].copy())
    for s, k in zip(states, kept):
        assert s.shape == (1, rows, H)
        np.testing.assert_array_equal(s, k)


# x and h0 define T, B, I and H: a size wrong there is blamed on the first argument
# that disagrees with them.
BLAMED = {"x": "w_ih", "h0": "c0|w_ih"}


def _bad_variants(cell):
    """(argument, replacement, expected exception, name in the message) for every array."""
    args = arguments(cell)
    for name, a in args.items():
        yield name, a.tolist(), TypeError, name                 # not an ndarray
        yield name, a.astype(np.float32), TypeError, "h0" if name == "x" else name  # dtype
        yield name, a[..., :-1], ValueError, BLAMED.get(name, name)   # one too few
        yield name, a[None], ValueError, name                   # one dimension too many
    yield "x", args["x"].astype(np.int64), TypeError, "x"
    yield "x", args["x"][:0], ValueError, "x"                   # T = 0


@pytest.mark.parametrize("cell", list(backends.CELLS))
def test_every_bad_array_names_the_argument(backend, cell):
    fwd, _ = backends.get(backend).kernels(cell)
    for name, bad, exc, blamed in _bad_variants(cell):
        args = arguments(cell)
        args[name] = bad
        with pytest.raises(exc, match=rf"\b({blamed})\b"):
            call(fwd, args)


@pytest.mark.parametrize("cell", list(backends.CELLS))
def test_bad_options_and_lengths(backend, cell):
    fwd, _ = backends.get(backend).kernels(cell)
    args = arguments(cell)
    for lengths, exc in ((np.array([4, 1]), ValueError), (np.array([4, 1, 5]), ValueError),
                         (np.array([4, -1, 0]), ValueError), (np.array([4., 1, 0]), TypeError),
                         ([4, 1, 0], TypeError)):
        with pytest.raises(exc, match="lengths"):
            call(fwd, args, lengths=lengths)
    for flag in ("reverse", "training") + tuple(backends.KERNEL_OPTIONS.get(cell, {})):
        with pytest.raises(TypeError, match=flag):
            call(fwd, args, **{flag: "yes"})
    with pytest.raises(TypeError, match="unexpected argument 'bogus'"):
        call(fwd, args, bogus=1)
    no_bias = {**args, "b_hh": None}
    with pytest.raises(ValueError, match="b_ih and b_hh"):
        call(fwd, no_bias)


@pytest.mark.parametrize("cell", list(backends.CELLS))
def test_backward_checks_against_its_forward(backend, cell):
    fwd, bwd = backends.get(backend).kernels(cell)
    S = backends.CELLS[cell].states
    out = call(fwd, arguments(cell))
    cache = out[-1]
    d_states = (np.ones((B, H)),) * S
    with pytest.raises(ValueError, match="d_out"):
        bwd(np.ones((T, B, H + 1)), *d_states, cache)
    with pytest.raises(TypeError, match="d_out"):
        bwd(np.ones((T, B, H), np.float32), *d_states, cache)
    with pytest.raises(ValueError, match="d_h_n"):
        bwd(np.ones((T, B, H)), np.ones((B + 1, H)), *d_states[1:], cache)
    with pytest.raises(TypeError, match="cache"):
        bwd(np.ones((T, B, H)), *d_states, ("not", "a", "cache"))
    other = "lstm" if cell != "lstm" else "gru"
    other_cache = call(backends.get(backend).kernels(other)[0], arguments(other))[-1]
    with pytest.raises(TypeError, match="cache"):
        bwd(np.ones((T, B, H)), *d_states, other_cache)
    with pytest.raises(TypeError, match="d_out, d_h_n"):
        bwd(np.ones((T, B, H)), cache)


def test_misshapen_w_hh_never_reaches_blas():
    """The case that motivated the checks: a (G, H - 1) w_hh made numba's BLAS read
    past the array."""
    if "numba" not in backends.available():
        pytest.skip("numba backend absent")
    fwd, _ = backends.get("numba").kernels("lstm")
    args = arguments("lstm", np.float32)
    args["w_hh"] = np.ones((4 * H, H - 1), np.float32)
    with pytest.raises(ValueError, match=r"w_hh must have shape \(24, 6\)"):
        call(fwd, args)


def test_unknown_cell_names_the_kinds():
    with pytest.raises(ValueError, match="rnn_tanh"):
        backends.get("numpy").kernels("lstmp")
    with pytest.raises(ValueError, match="cell must be one of"):
        backends.gate_count("conv")


def test_any_layout_is_accepted(backend):
    """Strided and Fortran arrays are made contiguous at the boundary, same results."""
    fwd, _ = backends.get(backend).kernels("gru")
    args = arguments("gru")
    want = call(fwd, args, training=False)
    strided = {k: np.asfortranarray(v) for k, v in args.items()}
    strided["x"] = np.repeat(args["x"], 2, axis=2)[:, :, ::2]
    got = call(fwd, strided, training=False)
    for a, b in zip(got[:2], want[:2]):
        np.testing.assert_array_equal(a, b)
    assert isinstance(fastrnn.backends.contract.Cache, type)
