"""LLVM-level building blocks for the packed time loops (:mod:`.packed_numba`).

Numba's auto-vectorizer does not keep a GEMM's accumulators in registers
(docs/numba.md), so the recurrent product's inner kernel is written here
directly in LLVM IR, through :func:`numba.extending.intrinsic`, with vector
types of the width the host's ISA has: ``<16 x float>`` on AVX-512, ``<8 x
float>`` on AVX2 (and below, where LLVM splits it). Numba compiles for the host
CPU, so the same source gets zmm registers on one machine and ymm on another.

* :func:`microkernel` ``(MR, NV, VW)``: ``C[:mr, :NV*VW] = A[:mr, :K] @ P[:K, :NV*VW]``
  for a packed panel ``P`` (K rows of ``NV * VW`` contiguous values), with
  ``MR * NV`` vector accumulators held in registers over the whole ``K`` loop.
* :func:`wide_vectors`: lets LLVM's loop vectorizer use the host's widest vectors in
  the function that calls it.
* :func:`load_acquire` / :func:`store_release`: atomic int64 accesses, and
  :func:`arrive` / :func:`wait_all` built on them: the per-step barrier of the threads that
  share one time loop.
"""

from __future__ import annotations

import functools

import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._numba_math import FASTMATH


def host_features():
    """The feature names of the CPU Numba compiles for: the host's, as LLVM sees them,
    or those of ``NUMBA_CPU_FEATURES`` where it is set (with ``NUMBA_CPU_NAME``, Numba
    then compiles for that CPU, e.g. ``haswell`` for AVX2 code on an AVX-512 host)."""
    if numba.config.CPU_FEATURES:
        return {f[1:] for f in numba.config.CPU_FEATURES.split(",") if f.startswith("+")}
    return {name for name, on in llvm.get_host_cpu_features().items() if on}


def vector_width(features=None):
    """float32 lanes of the widest vector register the host has: 16 with AVX-512F,
    8 otherwise (AVX2; on older ISAs LLVM splits the 8-lane vectors)."""
    features = host_features() if features is None else features
    return 16 if "avx512f" in features else 8


def _i64(value):
    return ir.Constant(ir.IntType(64), value)


def _emit_kernel(builder, m, NV, VW, ap, a_off, lda, bpp, b_off, K, cp, ldc, cv, acc, pf, pf_n,
                 S, lak=None, ldp=None):
    """The m-row kernel: accumulators in allocas (promoted to registers by LLVM's
    mem2reg), per k NV vector loads of the panel and m broadcasts of A.

    ``S = 2``: the k loop split in two interleaved halves with their own accumulators,
    summed at the end, for few rows (m NV < 12 chains of dependent FMAs, fewer than the
    FMA units' latency times their count keep busy): at B = 1 the one-row kernel would
    otherwise wait on the FMA latency at every k. The halves sum in another order, so
    the caller chooses them by its batch (``halves``), never by the tile: then the rows
    can be split between threads anywhere and give the same bits.

    ``pf``: a float pointer, from which the loop's i-th step prefetches the i-th 64-byte
    line into L2 while i < ``pf_n``; None: no prefetch code in the loop.

    ``lak`` and ``ldp`` (int64 values): A's and the panel's strides along k; None: A's
    rows run along k (stride 1) and the panel is packed (stride ``NV VW``)."""
    vec = ir.VectorType(ir.FloatType(), VW)
    i32 = ir.IntType(32)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3),
                                         f"llvm.fma.v{VW}f32")
    zero = ir.Constant(vec, [0.0] * VW)
    undef = ir.Constant(vec, ir.Undefined)
    splat = ir.Constant(ir.VectorType(i32, VW), [0] * VW)
    accs = [[[cgutils.alloca_once_value(builder, zero) for _ in range(NV)] for _ in range(m)]
            for _ in range(S)]
    cptrs = [[builder.bitcast(builder.gep(cp, [builder.add(builder.mul(ldc, _i64(r)),
                                                           builder.mul(cv, _i64(v)))]),
                              vec.as_pointer()) for v in range(NV)] for r in range(m)]
    for r in range(m):       # accumulate onto c, or start from zero
        for v in range(NV):
            builder.store(builder.select(acc, builder.load(cptrs[r][v], align=4), zero),
                          accs[0][r][v])
    rows = [builder.gep(ap, [builder.add(a_off, builder.mul(lda, _i64(r)))]) for r in range(m)]
    panel = builder.gep(bpp, [b_off])

    prefetch = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32]),
        "llvm.prefetch.p0")

    def prefetch_line(i):
        """The ``i``-th of the ``pf_n`` cache lines from ``pf`` into L2 (prefetcht1); no code
        at all in the loop without ``pf`` (``pf`` None: the caller's plain variant)."""
        if pf is None:
            return
        with builder.if_then(builder.icmp_unsigned("<", i, pf_n)):
            line = builder.bitcast(builder.gep(pf, [builder.mul(i, _i64(16))]),
                                   ir.IntType(8).as_pointer())
            builder.call(prefetch, [line, ir.Constant(i32, 0), ir.Constant(i32, 2),
                                    ir.Constant(i32, 1)])

    ldp = _i64(NV * VW) if ldp is None else ldp

    def step(k, acc):
        pk = builder.gep(panel, [builder.mul(k, ldp)])
        ka = k if lak is None else builder.mul(k, lak)
        bv = [builder.load(builder.bitcast(builder.gep(pk, [_i64(v * VW)]), vec.as_pointer()),
                           align=4) for v in range(NV)]
        for r in range(m):
            s = builder.load(builder.gep(rows[r], [ka]))
            sv = builder.shuffle_vector(builder.insert_element(undef, s, ir.Constant(i32, 0)),
                                        undef, splat)
            for v in range(NV):
                builder.store(builder.call(fma, [sv, bv[v], builder.load(acc[r][v])]), acc[r][v])

    if S == 1:
        with cgutils.for_range(builder, K) as loop:
            prefetch_line(loop.index)
            step(loop.index, accs[0])
    else:
        with cgutils.for_range(builder, builder.udiv(K, _i64(2))) as loop:
            prefetch_line(loop.index)
            k0 = builder.mul(loop.index, _i64(2))
            step(k0, accs[0])
            step(builder.add(k0, _i64(1)), accs[1])
        odd = builder.icmp_unsigned("!=", builder.urem(K, _i64(2)), _i64(0))
        with builder.if_then(odd):
            step(builder.sub(K, _i64(1)), accs[0])
        for r in range(m):
            for v in range(NV):
                builder.store(builder.fadd(builder.load(accs[0][r][v]), builder.load(accs[1][r][v])),
                              accs[0][r][v])
    for r in range(m):
        for v in range(NV):
            builder.store(builder.load(accs[0][r][v]), cptrs[r][v], align=4)


def _switch_rows(builder, m64, MR, rows):
    """A switch on the row count ``m64`` (1 to ``MR``), each case's code from ``rows(m)``:
    one specialized kernel per row count."""
    done = builder.append_basic_block("mk.done")
    switch = builder.switch(m64, done)
    for m in range(1, MR + 1):
        block = builder.append_basic_block(f"mk.rows{m}")
        switch.add_case(_i64(m), block)
        builder.position_at_end(block)
        rows(m)
        builder.branch(done)
    builder.position_at_end(done)


@functools.lru_cache(maxsize=None)
def microkernel(MR, NV, VW):
    """An intrinsic ``mk(mr, a, a_off, lda, p, p_off, K, c, c_off, ldc, cv, acc, halves, pf_off,
    pf_n)``
    (float32 arrays, C-contiguous, of any rank; offsets and strides in elements):

    ``c[c_off + r ldc + v cv + j] (+)= sum_k a[a_off + r lda + k] p[p_off + k NV VW + v VW + j]``
    for rows ``r < mr <= MR``, vectors ``v < NV`` and lanes ``j < VW``: vector ``v``
    of the panel lands ``cv`` apart in ``c`` (a gate's stride in a gate-major row); with
    ``acc`` true the sums are added to what ``c`` holds (a later block of ``k``). One specialized loop per ``mr``
    (a switch), so a remainder block of rows computes only its rows. ``halves`` true:
    tiles of fewer than ``12 / NV`` rows run the k loop in two halves (:func:`_emit_kernel`;
    :func:`split_k` says when). With ``pf_n > 0`` a loop that also prefetches into L2
    (``prefetcht1``), at its i-th step (k = i, or k = 2i, 2i + 1 in halves) for i < ``pf_n``,
    the cache line at ``p[pf_off + 16 i]`` (what the caller reads next:
    :func:`.packed_numba._prefetch_plan`); with ``pf_n = 0``, a loop without that code.
    """

    @intrinsic
    def mk(typingctx, mr, a, a_off, lda, p, p_off, K, c, c_off, ldc, cv, acc, halves, pf_off,
           pf_n):
        if not all(isinstance(x, types.Array) and x.dtype == types.float32 for x in (a, p, c)):
            return None
        sig = types.void(mr, a, a_off, lda, p, p_off, K, c, c_off, ldc, cv, acc, halves, pf_off,
                         pf_n)

        def codegen(context, builder, signature, args):
            (mr_, a_, a_off_, lda_, p_, p_off_, K_, c_, c_off_, ldc_, cv_, acc_, halves_, pf_off_,
             pf_n_) = args
            tys = signature.args
            ap = context.make_array(tys[1])(context, builder, a_).data
            bpp = context.make_array(tys[4])(context, builder, p_).data
            cp = context.make_array(tys[7])(context, builder, c_).data
            ints = [context.cast(builder, v, t, types.int64) for v, t in
                    ((mr_, tys[0]), (a_off_, tys[2]), (lda_, tys[3]), (p_off_, tys[5]),
                     (K_, tys[6]), (c_off_, tys[8]), (ldc_, tys[9]), (cv_, tys[10]),
                     (pf_off_, tys[13]), (pf_n_, tys[14]))]
            m64, a_off64, lda64, p_off64, K64, c_off64, ldc64, cv64, pf_off64, pf_n64 = ints
            pf = builder.gep(bpp, [pf_off64])
            cp = builder.gep(cp, [c_off64])
            accb = context.cast(builder, acc_, tys[11], types.boolean)
            halvesb = context.cast(builder, halves_, tys[12], types.boolean)

            def rows(m):
                kernel = functools.partial(_emit_kernel, builder, m, NV, VW, ap, a_off64, lda64,
                                           bpp, p_off64, K64, cp, ldc64, cv64, accb)
                # A loop that prefetches and one without: a compare in every k step cost
                # the few-row products (which never prefetch) up to 0.86x.
                with builder.if_else(builder.icmp_unsigned(">", pf_n64, _i64(0))) as (
                        fetch, plain):
                    for prefetch_from, branch in ((pf, fetch), (None, plain)):
                        with branch:
                            if m * NV < 12:
                                with builder.if_else(halvesb) as (two, one):
                                    with two:
                                        kernel(prefetch_from, pf_n64, 2)
                                    with one:
                                        kernel(prefetch_from, pf_n64, 1)
                            else:
                                kernel(prefetch_from, pf_n64, 1)

            _switch_rows(builder, m64, MR, rows)
            return context.get_dummy_value()

        return sig, codegen

    return mk


def strided_microkernel(MR, NV, VW):
    """An intrinsic ``mk(mr, a, a_off, lda, lak, p, p_off, ldp, K, c, c_off, ldc, cv, acc)``:
    :func:`microkernel`'s product over operands that are not packed,

    ``c[c_off + r ldc + v cv + j] (+)= sum_k a[a_off + r lda + k lak] p[p_off + k ldp + v VW + j]``

    (rows ``r < mr <= MR``): A read at any strides (a transposed matrix: ``lda`` 1), the
    panel any ``NV VW`` contiguous columns of a row-major matrix (``ldp`` its row
    stride). The weights' gradients ``d_W = d_a^T x`` (:mod:`.packed_bptt`) read ``d_a``
    and ``x`` this way, where they lie. No halves, no prefetch."""

    @intrinsic
    def mk(typingctx, mr, a, a_off, lda, lak, p, p_off, ldp, K, c, c_off, ldc, cv, acc):
        if not all(isinstance(x, types.Array) and x.dtype == types.float32 for x in (a, p, c)):
            return None
        sig = types.void(mr, a, a_off, lda, lak, p, p_off, ldp, K, c, c_off, ldc, cv, acc)

        def codegen(context, builder, signature, args):
            tys = signature.args
            ap = context.make_array(tys[1])(context, builder, args[1]).data
            bpp = context.make_array(tys[5])(context, builder, args[5]).data
            cp = context.make_array(tys[9])(context, builder, args[9]).data
            m64, a_off64, lda64, lak64, p_off64, ldp64, K64, c_off64, ldc64, cv64 = [
                context.cast(builder, args[i], tys[i], types.int64)
                for i in (0, 2, 3, 4, 6, 7, 8, 10, 11, 12)]
            cp = builder.gep(cp, [c_off64])
            accb = context.cast(builder, args[13], tys[13], types.boolean)
            _switch_rows(builder, m64, MR, lambda m: _emit_kernel(
                builder, m, NV, VW, ap, a_off64, lda64, bpp, p_off64, K64, cp, ldc64, cv64,
                accb, None, None, 1, lak64, ldp64))
            return context.get_dummy_value()

        return sig, codegen

    return mk


#: Vector registers of the host's widest kind: 32 zmm with AVX-512, 16 ymm with AVX2.
VECTOR_REGISTERS = 32 if vector_width() == 16 else 16


@numba.njit(cache=True)
def split_k(B, NV, MR):
    """Whether a product over ``B`` batch rows, in tiles of up to ``MR`` rows, runs its
    small tiles' k loops in halves (``halves`` of :func:`microkernel`): where the batch's
    fullest tile makes fewer than 12 accumulator chains (min(B, MR) NV < 12) and twice its
    accumulators, with the NV panel vectors and a broadcast, still fit the vector registers
    (:data:`VECTOR_REGISTERS`). With AVX-512: B <= 2 for the LSTM, B <= 3 for the GRU.
    With AVX2 (tiles of 2 and 3 rows, 16 registers): B = 1 for the LSTM, B <= 2 for the
    GRU; until session 16 every batch there, and the halves' 16 accumulators of the LSTM's
    2-row tile spilled: its product ran at 66 GFLOP/s a core instead of 108 (Numba compiling
    for Haswell on a Zen 4 host, B = 64: ``python bench/packed_parts.py --parts halves``),
    and a split LSTM 100x64x256x256 inference took 236 ms against 45 for the BLAS loops
    (``bench/results/2026-12-06-packed-ab-avx2-session16.txt``). One choice per
    product, so that a tile's sums never depend on where its rows start (a thread's share
    of them)."""
    m = min(B, MR)
    return m * NV < 12 and 2 * m * NV + NV + 1 <= VECTOR_REGISTERS


# ------------------------------------------------------------------ atomics

@intrinsic
def load_acquire(typingctx, arr, i):
    """``arr[i]`` read with acquire ordering (an int64 array)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None
    sig = types.int64(arr, i)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.int64)
        return builder.load_atomic(builder.gep(ary.data, [idx]), "acquire", 8)

    return sig, codegen


@intrinsic
def store_release(typingctx, arr, i, value):
    """``arr[i] = value`` with release ordering (an int64 array)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None
    sig = types.void(arr, i, value)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.int64)
        val = context.cast(builder, args[2], signature.args[2], types.int64)
        builder.store_atomic(val, builder.gep(ary.data, [idx]), "release", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _sched_yield(typingctx):
    """libc's sched_yield(): lets the thread we wait for run on our core."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []),
                                            "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


#: Flags are this many int64 apart: one 128-byte line each, so the threads' stores
#: do not share a cache line (or an adjacent-line prefetch pair).
FLAG_STRIDE = 16
#: Spins before the waiting thread starts yielding its core (a few microseconds).
SPINS_BEFORE_YIELD = 2000


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def wait_for(flags, i, value):
    """Wait until ``flags[i] >= value`` (read with acquire: what the thread that stored
    it wrote before is visible after), spinning, then yielding the core."""
    spins = 0
    while load_acquire(flags, i) < value:
        spins += 1
        if spins > SPINS_BEFORE_YIELD:
            _sched_yield()


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def arrive(flags, tid, step):
    """Thread ``tid`` has finished ``step`` of a barrier: it publishes it (release), and
    can do work of its own before :func:`wait_all`."""
    store_release(flags, tid * FLAG_STRIDE, step)


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def wait_all(flags, nthreads, step):
    """Wait until every one of ``nthreads`` threads has arrived at ``step``. Everything a
    thread wrote before its :func:`arrive` is visible to every thread after this."""
    for q in range(nthreads):
        wait_for(flags, q * FLAG_STRIDE, step)


# ------------------------------------------------------------ vector width


@intrinsic
def wide_vectors(typingctx):
    """Mark the calling function ``"prefer-vector-width"="512"``: LLVM's tuning for the
    AVX-512 Xeons (Skylake-SP to Sapphire Rapids) prefers 256-bit vectors in
    auto-vectorized loops, so the pointwise passes ran on 8-lane vectors there. With the
    mark they use 16 lanes: 2.86 -> 2.14 ns per unit at B = 64, H = 512 (LSTM), 3.49 ->
    2.85 at B = 8, H = 32 (``python bench/packed_parts.py --parts pointwise``). A CPU
    without AVX-512 keeps its widest (256-bit) vectors. The explicit ``<16 x float>`` of
    :func:`microkernel` need no mark: without a ``min-legal-vector-width`` attribute,
    which Numba does not set, 512-bit types stay legal. llvmlite validates only the attributes it knows, so this string
    attribute goes into the set directly (``tests/test_packed.py`` checks the result)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()
    return sig, codegen
