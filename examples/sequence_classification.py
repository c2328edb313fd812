"""Many-to-one sequence classification: which waveform is this noisy, variable-length signal?

Four classes (sine, square, rising and falling sawtooth) with a random frequency,
phase and amplitude, Gaussian noise, and a length between ``--min-len`` and
``--max-len``. A batch is padded to its longest sequence and the true
lengths are passed to the GRU, so its final state ``h_n`` is the state after
each sequence's own last step (PyTorch's packed sequences); a Linear layer
reads the class from it.

    python examples/sequence_classification.py [--backend numba] [--steps 300] [--quick]
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
from fastrnn.losses import cross_entropy

CLASSES = ("sine", "square", "ramp up", "ramp down")


def waveforms(rng, B, min_len, max_len, noise):
    """x (T, B, 1) zero-padded, lengths (B,), labels (B,)."""
    labels = rng.integers(0, len(CLASSES), B)
    lengths = rng.integers(min_len, max_len + 1, B)
    T = int(lengths.max())
    t = np.arange(T)[:, None]
    cycles = t * rng.uniform(0.05, 0.15, B) + rng.random(B)    # periods of 7 to 20 steps
    frac = cycles % 1.0
    shapes = np.stack([np.sin(2 * np.pi * cycles),
                       np.where(frac < 0.5, 1.0, -1.0),
                       2 * frac - 1,
                       1 - 2 * frac])                          # (4, T, B)
    x = shapes[labels, :, np.arange(B)].T * rng.uniform(0.5, 1.5, B)
    x += noise * rng.standard_normal(x.shape)
    x[t >= lengths] = 0                                        # padding
    return x[:, :, None].astype(np.float32), lengths, labels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="auto")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--min-len", type=int, default=20)
    p.add_argument("--max-len", type=int, default=60)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps, to check that it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 3
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    gru = fastrnn.GRU(1, args.hidden, backend=args.backend, seed=args.seed)
    head = fastrnn.Linear(args.hidden, len(CLASSES), backend=args.backend, seed=args.seed)
    opt = fastrnn.optim.Adam([gru, head], lr=args.lr)

    bar = tqdm(range(args.steps), desc="GRU classifier", unit="step")
    avg = None
    for _ in bar:
        x, lengths, labels = waveforms(rng, args.batch, args.min_len, args.max_len, args.noise)
        out, h_n = gru(x, lengths=lengths)
        loss, d_logits = cross_entropy(head(h_n[-1]), labels)
        # Many-to-one: the gradient enters through h_n only; d_out is zero.
        gru.backward(np.zeros_like(out), head.backward(d_logits)[None])
        fastrnn.clip_grad_norm_([gru, head], 1.0)
        opt.step()
        opt.zero_grad()
        avg = loss if avg is None else 0.95 * avg + 0.05 * loss
        bar.set_postfix(loss=f"{avg:.3f}")

    gru.eval()
    head.eval()
    x, lengths, labels = waveforms(np.random.default_rng(12345), 1000, args.min_len,
                                   args.max_len, args.noise)
    _, h_n = gru(x, lengths=lengths)
    predicted = head(h_n[-1]).argmax(axis=1)
    confusion = np.zeros((len(CLASSES), len(CLASSES)), int)
    np.add.at(confusion, (labels, predicted), 1)
    print("confusion matrix (rows: true class, columns: predicted)")
    for name, row in zip(CLASSES, confusion):
        print(f"  {name:>9} " + " ".join(f"{n:4d}" for n in row))
    print(f"test accuracy: {(predicted == labels).mean():.3f} (chance: {1 / len(CLASSES):.2f}); "
          f"{time.perf_counter() - started:.1f} s on backend {gru.backend!r}")


if __name__ == "__main__":
    main()
