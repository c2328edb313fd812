"""Benchmarks: fastrnn's backends against the engines a user would deploy instead.

Used by ``fastrnn bench`` (:mod:`fastrnn.cli`) and by the pytest-benchmark suite
in ``bench/``. One module per concern:

* :mod:`.cases`: what is timed (cell, T, B, I, H), the grids, flops, the inputs;
* :mod:`.machine`: CPU, versions, the BLAS in use (threadpoolctl), the GEMM peak;
* :mod:`.engines`: the registry of engines (numpy, numba, cuda, torch,
  onnxruntime, openvino, openvino-bf16, jax) and their verification;
* :mod:`.worker` / :mod:`.runner`: one process per engine, taking turns;
* :mod:`.report`: table, summary, JSON, plot.

GFLOP/s counts the matrix products only, the work every implementation must do
(:meth:`.cases.Case.flops`).
"""

from .cases import FULL_GRID, MODES, QUICK_GRID, VARIANTS, Case, build_layer, inputs, make_layer
from .engines import FASTRNN, OURS, PEERS, fastrnn_runner, torch_runner, verify_backend
from .machine import blas_info, blas_warning, gemm_peak, machine_info

__all__ = ["Case", "FULL_GRID", "QUICK_GRID", "MODES", "VARIANTS", "OURS", "build_layer", "make_layer", "inputs",
           "FASTRNN", "PEERS", "fastrnn_runner", "torch_runner", "verify_backend",
           "blas_info", "blas_warning", "gemm_peak", "machine_info"]
