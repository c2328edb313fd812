"""Measurements for docs/distributed.md: MPI allreduce cost vs step compute, Dask 1 vs 2 workers.

    # data-parallel training: compute per step on R ranks, and the allreduce
    python bench/distributed_scaling.py mpi                      # R = 1: the whole batch
    mpiexec -n 2 python bench/distributed_scaling.py mpi         # R = 2: half each + allreduce

    # sharded inference: sequences per second on a LocalCluster of 1 and of 2 workers
    python bench/distributed_scaling.py dask

Each prints a table and appends a JSON record to --json (default: print only).
Timings are medians over --repeats; this machine is shared, so the load
average at the start is printed alongside.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # one BLAS thread per rank / worker
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

import fastrnn
from fastrnn.losses import cross_entropy

#: (label, vocabulary, embedding, hidden, layers): the char LM of examples/char_lm.py
#: and a larger one, where the gradient is 25x bigger.
MODELS = [("char-lm", 64, 32, 128, 1), ("lstm-512x2", 64, 256, 512, 2)]
GLOBAL_BATCH, CHUNK = 32, 32


def load():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def median_time(fn, repeats, sync=None):
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_mpi(args):
    from mpi4py import MPI
    from fastrnn.distributed import DataParallel
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    records = []
    for label, V, E, H, L in MODELS:
        emb = fastrnn.Embedding(V, E, backend=args.backend, seed=0)
        lstm = fastrnn.LSTM(E, H, num_layers=L, backend=args.backend, seed=1)
        head = fastrnn.Linear(H, V, backend=args.backend, seed=2)
        models = [emb, lstm, head]
        dp = DataParallel(models, comm)
        b = GLOBAL_BATCH // size
        rng = np.random.default_rng(rank)
        ids, targets = rng.integers(0, V, (CHUNK, b)), rng.integers(0, V, (CHUNK, b))

        def compute():
            out, _ = lstm(emb(ids))
            _, d_logits = cross_entropy(head(out), targets)
            d_x, _ = lstm.backward(head.backward(d_logits))
            emb.backward(d_x)

        compute()                                        # warm-up: kernels loaded
        dp.allreduce_grads()
        t_compute = median_time(compute, args.repeats)
        # the allreduce alone: a barrier first, so that waiting for a slower rank is not counted
        t_reduce = median_time(dp.allreduce_grads, args.repeats, sync=comm.Barrier)
        t_compute = comm.allreduce(t_compute, op=MPI.MAX)   # a step waits for the slowest
        t_reduce = comm.allreduce(t_reduce, op=MPI.MAX)
        records.append({"model": label, "ranks": size, "batch_per_rank": b,
                        "grad_bytes": dp.nbytes, "compute_ms": 1e3 * t_compute,
                        "allreduce_ms": 1e3 * t_reduce})
    # raw Allreduce of float32 buffers: the latency + bandwidth constants of the cost model
    sweep = []
    if size > 1:
        for nbytes in (4 << 10, 64 << 10, 1 << 20, 16 << 20):
            buf = np.ones(nbytes // 4, np.float32)
            t = median_time(lambda: comm.Allreduce(MPI.IN_PLACE, buf), args.repeats,
                            sync=comm.Barrier)
            sweep.append({"bytes": nbytes, "ms": 1e3 * comm.allreduce(t, op=MPI.MAX)})
    if rank == 0:
        print(f"# {size} rank(s), backend {args.backend}, global batch {GLOBAL_BATCH} x chunk "
              f"{CHUNK}, load average {load():.2f}")
        print(f"{'model':12} {'ranks':>5} {'B/rank':>6} {'grad bytes':>11} {'compute ms':>10} "
              f"{'allreduce ms':>12} {'share':>6}")
        for r in records:
            share = r["allreduce_ms"] / (r["allreduce_ms"] + r["compute_ms"])
            print(f"{r['model']:12} {r['ranks']:5d} {r['batch_per_rank']:6d} "
                  f"{r['grad_bytes']:11d} {r['compute_ms']:10.2f} {r['allreduce_ms']:12.3f} "
                  f"{share:6.1%}")
        for s in sweep:
            print(f"Allreduce {s['bytes']:>9d} bytes: {s['ms']:.3f} ms "
                  f"({s['bytes'] / s['ms'] / 1e6:.2f} GB/s)")
        save(args, {"kind": "mpi", "ranks": size, "load": load(), "records": records,
                    "sweep": sweep})


def bench_dask(args):
    import contextlib
    import logging

    import dask.array as da
    from distributed import Client, LocalCluster, wait

    from fastrnn.dask import apply
    T, B, I, H, block = 100, 1024, 64, 128, 64
    models = iter([fastrnn.LSTM(I, H, backend=args.backend, seed=k)
                   for k in range(2 * args.repeats + 2)])
    x_local = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    local = fastrnn.LSTM(I, H, backend=args.backend, seed=0).eval()
    print(f"# LSTM({I}, {H}), T = {T}, {B} sequences in blocks of {block}, backend "
          f"{local.backend}, load average {load():.2f}; runs interleaved, medians of "
          f"{args.repeats}")
    with contextlib.ExitStack() as stack:
        runners = {}
        for workers in (1, 2):
            cluster = stack.enter_context(LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True,
                dashboard_address=":0", silence_logs=logging.CRITICAL))
            client = stack.enter_context(Client(cluster))
            # the input is made on the workers and kept there: only the model travels
            x = da.random.default_rng(0).standard_normal((T, B, I), chunks=(T, block, I))
            dx = client.persist(x.astype(np.float32))
            wait(dx)

            def run(client=client, dx=dx):
                # a model of its own seed each time: new keys, so nothing is reused
                out = client.persist(apply(next(models), dx))   # computed, kept on the workers
                wait(out)
                del out
            run()                                        # warm-up: kernels loaded on workers
            runners[workers] = run
        # the same work in this process, one call on the whole batch
        runners["in-process"] = lambda: local(x_local)
        runners["in-process"]()
        times = {label: [] for label in runners}
        for _ in range(args.repeats):                    # interleaved: the load hits all alike
            for label, run in runners.items():
                t0 = time.perf_counter()
                run()
                times[label].append(time.perf_counter() - t0)
    records = []
    for label in ("in-process", 1, 2):
        t = float(np.median(times[label]))
        records.append({"workers": label, "seconds": t, "sequences_per_s": B / t})
        name = "in-process, one call" if label == "in-process" else f"{label} worker(s)"
        print(f"{name:22}: {t:.3f} s, {B / t:.0f} sequences/s")
    ratio = records[2]["sequences_per_s"] / records[1]["sequences_per_s"]
    print(f"2 workers / 1 worker: {ratio:.2f}x")
    save(args, {"kind": "dask", "load": load(), "T": T, "B": B, "I": I, "H": H,
                "block": block, "records": records})


def save(args, record):
    if args.json:
        record.update(date=time.strftime("%Y-%m-%d %H:%M"), argv=sys.argv)
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["mpi", "dask"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", help="append the results to this JSON-lines file")
    args = p.parse_args(argv)
    (bench_mpi if args.what == "mpi" else bench_dask)(args)


if __name__ == "__main__":
    main()
