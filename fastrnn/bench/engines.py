"""The engines ``fastrnn bench`` times: fastrnn's backends and the peers a user would
deploy instead (torch, ONNX Runtime, OpenVINO, JAX), one registry.

Every engine builds, for a :class:`~fastrnn.bench.cases.Case` and a mode, a
zero-argument callable that runs one inference (eval-mode forward) or one
training step (forward and backward: input and weight gradients), from the same
inputs and weights (:func:`~fastrnn.bench.cases.inputs`). Before it is timed an
engine is verified against the float64 numpy reference on a small problem of the
same cell kind and mode (:func:`verify`); an absent engine says why.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from fastrnn import backends

from .cases import Case, build_layer, inputs, make_layer


class Engine:
    """One contender. Subclasses set ``name``, ``modes`` and ``requires`` and define
    :meth:`runner` and :meth:`compute`."""

    name = ""
    modes = ("inference", "training")
    requires = ()
    #: Precision label shown next to the engine (OpenVINO's bf16 default).
    precision = None
    #: Relative error allowed against the float64 reference in float32.
    tolerance32 = 1e-4
    #: Layer variants it can run (cases.VARIANTS; "" is the plain layer).
    variants = ("",)

    def unavailable_reason(self) -> str | None:
        for module in self.requires:
            try:
                __import__(module)
            except ImportError as exc:
                return f"{module} is not installed ({exc}); pip install 'fastrnn[peers]'"
        return None

    def setup(self, threads: int) -> None:
        """Set the engine's thread count, once per process, before anything runs."""

    def runner(self, case: Case, mode: str, threads: int):
        raise NotImplementedError

    def compute(self, case: Case, mode: str, threads: int) -> dict:
        """Named float64 results of one run on ``inputs(case)``: ``out`` and, in
        training, the gradients of ``sum(out * d_out)`` by ``x`` and every parameter
        (torch's names)."""
        raise NotImplementedError


# ----------------------------------------------------------------- fastrnn

class FastrnnEngine(Engine):
    def __init__(self, backend):
        self.name = backend
        self.variants = ("",) if backend == "cuda" else ("", "proj", "layernorm")

    def unavailable_reason(self):
        return backends.why_absent().get(self.name)

    def setup(self, threads):
        if self.name != "cuda":
            from threadpoolctl import threadpool_limits
            threadpool_limits(threads, user_api="blas")

    def _layer(self, case, mode):
        return _timed_model(case, self.name, mode)

    def runner(self, case, mode, threads):
        return fastrnn_runner(case, self.name, mode, *inputs(case)[:2])[0]

    def compute(self, case, mode, threads):
        x, d_out, _ = inputs(case)
        model = self._layer(case, mode)
        xp = model._xp
        out, _ = model(xp.asarray(x))
        result = {"out": out}
        if mode == "training":
            d_x, _ = model.backward(xp.asarray(d_out))
            result.update({"x": d_x, **model.grads})
        return {k: np.asarray(v.get() if hasattr(v, "get") else v, np.float64)
                for k, v in result.items()}


def _timed_model(case: Case, backend: str, mode: str):
    """The model an engine of fastrnn verifies and times: for inference a frozen copy
    (``Module.freeze``: the weights packed once, as ONNX Runtime and OpenVINO pack them when
    they load a model), for training the module itself."""
    model = make_layer(case, backend)
    return model.train() if mode == "training" else model.freeze()


def fastrnn_runner(case: Case, backend: str, mode: str, x, d_out):
    """A zero-argument callable that runs one inference or training step
    (:func:`_timed_model`), and the model."""
    model = _timed_model(case, backend, mode)
    xp = model._xp
    x, d_out = xp.asarray(x), xp.asarray(d_out)
    sync = (lambda: xp.cuda.Device().synchronize()) if backend == "cuda" else (lambda: None)
    if mode == "inference":
        def run():
            model(x)
            sync()
    else:
        def run():
            model(x)
            model.backward(d_out)
            sync()
    return run, model


# ------------------------------------------------------------------- torch

def torch_module(case: Case, state_dict, device="cpu", namespace=None):
    import torch
    kind = backends.cell_kind(case.cell)
    options = kind.constructor_options()
    if case.variant == "proj":
        options["proj_size"] = case.P
    layer = getattr(namespace or torch.nn, kind.family)(case.I, case.H, **options)
    layer = layer.to(device=device, dtype=getattr(torch, case.dtype))
    layer.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()})
    return layer


def torch_runner(case: Case, mode: str, x, d_out, state_dict, device="cpu", namespace=None):
    import torch
    layer = torch_module(case, state_dict, device, namespace)
    xt = torch.from_numpy(x).to(device)
    dt = torch.from_numpy(d_out).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if mode == "inference":
        layer.eval()

        def run():
            with torch.no_grad():
                layer(xt)
            sync()
    else:
        layer.train()
        xg = xt.clone().requires_grad_(True)

        def run():
            out, _ = layer(xg)
            out.backward(dt)
            sync()
    return run


class TorchEngine(Engine):
    name = "torch"
    requires = ("torch",)
    variants = ("", "proj")

    def _namespace(self):
        return None            # torch.nn

    def setup(self, threads):
        import torch
        torch.set_num_threads(threads)

    def runner(self, case, mode, threads):
        x, d_out, state = inputs(case)
        return torch_runner(case, mode, x, d_out, state, namespace=self._namespace())

    def compute(self, case, mode, threads):
        import torch
        x, d_out, state = inputs(case)
        layer = torch_module(case, state, namespace=self._namespace())
        xt = torch.from_numpy(x).requires_grad_(mode == "training")
        out, _ = layer(xt)
        result = {"out": out.detach().numpy()}
        if mode == "training":
            out.backward(torch.from_numpy(d_out))
            result["x"] = xt.grad.numpy()
            result.update({k: p.grad.numpy() for k, p in layer.named_parameters()})
        return {k: np.asarray(v, np.float64) for k, v in result.items()}


class FastrnnTorchEngine(TorchEngine):
    """``fastrnn.torch`` modules: torch's API and autograd over fastrnn's numba kernels,
    what a torch user on the CPU gets by changing one import."""

    name = "fastrnn.torch"
    variants = ("",)

    def _namespace(self):
        import fastrnn.torch
        return fastrnn.torch


# ------------------------------------------------- ONNX Runtime, OpenVINO

def _onnx_file(case: Case) -> str:
    """The case's layer as an ONNX file (fastrnn.to_onnx, the same weights)."""
    import fastrnn
    layer = make_layer(case, "numpy")
    path = os.path.join(tempfile.mkdtemp(prefix="fastrnn-bench-"), f"{case.cell}.onnx")
    fastrnn.to_onnx(layer, path)
    return path


class OnnxRuntimeEngine(Engine):
    """ONNX Runtime, CPU execution provider, the ONNX LSTM/GRU/RNN operator (inference)."""

    name = "onnxruntime"
    modes = ("inference",)
    requires = ("onnxruntime", "onnx")

    def _session(self, case, threads):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle pool threads otherwise spin and take the cores of whatever runs next.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return ort.InferenceSession(_onnx_file(case), options,
                                    providers=["CPUExecutionProvider"])

    def runner(self, case, mode, threads):
        session = self._session(case, threads)
        feed = {"X": inputs(case)[0]}
        return lambda: session.run(None, feed)

    def compute(self, case, mode, threads):
        out = self._session(case, threads).run(None, {"X": inputs(case)[0]})[0]
        return {"out": np.asarray(out, np.float64)}


class OpenVinoEngine(Engine):
    """OpenVINO's CPU plugin on the same ONNX model (inference). ``precision`` f32 is
    the comparable run; OpenVINO's default on AVX512-BF16 CPUs is bf16 (error about
    1e-2), shown as its own row."""

    modes = ("inference",)
    requires = ("openvino", "onnx")

    def __init__(self, precision):
        self.precision = precision
        self.name = "openvino" if precision == "f32" else f"openvino-{precision}"
        if precision != "f32":
            self.tolerance32 = 5e-2   # reported, not comparable: bf16 keeps 8 bits

    def _compiled(self, case, threads):
        import openvino as ov
        core = ov.Core()
        model = core.read_model(_onnx_file(case))
        model.reshape({model.inputs[0]: [case.T, case.B, case.I]})
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if self.precision == "f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        return core.compile_model(model, "CPU", config)

    def runner(self, case, mode, threads):
        request = self._compiled(case, threads).create_infer_request()
        x = inputs(case)[0]
        return lambda: request.infer({0: x})

    def compute(self, case, mode, threads):
        request = self._compiled(case, threads).create_infer_request()
        out = request.infer({0: inputs(case)[0]})
        return {"out": np.asarray(next(iter(out.values())), np.float64)}


# --------------------------------------------------------------------- JAX

def _jax_cell(cell, H):
    """One step ``(h, c), x_t W_ih^T -> (h', c')`` in jax.numpy, torch's gate order."""
    import jax
    import jax.numpy as jnp

    if cell == "lstm":
        def step(state, xw, w_hh, b):
            h, c = state
            a = xw + h @ w_hh.T + b
            i, f, g, o = jnp.split(a, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h
    elif cell == "gru":
        def step(state, xw, w_hh, b):
            (h,) = state
            b_ih, b_hh = b
            ah = h @ w_hh.T + b_hh
            xr, xz, xn = jnp.split(xw + b_ih, 3, axis=-1)
            hr, hz, hn = jnp.split(ah, 3, axis=-1)
            r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
            n = jnp.tanh(xn + r * hn)
            h = (1 - z) * n + z * h
            return (h,), h
    else:
        act = jnp.tanh if cell == "rnn_tanh" else jax.nn.relu

        def step(state, xw, w_hh, b):
            (h,) = state
            h = act(xw + h @ w_hh.T + b)
            return (h,), h
    return step


class JaxEngine(Engine):
    """JAX on the CPU: a ``jit`` of ``value_and_grad`` of a ``lax.scan`` of the cell
    (training), and a ``jit`` of the scan (inference)."""

    name = "jax"
    requires = ("jax",)

    def setup(self, threads):
        # XLA reads its flags at start-up: the worker sets XLA_FLAGS (see worker.py).
        pass

    def _functions(self, case):
        import jax
        import jax.numpy as jnp
        step = _jax_cell(case.cell, case.H)
        S = backends.state_count(case.cell)

        def forward(params, x):
            w_ih, w_hh, b_ih, b_hh = params
            xw = jnp.einsum("tbi,gi->tbg", x, w_ih)
            b = (b_ih, b_hh) if case.cell == "gru" else b_ih + b_hh
            h0 = jnp.zeros((x.shape[1], case.H), x.dtype)
            _, out = jax.lax.scan(lambda s, xt: step(s, xt, w_hh, b), (h0,) * S, xw)
            return out

        def loss(params, x, d_out):
            return jnp.sum(forward(params, x) * d_out)

        return jax.jit(forward), jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    def _params(self, case):
        state = inputs(case)[2]
        return tuple(state[f"{n}_l0"] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def runner(self, case, mode, threads):
        import jax
        forward, grad = self._functions(case)
        x, d_out, _ = inputs(case)
        params = tuple(jax.device_put(p) for p in self._params(case))
        x, d_out = jax.device_put(x), jax.device_put(d_out)
        if mode == "inference":
            return lambda: forward(params, x).block_until_ready()
        return lambda: jax.block_until_ready(grad(params, x, d_out))

    def compute(self, case, mode, threads):
        forward, grad = self._functions(case)
        x, d_out, _ = inputs(case)
        params = self._params(case)
        result = {"out": forward(params, x)}
        if mode == "training":
            _, (d_params, d_x) = grad(params, x, d_out)
            result["x"] = d_x
            for n, g in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), d_params):
                result[f"{n}_l0"] = g
        return {k: np.asarray(v, np.float64) for k, v in result.items()}


# ---------------------------------------------------------------- registry

FASTRNN = ("numpy", "numba", "cuda")
PEERS = ("torch", "onnxruntime", "openvino", "openvino-bf16", "jax", "fastrnn.torch")
#: The engines whose rows are fastrnn's, with speedups over the peers.
OURS = FASTRNN + ("fastrnn.torch",)


def engine(name: str) -> Engine:
    """The engine called ``name`` (one of :data:`FASTRNN` or :data:`PEERS`)."""
    if name in FASTRNN:
        return FastrnnEngine(name)
    makers = {"torch": TorchEngine, "onnxruntime": OnnxRuntimeEngine, "jax": JaxEngine,
              "fastrnn.torch": FastrnnTorchEngine,
              "openvino": lambda: OpenVinoEngine("f32"),
              "openvino-bf16": lambda: OpenVinoEngine("bf16")}
    if name not in makers:
        raise ValueError(f"unknown engine {name!r}; choose from {', '.join(FASTRNN + PEERS)}")
    return makers[name]()


#: The small problem every engine is verified on, per cell kind and mode.
VERIFY_SHAPE = (7, 4, 5, 6)


def reference(case: Case, mode: str) -> dict:
    """The float64 numpy reference of :meth:`Engine.compute` (same weights and inputs)."""
    ref = FastrnnEngine("numpy")
    return ref.compute(Case(case.cell, case.T, case.B, case.I, case.H, "float64", case.variant),
                       mode, 1)


def verify(eng: Engine, kind: str, mode: str, dtype: str, threads: int) -> tuple[bool, float]:
    """``(passed, worst relative error)`` of ``eng`` against the float64 reference on
    the small problem :data:`VERIFY_SHAPE` of ``kind`` (a cell kind, or
    'cell:variant') in ``mode``."""
    cell, _, variant = kind.partition(":")
    case = Case(cell, *VERIFY_SHAPE, dtype, variant)
    want = reference(case, mode)
    got = eng.compute(case, mode, threads)
    missing = set(want) - set(got)
    if missing:
        raise RuntimeError(f"{eng.name} did not compute {', '.join(sorted(missing))}")
    worst = 0.0
    for key, w in want.items():
        scale = max(1.0, float(np.max(np.abs(w))))
        worst = max(worst, float(np.max(np.abs(got[key] - w))) / scale)
    tolerance = eng.tolerance32 if dtype == "float32" else 1e-9
    return worst <= tolerance, worst


def verify_backend(backend, cells, dtype) -> tuple[bool, float]:
    """A fastrnn backend's outputs, final states and every gradient (input, initial
    states, parameters) against the float64 reference, with lengths, bidirectional:
    more than the timed configuration, because fastrnn's own kernels are on trial."""
    worst = 0.0
    rng = np.random.default_rng(1)
    T, B, I, H = 7, 4, 5, 6
    x = rng.standard_normal((T, B, I))
    lengths = np.array([7, 3, 5, 1])
    tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-9
    for cell in cells:
        ref = build_layer(cell, I, H, "numpy", np.float64, bidirectional=True)
        model = ref.copy(backend=backend, dtype=dtype)
        results = []
        for m in (ref, model):
            xp = m._xp
            out, states = m(xp.asarray(x.astype(m.dtype)), lengths=lengths)
            states = states if isinstance(states, tuple) else (states,)
            d_out = xp.asarray(np.ones(out.shape, dtype=m.dtype))
            d_states = tuple(xp.asarray(np.full(s.shape, 0.5, dtype=m.dtype)) for s in states)
            d_x, d_hx = m.backward(d_out, d_states if len(states) == 2 else d_states[0])
            d_hx = d_hx if isinstance(d_hx, tuple) else (d_hx,)
            grads = [out, *states, d_x, *d_hx] + [m.grads[k] for k in sorted(m.grads)]
            results.append([np.asarray(g.get() if hasattr(g, "get") else g, dtype=np.float64)
                            for g in grads])
        for a, b in zip(*results):
            err = float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(a)))))
            worst = max(worst, err)
    return worst <= tol, worst
