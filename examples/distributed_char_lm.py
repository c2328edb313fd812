"""The character LM of char_lm.py, trained data-parallel over MPI ranks.

The global batch of B streams is split over R ranks (B/R streams each); every
rank runs forward and backward on its streams, ``DataParallel.allreduce_grads``
averages the gradients, and every rank takes the same optimizer step. The loss
printed is the mean over ranks, i.e. the loss of the whole global batch, so the
curve is the one a single process gets on the same B streams (up to float32
rounding):

    mpiexec -n 2 python examples/distributed_char_lm.py --losses two.json
    python examples/distributed_char_lm.py --losses one.json       # one rank, same batch

(``mpiexec`` comes with ``pip install 'fastrnn[distributed]'``, next to the
virtualenv's python.) Ends with ``final loss: X (unigram baseline: Y)`` and the
time per step spent in the allreduce.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # one BLAS thread per rank

import numpy as np
from mpi4py import MPI
from tqdm import tqdm

import fastrnn
from fastrnn.distributed import DataParallel
from fastrnn.losses import cross_entropy

from char_lm import TEXT, CharLM, evaluate, streams   # examples/ is on sys.path when run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="auto")
    p.add_argument("--steps", type=int, default=250, help="training chunks (default 250)")
    p.add_argument("--chunk", type=int, default=32, help="truncation length (default 32)")
    p.add_argument("--batch", type=int, default=16,
                   help="global number of streams, split over the ranks (default 16)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--losses", help="write the per-step global losses to this JSON file")
    p.add_argument("--quick", action="store_true", help="a few steps, to check that it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.hidden = 5, 16
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if args.batch % size:
        p.error(f"--batch {args.batch} must be a multiple of the number of ranks ({size})")
    started = time.perf_counter()

    text = TEXT.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text])
    split = int(0.9 * len(ids))
    train_ids, valid_ids = ids[:split], ids[split:]
    share = args.batch // size
    data = streams(train_ids, args.batch)[:, rank * share:(rank + 1) * share]   # this rank's
    counts = np.bincount(train_ids, minlength=len(chars)) + 1
    unigram = -np.log(counts / counts.sum())[valid_ids[1:]].mean()

    model = CharLM(len(chars), 32, args.hidden, args.backend, args.seed)
    dp = DataParallel(model.modules, comm)           # every rank starts from rank 0's weights
    opt = fastrnn.optim.Adam(model.modules, lr=args.lr)
    if rank == 0:
        print(f"{size} rank(s), {share} of {args.batch} streams each, chunks of {args.chunk}; "
              f"LSTM({args.hidden}) on backend {model.lstm.backend!r}; {dp.nbytes} bytes of "
              f"gradients per step in {len(dp.buckets)} Allreduce call(s)")

    losses, step, avg, t_reduce = [], 0, math.log(len(chars)), 0.0
    bar = tqdm(total=args.steps, desc="char LM", unit="chunk", disable=rank != 0)
    t_loop = time.perf_counter()
    while step < args.steps:
        state = None
        for xs, ys in fastrnn.tbptt.chunks(data[:-1], data[1:], size=args.chunk):
            logits, state = model.forward(xs, state)
            loss, d_logits = cross_entropy(logits, ys)
            model.backward(d_logits)
            t0 = time.perf_counter()
            dp.allreduce_grads()                     # mean gradient of the global batch
            t_reduce += time.perf_counter() - t0
            fastrnn.clip_grad_norm_(model.modules, 1.0)   # same gradients: same clipping
            opt.step()
            opt.zero_grad()
            loss = dp.allreduce_mean(loss)           # the global batch's loss
            losses.append(loss)
            avg = 0.95 * avg + 0.05 * loss
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{avg:.3f}")
            if step == args.steps:
                break
    bar.close()
    t_loop = time.perf_counter() - t_loop
    assert dp.in_sync(), "ranks diverged"            # bitwise-equal parameters everywhere

    if rank == 0:
        final = evaluate(model, valid_ids)
        print(f"allreduce {1e3 * t_reduce / step:.2f} ms of {1e3 * t_loop / step:.2f} ms per "
              f"step (rank 0); {time.perf_counter() - started:.1f} s")
        print(f"final loss: {final:.3f} (unigram baseline: {unigram:.3f})")
        if args.losses:
            with open(args.losses, "w") as f:
                json.dump({"ranks": size, "batch": args.batch, "losses": losses,
                           "final": final}, f)


if __name__ == "__main__":
    main()
