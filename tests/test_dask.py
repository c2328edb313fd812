"""fastrnn.dask.apply against the in-memory call, on a 2-worker LocalCluster and local schedulers."""

from __future__ import annotations

import logging
import os
import signal
import time

import numpy as np
import pytest

import fastrnn
from conftest import KINDS, make_layer, n_states, require


def dask_or_skip():
    return require("dask.array", "distributed")[1]


@pytest.fixture(scope="module")
def client():
    distributed = dask_or_skip()
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=logging.CRITICAL)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


T, B, I, H = 9, 10, 5, 6
CHUNKS = (4, 3, 3)          # uneven batch chunks
LENGTHS = np.array([9, 3, 0, 9, 5, 1, 9, 2, 8, 4])


def problem(kind, dtype=np.float64, backend="numpy", **kwargs):
    model = make_layer(kind, I, H, num_layers=2, bidirectional=True, dtype=dtype,
                       backend=backend, seed=3, **kwargs)
    x = np.random.default_rng(7).standard_normal((T, B, I)).astype(dtype)
    return model, x


def in_memory(model, x, lengths):
    """The oracle: the plain eval-mode call on the whole batch."""
    m = model.copy().eval()
    out, state = m(x, lengths=lengths)
    return out, (state if isinstance(state, tuple) else (state,))


def states(result):
    return result if isinstance(result, tuple) else (result,)


# ------------------------------------------------------------------ results

@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_in_memory_call_on_local_cluster(client, kind):
    import dask.array as da
    from fastrnn.dask import apply
    model, x = problem(kind)
    dx = da.from_array(x, chunks=(T, CHUNKS, I))
    out, state = apply(model, dx, LENGTHS, return_state=True)
    assert out.shape == (T, B, 2 * H) and out.chunks == ((T,), CHUNKS, (2 * H,))
    assert out.dtype == np.float64 and out._meta.dtype == np.float64
    state = states(state)
    assert len(state) == n_states(kind)
    for s in state:
        assert s.shape == (4, B, H) and s.chunks == ((4,), CHUNKS, (H,))
    got_out, *got_state = client.compute([out, *state], sync=True)
    want_out, want_state = in_memory(model, x, LENGTHS)
    np.testing.assert_allclose(got_out, want_out, rtol=0, atol=1e-13)
    assert np.all(got_out[LENGTHS[2]:, 2] == 0)        # padded steps of the length-0 row
    for got, want in zip(got_state, want_state, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("scheduler", ["sync", "threads", "processes"])
def test_numba_float32_batch_first_on_local_schedulers(scheduler):
    dask_or_skip()
    import dask
    import dask.array as da
    from fastrnn.dask import apply
    model, x = problem("lstm", dtype=np.float32, backend="auto", batch_first=True)
    x = x.transpose(1, 0, 2).copy()                      # (B, T, I)
    lengths = da.from_array(LENGTHS, chunks=5)           # a dask array, rechunked to x's
    dx = da.from_array(x, chunks=(CHUNKS, T, I))
    out, (h_n, c_n) = apply(model, dx, lengths, return_state=True)
    assert out.chunks == (CHUNKS, (T,), (2 * H,)) and out.dtype == np.float32
    got_out, got_h, got_c = dask.compute(out, h_n, c_n, scheduler=scheduler)
    want_out, (want_h, want_c) = in_memory(model, x, LENGTHS)
    # numba's float32 tanh differs from the reference by up to 4.5e-7: a few times that here
    for got, want in ((got_out, want_out), (got_h, want_h), (got_c, want_c)):
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-6)
        assert got.dtype == np.float32


def test_output_only_without_lengths():
    dask_or_skip()
    import dask.array as da
    from fastrnn.dask import apply
    model, x = problem("gru")
    out = apply(model, da.from_array(x, chunks=(T, 4, I)))
    want, _ = in_memory(model, x, None)
    np.testing.assert_allclose(out.compute(scheduler="sync"), want, rtol=0, atol=1e-13)


def test_lstm_with_projection():
    dask_or_skip()
    import dask.array as da
    from fastrnn.dask import apply
    model = fastrnn.LSTM(I, H, bidirectional=True, proj_size=3, backend="numpy",
                         dtype=np.float64, seed=6)
    x = np.random.default_rng(9).standard_normal((T, B, I))
    out, (h_n, c_n) = apply(model, da.from_array(x, chunks=(T, CHUNKS, I)), LENGTHS,
                            return_state=True)
    assert out.chunks[2] == (6,) and h_n.chunks[2] == (3,) and c_n.chunks[2] == (H,)
    got = da.compute(out, h_n, c_n, scheduler="sync")
    want_out, want_state = in_memory(model, x, LENGTHS)
    for g, w in zip(got, (want_out, *want_state), strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-13)


@pytest.mark.parametrize("layer", ["LayerNormLSTM", "LayerNormGRU"])
def test_layernorm_layers(layer):
    dask_or_skip()
    import dask.array as da
    from fastrnn.dask import apply
    model = getattr(fastrnn, layer)(I, H, num_layers=2, backend="numpy", dtype=np.float64,
                                    seed=4)
    x = np.random.default_rng(8).standard_normal((T, B, I))
    out, state = apply(model, da.from_array(x, chunks=(T, CHUNKS, I)), LENGTHS,
                       return_state=True)
    got_out, *got_state = da.compute(out, *states(state), scheduler="sync")
    want_out, want_state = in_memory(model, x, LENGTHS)
    np.testing.assert_allclose(got_out, want_out, rtol=0, atol=1e-13)
    for got, want in zip(got_state, want_state, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


# ------------------------------------------------------------------ the graph

def test_model_enters_the_graph_once_and_is_left_alone():
    dask_or_skip()
    import dask.array as da
    from fastrnn.dask import apply
    model, x = problem("lstm")
    before = model.state_dict()
    out, (h_n, c_n) = apply(model, da.from_array(x, chunks=(T, CHUNKS, I)), LENGTHS,
                            return_state=True)
    graph = dict(out.__dask_graph__())
    model_keys = [k for k in graph if isinstance(k, str) and k.startswith("fastrnn-model-")]
    assert len(model_keys) == 1
    run_keys = [k for k in graph if isinstance(k, tuple) and k[0].startswith("fastrnn-lstm-")]
    assert len(run_keys) == len(CHUNKS)
    deps = out.__dask_graph__().get_all_dependencies()
    assert all(model_keys[0] in deps[k] for k in run_keys)
    assert model.training                                 # the caller's model: not switched
    want, _ = in_memory(model, x, LENGTHS)
    model.params["weight_hh_l0"][...] = 0                 # later changes do not reach the graph
    np.testing.assert_allclose(out.compute(scheduler="sync"), want, rtol=0, atol=1e-13)
    model.load_state_dict(before)


def test_chunks_along_T_or_I_are_rejected_or_rechunked():
    dask_or_skip()
    import dask.array as da
    from fastrnn.dask import apply
    model, x = problem("rnn_tanh")
    along_t = da.from_array(x, chunks=(5, 4, I))
    with pytest.raises(ValueError, match=r"chunked along T \(axis 0: chunks \(5, 4\)\)"):
        apply(model, along_t)
    with pytest.raises(ValueError, match=r"chunked along I \(axis 2"):
        apply(model, da.from_array(x, chunks=(T, 4, 2)))
    out = apply(model, along_t, LENGTHS, rechunk=True)
    assert out.chunks == ((T,), (4, 4, 2), (2 * H,))
    want, _ = in_memory(model, x, LENGTHS)
    np.testing.assert_allclose(out.compute(scheduler="sync"), want, rtol=0, atol=1e-13)


def test_argument_errors_name_the_argument():
    dask_or_skip()
    import dask.array as da
    from fastrnn.dask import apply
    model, x = problem("gru")
    dx = da.from_array(x, chunks=(T, 5, I))
    cases = [
        (TypeError, "model must be", dict(model=fastrnn.Linear(I, H))),
        (TypeError, "x must be a dask array", dict(x=x)),
        (ValueError, "x must have 3 dimensions", dict(x=dx[0])),
        (ValueError, "input_size=5", dict(x=da.from_array(x[..., :4], chunks=(T, 5, 4)))),
        (TypeError, "dtype float32", dict(x=dx.astype(np.float32))),
        (ValueError, r"lengths must have shape \(10,\)", dict(lengths=LENGTHS[:4])),
        (ValueError, r"lengths must lie in \[0, T=9\]", dict(lengths=LENGTHS + 1)),
        (TypeError, "lengths must hold integers", dict(lengths=LENGTHS.astype(float))),
        (TypeError, "return_state must be a bool", dict(return_state=1)),
        (TypeError, "rechunk must be a bool", dict(rechunk="yes")),
    ]
    for error, message, override in cases:
        kwargs = {"model": model, "x": dx, **override}
        with pytest.raises(error, match=message):
            apply(**kwargs)


# ------------------------------------------------------------------ a killed worker

def test_killed_worker_is_retried_with_the_same_result(client):
    """A worker dies while it runs a block; Dask reruns the block elsewhere, same result."""
    import dask.array as da
    from fastrnn.dask import apply
    # blocks of about 0.3-1 s each on the numpy reference, so a kill lands mid-block
    model = fastrnn.LSTM(4, 32, backend="numpy", dtype=np.float64, seed=5)
    x = np.random.default_rng(11).standard_normal((3000, 12, 4))
    out = apply(model, da.from_array(x, chunks=(3000, 2, 4)))
    token = out.name.rsplit("-", 1)[1]   # shared by the block tasks (fused or not)
    future = client.compute(out)

    def progress(dask_scheduler, token=token):
        """(blocks done, {worker: blocks assigned to it and not done})"""
        done, busy = 0, {}
        for key, ts in dask_scheduler.tasks.items():
            if token in str(key):
                done += ts.state == "memory"
                if ts.state == "processing":
                    busy.setdefault(ts.processing_on.address, []).append(str(key))
        return done, busy
    victim, deadline = None, time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        done, busy = client.run_on_scheduler(progress)
        if done and busy:            # under way: a block is done, others are still running
            victim = next(iter(busy))
        time.sleep(0.01)
    assert victim is not None, "the computation did not get under way within 60 s"
    nanny = next(n for n in client.cluster.workers.values() if n.worker_address == victim)
    os.kill(nanny.pid, signal.SIGKILL)     # the worker process; its nanny starts a new one
    got = future.result(timeout=120)

    def rescheduled(dask_scheduler, token=token):
        # transitions out of 'processing' that are not a completion: the worker was lost
        return [(str(key), start, finish) for key, start, finish, *_ in
                dask_scheduler.transition_log
                if token in str(key) and start == "processing" and finish != "memory"]
    rerun = client.run_on_scheduler(rescheduled)
    assert rerun, "no block was rerun"
    want, _ = in_memory(model, x, None)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
