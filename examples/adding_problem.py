"""The adding problem: a long-range memory task where LSTM and GRU beat the vanilla RNN.

Each sequence has ``--lag`` steps of two features: a random value in [0, 1)
and a marker that is 1 at exactly two steps, one in each half of the
sequence. The target, read from the last hidden state, is the sum of the two
marked values. Predicting the mean (1.0) whatever the input scores a mean
squared error of 1/6 = 0.167; doing better means carrying a value across up
to ``--lag`` steps, which the vanilla RNN's vanishing gradient does not allow
(Hochreiter & Schmidhuber, 1997).

    python examples/adding_problem.py [--backend numba] [--lag 50] [--steps 1000] [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

# Small GEMMs: one BLAS thread is faster, and two BLAS pools spinning on a busy
# machine can be a hundred times slower. Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from tqdm import tqdm

import fastrnn
from fastrnn.losses import mse_loss


def adding_batch(rng, T, B):
    """x (T, B, 2): values and markers; y (B, 1): the sum of the two marked values."""
    values = rng.random((T, B))
    markers = np.zeros((T, B))
    first = rng.integers(0, T // 2, B)
    second = rng.integers(T // 2, T, B)
    markers[first, np.arange(B)] = 1
    markers[second, np.arange(B)] = 1
    x = np.stack([values, markers], axis=2).astype(np.float32)
    y = (values * markers).sum(axis=0)[:, None].astype(np.float32)
    return x, y


def train(cls, args, rng):
    """Train ``cls`` (RNN, LSTM or GRU) + a Linear read-out on h_n; return the test MSE and the RNN."""
    rnn = cls(2, args.hidden, backend=args.backend, seed=args.seed)
    head = fastrnn.Linear(args.hidden, 1, backend=args.backend, seed=args.seed)
    opt = fastrnn.optim.Adam([rnn, head], lr=args.lr)
    bar = tqdm(range(args.steps), desc=f"{cls.__name__:>4}", unit="step")
    avg = None
    for _ in bar:
        x, y = adding_batch(rng, args.lag, args.batch)
        _, h_n = rnn(x)
        h_last = h_n[0][-1] if isinstance(h_n, tuple) else h_n[-1]     # (B, H)
        loss, d_pred = mse_loss(head(h_last), y)
        d_h = head.backward(d_pred)[None]                               # (1, B, H)
        # Many-to-one: the loss reaches the RNN through h_n only, d_out is zero.
        rnn.backward(np.zeros((args.lag, args.batch, args.hidden), np.float32),
                     (d_h, np.zeros_like(d_h)) if isinstance(h_n, tuple) else d_h)
        fastrnn.clip_grad_norm_([rnn, head], 1.0)
        opt.step()
        opt.zero_grad()
        avg = loss if avg is None else 0.95 * avg + 0.05 * loss
        bar.set_postfix(mse=f"{avg:.4f}")
    x, y = adding_batch(np.random.default_rng(12345), args.lag, 1000)
    rnn.eval()
    _, h_n = rnn(x)
    h_last = h_n[0][-1] if isinstance(h_n, tuple) else h_n[-1]
    head.eval()
    rnn.train()
    return mse_loss(head(h_last), y)[0], rnn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="auto")
    p.add_argument("--lag", type=int, default=50, help="sequence length (default 50)")
    p.add_argument("--steps", type=int, default=1000, help="training steps per model")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps, to check that it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.lag = 3, 10
    started = time.perf_counter()
    print(f"adding problem, lag {args.lag}: predicting 1.0 always gives MSE 0.167")
    results = {}
    for cls in (fastrnn.RNN, fastrnn.LSTM, fastrnn.GRU):
        results[cls.__name__], _ = train(cls, args, np.random.default_rng(args.seed))
    for name, mse in results.items():
        verdict = "learned" if mse < 0.05 else "not learned"
        print(f"{name:>4}: test MSE {mse:.4f} ({verdict})")
    print(f"{time.perf_counter() - started:.1f} s on backend {fastrnn.backends.get(args.backend).name!r}")


if __name__ == "__main__":
    main()
