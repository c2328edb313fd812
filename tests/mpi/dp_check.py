"""Run under ``mpiexec -n 2``: DataParallel scenarios, each rank's results pickled to OUT_DIR.

    mpiexec -n 2 python tests/mpi/dp_check.py OUT_DIR

tests/test_distributed.py imports the problem definitions below (models, batches,
losses) to compute its single-process oracle, and checks the pickles.
"""

from __future__ import annotations

import pickle
import sys
import traceback
from pathlib import Path

import numpy as np

import fastrnn
from fastrnn.losses import cross_entropy, mse_loss

BACKEND = "numpy"   # the reference: no compilation, so the helper starts fast
V, T_A, B_A = 11, 7, 6          # problem A: Embedding -> 2-layer bi-LSTM -> Linear, float32
T_B, B_B = 6, 5                 # problem B: GRU with lengths -> LSTMCell steps, float64
ADAM_STEPS = 3


# ------------------------------------------------------------------ problems

def models_a(seed, hidden=16):
    return [fastrnn.Embedding(V, 8, backend=BACKEND, seed=seed),
            fastrnn.LSTM(8, hidden, num_layers=2, bidirectional=True, backend=BACKEND,
                         seed=seed + 1),
            fastrnn.Linear(2 * hidden, V, backend=BACKEND, seed=seed + 2)]


def batch_a(step):
    rng = np.random.default_rng(1000 + step)
    return rng.integers(0, V, (T_A, B_A)), rng.integers(0, V, (T_A, B_A))


def loss_a(models, ids, targets):
    """Mean cross-entropy over the (T, b) targets; gradients added to the models."""
    emb, lstm, head = models
    out, _ = lstm(emb(ids))
    loss, d_logits = cross_entropy(head(out), targets)
    d_x, _ = lstm.backward(head.backward(d_logits))
    emb.backward(d_x)
    return loss


def models_b(seed):
    return [fastrnn.GRU(5, 6, backend=BACKEND, dtype=np.float64, seed=seed),
            fastrnn.LSTMCell(6, 4, backend=BACKEND, dtype=np.float64, seed=seed + 1)]


def batch_b():
    rng = np.random.default_rng(2000)
    x = rng.standard_normal((T_B, B_B, 5))
    lengths = np.array([6, 2, 5, 0, 4])
    return x, lengths, rng.standard_normal((B_B, 4))


def loss_b(models, x, lengths, target):
    """Mean squared error of the cell's last state; gradients added to the models."""
    gru, cell = models
    out, _ = gru(x, lengths=lengths)
    state = None
    for t in range(len(out)):
        state = cell(out[t], state)
    loss, d_h = mse_loss(state[0], target)
    d_out = np.zeros_like(out)
    d_c = None
    for t in reversed(range(len(out))):
        d_out[t], (d_h, d_c) = cell.backward(d_h, d_c)
    gru.backward(d_out)
    return loss


def shard(rank, size, n):
    """Rank's slice of n batch rows (the first ranks get one more when n % size)."""
    per, extra = divmod(n, size)
    start = rank * per + min(rank, extra)
    return slice(start, start + per + (rank < extra))


def grads_of(models):
    return [{k: v.copy() for k, v in m.grads.items()} for m in models]


def params_of(models):
    return [{k: v.copy() for k, v in m.params.items()} for m in models]


# ------------------------------------------------------------------ scenarios

def run(comm, out_dir):
    from fastrnn.distributed import DataParallel, NonFiniteGradientError
    rank, size = comm.Get_rank(), comm.Get_size()
    res = {"rank": rank, "size": size}

    # A: each rank starts from its own seed; construction must broadcast rank 0's.
    models = models_a(100 + rank)
    res["a_own_params"] = params_of(models)
    dp = DataParallel(models, comm)
    res["a_broadcast_params"] = params_of(models)
    res["a_nbytes"], res["a_buckets"] = dp.nbytes, [(str(d), n, k) for d, n, k in dp.buckets]
    ids, targets = batch_a(0)
    rows = shard(rank, size, B_A)
    local_loss = loss_a(models, ids[:, rows], targets[:, rows])
    res["a_local_grads"] = grads_of(models)
    dp.allreduce_grads()
    res["a_grads"] = grads_of(models)
    res["a_loss"] = dp.allreduce_mean(local_loss)

    # A, continued: Adam steps from there (step 0's averaged gradient first).
    opt = fastrnn.optim.Adam(models, lr=1e-2)
    losses = []
    for step in range(ADAM_STEPS):
        if step:
            ids, targets = batch_a(step)
            local_loss = loss_a(models, ids[:, rows], targets[:, rows])
            dp.allreduce_grads()
            losses.append(dp.allreduce_mean(local_loss))
        opt.step()
        opt.zero_grad()
    res["a_steps_params"], res["a_steps_losses"], res["a_in_sync"] = \
        params_of(models), losses, dp.in_sync()

    # B: float64, unequal shards (3 and 2 rows), weighted by the local batch size.
    models = models_b(200)
    dp = DataParallel(models, comm)
    x, lengths, target = batch_b()
    rows = shard(rank, size, B_B)
    loss_b(models, x[:, rows], lengths[rows], target[rows])
    dp.allreduce_grads(weight=rows.stop - rows.start)
    res["b_grads"] = grads_of(models)

    # NaN on the last rank: reported on every rank, nothing averaged.
    models = models_a(300)
    dp = DataParallel(models, comm)
    ids, targets = batch_a(0)
    loss_a(models, ids[:, shard(rank, size, B_A)], targets[:, shard(rank, size, B_A)])
    if rank == size - 1:
        models[1].grads["weight_hh_l1_reverse"][3, 2] = np.nan
    before = grads_of(models)
    try:
        dp.allreduce_grads()
        res["nan"] = None
    except NonFiniteGradientError as exc:
        res["nan"] = {"message": str(exc), "ranks": exc.ranks, "keys": exc.keys}
    res["nan_unchanged"] = all(
        np.array_equal(b[k], m.grads[k], equal_nan=True)
        for b, m in zip(before, models) for k in b)

    # Shapes that differ across ranks: ValueError naming the key, on every rank, no change.
    models = models_a(400, hidden=16 if rank == 0 else 17)
    before = params_of(models)
    try:
        DataParallel(models, comm)
        res["shape"] = None
    except ValueError as exc:
        res["shape"] = str(exc)
    res["shape_unchanged"] = all(np.array_equal(b[k], m.params[k])
                                 for b, m in zip(before, models) for k in b)

    # Argument errors, local and before any communication.
    errors = {}
    for label, kwargs in {"bucket_bytes": {"bucket_bytes": 0},
                          "check_finite": {"check_finite": "yes"},
                          "comm": {"comm": object()}}.items():
        try:
            DataParallel(models_a(500), **{"comm": comm, **kwargs})
            errors[label] = None
        except (TypeError, ValueError) as exc:
            errors[label] = f"{type(exc).__name__}: {exc}"
    dp = DataParallel(models_a(500), comm)
    for label, w in {"weight_zero": 0, "weight_str": "3"}.items():
        try:
            dp.allreduce_grads(weight=w)
            errors[label] = None
        except (TypeError, ValueError) as exc:
            errors[label] = f"{type(exc).__name__}: {exc}"
    try:
        dp.broadcast_params(root=size)
        errors["root"] = None
    except ValueError as exc:
        errors["root"] = f"{type(exc).__name__}: {exc}"
    dp.models[1].to(dtype=np.float64)          # the buckets were planned for float32
    try:
        dp.allreduce_grads()
        errors["stale"] = None
    except ValueError as exc:
        errors["stale"] = f"{type(exc).__name__}: {exc}"
    res["errors"] = errors

    # Small buckets: many Allreduce calls, same result as one.
    models = models_a(100 + rank)
    dp = DataParallel(models, comm, bucket_bytes=4096)
    res["small_buckets"] = len(dp.buckets)
    ids, targets = batch_a(0)
    rows = shard(rank, size, B_A)
    loss_a(models, ids[:, rows], targets[:, rows])
    dp.allreduce_grads()
    res["small_bucket_grads"] = grads_of(models)

    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(res, f)


def main():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    try:
        run(comm, sys.argv[1])
    except BaseException:
        traceback.print_exc()
        comm.Abort(1)   # a rank that fails must not leave the other one waiting


if __name__ == "__main__":
    main()
