"""Vanishing gradients made visible: ||dL/dh_t|| for RNN, LSTM and GRU, before and after training.

For L = sum of the last hidden state, ``fastrnn.diagnostics.gradient_flow``
gives the norm of dL/dh_t at every step t: how much the last step can still
"hear" step t. The left panel is at PyTorch's initialisation, the right one
after training each model on the adding problem (examples/adding_problem.py),
on the same adding-problem inputs. Writes a PNG (matplotlib: the ``plot``
extra, ``pip install fastrnn[plot]``) and prints the numbers.

    python examples/gradient_flow.py [--backend numba] [--out gradient_flow.png] [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

# Small GEMMs: one BLAS thread is faster, and two BLAS pools spinning on a busy
# machine can be a hundred times slower. Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

import fastrnn
from adding_problem import adding_batch, train
from fastrnn.diagnostics import gradient_flow


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default="gradient_flow.png", help="the PNG to write")
    p.add_argument("--lag", type=int, default=50, help="sequence length (default 50)")
    p.add_argument("--steps", type=int, default=1000,
                   help="adding-problem training steps per model (default 1000)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps, to check that it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.lag = 3, 10
    train_args = argparse.Namespace(backend=args.backend, lag=args.lag, steps=args.steps,
                                    batch=32, hidden=args.hidden, lr=1e-2, seed=args.seed)
    started = time.perf_counter()
    x, _ = adding_batch(np.random.default_rng(1), args.lag, 64)
    flows = {}
    for cls in (fastrnn.RNN, fastrnn.LSTM, fastrnn.GRU):
        name = cls.__name__
        flows[name, "init"] = gradient_flow(cls(2, args.hidden, backend=args.backend,
                                                seed=args.seed), x)
        mse, trained = train(cls, train_args, np.random.default_rng(args.seed))
        flows[name, "trained"] = gradient_flow(trained, x)
        print(f"{name:>4}: adding-problem test MSE after training {mse:.4f}")

    T = args.lag
    steps_back = [k for k in (0, 10, 25, T - 1) if k < T]
    print("||dL/dh_t|| at t = T-1-k (L = sum of h_{T-1}):")
    print("              " + "".join(f"{'k=' + str(k):>11}" for k in steps_back))
    for (name, when), norms in flows.items():
        print(f"{name:>4} {when:>8} " + "".join(f"{norms[T - 1 - k]:11.2e}" for k in steps_back))

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install fastrnn[plot]): no plot written")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, when in zip(axes, ("init", "trained")):
        for name in ("RNN", "LSTM", "GRU"):
            ax.semilogy(np.arange(T), flows[name, when], label=name)
        ax.set_title(f"{'at initialisation' if when == 'init' else 'after training'}")
        ax.set_xlabel("time step t")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel(r"$\|\partial L / \partial h_t\|$,  $L = \sum h_{T-1}$")
    axes[0].legend()
    fig.suptitle(f"Gradient flow on adding-problem inputs (T = {T}, hidden {args.hidden})")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}; {time.perf_counter() - started:.1f} s on backend "
          f"{fastrnn.backends.get(args.backend).name!r}")


if __name__ == "__main__":
    main()
