"""Data-parallel training over MPI (mpi4py): every rank holds the whole model and
1/R of the batch; gradients are averaged across ranks before each optimizer step.

    from fastrnn.distributed import DataParallel
    dp = DataParallel([emb, lstm, head])     # broadcasts rank 0's parameters
    ...forward and backward on this rank's share of the batch...
    dp.allreduce_grads()                     # every rank now holds the mean gradient
    opt.step(); opt.zero_grad()

Run with ``mpiexec -n R python train.py`` (``pip install 'fastrnn[distributed]'``
installs mpi4py and the MPICH wheel, whose ``mpiexec`` lands next to Python).
Importing :mod:`fastrnn` does not import mpi4py; this module imports it when a
:class:`DataParallel` is built without a ``comm``.

Equations
---------
With rank r's gradient g_r and weight w_r (1 unless given)::

    g = sum_r w_r * g_r / sum_r w_r

When every rank's loss is the mean over its n_r examples and w_r = n_r (or all
n_r are equal and no weights are given), g is the gradient of the mean loss over
the whole batch.
"""

from __future__ import annotations

import numbers

import numpy as np

from .optim import _as_models

__all__ = ["DataParallel", "NonFiniteGradientError"]

#: Default bucket size: large enough that a model of a few million parameters
#: goes in one or two calls, small enough to bound the staging memory.
BUCKET_BYTES = 1 << 24


class NonFiniteGradientError(FloatingPointError):
    """Raised on every rank when some rank's gradients hold NaN or an infinity.

    ``ranks`` lists the offending ranks; ``keys`` the ``(model index, name)`` pairs
    that are non-finite on *this* rank (empty on a clean rank). The gradients
    are left as they were on every rank, so the caller can skip the step
    (``opt.zero_grad()``) on all ranks alike.
    """

    def __init__(self, message, ranks, keys):
        super().__init__(message)
        self.ranks, self.keys = list(ranks), list(keys)


def _to_host(a):
    return a.get() if hasattr(a, "get") else a   # cupy -> numpy (MPICH's wheel is not CUDA-aware)


class _Bucket:
    """One flat host buffer of one dtype and the gradient slices it carries.

    ``entries`` are ``(model index, name, offset, size)``; the first bucket also
    carries ``meta`` slots after the gradients: one non-finite flag per rank,
    then the rank's weight.
    """

    def __init__(self, dtype, entries, n_meta):
        self.dtype = dtype
        self.entries = entries
        self.n_grads = sum(size for *_, size in entries)
        self.n_meta = n_meta
        self.buffer = np.empty(self.n_grads + n_meta, dtype)

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes


class DataParallel:
    """Synchronous data parallelism over an MPI communicator.

    Parameters
    ----------
    models : module or list of modules
        What an optimizer takes: layers, cells, ``Linear``, ``Embedding``, or
        anything with ``params`` and ``grads`` dicts of float32/float64 arrays.
    comm : mpi4py communicator, optional
        Defaults to ``MPI.COMM_WORLD``. Every rank of it must build a
        ``DataParallel`` over models of the same structure, in the same order.
    bucket_bytes : int
        Upper bound of one ``Allreduce`` call's buffer (a tensor larger than
        that gets a bucket of its own). Gradients of one dtype are packed in
        as few buckets as this allows.
    check_finite : bool
        Check every rank's gradients for NaN and infinities at each
        :meth:`allreduce_grads` (the flags travel in the same ``Allreduce``;
        the check costs one pass over the local gradients).

    Construction is collective: it checks that every rank has the same
    models, names, shapes and dtypes (``ValueError`` naming the first key that
    differs, raised on every rank, nothing changed), then broadcasts rank 0's
    parameters into every rank's arrays, in place.
    """

    def __init__(self, models, comm=None, *, bucket_bytes=BUCKET_BYTES, check_finite=True):
        models = _as_models(models)
        if (isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, numbers.Integral)
                or bucket_bytes < 1):
            raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
        if not isinstance(check_finite, (bool, np.bool_)):
            raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
        signature = self._local_signature(models)
        if comm is None:
            try:
                from mpi4py import MPI
            except ImportError as exc:
                raise ImportError("fastrnn.distributed needs mpi4py and an MPI library: "
                                  "pip install 'fastrnn[distributed]'") from exc
            comm = MPI.COMM_WORLD
        for method in ("Allreduce", "Bcast", "allgather", "Get_rank", "Get_size"):
            if not hasattr(comm, method):
                raise TypeError(f"comm must be an mpi4py communicator, got "
                                f"{type(comm).__name__} (no {method})")
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._check_same_everywhere(signature)
        self.models = models
        self.check_finite = bool(check_finite)
        self.bucket_bytes = int(bucket_bytes)
        self._buckets = self._plan(signature)
        self.broadcast_params()

    # ------------------------------------------------------------ set-up

    @staticmethod
    def _local_signature(models):
        """``[(model index, name, shape, dtype)]``, checking each model's grads locally."""
        signature = []
        for i, m in enumerate(models):
            for name, p in m.params.items():
                if name not in m.grads:
                    raise KeyError(f"models[{i}].grads has no entry {name!r} for the parameter "
                                   f"of that name")
                g = m.grads[name]
                if tuple(g.shape) != tuple(p.shape) or np.dtype(g.dtype) != np.dtype(p.dtype):
                    raise ValueError(f"models[{i}].grads[{name!r}] is {np.dtype(g.dtype)} "
                                     f"{tuple(g.shape)}, expected the parameter's "
                                     f"{np.dtype(p.dtype)} {tuple(p.shape)}")
                if np.dtype(p.dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
                    raise TypeError(f"models[{i}].params[{name!r}] has dtype {p.dtype}, "
                                    f"expected float32 or float64")
                signature.append((i, name, tuple(int(n) for n in p.shape), np.dtype(p.dtype).str))
        return signature

    def _check_same_everywhere(self, signature):
        """Raise the same ValueError on every rank if any rank's models differ from rank 0's."""
        everyone = self.comm.allgather(signature)
        reference = everyone[0]
        for rank, theirs in enumerate(everyone[1:], start=1):
            if theirs == reference:
                continue
            for mine, other in zip(reference, theirs):
                if mine != other:
                    i, name, shape, dtype = other
                    i0, name0, shape0, dtype0 = mine
                    if (i, name) != (i0, name0):
                        raise ValueError(f"models differ across ranks: parameter "
                                         f"models[{i0}].params[{name0!r}] on rank 0 is "
                                         f"models[{i}].params[{name!r}] on rank {rank}")
                    raise ValueError(f"models[{i}].params[{name!r}] differs across ranks: "
                                     f"{np.dtype(dtype0)} {shape0} on rank 0, "
                                     f"{np.dtype(dtype)} {shape} on rank {rank}")
            longer = 0 if len(reference) > len(theirs) else rank
            i, name, *_ = everyone[longer][min(len(reference), len(theirs))]
            raise ValueError(f"models differ across ranks: models[{i}].params[{name!r}] exists "
                             f"on rank {longer} only ({len(reference)} parameters on rank 0, "
                             f"{len(theirs)} on rank {rank})")

    def _plan(self, signature):
        """Buckets: per dtype (float32 first), tensors in order, up to ``bucket_bytes`` each."""
        buckets = []
        n_meta = self.size + 1
        for dtype in sorted({d for *_, d in signature}):
            dtype = np.dtype(dtype)
            entries, nbytes = [], 0
            for i, name, shape, d in signature:
                if np.dtype(d) != dtype:
                    continue
                size = int(np.prod(shape, dtype=np.int64))
                if entries and nbytes + size * dtype.itemsize > self.bucket_bytes:
                    buckets.append(_Bucket(dtype, entries, 0))
                    entries, nbytes = [], 0
                entries.append((i, name, nbytes // dtype.itemsize, size))
                nbytes += size * dtype.itemsize
            if entries:
                buckets.append(_Bucket(dtype, entries, 0))
        if not buckets:   # no parameters: the meta slots still need a buffer
            buckets.append(_Bucket(np.dtype(np.float64), [], 0))
        first = buckets[0]
        buckets[0] = _Bucket(first.dtype, first.entries, n_meta)
        return buckets

    # ------------------------------------------------------------ public

    @property
    def nbytes(self) -> int:
        """Bytes that one :meth:`allreduce_grads` reduces per rank (gradients and flags)."""
        return sum(b.nbytes for b in self._buckets)

    @property
    def buckets(self):
        """``[(dtype, nbytes, number of tensors)]``: one ``Allreduce`` call each."""
        return [(b.dtype, b.nbytes, len(b.entries)) for b in self._buckets]

    def broadcast_params(self, root=0):
        """Copy rank ``root``'s parameters into every rank's arrays, in place (collective)."""
        if (isinstance(root, bool) or not isinstance(root, numbers.Integral)
                or not 0 <= root < self.size):
            raise ValueError(f"root must be a rank in [0, {self.size}), got {root!r}")
        self._check_plan("params")
        for b in self._buckets:
            values = b.buffer[:b.n_grads]
            if self.rank == root:
                for i, name, offset, size in b.entries:
                    values[offset:offset + size] = _to_host(self.models[i].params[name]).ravel()
            self.comm.Bcast(values, root=root)
            for i, name, offset, size in b.entries:
                p = self.models[i].params[name]
                p[...] = self._like(p, values[offset:offset + size].reshape(p.shape))

    def allreduce_grads(self, weight=None):
        """Average every gradient across ranks, in place (collective).

        Parameters
        ----------
        weight : positive number, optional
            This rank's share of the global loss, e.g. the number of targets
            its mean loss was taken over. The result is ``sum_r w_r g_r /
            sum_r w_r``; without weights, the plain mean over ranks.

        Raises
        ------
        NonFiniteGradientError
            On every rank, when some rank's gradients hold NaN or an infinity
            (with ``check_finite``); no gradient is changed on any rank.
        """
        if weight is None:
            w = 1.0
        else:
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
                raise TypeError(f"weight must be a positive real number, got {weight!r}")
            w = float(weight)
            if not (np.isfinite(w) and w > 0):
                raise ValueError(f"weight must be finite and > 0, got {weight!r}")
        self._check_plan("grads")
        bad_keys = []
        for b in self._buckets:
            values = b.buffer[:b.n_grads]
            for i, name, offset, size in b.entries:
                g = _to_host(self.models[i].grads[name]).ravel()
                if weight is None:
                    values[offset:offset + size] = g
                else:
                    np.multiply(g, b.dtype.type(w), out=values[offset:offset + size])
                if self.check_finite and not np.isfinite(values[offset:offset + size]).all():
                    bad_keys.append((i, name))
        meta = self._buckets[0].buffer[self._buckets[0].n_grads:]
        meta[:] = 0
        meta[self.rank] = 1 if bad_keys else 0
        meta[-1] = w
        for b in self._buckets:
            self.comm.Allreduce(self._in_place(), b.buffer)
        bad_ranks = [r for r in range(self.size) if meta[r] != 0]
        if bad_ranks:
            # Only the error path pays for this second collective; every rank takes it.
            everyone = self.comm.allgather(bad_keys)
            where = "; ".join(f"rank {r}: " + ", ".join(f"models[{i}].grads[{name!r}]"
                                                        for i, name in everyone[r])
                              for r in bad_ranks)
            raise NonFiniteGradientError(
                f"non-finite gradients (NaN or inf) on rank(s) {bad_ranks} ({where}); nothing "
                f"was averaged and every gradient is unchanged", bad_ranks, bad_keys)
        for b in self._buckets:
            scale = b.dtype.type(1.0 / meta[-1])
            values = b.buffer[:b.n_grads]
            values *= scale
            for i, name, offset, size in b.entries:
                g = self.models[i].grads[name]
                g[...] = self._like(g, values[offset:offset + size].reshape(g.shape))

    def allreduce_mean(self, value, weight=None):
        """The (weighted) mean of a float over ranks, e.g. the step's loss (collective)."""
        w = 1.0 if weight is None else float(weight)
        pair = np.array([float(value) * w, w], np.float64)
        self.comm.Allreduce(self._in_place(), pair)
        return float(pair[0] / pair[1])

    def in_sync(self) -> bool:
        """Whether every rank's parameters are bitwise equal to rank 0's (collective)."""
        import hashlib
        h = hashlib.sha256()
        for i, m in enumerate(self.models):
            for name, p in m.params.items():
                h.update(f"{i}/{name}".encode())
                h.update(np.ascontiguousarray(_to_host(p)).tobytes())
        digests = self.comm.allgather(h.hexdigest())
        return all(d == digests[0] for d in digests)

    # ------------------------------------------------------------ helpers

    def _check_plan(self, which):
        """The models still match the buckets (a ``to(dtype=...)`` since would not): local,
        before any communication, so a mismatch raises and changes nothing."""
        for b in self._buckets:
            for i, name, _, size in b.entries:
                a = getattr(self.models[i], which).get(name)
                if a is None or a.size != size or np.dtype(a.dtype) != b.dtype:
                    got = "missing" if a is None else f"{np.dtype(a.dtype)} of {a.size} values"
                    raise ValueError(f"models[{i}].{which}[{name!r}] is {got}, but this "
                                     f"DataParallel was built for {b.dtype} of {size} values: "
                                     f"build a new one after changing the models")

    def _in_place(self):
        from mpi4py import MPI
        return MPI.IN_PLACE

    @staticmethod
    def _like(target, host):
        """``host`` as an array of ``target``'s kind (numpy, or cupy on the cuda backend)."""
        if hasattr(target, "get"):
            import cupy
            return cupy.asarray(host)
        return host
