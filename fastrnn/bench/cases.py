"""What is timed: a case (cell kind, T, B, I, H, dtype), the grids, the flop count,
and the inputs and weights every engine gets (the same in every process)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

import fastrnn
from fastrnn import backends

#: The grid of the CPU-speed issues: (T, B, I, H).
FULL_GRID = [(100, 64, 512, 512), (100, 64, 256, 256), (50, 16, 128, 128), (200, 1, 64, 64),
             (1000, 8, 32, 32)]
QUICK_GRID = [(100, 64, 256, 256), (50, 16, 128, 128), (200, 1, 64, 64)]
MODES = ("inference", "training")
#: Layer variants beyond the plain cell kinds (``fastrnn bench --variants``): the LSTM
#: with projections (proj_size = H // 2) and the LayerNorm LSTM.
VARIANTS = {"proj": "lstm", "layernorm": "lstm"}


@dataclass(frozen=True)
class Case:
    cell: str
    T: int
    B: int
    I: int
    H: int
    dtype: str = "float32"
    #: "" (the plain layer) or a key of :data:`VARIANTS`.
    variant: str = ""

    @property
    def kind(self) -> str:
        """The cell kind, with the variant: 'lstm', 'lstm:proj', 'lstm:layernorm'."""
        return f"{self.cell}:{self.variant}" if self.variant else self.cell

    @property
    def P(self) -> int:
        """Features of h and of the output: H, or proj_size."""
        return self.H // 2 if self.variant == "proj" else self.H

    def flops(self, mode: str) -> float:
        """GEMM flops every implementation must do: forward ``2 T B G (I + H)`` (input
        projection plus recurrent GEMM, ``G`` = gates x H); training (forward plus
        backward: ``d_x``, ``d_w_ih``, the recurrent ``d_h`` and ``d_w_hh``) 3 times that."""
        G = backends.gate_count(self.cell) * self.H
        forward = 2.0 * self.T * self.B * G * (self.I + self.P)
        if self.variant == "proj":
            forward += 2.0 * self.T * self.B * self.P * self.H
        return forward * (3 if mode == "training" else 1)

    def label(self) -> str:
        return f"{self.kind} {self.T}x{self.B}x{self.I}x{self.H}"

    def as_dict(self) -> dict:
        return asdict(self)


def build_layer(cell, I, H, backend, dtype, seed=0, **options):
    """The layer of a cell kind ('lstm', 'gru', 'rnn_tanh', 'rnn_relu')."""
    return fastrnn.make_layer(cell, I, H, backend=backend, dtype=dtype, seed=seed, **options)


def make_layer(case: Case, backend: str, seed: int = 0):
    dtype = np.dtype(case.dtype)
    if case.variant == "layernorm":
        return fastrnn.LayerNormLSTM(case.I, case.H, backend=backend, dtype=dtype, seed=seed)
    options = {"proj_size": case.P} if case.variant == "proj" else {}
    return build_layer(case.cell, case.I, case.H, backend, dtype, seed, **options)


def inputs(case: Case):
    """``(x (T, B, I), d_out (T, B, H), state_dict)``: the same in every process."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((case.T, case.B, case.I)).astype(case.dtype)
    d_out = rng.standard_normal((case.T, case.B, case.P)).astype(case.dtype)
    state = make_layer(case, "numpy").state_dict()
    return x, d_out, state
