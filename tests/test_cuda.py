"""The cuda backend, checked three ways.

1. Without a GPU, when g++ is present: the kernels of ``csrc/`` are compiled as
   plain C++ (``tests/cuda_host_shim.h`` stands in for CUDA's keywords), and
   the backend's host loops (:mod:`fastrnn.backends.cuda.loops`) run on NumPy arrays
   through them. Stepwise kernels run their grid-stride loops on one thread;
   persistent kernels run as a real grid of OS threads, with block barriers,
   per-block shared memory (NaN-filled) and the grid barrier's atomics, on
   several launch geometries. This checks the kernels' maths, the masking, the
   state-buffer offsets, the work split, the synchronisation logic, the
   private cache layout and every GEMM of the host loop against the float64
   reference, on every cell, option and algorithm.
2. Without a GPU, when nvcc is present: every ``.cu`` compiles for sm_90 with
   ``-Xptxas -v`` and no spills; when libnvrtc can be loaded, the inlined
   source compiles under NVRTC too.
3. With a GPU (``pytest -m cuda``): the same comparisons through CuPy, the
   layers with ``backend="cuda"``, the loader, streams and TF32.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import subprocess
import threading
import types
from pathlib import Path

import numpy as np
import pytest

import fastrnn
from fastrnn.backends import cuda, reference
from fastrnn.backends.cuda import _cupy, checks, loader, runtime

CSRC = cuda.csrc_dir()
UNITS = sorted(set(cuda.UNITS.values()))
HAS_GPU = "cuda" in fastrnn.backends.available()
gpu = pytest.mark.skipif(not HAS_GPU, reason=f"no cuda backend here: "
                         f"{fastrnn.backends.why_absent().get('cuda')}")

# (cell, reset_after) pairs, None for a cell without that option: every kernel path.
CASES = [(cell, reset_after) for cell in fastrnn.backends.CELLS
         for reset_after in ((True, False) if "reset_after" in
                             fastrnn.backends.KERNEL_OPTIONS.get(cell, {}) else (None,))]
TOL = {np.float32: 1e-5, np.float64: 1e-10}


# ------------------------------------------------------------------ problem set-up

def make_problem(cell, T=6, B=5, I=4, H=7, bias=True, lengths=False, seed=0, P=None):
    """float64 NumPy arguments of ``{cell}_forward`` and a random d_out, d_states; with ``P``,
    the LSTM's projection ``w_hr`` (P, H), and h, w_hh's rows and their gradients have P
    columns."""
    rng = np.random.default_rng(seed)
    G = fastrnn.backends.gate_count(cell) * H
    S = fastrnn.backends.state_count(cell)
    widths = (H if P is None else P, H)[:S]   # of h (and the LSTM's c)
    k = 1 / np.sqrt(H)
    args = dict(
        x=rng.standard_normal((T, B, I)),
        states=[0.5 * rng.standard_normal((B, width)) for width in widths],
        w_ih=rng.uniform(-k, k, (G, I)), w_hh=rng.uniform(-k, k, (G, widths[0])),
        b_ih=rng.uniform(-k, k, G) if bias else None,
        b_hh=rng.uniform(-k, k, G) if bias else None,
        lengths=None)
    if lengths:
        lens = rng.integers(0, T + 1, size=B)
        lens[0], lens[-1] = T, 0   # a full sequence and an empty one
        args["lengths"] = lens.astype(np.int64)
    d_out = rng.standard_normal((T, B, widths[0]))
    d_states = [rng.standard_normal((B, width)) for width in widths]
    if P is not None:
        args["w_hr"] = rng.uniform(-k, k, (P, H))
    return args, d_out, d_states


def run(module, cell, args, d_out, d_states, reverse, training, reset_after, convert):
    """Forward (and backward when training) of ``module``; every result as NumPy float64."""
    fwd = getattr(module, f"{cell}_forward")
    bwd = getattr(module, f"{cell}_backward")
    extra = {} if reset_after is None else {"reset_after": reset_after}
    c = convert
    if args.get("w_hr") is not None:
        extra["w_hr"] = c(args["w_hr"])
    lengths = args["lengths"]
    result = fwd(c(args["x"]), *map(c, args["states"]), c(args["w_ih"]), c(args["w_hh"]),
                 None if args["b_ih"] is None else c(args["b_ih"]),
                 None if args["b_hh"] is None else c(args["b_hh"]),
                 lengths=lengths, reverse=reverse, training=training, **extra)
    *outputs, cache = result
    if not training:
        assert cache is None
        return outputs
    grads = bwd(c(d_out), *map(c, d_states), cache)
    return outputs + list(grads)


def assert_close(got, want, tol, what):
    assert len(got) == len(want), what
    for index, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"{what}: result {index} should be None"
            continue
        g = g.get() if hasattr(g, "get") else np.asarray(g)
        assert g.shape == w.shape, f"{what}: result {index} has shape {g.shape}, not {w.shape}"
        scale = max(np.abs(w).max(initial=0.0), 1e-30)
        err = np.abs(g.astype(np.float64) - w).max(initial=0.0) / scale
        assert err <= tol, f"{what}: result {index} relative error {err:.3g} > {tol:g}"


def check_against_reference(convert_for, dtype, cell, reset_after, reverse, bias, lengths,
                            training, **shape):
    args, d_out, d_states = make_problem(cell, bias=bias, lengths=lengths, **shape)
    want = run(reference, cell, args, d_out, d_states, reverse, training, reset_after,
               lambda a: a)
    got = run(cuda, cell, args, d_out, d_states, reverse, training, reset_after,
              convert_for(dtype))
    assert_close(got, want, TOL[dtype],
                 f"{cell} reset_after={reset_after} reverse={reverse} bias={bias} "
                 f"lengths={lengths} training={training} {np.dtype(dtype).name} {shape}")


OPTIONS = [(reverse, bias, lengths) for reverse in (False, True) for bias in (True, False)
           for lengths in (False, True)]


def each_option():
    """(reverse, bias, lengths, training) for every option of the kernel contract."""
    return [(*option, training) for option in OPTIONS for training in (True, False)]


# ------------------------------------------------------------------ 1. host emulation

SHIM = Path(__file__).with_name("cuda_host_shim.h")
# Launch limits of the emulated device: few SMs and small blocks, so that the test shapes
# need several blocks, a partial last block, K splits and several batches per thread.
HOST_LIMITS = cuda.PersistentLimits(sms=3, shared_bytes=48 * 1024, threads=64,
                                    min_split_vectors=1)


@pytest.fixture(scope="session")
def host_libs(tmp_path_factory):
    """csrc/*.cu compiled as C++ shared libraries, one per unit."""
    gxx = shutil.which("g++")
    if gxx is None or CSRC is None:
        pytest.skip("g++ or csrc/ not found")
    folder = tmp_path_factory.mktemp("fastrnn_host")
    libs = {}
    for unit in UNITS:
        lib = folder / f"fastrnn_{unit}.so"
        subprocess.run([gxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", "-Wall",
                        "-Werror", "-Wno-unknown-pragmas", "-include", str(SHIM), "-x", "c++",
                        str(CSRC / f"fastrnn_{unit}.cu"), "-o", str(lib)],
                       check=True, capture_output=True, text=True)
        libs[unit] = ctypes.CDLL(str(lib))
        libs[unit].fastrnn_host_grid_new.restype = ctypes.c_void_p
        libs[unit].fastrnn_host_grid_new.argtypes = [ctypes.c_uint, ctypes.c_uint,
                                                     ctypes.c_size_t]
        libs[unit].fastrnn_host_grid_free.argtypes = [ctypes.c_void_p]
        libs[unit].fastrnn_host_enter.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    return libs


class HostRuntime(runtime.Runtime):
    """The backend's host loop on NumPy arrays, with the kernels compiled for the CPU."""

    xp = np

    def __init__(self, libs, limits=HOST_LIMITS):
        self.libs = libs
        self.limits = limits
        self.launches = []   # the kernel of every launch
        self.found = []      # the kernel of every look-up of a stepwise kernel

    @staticmethod
    def _c_args(args):
        return [ctypes.c_int(a) if isinstance(a, int) else ctypes.c_void_p(a.ctypes.data)
                for a in args]

    def _step_launcher(self, unit, name, n):
        self.found.append(name)
        kernel = getattr(self.libs[unit], name)

        def launch(args):
            self.launches.append(name)
            kernel(*self._c_args(args))

        return launch

    def _launch_persistent(self, unit, name, plan, args):
        """One OS thread per CUDA thread; ctypes lets go of the GIL during each call."""
        self.launches.append(name)
        lib, c_args = self.libs[unit], self._c_args(args)
        assert plan.shared_bytes <= self.limits.shared_bytes and plan.blocks <= self.limits.sms
        grid = lib.fastrnn_host_grid_new(plan.blocks, plan.threads, plan.shared_bytes)

        def thread(block, index):
            lib.fastrnn_host_enter(grid, block, index)
            getattr(lib, name)(*c_args)

        threads = [threading.Thread(target=thread, args=(b, i), daemon=True)
                   for b in range(plan.blocks) for i in range(plan.threads)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
                assert not t.is_alive(), f"{name} did not finish: a barrier never opened"
        finally:
            if not any(t.is_alive() for t in threads):
                lib.fastrnn_host_grid_free(grid)

    def persistent_limits(self):
        return self.limits


@pytest.fixture
def host_runtime(host_libs, monkeypatch):
    rt = HostRuntime(host_libs)
    monkeypatch.setattr(runtime, "_override", rt)
    monkeypatch.setattr(cuda, "_algorithm", "stepwise")
    return rt


def to_host(dtype):
    return lambda a: np.ascontiguousarray(a, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell, reset_after", CASES)
def test_host_loop_matches_reference(host_runtime, cell, reset_after, dtype):
    for option in each_option():
        check_against_reference(to_host, dtype, cell, reset_after, *option)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_host_loop_with_projection_matches_reference(host_runtime, dtype):
    """The LSTM's projection (w_hr, torch's proj_size) on the stepwise loop: out, h_n, c_n and
    every gradient, d_w_hr last, for every option; one step, one sequence, P = 1."""
    for option in each_option():
        check_against_reference(to_host, dtype, "lstm", None, *option, P=3)
    for T, B in ((1, 1), (1, 3), (4, 1)):
        for reverse in (False, True):
            check_against_reference(to_host, dtype, "lstm", None, reverse, False, True, True,
                                    T=T, B=B, P=3)
    check_against_reference(to_host, dtype, "lstm", None, True, True, True, True, P=1)


def test_projection_runs_stepwise_under_auto(host_runtime, monkeypatch):
    """"auto" takes the stepwise loop for w_hr, and still the persistent one without it."""
    monkeypatch.setattr(cuda, "_algorithm", "auto")
    check_against_reference(to_host, np.float64, "lstm", None, False, True, True, True, H=8,
                            P=4)
    assert sorted(set(host_runtime.launches)) == [
        "fastrnn_lstm_bwd_f64", "fastrnn_lstm_fwd_train_f64", "fastrnn_lstm_proj_bwd_f64",
        "fastrnn_lstm_proj_fwd_f64"]
    host_runtime.launches.clear()
    check_against_reference(to_host, np.float64, "lstm", None, False, True, True, True, H=8)
    assert host_runtime.launches == ["fastrnn_lstm_persist_fwd_train_f64",
                                     "fastrnn_lstm_persist_bwd_f64"]


def test_persistent_refuses_the_projection(host_runtime, monkeypatch):
    """The persistent loop has no projection: NotImplementedError naming w_hr and why, before
    any launch, in forward and for a backward of a stepwise forward's cache."""
    args, d_out, (d_h_n, d_c_n) = make_problem("lstm", H=8, P=4)
    forward = lambda: cuda.lstm_forward(  # noqa: E731
        args["x"], *args["states"], args["w_ih"], args["w_hh"], args["b_ih"], args["b_hh"],
        w_hr=args["w_hr"])
    refusal = r"w_hr \(proj_size\): the persistent algorithm has no LSTM projection.*barrier"
    monkeypatch.setattr(cuda, "_algorithm", "persistent")
    with pytest.raises(NotImplementedError, match=refusal):
        forward()
    assert host_runtime.launches == []
    monkeypatch.setattr(cuda, "_algorithm", "stepwise")
    *_, cache = forward()
    host_runtime.launches.clear()
    monkeypatch.setattr(cuda, "_algorithm", "persistent")
    with pytest.raises(NotImplementedError, match=refusal):
        cuda.lstm_backward(d_out, d_h_n, d_c_n, cache)
    assert host_runtime.launches == []


@pytest.mark.parametrize("cell, reset_after", CASES)
def test_zoneout_is_refused(host_runtime, cell, reset_after):
    """The contract's zoneout masks have no cuda kernels: NotImplementedError naming zoneout,
    before any launch, rather than a silent run without them."""
    args, _, _ = make_problem(cell)
    extra = {} if reset_after is None else {"reset_after": reset_after}
    forward = getattr(cuda, f"{cell}_forward")
    masks = fastrnn.backends.CELLS[cell].zoneout_arrays
    assert masks and "zoneout_h" in masks
    for name in masks:
        with pytest.raises(NotImplementedError, match=rf"zoneout \({name}\): the cuda backend "
                                                      rf"has no zoneout kernels"):
            forward(args["x"], *args["states"], args["w_ih"], args["w_hh"], args["b_ih"],
                    args["b_hh"], **extra, **{name: np.ones((1, 1, 7))})
    assert host_runtime.launches == []
    forward(args["x"], *args["states"], args["w_ih"], args["w_hh"], args["b_ih"],
            args["b_hh"], **extra, **{name: None for name in masks})   # None is no zoneout


def test_host_loop_single_step_and_unit_batch(host_runtime):
    for cell, reset_after in CASES:
        for T, B in ((1, 1), (1, 3), (4, 1)):
            check_against_reference(to_host, np.float64, cell, reset_after, True, True, False,
                                    True, T=T, B=B)


def test_every_kernel_exists_in_the_sources(host_libs):
    for unit in UNITS:
        for name in cuda.kernel_names(unit):
            assert hasattr(host_libs[unit], name), f"{name} missing from fastrnn_{unit}.cu"


class FakeRawModule:
    """``cupy.RawModule(path=...)`` and ``(code=...)``; a kernel is its name."""

    fatbin_error = None   # what loading a fatbin raises, if anything

    def __init__(self, path=None, code=None, options=()):
        if path is not None and self.fatbin_error is not None:
            raise self.fatbin_error
        self.code = code

    def get_function(self, name):
        return name


def test_loader_takes_the_fatbin_only_where_it_has_code_for_the_device(tmp_path, monkeypatch):
    if CSRC is None:
        pytest.skip("csrc/ not found")
    for source in CSRC.glob("*.cu*"):
        shutil.copy(source, tmp_path / source.name)
    monkeypatch.setattr(loader, "csrc_dir", lambda: tmp_path)
    got = loader.load("lstm", "90", FakeRawModule)
    assert got.origin == f"NVRTC from {tmp_path / 'fastrnn_lstm.cu'} (no fatbin installed)"
    assert sorted(got.functions) == sorted(cuda.kernel_names("lstm"))
    fatbin = tmp_path / "fastrnn_lstm.fatbin"
    fatbin.write_bytes(b"")
    assert loader.load("lstm", "90", FakeRawModule).origin == f"fatbin {fatbin}"
    assert "(the fatbin has no sm_75 code)" in loader.load("lstm", "75", FakeRawModule).origin
    monkeypatch.setattr(FakeRawModule, "fatbin_error", RuntimeError("no binary for GPU"))
    got = loader.load("lstm", "90", FakeRawModule)
    assert "(the fatbin failed to load: RuntimeError: no binary for GPU)" in got.origin
    assert sorted(got.functions) == sorted(cuda.kernel_names("lstm"))


class FakeCupy:
    """What the loader uses of CuPy: the current device, RawModule, and CuPy's memoizer
    (``cupy.memoize``: one entry per argument and, with for_each_device, per device)."""

    RawModule = FakeRawModule

    def __init__(self):
        self.current = types.SimpleNamespace(id=0, compute_capability="90")
        self.cuda = types.SimpleNamespace(Device=lambda: self.current)

    def memoize(self, for_each_device=False):
        assert for_each_device, "the loader's modules belong to one device"

        def decorate(function):
            memo = {}

            def memoized(*args):
                key = (self.current.id, args)
                if key not in memo:
                    memo[key] = function(*args)
                return memo[key]
            return memoized
        return decorate


def test_loader_memoizes_one_module_per_unit_and_device(tmp_path, monkeypatch):
    if CSRC is None:
        pytest.skip("csrc/ not found")
    for source in CSRC.glob("*.cu*"):
        shutil.copy(source, tmp_path / source.name)
    (tmp_path / "fastrnn_lstm.fatbin").write_bytes(b"")
    fake = FakeCupy()
    for module in (_cupy, loader):
        monkeypatch.setattr(module, "cupy", fake)
    monkeypatch.setattr(loader, "csrc_dir", lambda: tmp_path)
    monkeypatch.setattr(loader, "_origins", {})
    # loader.loaded as it is decorated where CuPy is installed, here with the fake
    loaded = _cupy.per_device(getattr(loader.loaded, "__wrapped__", loader.loaded))
    on_0 = loaded("lstm")
    assert loaded("lstm") is on_0 and on_0.origin.startswith("fatbin")
    fake.current = types.SimpleNamespace(id=1, compute_capability="75")
    on_1 = loaded("lstm")
    assert on_1 is not on_0 and "no sm_75 code" in on_1.origin
    assert loaded("gru") is not on_1
    assert sorted(loader.origins()) == [(0, "lstm"), (1, "gru"), (1, "lstm")]


def test_cupy_runtime_launches_a_stepwise_kernel_once_found(monkeypatch):
    """CuPy's launcher: the kernel of the current device found when the sequence starts, a
    grid of ceil(n / 256) blocks (at most 65535: the kernels loop with a grid stride), and
    C ints passed as int32."""
    name = "fastrnn_rnn_tanh_bwd_f32"
    calls, found = [], []
    kernel = lambda grid, block, args: calls.append((grid, block, args))  # noqa: E731
    monkeypatch.setattr(loader, "loaded", lambda unit: (
        found.append(unit), loader.LoadedUnit({name: kernel}, "test"))[1])
    rt = runtime.CupyRuntime()
    step = rt.kernel("rnn", name, 300)
    a = np.zeros(3, np.float32)
    for t in range(3):
        step(t, a)
    assert found == ["rnn"] and [c[:2] for c in calls] == [((2,), (256,))] * 3
    assert [type(c[2][0]) for c in calls] == [np.int32] * 3 and calls[2][2][1] is a
    rt.kernel("rnn", name, 10 ** 9)(0, a)
    assert calls[-1][0] == (65535,)
    rt.kernel("rnn", name, 0)(0, a)   # no elements: no launch
    assert len(calls) == 4


def test_units_and_kernel_names_come_from_the_registry():
    assert cuda.UNITS == {cell: kind.family.lower()
                          for cell, kind in fastrnn.backends.CELLS.items()}
    for cell, unit in cuda.UNITS.items():
        assert f"fastrnn_{cell}_persist_bwd_f32" in cuda.kernel_names(unit)


def test_launch_rejects_wrong_arrays(host_runtime):
    with pytest.raises(TypeError, match="argument 0"):
        host_runtime.kernel("rnn", "fastrnn_rnn_tanh_bwd_f32", 1)(np.zeros(3, np.float64))
    with pytest.raises(TypeError, match="C-contiguous"):
        host_runtime.kernel("rnn", "fastrnn_rnn_tanh_bwd_f64", 1)(np.zeros((3, 4))[:, ::2])
    assert host_runtime.launches == []


def test_stepwise_loop_finds_and_checks_each_kernel_once_per_sequence(host_runtime,
                                                                       monkeypatch):
    """A step is a GEMM and a launch: kernel look-up and argument checks happen once."""
    checked = []
    check = checks.launch_arguments
    monkeypatch.setattr(checks, "launch_arguments",
                        lambda name, args: (checked.append(name), check(name, args))[1])
    T = 6
    for cell, reset_after, shape in [(*case, {}) for case in CASES] + [("lstm", None, {"P": 3})]:
        for training in (True, False):
            host_runtime.launches.clear()
            host_runtime.found.clear()
            checked.clear()
            check_against_reference(to_host, np.float64, cell, reset_after, False, True, True,
                                    training, T=T, **shape)
            kernels = sorted(set(host_runtime.launches))
            assert sorted(host_runtime.found) == kernels, cell
            assert sorted(checked) == kernels, cell
            assert len(host_runtime.launches) == T * len(kernels), cell


def test_forward_validates_arguments(host_runtime):
    args, _, _ = make_problem("lstm")
    x, (h0, c0) = args["x"], args["states"]
    with pytest.raises(ValueError, match="w_hh must have shape"):
        cuda.lstm_forward(x, h0, c0, args["w_ih"], args["w_hh"][:, :3], None, None)
    with pytest.raises(TypeError, match="h0 has dtype"):
        cuda.lstm_forward(x, h0.astype(np.float32), c0, args["w_ih"], args["w_hh"], None, None)
    with pytest.raises(ValueError, match="both"):
        cuda.lstm_forward(x, h0, c0, args["w_ih"], args["w_hh"], args["b_ih"], None)


# ------------------------------------------------------------------ 1b. persistent kernels

PERSISTENT_CASES = [c for c in CASES if c != ("gru", False)]
# Emulated devices and shapes that reach every branch of the work split (H = 8):
#   3 SMs, 64 threads, B = 5: J = 3, a partial last block, 2-4 K splits, 1 batch per thread;
#   8 SMs, 32 threads, B = 33: J = 1, 8 blocks, 2 batches per thread;
#   2 SMs, 32 threads, B = 40: J = 4, 8 batches per thread.
GEOMETRIES = [(HOST_LIMITS, 5),
              # J = 12, B J = 60 > 32: 2 batch rows per thread would need 3 groups * 12 units
              # = 36 threads; the plan must take 4 rows (this once skipped units silently)
              (cuda.PersistentLimits(sms=1, shared_bytes=48 * 1024, threads=32,
                                     min_split_vectors=1), 5),
              (cuda.PersistentLimits(sms=8, shared_bytes=48 * 1024, threads=32,
                                     min_split_vectors=1), 33),
              (cuda.PersistentLimits(sms=2, shared_bytes=48 * 1024, threads=32,
                                     min_split_vectors=1), 40)]


def persistent_launches(rt):
    return [name for name in rt.launches if "_persist_" in name]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell, reset_after", PERSISTENT_CASES)
def test_persistent_loop_matches_reference(host_runtime, monkeypatch, cell, reset_after, dtype):
    monkeypatch.setattr(cuda, "_algorithm", "persistent")
    for *option, training in each_option():
        host_runtime.launches.clear()
        check_against_reference(to_host, dtype, cell, reset_after, *option, training, H=8)
        # every launch of the time loop was persistent: forward, and backward if training
        assert len(persistent_launches(host_runtime)) == 1 + training
        assert not [n for n in host_runtime.launches if "_persist_" not in n]


@pytest.mark.parametrize("limits, B", GEOMETRIES)
@pytest.mark.parametrize("cell, reset_after", PERSISTENT_CASES)
def test_persistent_work_split(host_runtime, monkeypatch, cell, reset_after, limits, B):
    monkeypatch.setattr(cuda, "_algorithm", "persistent")
    host_runtime.limits = limits
    for backward in (False, True):
        plan, why = cuda.persistent_plan(cell, B, 12 if limits.sms == 1 else 8, np.float32,
                                         backward, limits=limits)
        assert plan is not None, why
    H = 12 if limits.sms == 1 else 8
    check_against_reference(to_host, np.float32, cell, reset_after, True, True, True, True,
                            T=4, B=B, H=H)
    assert len(persistent_launches(host_runtime)) == 2


def test_persistent_forward_then_stepwise_backward(host_runtime, monkeypatch):
    """Both algorithms write the same cache."""
    for cell, reset_after in PERSISTENT_CASES:
        args, d_out, d_states = make_problem(cell, H=8, lengths=True)
        extra = {} if reset_after is None else {"reset_after": reset_after}
        monkeypatch.setattr(cuda, "_algorithm", "persistent")
        *outputs, cache = getattr(cuda, f"{cell}_forward")(
            args["x"], *args["states"], args["w_ih"], args["w_hh"], args["b_ih"], args["b_hh"],
            lengths=args["lengths"], **extra)
        monkeypatch.setattr(cuda, "_algorithm", "stepwise")
        grads = getattr(cuda, f"{cell}_backward")(d_out, *d_states, cache)
        want = run(reference, cell, args, d_out, d_states, False, True, reset_after,
                   lambda a: a)
        assert_close(list(outputs) + list(grads), want, TOL[np.float64], cell)


def test_persistent_refuses_what_it_cannot_run(host_runtime, monkeypatch):
    args, _, _ = make_problem("gru", H=8)
    call = lambda **kw: cuda.gru_forward(args["x"], *args["states"], args["w_ih"],  # noqa: E731
                                         args["w_hh"], args["b_ih"], args["b_hh"], **kw)
    monkeypatch.setattr(cuda, "_algorithm", "persistent")
    with pytest.raises(ValueError, match="reset_after=False runs stepwise"):
        call(reset_after=False)
    odd, _, _ = make_problem("lstm", H=7)
    with pytest.raises(ValueError, match="H = 7 is not a multiple of 2"):
        cuda.lstm_forward(odd["x"], *odd["states"], odd["w_ih"], odd["w_hh"], None, None)
    # "auto" runs them stepwise, and the persistent loop where it fits
    monkeypatch.setattr(cuda, "_algorithm", "auto")
    host_runtime.launches.clear()
    call(reset_after=False)
    assert host_runtime.launches and not persistent_launches(host_runtime)
    call(reset_after=True)
    assert persistent_launches(host_runtime) == ["fastrnn_gru_persist_fwd_train_f64"]


def test_persistent_launch_refuses_a_plan_larger_than_its_block(host_runtime):
    plan = cuda.PersistentPlan(blocks=1, threads=32, J=12, groups=3, splits=1, bt=2,
                               stride=20, shared_bytes=4096)
    with pytest.raises(ValueError, match="needs 36 threads per block, more than the 32"):
        host_runtime.launch_persistent("rnn", "fastrnn_rnn_tanh_persist_fwd_infer_f32", plan,
                                       1, 5, 12, 0)
    assert host_runtime.launches == []


def test_set_algorithm(monkeypatch):
    monkeypatch.setattr(cuda, "_algorithm", "stepwise")
    cuda.set_algorithm("auto")
    assert cuda.algorithm() == "auto"
    with pytest.raises(ValueError, match="algorithm must be one of"):
        cuda.set_algorithm("fast")
    assert cuda.algorithm() == "auto"


H100 = cuda.PersistentLimits(sms=132, shared_bytes=227 * 1024)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_persistent_plan_invariants(cell, dtype):
    """Every plan covers all units and batches within the block, SM and shared-memory limits."""
    itemsize = np.dtype(dtype).itemsize
    for H in list(range(4, 1025, 4 * 11)) + [512, 800, 1024]:
        for B in list(range(1, 257, 3)) + [64, 256]:
            for backward in (False, True):
                plan, why = cuda.persistent_plan(cell, B, H, dtype, backward, limits=H100)
                if plan is None:
                    assert "shared memory" in why or "8 batches" in why, why
                    continue
                assert plan.blocks <= H100.sms and plan.blocks * plan.J >= H
                assert (plan.blocks - 1) * plan.J < H           # no empty block
                assert plan.groups * plan.bt >= B and plan.bt in (1, 2, 4, 8)
                assert plan.J * plan.groups * plan.splits <= plan.threads
                assert plan.splits == 1 or plan.bt == 1
                assert plan.shared_bytes <= H100.shared_bytes
                assert plan.stride * itemsize % 128 == 16 and plan.stride % (16 // itemsize) == 0


def test_persistent_plan_reaches_the_benchmark_grid():
    """The issue's grid (B <= 256, H <= 1024, float32) is persistent on an H100 for every cell."""
    for cell in ("rnn_tanh", "lstm", "gru"):
        for H in (128, 256, 512, 1024):
            for B in (1, 16, 64, 256):
                for backward in (False, True):
                    plan, why = cuda.persistent_plan(cell, B, H, np.float32, backward,
                                                     limits=H100)
                    assert plan is not None, f"{cell} B={B} H={H} backward={backward}: {why}"


# ------------------------------------------------------------------ 2. compilers

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None or CSRC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("unit", UNITS)
def test_nvcc_compiles_without_spills(unit, tmp_path):
    result = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", "-Xptxas", "-v", "-cubin",
                             "-o", str(tmp_path / f"{unit}.cubin"),
                             str(CSRC / f"fastrnn_{unit}.cu")],
                            capture_output=True, text=True)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "warning" not in log.lower(), log
    entries = set(re.findall(r"Compiling entry function '(\w+)'", log))
    assert entries == set(cuda.kernel_names(unit)), log
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", log)
    assert len(spills) == 2 * len(entries), log
    assert all(int(s) == 0 for s in spills), log
    stacks = re.findall(r"(\d+) bytes stack frame", log)
    assert all(int(s) == 0 for s in stacks), log


def _nvrtc_library():
    candidates = [os.environ.get("FASTRNN_NVRTC_LIB"), ctypes.util.find_library("nvrtc"),
                  "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    for name in filter(None, candidates):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@pytest.mark.parametrize("unit", UNITS)
def test_nvrtc_source_is_self_contained(unit):
    if CSRC is None:
        pytest.skip("csrc/ not found")
    source = cuda.nvrtc_source(unit)
    assert "#include" not in source, "NVRTC sees no host headers and no include path"
    assert "fastrnn_common.cuh" not in re.sub(r"//.*", "", source)


@pytest.mark.parametrize("unit", UNITS)
def test_nvrtc_compiles(unit):
    lib = _nvrtc_library()
    if lib is None or CSRC is None:
        pytest.skip("libnvrtc not found (set FASTRNN_NVRTC_LIB to its path)")
    program = ctypes.c_void_p()
    source = cuda.nvrtc_source(unit).encode()
    assert lib.nvrtcCreateProgram(ctypes.byref(program), source, f"fastrnn_{unit}.cu".encode(),
                                  0, None, None) == 0
    options = [b"-std=c++17", b"-arch=compute_90"]   # what CuPy passes, minus its include path
    array = (ctypes.c_char_p * len(options))(*options)
    status = lib.nvrtcCompileProgram(program, len(options), array)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    lib.nvrtcDestroyProgram(ctypes.byref(program))
    assert status == 0, log.value.decode(errors="replace")
    assert "warning" not in log.value.decode(errors="replace").lower(), log.value


# ------------------------------------------------------------------ 3. on a GPU

def to_device(dtype):
    import cupy
    return lambda a: cupy.asarray(np.asarray(a, dtype=dtype))


@pytest.fixture(params=["stepwise", "auto"])
def gpu_algorithm(request, monkeypatch):
    """Each GPU test runs with the stepwise loop, then with the persistent one where it fits."""
    monkeypatch.setattr(cuda, "_algorithm", request.param)
    return request.param


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell, reset_after", CASES)
def test_gpu_matches_reference(gpu_algorithm, cell, reset_after, dtype):
    for option in each_option():
        check_against_reference(to_device, dtype, cell, reset_after, *option,
                                H=8 if gpu_algorithm == "auto" else 7)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_projection_matches_reference(gpu_algorithm, dtype):
    """The LSTM's projection (w_hr): stepwise under both algorithms ("auto" must not refuse
    it), every option, and a shape of several blocks (B P and B H not multiples of 256)."""
    for option in each_option():
        check_against_reference(to_device, dtype, "lstm", None, *option, H=8, P=3)
    check_against_reference(to_device, dtype, "lstm", None, True, True, True, True,
                            T=9, B=33, I=40, H=132, P=50)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("cell, reset_after", CASES)
@pytest.mark.parametrize("B, H", [(33, 132), (3, 1024), (150, 1024)])
def test_gpu_larger_shapes(gpu_algorithm, cell, reset_after, B, H):
    """Several blocks per launch, H not a multiple of the block size; persistent on 132 SMs:
    K splits (B = 3, 33), 8 units per block and 8 batches per thread (B = 150, H = 1024)."""
    check_against_reference(to_device, np.float32, cell, reset_after, True, True, True, True,
                            T=9, B=B, I=40, H=H)


@pytest.mark.cuda
@gpu
def test_gpu_persistent_runs_in_one_launch_per_direction(monkeypatch):
    """The persistent loop is taken on the GPU where the plan fits (nothing silently stepwise)."""
    plan, why = cuda.persistent_plan("lstm", 16, 256, np.float32)
    assert plan is not None, why
    rt = runtime.current()
    launches = {"stepwise": [], "persistent": []}
    stepwise, persistent = type(rt)._step_launcher, type(rt)._launch_persistent
    monkeypatch.setattr(type(rt), "_step_launcher", lambda self, unit, name, *a: (
        launches["stepwise"].append(name), stepwise(self, unit, name, *a))[1])
    monkeypatch.setattr(type(rt), "_launch_persistent", lambda self, unit, name, *a: (
        launches["persistent"].append(name), persistent(self, unit, name, *a))[1])
    monkeypatch.setattr(cuda, "_algorithm", "persistent")
    check_against_reference(to_device, np.float32, "lstm", None, False, True, True, True,
                            T=20, B=16, I=32, H=256)
    assert launches == {"stepwise": [], "persistent": ["fastrnn_lstm_persist_fwd_train_f32",
                                                       "fastrnn_lstm_persist_bwd_f32"]}


@pytest.mark.cuda
@gpu
def test_gpu_on_a_non_default_stream():
    import cupy
    with cupy.cuda.Stream(non_blocking=True) as stream:
        check_against_reference(to_device, np.float32, "lstm", None, False, True, True, True)
        stream.synchronize()


@pytest.mark.cuda
@gpu
def test_gpu_tf32_switch_restores_cupy_setting():
    from cupy._core import _routines_linalg as linalg
    before = linalg.get_compute_type(np.float32)
    cuda.allow_tf32(True)
    try:
        assert cuda.tf32_allowed()
        args, d_out, d_states = make_problem("gru")
        run(cuda, "gru", args, d_out, d_states, False, True, True, to_device(np.float32))
    finally:
        cuda.allow_tf32(False)
    assert linalg.get_compute_type(np.float32) == before
    check_against_reference(to_device, np.float32, "gru", True, False, True, False, True)


@pytest.mark.cuda
@gpu
def test_gpu_info_reports_kernel_origin():
    report = cuda.info(load=True)
    assert report["available"]
    assert len(report["modules"]) == len(UNITS)
    for origin in report["modules"].values():
        assert origin.startswith(("fatbin", "NVRTC"))


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("kind", ["rnn_tanh", "rnn_relu", "lstm", "gru", "gru_reset_before"])
def test_gpu_layers_match_numpy_layers(kind):
    import cupy

    from conftest import make_layer, random_lengths
    rng = np.random.default_rng(1)
    T, B, I, H = 5, 4, 3, 6
    ref = make_layer(kind, I, H, num_layers=2, bidirectional=True, backend="numpy",
                     dtype=np.float64, seed=3)
    dev = ref.copy(backend="cuda")
    assert all(isinstance(v, cupy.ndarray) for v in dev.state_dict().values())
    x = rng.standard_normal((T, B, I))
    lengths = random_lengths(rng, T, B)
    out_ref, _ = ref(x, lengths=lengths)
    out_dev, _ = dev(cupy.asarray(x), lengths=lengths)
    np.testing.assert_allclose(out_dev.get(), out_ref, rtol=1e-10, atol=1e-12)
    d_out = rng.standard_normal(out_ref.shape)
    d_x_ref, _ = ref.backward(d_out)
    d_x_dev, _ = dev.backward(cupy.asarray(d_out))
    np.testing.assert_allclose(d_x_dev.get(), d_x_ref, rtol=1e-9, atol=1e-12)
    for name, g in ref.grads.items():
        np.testing.assert_allclose(dev.grads[name].get(), g, rtol=1e-9, atol=1e-12,
                                   err_msg=name)
    back = dev.copy(backend="numpy")
    assert all(isinstance(v, np.ndarray) for v in back.state_dict().values())


def projected_lstm_layers(to_device, fetch):
    """fastrnn.LSTM(proj_size=4), 2 layers, both directions, lengths, on the cuda backend
    against the same layer on numpy: outputs, final states and every gradient."""
    rng = np.random.default_rng(4)
    T, B, I, H, P = 5, 4, 3, 6, 4
    ref = fastrnn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=P, backend="numpy",
                       dtype=np.float64, seed=3)
    try:
        dev = ref.copy(backend="cuda")
    except NotImplementedError as exc:   # fastrnn/layers.py refused proj_size on cuda
        pytest.skip(f"the layers refuse proj_size on cuda: {exc}")
    x = rng.standard_normal((T, B, I))
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0] = T
    out_ref, (h_ref, c_ref) = ref(x, lengths=lengths)
    out_dev, (h_dev, c_dev) = dev(to_device(x), lengths=lengths)
    assert out_ref.shape == (T, B, 2 * P) and h_ref.shape == (4, B, P)
    for got, want in ((out_dev, out_ref), (h_dev, h_ref), (c_dev, c_ref)):
        np.testing.assert_allclose(fetch(got), want, rtol=1e-10, atol=1e-12)
    d_out = rng.standard_normal(out_ref.shape)
    d_x_ref, _ = ref.backward(d_out)
    d_x_dev, _ = dev.backward(to_device(d_out))
    np.testing.assert_allclose(fetch(d_x_dev), d_x_ref, rtol=1e-9, atol=1e-12)
    assert any(name.startswith("weight_hr") for name in ref.grads)
    for name, g in ref.grads.items():
        np.testing.assert_allclose(fetch(dev.grads[name]), g, rtol=1e-9, atol=1e-12,
                                   err_msg=name)


@pytest.mark.cuda
@gpu
def test_gpu_projected_layers_match_numpy_layers():
    import cupy
    projected_lstm_layers(cupy.asarray, cupy.asnumpy)


def test_host_loop_under_the_projected_layers(host_runtime, monkeypatch):
    """fastrnn.LSTM(proj_size=...) with backend="cuda" on the host emulation (arrays stay
    NumPy); skipped while the layers still refuse proj_size on cuda."""
    monkeypatch.setattr(cuda, "xp", np)
    monkeypatch.setitem(fastrnn.backends._loaded, "cuda", fastrnn.backends.Backend("cuda", cuda))
    projected_lstm_layers(np.asarray, np.asarray)


@pytest.mark.parametrize("kind", ["rnn_tanh", "rnn_relu", "lstm", "gru", "gru_reset_before"])
def test_host_loop_under_the_layers(host_runtime, monkeypatch, kind):
    """Layers with backend="cuda" (arrays stay NumPy here): 2 layers, both directions, lengths."""
    from conftest import make_layer, random_lengths
    monkeypatch.setattr(cuda, "xp", np)
    monkeypatch.setitem(fastrnn.backends._loaded, "cuda", fastrnn.backends.Backend("cuda", cuda))
    rng = np.random.default_rng(2)
    T, B, I, H = 5, 4, 3, 6
    ref = make_layer(kind, I, H, num_layers=2, bidirectional=True, backend="numpy",
                     dtype=np.float64, seed=3)
    dev = ref.copy(backend="cuda")
    x = rng.standard_normal((T, B, I))
    lengths = random_lengths(rng, T, B)
    out_ref, h_ref = ref(x, lengths=lengths)
    out_dev, h_dev = dev(x, lengths=lengths)
    np.testing.assert_allclose(out_dev, out_ref, rtol=1e-10, atol=1e-12)
    as_tuple = lambda h: h if isinstance(h, tuple) else (h,)  # noqa: E731 - LSTM: (h, c)
    for a, b in zip(as_tuple(h_dev), as_tuple(h_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    d_out = rng.standard_normal(out_ref.shape)
    d_x_ref, _ = ref.backward(d_out)
    d_x_dev, _ = dev.backward(d_out)
    np.testing.assert_allclose(d_x_dev, d_x_ref, rtol=1e-9, atol=1e-12)
    for name, g in ref.grads.items():
        np.testing.assert_allclose(dev.grads[name], g, rtol=1e-9, atol=1e-12, err_msg=name)


# ------------------------------------------------------------------ 4. the GPU script

def load_gpu_script():
    import importlib.util
    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_vs_cudnn.py"
    if not path.is_file():
        pytest.skip("bench/gpu_vs_cudnn.py is not in this checkout")
    spec = importlib.util.spec_from_file_location("gpu_vs_cudnn", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LimitsOnly:
    """A runtime that answers persistent_limits() alone, like an H100."""

    def persistent_limits(self):
        return H100


def test_gpu_script_names_the_algorithm_of_each_point(monkeypatch):
    script = load_gpu_script()
    monkeypatch.setattr(runtime, "_override", LimitsOnly())
    assert script.algorithm_used("lstm", "training", 64, 512) == "persistent"
    assert script.algorithm_used("gru", "inference", 16, 1024) == "persistent"
    tight = cuda.PersistentLimits(sms=132, shared_bytes=130 * 1024)  # B=1: bwd fits, fwd not
    monkeypatch.setattr(LimitsOnly, "persistent_limits", lambda self: tight)
    assert script.algorithm_used("lstm", "inference", 1, 1024) == "stepwise"
    assert script.algorithm_used("lstm", "training", 1, 1024) == "mixed"


def test_gpu_script_speedups_pair_each_algorithm_with_cudnn():
    script = load_gpu_script()
    point = dict(cell="lstm", mode="training", B=16, H=512)
    rows = [dict(point, backend="cudnn", algorithm="cudnn", median_ms=6.0),
            dict(point, backend="cuda", algorithm="stepwise", median_ms=12.0),
            dict(point, backend="cuda", algorithm="persistent", median_ms=3.0),
            dict(point, B=64, backend="cuda", algorithm="stepwise", median_ms=None)]
    got = {s["algorithm"]: s["speedup_vs_cudnn"] for s in script.speedups(rows)}
    assert got == {"stepwise": 0.5, "persistent": 2.0}
