"""Bad input on every public entry point: the right exception, a message naming the
argument, and nothing changed by the failed call.

Each row of a table is ``(label, exception, match, call)``; ``call`` gets the fixture
objects and does one bad call. Before and after, every parameter, gradient, pending
forward, tape and optimizer state is snapshotted and compared.
"""

import copy
import math

import numpy as np
import pytest

import fastrnn
from fastrnn import losses, optim
from fastrnn.cli import main as cli_main
from fastrnn.tbptt import chunks, truncated_bptt

from conftest import CPU_BACKENDS

f32, f64 = np.float32, np.float64
T, B, I, H = 5, 2, 3, 4


def zeros(*shape, dtype=f32):
    return np.zeros(shape, dtype=dtype)


def snapshot(obj):
    """Everything a failed call could change, as comparable copies."""
    state = {}
    for name in ("params", "grads"):
        if hasattr(obj, name):
            state[name] = {k: np.array(v, copy=True) for k, v in getattr(obj, name).items()}
    for name in ("_pending", "training", "dtype", "backend"):
        if hasattr(obj, name):
            state[name] = id(getattr(obj, name)) if name == "_pending" else getattr(obj, name)
    if hasattr(obj, "_tape"):
        state["tape"] = [id(entry) for entry in obj._tape]
    if hasattr(obj, "state") and isinstance(obj.state, dict):   # an optimizer
        state["opt"] = copy.deepcopy(obj.state)
    return state


def assert_same(before, after):
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        if isinstance(a, dict) and key != "opt":
            assert a.keys() == b.keys(), key
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{key}[{k}] changed")
        elif key == "opt":
            assert repr(a) == repr(b), "optimizer state changed"
        else:
            assert a == b, f"{key} changed"


# ------------------------------------------------------------------ layers

def lstm(backend, **kw):
    return fastrnn.LSTM(I, H, backend=backend, seed=0, **kw)


def with_pending(model, x=None):
    model(zeros(T, B, I) if x is None else x)
    return model


LAYER_CALLS = [
    # (label, exception, match, call(model))
    ("x int", TypeError, "x has dtype int64.*float32", lambda m: m(np.zeros((T, B, I), int))),
    ("x float64", TypeError, "x has dtype float64", lambda m: m(zeros(T, B, I, dtype=f64))),
    ("x float16", TypeError, "x has dtype float16", lambda m: m(zeros(T, B, I, dtype=np.float16))),
    ("x list", TypeError, "x must be a numpy.ndarray", lambda m: m([[[0.0] * I]])),
    ("x 4-D", ValueError, "x must have 3 dimensions", lambda m: m(zeros(T, B, I, 1))),
    ("x 1-D", ValueError, "x must have 3 dimensions", lambda m: m(zeros(I))),
    ("x features", ValueError, "input_size=3", lambda m: m(zeros(T, B, I + 1))),
    ("x T=0", ValueError, "at least one time step", lambda m: m(zeros(0, B, I))),
    ("x B=0", ValueError, "at least one sequence", lambda m: m(zeros(T, 0, I))),
    ("hx not a pair", ValueError, "hx must be a pair", lambda m: m(zeros(T, B, I), zeros(1, B, H))),
    ("hx triple", ValueError, "hx must be a pair",
     lambda m: m(zeros(T, B, I), (zeros(1, B, H),) * 3)),
    ("hx[1] shape", ValueError, r"hx\[1\] must have shape \(1, 2, 4\)",
     lambda m: m(zeros(T, B, I), (zeros(1, B, H), zeros(1, B + 1, H)))),
    ("hx[0] layers", ValueError, r"hx\[0\] must have shape",
     lambda m: m(zeros(T, B, I), (zeros(2, B, H), zeros(1, B, H)))),
    ("hx[0] dtype", TypeError, r"hx\[0\] has dtype float64",
     lambda m: m(zeros(T, B, I), (zeros(1, B, H, dtype=f64), zeros(1, B, H)))),
    ("hx[1] None", TypeError, r"hx\[1\] must be a numpy.ndarray",
     lambda m: m(zeros(T, B, I), (zeros(1, B, H), None))),
    ("hx unbatched shape", ValueError, "hx\\[0\\] must have shape \\(1, 4\\)",
     lambda m: m(zeros(T, I), (zeros(1, B, H), zeros(1, B, H)))),
    ("lengths float", TypeError, "lengths must be an integer array.*float64",
     lambda m: m(zeros(T, B, I), lengths=np.array([1.0, 2.0]))),
    ("lengths bool", TypeError, "lengths must be an integer array.*bool",
     lambda m: m(zeros(T, B, I), lengths=np.array([True, False]))),
    ("lengths object", TypeError, "lengths must be an integer array",
     lambda m: m(zeros(T, B, I), lengths=[None, 1])),
    ("lengths negative", ValueError, r"lengths must lie in \[0, T\] = \[0, 5\]",
     lambda m: m(zeros(T, B, I), lengths=np.array([-1, 2]))),
    ("lengths > T", ValueError, r"lengths must lie in \[0, T\]",
     lambda m: m(zeros(T, B, I), lengths=np.array([T + 1, 2]))),
    ("lengths uint64 huge", ValueError, r"lengths must lie in \[0, T\]",
     lambda m: m(zeros(T, B, I), lengths=np.array([2 ** 63 + 5, 1], np.uint64))),
    ("lengths shape", ValueError, r"lengths must have shape \(B,\) = \(2,\)",
     lambda m: m(zeros(T, B, I), lengths=np.array([[1, 2]]))),
    ("lengths scalar", ValueError, "lengths must have shape",
     lambda m: m(zeros(T, B, I), lengths=3)),
    ("lengths too few", ValueError, "lengths must have shape",
     lambda m: m(zeros(T, B, I), lengths=np.array([3]))),
    ("lengths unbatched", ValueError, "lengths is only accepted with batched",
     lambda m: m(zeros(T, I), lengths=[3])),
    ("backward without forward", RuntimeError, "pending train-mode forward",
     lambda m: m.backward(zeros(T, B, H))),
    ("backward after eval forward", RuntimeError, "pending train-mode forward",
     lambda m: (with_pending(m).eval()(zeros(T, B, I)), m.train(), m.backward(zeros(T, B, H)))),
    ("second backward", RuntimeError, "pending train-mode forward",
     lambda m: (with_pending(m).backward(zeros(T, B, H)), m.backward(zeros(T, B, H)))),
    ("d_out shape", ValueError, r"d_out must have the shape of out, \(5, 2, 4\)",
     lambda m: m.backward(zeros(T, B, H + 1))),
    ("d_out time", ValueError, "d_out must have the shape of out",
     lambda m: m.backward(zeros(T - 1, B, H))),
    ("d_out dtype", TypeError, "d_out has dtype float64",
     lambda m: m.backward(zeros(T, B, H, dtype=f64))),
    ("d_out list", TypeError, "d_out must be a numpy.ndarray",
     lambda m: m.backward([[[0.0] * H] * B] * T)),
    ("d_h_n not a pair", ValueError, "d_h_n must be a pair",
     lambda m: m.backward(zeros(T, B, H), zeros(1, B, H))),
    ("d_h_n[1] shape", ValueError, r"d_h_n\[1\] must have shape",
     lambda m: m.backward(zeros(T, B, H), (zeros(1, B, H), zeros(2, B, H)))),
    ("d_h_n[0] dtype", TypeError, r"d_h_n\[0\] has dtype float64",
     lambda m: m.backward(zeros(T, B, H), (zeros(1, B, H, dtype=f64),
                                                          zeros(1, B, H)))),
    ("state_dict missing", KeyError, r"missing keys \['bias_hh_l0'\]",
     lambda m: m.load_state_dict({k: v for k, v in m.state_dict().items() if k != "bias_hh_l0"})),
    ("state_dict extra", KeyError, r"unexpected keys \['weight_ih_l1'\]",
     lambda m: m.load_state_dict({**m.state_dict(), "weight_ih_l1": zeros(16, 4)})),
    ("state_dict shape", ValueError, r"state_dict\['weight_hh_l0'\] has shape \(16, 5\)",
     lambda m: m.load_state_dict({**m.state_dict(), "weight_hh_l0": zeros(16, 5)})),
    ("state_dict int", TypeError, r"state_dict\['bias_ih_l0'\] has dtype int64",
     lambda m: m.load_state_dict({**m.state_dict(), "bias_ih_l0": np.zeros(16, int)})),
    ("state_dict str", TypeError, r"state_dict\['bias_ih_l0'\] has dtype <U",
     lambda m: m.load_state_dict({**m.state_dict(), "bias_ih_l0": "zeros"})),
    ("state_dict list", TypeError, "state_dict must be a mapping", lambda m: m.load_state_dict([1])),
    ("eval_chunk 0", ValueError, "eval_chunk must be a positive integer",
     lambda m: (setattr(m, "eval_chunk", 0), m.eval()(zeros(T, B, I)))),
    ("train('no')", TypeError, "mode must be a bool", lambda m: m.train("no")),
    ("to(dtype=int)", TypeError, "dtype must be float32 or float64", lambda m: m.to(dtype=int)),
    ("to(backend='tpu')", ValueError, "backend must be one of", lambda m: m.to(backend="tpu")),
]


@pytest.mark.parametrize("label,exc,match,call", LAYER_CALLS, ids=[r[0] for r in LAYER_CALLS])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layer_rejects(backend, label, exc, match, call):
    m = lstm(backend)
    if label != "backward without forward":
        with_pending(m)   # a pending forward that a failed call must not consume
    m.grads["weight_hh_l0"][...] = 1.5   # accumulated gradients that must survive
    before = snapshot(m)
    with pytest.raises(exc, match=match):
        call(m)
    if label not in ("backward after eval forward", "second backward",
                     "eval_chunk 0"):  # these change the model on purpose before failing
        assert_same(before, snapshot(m))


CONSTRUCTOR_CALLS = [
    ("input_size 0", ValueError, "input_size must be a positive integer",
     lambda: fastrnn.LSTM(0, H)),
    ("input_size float", ValueError, "input_size", lambda: fastrnn.GRU(3.0, H)),
    ("hidden_size negative", ValueError, "hidden_size", lambda: fastrnn.RNN(I, -1)),
    ("num_layers 0", ValueError, "num_layers", lambda: fastrnn.RNN(I, H, 0)),
    ("bias int", TypeError, "bias must be a bool", lambda: fastrnn.LSTM(I, H, bias=1)),
    ("batch_first str", TypeError, "batch_first must be a bool",
     lambda: fastrnn.LSTM(I, H, batch_first="yes")),
    ("bidirectional None", TypeError, "bidirectional must be a bool",
     lambda: fastrnn.GRU(I, H, bidirectional=None)),
    ("reset_after int", TypeError, "reset_after must be a bool",
     lambda: fastrnn.GRU(I, H, reset_after=0)),
    ("nonlinearity", ValueError, "nonlinearity must be 'tanh' or 'relu'",
     lambda: fastrnn.RNN(I, H, nonlinearity="sigmoid")),
    ("dtype int", TypeError, "dtype must be float32 or float64", lambda: fastrnn.RNN(I, H, dtype=int)),
    ("dtype float16", TypeError, "dtype must be float32 or float64",
     lambda: fastrnn.RNN(I, H, dtype=np.float16)),
    ("backend", ValueError, "backend must be one of", lambda: fastrnn.RNN(I, H, backend="tpu")),
    ("seed str", TypeError, "seed must be None or a non-negative integer",
     lambda: fastrnn.RNN(I, H, seed="x")),
    ("seed negative", ValueError, "seed must be None or a non-negative integer",
     lambda: fastrnn.LSTM(I, H, seed=-1)),
    ("cell input_size", ValueError, "input_size", lambda: fastrnn.LSTMCell(0, H)),
    ("cell bias", TypeError, "bias must be a bool", lambda: fastrnn.GRUCell(I, H, bias="yes")),
    ("cell seed", TypeError, "seed", lambda: fastrnn.RNNCell(I, H, seed=1.5)),
    ("Linear in_features", ValueError, "in_features", lambda: fastrnn.Linear(0, 2)),
    ("Linear bias", TypeError, "bias must be a bool", lambda: fastrnn.Linear(2, 2, bias=None)),
    ("Embedding dim", ValueError, "embedding_dim", lambda: fastrnn.Embedding(5, 0)),
    ("Embedding padding_idx bool", ValueError, "padding_idx",
     lambda: fastrnn.Embedding(5, 2, padding_idx=True)),
    ("Embedding padding_idx range", ValueError, "padding_idx",
     lambda: fastrnn.Embedding(5, 2, padding_idx=5)),
]


@pytest.mark.parametrize("label,exc,match,call", CONSTRUCTOR_CALLS,
                         ids=[r[0] for r in CONSTRUCTOR_CALLS])
def test_constructor_rejects(label, exc, match, call):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------- cells

def cell_with_tape(backend):
    cell = fastrnn.LSTMCell(I, H, backend=backend, seed=0)
    cell(zeros(B, I))
    cell.grads["weight_ih"][...] = 2.0
    return cell


CELL_CALLS = [
    ("x int", TypeError, "x has dtype int64", lambda c: c(np.zeros((B, I), int))),
    ("x 3-D", ValueError, "x must have shape", lambda c: c(zeros(1, B, I))),
    ("x B=0", ValueError, "B >= 1", lambda c: c(zeros(0, I))),
    ("hx single", ValueError, "hx must be a pair", lambda c: c(zeros(B, I), zeros(B, H))),
    ("hx[1] shape", ValueError, r"hx\[1\] must have shape",
     lambda c: c(zeros(B, I), (zeros(B, H), zeros(B + 1, H)))),
    ("hx[0] dtype", TypeError, r"hx\[0\] has dtype float64",
     lambda c: c(zeros(B, I), (zeros(B, H, dtype=f64), zeros(B, H)))),
    ("d_h shape", ValueError, "d_h must have shape", lambda c: c.backward(zeros(B + 1, H))),
    ("d_h dtype", TypeError, "d_h has dtype float64", lambda c: c.backward(zeros(B, H, dtype=f64))),
    ("d_c shape", ValueError, "d_c must have shape", lambda c: c.backward(zeros(B, H), zeros(B, 1))),
    ("d_h list", TypeError, "d_h must be a numpy.ndarray", lambda c: c.backward([[0.0] * H] * B)),
    ("empty tape", RuntimeError, "recorded step",
     lambda c: (c.clear_tape(), c.backward(zeros(B, H)))),
    ("state_dict missing", KeyError, "missing keys",
     lambda c: c.load_state_dict({"weight_ih": zeros(4 * H, I)})),
    ("state_dict shape", ValueError, r"state_dict\['weight_hh'\] has shape",
     lambda c: c.load_state_dict({**c.state_dict(), "weight_hh": zeros(H, H)})),
    ("train(1)", TypeError, "mode must be a bool", lambda c: c.train(1)),
]


@pytest.mark.parametrize("label,exc,match,call", CELL_CALLS, ids=[r[0] for r in CELL_CALLS])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cell_rejects(backend, label, exc, match, call):
    cell = cell_with_tape(backend)
    before = snapshot(cell)
    with pytest.raises(exc, match=match):
        call(cell)
    if label != "empty tape":   # that one clears the tape on purpose
        assert_same(before, snapshot(cell))


def test_gru_cell_rejects_d_c():
    cell = fastrnn.GRUCell(I, H)
    cell(zeros(B, I))
    before = snapshot(cell)
    with pytest.raises(ValueError, match="d_c is only accepted by an LSTMCell"):
        cell.backward(zeros(B, H), zeros(B, H))
    assert_same(before, snapshot(cell))


# -------------------------------------------------------- Linear, Embedding

MODULE_CALLS = [
    ("Linear x int", TypeError, "x has dtype int64", "linear", lambda m: m(np.zeros((B, I), int))),
    ("Linear x list", TypeError, "x must be a numpy.ndarray", "linear", lambda m: m([[0.0] * I])),
    ("Linear x features", ValueError, "in_features=3", "linear", lambda m: m(zeros(B, I + 1))),
    ("Linear d_y shape", ValueError, r"d_y must have the shape of y, \(2, 2\)", "linear",
     lambda m: m.backward(zeros(B, 3))),
    ("Linear d_y dtype", TypeError, "d_y has dtype float64", "linear",
     lambda m: m.backward(zeros(B, 2, dtype=f64))),
    ("Linear d_y int", TypeError, "d_y has dtype int64", "linear",
     lambda m: m.backward(np.zeros((B, 2), int))),
    ("Linear d_y list", TypeError, "d_y must be a numpy.ndarray", "linear",
     lambda m: m.backward([[0.0, 0.0]] * B)),
    ("Linear state_dict extra", KeyError, "unexpected keys", "linear",
     lambda m: m.load_state_dict({**m.state_dict(), "scale": zeros(2)})),
    ("Linear state_dict shape", ValueError, r"state_dict\['bias'\] has shape", "linear",
     lambda m: m.load_state_dict({**m.state_dict(), "bias": zeros(3)})),
    ("Embedding float indices", TypeError, "indices must be integers", "embedding",
     lambda m: m(np.zeros(3))),
    ("Embedding bool indices", TypeError, "indices must be integers", "embedding",
     lambda m: m(np.zeros(3, bool))),
    ("Embedding index range", IndexError, r"indices must lie in \[0, 5\)", "embedding",
     lambda m: m(np.array([5]))),
    ("Embedding negative", IndexError, r"indices must lie in \[0, 5\)", "embedding",
     lambda m: m(np.array([-1]))),
    ("Embedding d_y shape", ValueError, "d_y must have the shape of y", "embedding",
     lambda m: m.backward(zeros(3, 3))),
    ("Embedding d_y dtype", TypeError, "d_y has dtype float64", "embedding",
     lambda m: m.backward(zeros(3, 2, dtype=f64))),
    ("Embedding state_dict missing", KeyError, "missing keys", "embedding",
     lambda m: m.load_state_dict({})),
]


@pytest.mark.parametrize("label,exc,match,kind,call", MODULE_CALLS,
                         ids=[r[0] for r in MODULE_CALLS])
def test_module_rejects(label, exc, match, kind, call):
    if kind == "linear":
        m = fastrnn.Linear(I, 2, seed=0)
        m(zeros(B, I))
    else:
        m = fastrnn.Embedding(5, 2, seed=0)
        m(np.array([1, 2, 3]))
    m.grads["weight"][...] = 0.5
    before = snapshot(m)
    with pytest.raises(exc, match=match):
        call(m)
    assert_same(before, snapshot(m))


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_module_backward_without_forward(kind):
    m = fastrnn.Linear(I, 2) if kind == "linear" else fastrnn.Embedding(5, 2)
    with pytest.raises(RuntimeError, match="pending train-mode forward"):
        m.backward(zeros(B, 2))
    m.eval()(zeros(B, I) if kind == "linear" else np.array([0, 1]))
    with pytest.raises(RuntimeError, match="pending train-mode forward"):
        m.backward(zeros(B, 2))


# ------------------------------------------------------------------ losses

LOSS_CALLS = [
    ("logits list", TypeError, "logits must be a floating",
     lambda: losses.cross_entropy([[1.0, 2.0]], [0])),
    ("logits int", TypeError, "logits must have a floating dtype",
     lambda: losses.cross_entropy(np.zeros((2, 3), int), np.array([0, 1]))),
    ("logits 0-D", ValueError, "logits must have at least 1",
     lambda: losses.cross_entropy(np.float32(1.0) * np.ones((), f32), np.array(0))),
    ("logits no classes", ValueError, "at least one class",
     lambda: losses.cross_entropy(zeros(2, 0), np.array([0, 1]))),
    ("targets float", TypeError, "targets must be integers",
     lambda: losses.cross_entropy(zeros(2, 3), np.array([0.0, 1.0]))),
    ("targets bool", TypeError, "targets must be integers",
     lambda: losses.cross_entropy(zeros(2, 3), np.array([True, False]))),
    ("targets shape", ValueError, r"targets must have the shape of logits without its last axis",
     lambda: losses.cross_entropy(zeros(2, 3), np.array([0, 1, 2]))),
    ("targets range", IndexError, r"targets must lie in \[0, 3\)",
     lambda: losses.cross_entropy(zeros(2, 3), np.array([0, 3]))),
    ("ignore_index float", TypeError, "ignore_index must be an integer",
     lambda: losses.cross_entropy(zeros(2, 3), np.array([0, 1]), ignore_index=1.5)),
    ("reduction", ValueError, "reduction must be 'mean' or 'sum'",
     lambda: losses.cross_entropy(zeros(2, 3), np.array([0, 1]), reduction="none")),
    ("mse shapes", ValueError, "pred and target must have the same shape",
     lambda: losses.mse_loss(zeros(3), zeros(4))),
    ("mse pred list", TypeError, "pred must be a floating", lambda: losses.mse_loss([1.0], [1.0])),
    ("mse pred int", TypeError, "pred must have a floating dtype",
     lambda: losses.mse_loss(np.zeros(3, int), np.zeros(3, int))),
    ("mse target str", TypeError, "target must be a real numeric array",
     lambda: losses.mse_loss(zeros(3), np.array(["a", "b", "c"]))),
    ("mse reduction", ValueError, "reduction", lambda: losses.mse_loss(zeros(3), zeros(3),
                                                                       reduction=None)),
    ("log_softmax int", TypeError, "logits must have a floating dtype",
     lambda: losses.log_softmax(np.zeros(3, int))),
]


@pytest.mark.parametrize("label,exc,match,call", LOSS_CALLS, ids=[r[0] for r in LOSS_CALLS])
def test_loss_rejects(label, exc, match, call):
    with pytest.raises(exc, match=match):
        call()


def test_losses_do_not_mutate_their_inputs():
    logits = np.random.default_rng(0).standard_normal((4, 3)).astype(f32)
    targets = np.array([0, 2, -100, 1])
    saved = logits.copy(), targets.copy()
    losses.cross_entropy(logits, targets)
    losses.mse_loss(logits, logits[::-1].copy())
    np.testing.assert_array_equal(saved[0], logits)
    np.testing.assert_array_equal(saved[1], targets)


# -------------------------------------------------------------- optimizers

def trained_linear():
    m = fastrnn.Linear(I, 2, seed=0)
    m.grads["weight"][...] = 0.25
    m.grads["bias"][...] = -0.5
    return m


OPTIMIZER_CALLS = [
    ("SGD lr negative", ValueError, "lr must be finite and >= 0", lambda m: optim.SGD([m], lr=-1)),
    ("SGD lr nan", ValueError, "lr must be finite", lambda m: optim.SGD([m], lr=math.nan)),
    ("SGD lr inf", ValueError, "lr must be finite", lambda m: optim.SGD([m], lr=math.inf)),
    ("SGD lr str", TypeError, "lr must be a real number", lambda m: optim.SGD([m], lr="0.1")),
    ("SGD momentum negative", ValueError, "momentum", lambda m: optim.SGD([m], momentum=-0.1)),
    ("SGD dampening nan", ValueError, "dampening must be finite",
     lambda m: optim.SGD([m], dampening=math.nan)),
    ("SGD weight_decay negative", ValueError, "weight_decay",
     lambda m: optim.SGD([m], weight_decay=-1e-4)),
    ("SGD nesterov without momentum", ValueError, "nesterov",
     lambda m: optim.SGD([m], nesterov=True)),
    ("Adam beta1 = 1", ValueError, r"betas\[0\] must lie in \[0, 1\)",
     lambda m: optim.Adam([m], betas=(1.0, 0.999))),
    ("Adam beta2 negative", ValueError, r"betas\[1\] must lie in \[0, 1\)",
     lambda m: optim.Adam([m], betas=(0.9, -0.1))),
    ("Adam beta nan", ValueError, r"betas\[0\]", lambda m: optim.Adam([m], betas=(math.nan, 0.9))),
    ("Adam betas scalar", TypeError, "betas must be a pair", lambda m: optim.Adam([m], betas=0.9)),
    ("Adam betas triple", TypeError, "betas must be a pair",
     lambda m: optim.Adam([m], betas=(0.9, 0.9, 0.9))),
    ("Adam eps negative", ValueError, "eps", lambda m: optim.Adam([m], eps=-1e-8)),
    ("Adam eps inf", ValueError, "eps must be finite", lambda m: optim.Adam([m], eps=math.inf)),
    ("AdamW lr negative", ValueError, "lr", lambda m: optim.AdamW([m], lr=-1e-3)),
    ("AdamW weight_decay nan", ValueError, "weight_decay",
     lambda m: optim.AdamW([m], weight_decay=math.nan)),
    ("models int", TypeError, "models must be a model", lambda m: optim.SGD(5)),
    ("models [1]", TypeError, r"models\[1\] must have 'params' and 'grads'",
     lambda m: optim.SGD([m, 1])),
    ("models empty", ValueError, "models is empty", lambda m: optim.Adam([])),
]


@pytest.mark.parametrize("label,exc,match,call", OPTIMIZER_CALLS,
                         ids=[r[0] for r in OPTIMIZER_CALLS])
def test_optimizer_rejects(label, exc, match, call):
    m = trained_linear()
    before = snapshot(m)
    with pytest.raises(exc, match=match):
        call(m)
    assert_same(before, snapshot(m))


@pytest.mark.parametrize("opt_cls", [optim.SGD, optim.Adam, optim.AdamW])
def test_failed_step_updates_nothing(opt_cls):
    good, bad = trained_linear(), trained_linear()
    opt = opt_cls([good, bad], lr=0.1)
    opt.step()   # optimizer state exists; a failed step must not advance it
    bad.grads["bias"] = zeros(3)   # misshapen
    before_good, before_bad, before_opt = snapshot(good), snapshot(bad), snapshot(opt)
    with pytest.raises(ValueError, match=r"models\[1\].grads\['bias'\] has shape \(3,\)"):
        opt.step()
    del bad.grads["bias"]
    with pytest.raises(KeyError, match=r"models\[1\].grads has no entry 'bias'"):
        opt.step()
    assert_same(before_good, snapshot(good))
    assert_same(before_opt, snapshot(opt))
    for k in ("weight",):
        np.testing.assert_array_equal(before_bad["params"][k], bad.params[k])


def test_numpy_scalars_are_accepted_as_hyperparameters():
    m = trained_linear()
    optim.SGD([m], lr=np.float32(0.1), momentum=np.float64(0.9)).step()
    optim.Adam([m], lr=np.float64(1e-3), betas=(np.float32(0.9), 0.99)).step()


# ---------------------------------------------------------------- clipping

CLIP_CALLS = [
    ("max_norm 0", ValueError, "max_norm must be > 0", lambda m: fastrnn.clip_grad_norm_(m, 0)),
    ("max_norm negative", ValueError, "max_norm must be > 0",
     lambda m: fastrnn.clip_grad_norm_(m, -1.0)),
    ("max_norm nan", ValueError, "max_norm must be > 0",
     lambda m: fastrnn.clip_grad_norm_(m, math.nan)),
    ("max_norm str", TypeError, "max_norm must be a real number",
     lambda m: fastrnn.clip_grad_norm_(m, "1")),
    ("norm_type 0", ValueError, "norm_type must be > 0",
     lambda m: fastrnn.clip_grad_norm_(m, 1.0, norm_type=0)),
    ("norm_type nan", ValueError, "norm_type must be > 0",
     lambda m: fastrnn.clip_grad_norm_(m, 1.0, norm_type=math.nan)),
    ("clip_value 0", ValueError, "clip_value must be > 0",
     lambda m: fastrnn.clip_grad_value_(m, 0.0)),
    ("clip_value negative", ValueError, "clip_value must be > 0",
     lambda m: fastrnn.clip_grad_value_(m, -1)),
    ("clip_value nan", ValueError, "clip_value must be > 0",
     lambda m: fastrnn.clip_grad_value_(m, math.nan)),
    ("models int", TypeError, "models_or_grad_dicts must be", lambda m: fastrnn.clip_grad_norm_(5, 1)),
    ("models [int]", TypeError, r"models_or_grad_dicts\[1\]",
     lambda m: fastrnn.clip_grad_norm_([m, 5], 1)),
    ("int gradients", TypeError, "every gradient must be a floating array",
     lambda m: fastrnn.clip_grad_value_({"w": np.ones(3, int)}, 1.0)),
    ("nonfinite norm", RuntimeError, "total norm",
     lambda m: (m.grads["bias"].__setitem__(0, np.nan), fastrnn.clip_grad_norm_(
         m, 1e-3, error_if_nonfinite=True))),
]


@pytest.mark.parametrize("label,exc,match,call", CLIP_CALLS, ids=[r[0] for r in CLIP_CALLS])
def test_clip_rejects(label, exc, match, call):
    m = trained_linear()
    before = snapshot(m)
    with pytest.raises(exc, match=match):
        call(m)
    if label == "nonfinite norm":
        before["grads"]["bias"][0] = np.nan   # set by the call itself, before clipping
    assert_same(before, snapshot(m))


def test_clip_inf_only_measures():
    m = trained_linear()
    before = snapshot(m)
    norm = fastrnn.clip_grad_norm_(m, math.inf)
    assert norm > 0
    fastrnn.clip_grad_value_(m, math.inf)
    assert_same(before, snapshot(m))


# --------------------------------------------------------------- gradcheck

def rnn64():
    return fastrnn.RNN(2, 3, backend="numpy", dtype=f64, seed=0)


X64 = np.zeros((3, 2, 2))
GRADCHECK_CALLS = [
    ("eps 0", ValueError, "eps must be finite and > 0", lambda m: fastrnn.gradcheck(m, X64, eps=0)),
    ("eps nan", ValueError, "eps", lambda m: fastrnn.gradcheck(m, X64, eps=math.nan)),
    ("atol negative", ValueError, "atol must be finite and >= 0",
     lambda m: fastrnn.gradcheck(m, X64, atol=-1)),
    ("rtol str", TypeError, "rtol must be a real number",
     lambda m: fastrnn.gradcheck(m, X64, rtol="1e-5")),
    ("max_elements 0", ValueError, "max_elements",
     lambda m: fastrnn.gradcheck(m, X64, max_elements=0)),
    ("max_elements float", TypeError, "max_elements",
     lambda m: fastrnn.gradcheck(m, X64, max_elements=2.5)),
    ("model Linear", TypeError, "model must be a fastrnn RNN, LSTM or GRU",
     lambda m: fastrnn.gradcheck(fastrnn.Linear(2, 2), X64)),
    ("x int", TypeError, "x must have a floating dtype",
     lambda m: fastrnn.gradcheck(m, np.zeros((3, 2, 2), int))),
    ("x list", TypeError, "x must be a floating", lambda m: fastrnn.gradcheck(m, [[[0.0, 0.0]]])),
    ("x features", ValueError, "input_size=2", lambda m: fastrnn.gradcheck(m, np.zeros((3, 2, 5)))),
    ("lengths", ValueError, "lengths must lie in", lambda m: fastrnn.gradcheck(m, X64, lengths=[5, 1])),
    ("hx shape", ValueError, "hx must have shape",
     lambda m: fastrnn.gradcheck(m, X64, hx=np.zeros((2, 2, 3)))),
    ("hx int", TypeError, "hx must have a floating dtype",
     lambda m: fastrnn.gradcheck(m, X64, hx=np.zeros((1, 2, 3), int))),
    ("LSTM hx not a pair", ValueError, "hx must be a pair",
     lambda m: fastrnn.gradcheck(fastrnn.LSTM(2, 3, dtype=f64), X64, hx=np.zeros((1, 2, 3)))),
    ("seed", TypeError, "seed", lambda m: fastrnn.gradcheck(m, X64, seed="a")),
]


@pytest.mark.parametrize("label,exc,match,call", GRADCHECK_CALLS,
                         ids=[r[0] for r in GRADCHECK_CALLS])
def test_gradcheck_rejects(label, exc, match, call):
    m = rnn64()
    with_pending(m, np.zeros((T, B, 2)))
    before = snapshot(m)
    with pytest.raises(exc, match=match):
        call(m)
    assert_same(before, snapshot(m))


def test_gradcheck_leaves_the_model_alone():
    m = fastrnn.GRU(2, 3, seed=0)   # float32: the check runs on a float64 copy
    with_pending(m, np.zeros((T, B, 2), f32))
    m.grads["weight_hh_l0"][...] = 3.0
    before = snapshot(m)
    assert fastrnn.gradcheck(m, np.random.default_rng(0).standard_normal((3, 2, 2)),
                             max_elements=3)
    assert_same(before, snapshot(m))


# ------------------------------------------------------------------- tbptt

def loss_fn(out, steps):
    return 0.0, np.ones_like(out)


TBPTT_CALLS = [
    ("size 0", ValueError, "size must be a positive integer",
     lambda m: truncated_bptt(m, X64, 0, loss_fn)),
    ("size float", ValueError, "size must be a positive integer",
     lambda m: truncated_bptt(m, X64, 1.5, loss_fn)),
    ("loss_fn None", TypeError, "loss_fn must be callable", lambda m: truncated_bptt(m, X64, 2, None)),
    ("after_chunk int", TypeError, "after_chunk must be None or callable",
     lambda m: truncated_bptt(m, X64, 2, loss_fn, after_chunk=3)),
    ("x int", TypeError, "x has dtype int64", lambda m: truncated_bptt(m, X64.astype(int), 2, loss_fn)),
    ("x list", TypeError, "x must be a numpy.ndarray", lambda m: truncated_bptt(m, [[[0.0]]], 2,
                                                                               loss_fn)),
    ("hx shape", ValueError, "hx must have shape",
     lambda m: truncated_bptt(m, X64, 2, loss_fn, hx=np.zeros((1, 5, 3)))),
    ("eval mode", RuntimeError, "train mode", lambda m: truncated_bptt(m.eval(), X64, 2, loss_fn)),
    ("model Linear", TypeError, "model must be a fastrnn", lambda m: truncated_bptt(
        fastrnn.Linear(2, 2), X64, 2, loss_fn)),
    ("chunks axis", ValueError, "axis must be an integer in", lambda m: list(chunks(X64, size=2,
                                                                                   axis=3))),
    ("chunks lengths differ", ValueError, r"arrays\[1\] has 2 steps",
     lambda m: list(chunks(X64, X64[:2], size=2))),
]


@pytest.mark.parametrize("label,exc,match,call", TBPTT_CALLS, ids=[r[0] for r in TBPTT_CALLS])
def test_tbptt_rejects(label, exc, match, call):
    m = rnn64()
    m.grads["weight_ih_l0"][...] = 1.0
    before = snapshot(m)
    with pytest.raises(exc, match=match):
        call(m)
    if label != "eval mode":   # that call switched the mode itself
        assert_same(before, snapshot(m))


def test_tbptt_bad_loss_fn_result_is_named():
    with pytest.raises(TypeError, match=r"loss_fn must return \(loss, d_out\)"):
        truncated_bptt(rnn64(), X64, 2, lambda out, steps: 1.0)


def test_tbptt_accepts_numpy_integer_size():
    losses_, _ = truncated_bptt(rnn64(), X64, np.int64(2), loss_fn)
    assert len(losses_) == 2


# --------------------------------------------------------------------- CLI

CLI_ARGS = [
    (["bench", "--repeats", "0"], "--repeats: expected a positive integer"),
    (["bench", "--repeats", "two"], "--repeats: expected a positive integer"),
    (["bench", "--passes", "0"], "--passes: expected a positive integer"),
    (["bench", "--threads", "-1"], "--threads: expected a positive integer"),
    (["bench", "--vs", "tensorflow"], "--vs takes peers from"),
    (["bench", "--protocol", "threads"], "--protocol: invalid choice"),
    (["bench", "--sizes", "1x2x3"], "--sizes takes TxBxIxH"),
    (["bench", "--sizes", "0x2x3x4"], "--sizes takes TxBxIxH"),
    (["bench", "--dtype", "float16"], "--dtype: invalid choice"),
    (["bench", "--cells", "transformer"], "--cells: invalid choice"),
    (["bench", "--backends", "tpu"], "--backends: invalid choice"),
    (["check", "--cells", "gru", "mlp"], "--cells: invalid choice"),
    (["launch"], "invalid choice"),
]


@pytest.mark.parametrize("argv,message", CLI_ARGS, ids=[" ".join(a) for a, _ in CLI_ARGS])
def test_cli_rejects(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------- layouts of valid input

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_noncontiguous_and_fortran_inputs(backend, kind):
    """Strided and Fortran-ordered x, hx and d_out give the contiguous results, bitwise."""
    rng = np.random.default_rng(3)
    cls = fastrnn.LSTM if kind == "lstm" else fastrnn.GRU
    m = cls(I, H, num_layers=2, bidirectional=True, backend=backend, dtype=f64, seed=0)
    S = 2 if kind == "lstm" else 1
    x = rng.standard_normal((T, B, I))
    hx = tuple(rng.standard_normal((4, B, H)) for _ in range(S))
    d_out = rng.standard_normal((T, B, 2 * H))
    lengths = np.array([T, 2])

    def run(x, hx, d_out):
        out, h_n = m(x, hx if S == 2 else hx[0], lengths)
        d_x, d_hx = m.backward(d_out)
        grads = {k: v.copy() for k, v in m.grads.items()}
        m.zero_grad()
        return out, h_n, d_x, d_hx, grads

    def strided(a):   # every other element of a twice-as-large array: no axis contiguous
        big = np.zeros(tuple(2 * n for n in a.shape))
        view = big[tuple(slice(None, None, 2) for _ in a.shape)]
        view[...] = a
        return view

    reference = run(x, hx, d_out)
    for layout in (np.asfortranarray, strided):
        xs, hxs, ds = layout(x), tuple(layout(h) for h in hx), layout(d_out)
        assert not xs.flags.c_contiguous
        saved = xs.copy(), [h.copy() for h in hxs], ds.copy()
        got = run(xs, hxs, ds)
        for a, b in zip(_flatten(reference), _flatten(got)):
            np.testing.assert_array_equal(a, b)
        # inputs are read, never written
        np.testing.assert_array_equal(saved[0], xs)
        np.testing.assert_array_equal(saved[2], ds)
        for s, h in zip(saved[1], hxs):
            np.testing.assert_array_equal(s, h)


def _flatten(item):
    if isinstance(item, dict):
        return [item[k] for k in sorted(item)]
    if isinstance(item, (tuple, list)):
        return [a for sub in item for a in _flatten(sub)]
    return [item]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_refilling_x_before_backward_does_not_change_gradients(backend):
    """The pending backward keeps its own copy of x (a reused input buffer is common)."""
    rng = np.random.default_rng(0)
    m = fastrnn.GRU(I, H, backend=backend, dtype=f64, seed=0)
    x = rng.standard_normal((T, B, I))
    d_out = rng.standard_normal((T, B, H))
    m(x)
    m.backward(d_out)
    expected = {k: v.copy() for k, v in m.grads.items()}
    m.zero_grad()
    m(x)
    x[...] = 1e3   # the caller reuses its buffer
    m.backward(d_out)
    for k in expected:
        np.testing.assert_array_equal(expected[k], m.grads[k])
