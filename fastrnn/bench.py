"""Side-by-side timing of fastrnn backends and PyTorch, with runs interleaved.

Used by ``fastrnn bench`` and by the pytest-benchmark suite in ``bench/``.

GFLOP/s counts the matrix products only, the work every implementation must
do: a forward pass costs ``2 T B G (I + H)`` flops (input projection plus
recurrent GEMM, ``G`` = gates x H), and training (forward plus backward:
``d_x``, ``d_w_ih``, the recurrent ``d_h`` and ``d_w_hh``) three times that.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import numpy as np

import fastrnn

CELL_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
#: The grid of the numba issue: (T, B, I, H).
FULL_GRID = [(100, 64, 512, 512), (100, 64, 256, 256), (50, 16, 128, 128), (200, 1, 64, 64),
             (1000, 8, 32, 32)]
QUICK_GRID = [(100, 64, 256, 256), (50, 16, 128, 128), (200, 1, 64, 64)]


@dataclass(frozen=True)
class Case:
    cell: str
    T: int
    B: int
    I: int
    H: int
    dtype: str = "float32"

    def flops(self, mode: str) -> float:
        forward = 2.0 * self.T * self.B * CELL_GATES[self.cell] * self.H * (self.I + self.H)
        return forward * (3 if mode == "training" else 1)


def build_layer(cell, I, H, backend, dtype, seed=0, **options):
    """The layer for a cell kind name ('lstm', 'gru', 'rnn_tanh', 'rnn_relu')."""
    if cell.startswith("rnn"):
        return fastrnn.RNN(I, H, nonlinearity=cell[4:], backend=backend, dtype=dtype,
                           seed=seed, **options)
    cls = fastrnn.LSTM if cell == "lstm" else fastrnn.GRU
    return cls(I, H, backend=backend, dtype=dtype, seed=seed, **options)


def make_layer(case: Case, backend: str, seed: int = 0):
    return build_layer(case.cell, case.I, case.H, backend, np.dtype(case.dtype), seed)


def fastrnn_runner(case: Case, backend: str, mode: str, x, d_out):
    """A zero-argument callable that runs one inference or training step."""
    model = make_layer(case, backend)
    xp = model._xp
    x, d_out = xp.asarray(x), xp.asarray(d_out)
    sync = (lambda: xp.cuda.Device().synchronize()) if backend == "cuda" else (lambda: None)
    if mode == "inference":
        model.eval()

        def run():
            model(x)
            sync()
    else:
        model.train()

        def run():
            model(x)
            model.backward(d_out)
            sync()
    return run, model


def torch_runner(case: Case, mode: str, x, d_out, state_dict, device="cpu"):
    import torch
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(case.cell, torch.nn.RNN)
    kwargs = {"nonlinearity": case.cell[4:]} if case.cell.startswith("rnn") else {}
    dtype = getattr(torch, case.dtype)
    layer = cls(case.I, case.H, **kwargs).to(device=device, dtype=dtype)
    layer.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()})
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


def time_interleaved(runners: dict, repeats: int, warmup: int = 2, budget_s=None) -> dict:
    """Median seconds of each runner, calling them in turn ``repeats`` times.

    Interleaving spreads the machine's noise evenly over the contenders.
    ``budget_s`` stops early (after at least 3 rounds) when time runs out.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    samples = {name: [] for name in runners}
    start = time.perf_counter()
    for k in range(repeats):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - t0)
        if budget_s is not None and k >= 2 and time.perf_counter() - start > budget_s:
            break
    return {name: float(np.median(s)) for name, s in samples.items()}


def gemm_peak(dtype="float32", n=1024, repeats=5) -> float:
    """The machine's measured GEMM GFLOP/s (numpy, n x n x n), median of repeats."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    out = np.empty_like(a)
    np.matmul(a, a, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, a, out=out)
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / float(np.median(times)) / 1e9


def machine_info() -> dict:
    import os
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpu": _cpu_name(), "cores": os.cpu_count(), "numpy": np.__version__,
            "fastrnn": fastrnn.__version__, "backends": fastrnn.backends.available()}
    for module in ("numba", "scipy", "torch", "cupy"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    if "cuda" in info["backends"]:
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
