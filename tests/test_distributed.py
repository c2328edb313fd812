"""fastrnn.distributed.DataParallel under ``mpiexec -n 2``, against the single-process oracle.

tests/mpi/dp_check.py runs every scenario on 2 ranks once (module fixture) and
pickles each rank's results; the tests here recompute the same problems in one
process, on the whole batch, and compare.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastrnn
from conftest import require

ROOT = Path(__file__).resolve().parent.parent
HELPER = ROOT / "tests" / "mpi" / "dp_check.py"
EXAMPLE = ROOT / "examples" / "distributed_char_lm.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def mpiexec_or_skip():
    """mpi4py and an mpiexec: skipped where absent, but never in CI."""
    require("mpi4py")
    exe = Path(sys.executable).parent / "mpiexec"
    found = str(exe) if exe.exists() else shutil.which("mpiexec")
    if found is None:
        if os.environ.get("CI"):
            raise RuntimeError("no mpiexec next to python or on PATH (pip install mpich)")
        pytest.skip("no mpiexec")
    return found


def _load_helper():
    spec = importlib.util.spec_from_file_location("dp_check", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dp_check = _load_helper()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    mpiexec = mpiexec_or_skip()
    out = tmp_path_factory.mktemp("mpi")
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, str(HELPER), str(out)],
                          env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)]


def assert_grads_close(got, want, rtol, atol):
    for g_model, w_model in zip(got, want, strict=True):
        assert g_model.keys() == w_model.keys()
        for k in w_model:
            np.testing.assert_allclose(g_model[k], w_model[k], rtol=rtol, atol=atol, err_msg=k)


def assert_bitwise(a, b):
    for a_model, b_model in zip(a, b, strict=True):
        for k in a_model:
            assert a_model[k].tobytes() == b_model[k].tobytes(), k


# ------------------------------------------------------------------ no engine on import

def test_import_fastrnn_imports_no_engine():
    code = ("import fastrnn, sys; bad = {'mpi4py', 'dask', 'distributed'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, timeout=120)


def test_models_checked_before_mpi():
    from fastrnn.distributed import DataParallel
    with pytest.raises(ValueError, match="models is empty"):
        DataParallel([])
    with pytest.raises(TypeError, match=r"models\[1\]"):
        DataParallel([fastrnn.Linear(2, 3, seed=0), object()])
    lin = fastrnn.Linear(2, 3, seed=0)
    lin.grads["weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"models\[0\]\.grads\['weight'\]"):
        DataParallel([lin])


# ------------------------------------------------------------------ correctness

def test_construction_broadcasts_rank0_parameters(ranks):
    own = [r["a_own_params"] for r in ranks]
    assert not np.array_equal(own[0][1]["weight_hh_l0"], own[1][1]["weight_hh_l0"])
    oracle = dp_check.params_of(dp_check.models_a(100))          # rank 0's seed
    for r in ranks:
        assert_bitwise(r["a_broadcast_params"], oracle)


def test_averaged_gradients_equal_full_batch_gradients(ranks):
    models = dp_check.models_a(100)
    ids, targets = dp_check.batch_a(0)
    loss = dp_check.loss_a(models, ids, targets)                  # one process, whole batch
    oracle = dp_check.grads_of(models)
    scale = max(np.abs(g).max() for m in oracle for g in m.values())
    for r in ranks:
        assert_grads_close(r["a_grads"], oracle, rtol=1e-5, atol=1e-6 * scale)
        assert r["a_loss"] == pytest.approx(loss, rel=1e-6)
    assert_bitwise(ranks[0]["a_grads"], ranks[1]["a_grads"])
    # The shards really differ: a rank's own gradient is not the full batch's.
    local = ranks[0]["a_local_grads"][1]["weight_hh_l0"]
    assert np.abs(local - oracle[1]["weight_hh_l0"]).max() > 100 * 1e-6 * scale


def test_weighted_unequal_shards_float64(ranks):
    models = dp_check.models_b(200)
    dp_check.loss_b(models, *dp_check.batch_b())
    oracle = dp_check.grads_of(models)
    for r in ranks:
        assert_grads_close(r["b_grads"], oracle, rtol=1e-12, atol=1e-14)
        assert r["b_grads"][0]["weight_hh_l0"].dtype == np.float64


def test_optimizer_steps_bitwise_equal_across_ranks(ranks):
    assert_bitwise(ranks[0]["a_steps_params"], ranks[1]["a_steps_params"])
    assert ranks[0]["a_in_sync"] and ranks[1]["a_in_sync"]
    # and close to the same steps in one process on the whole batch
    models = dp_check.models_a(100)
    opt = fastrnn.optim.Adam(models, lr=1e-2)
    losses = []
    for step in range(dp_check.ADAM_STEPS):
        ids, targets = dp_check.batch_a(step)
        loss = dp_check.loss_a(models, ids, targets)
        if step:
            losses.append(loss)
        opt.step()
        opt.zero_grad()
    np.testing.assert_allclose(ranks[0]["a_steps_losses"], losses, rtol=1e-5)
    assert_grads_close(ranks[0]["a_steps_params"], dp_check.params_of(models),
                       rtol=0, atol=1e-4)


def test_small_buckets_give_the_same_gradients(ranks):
    assert ranks[0]["a_buckets"] == [("float32", ranks[0]["a_nbytes"], 19)]   # one call
    assert ranks[0]["small_buckets"] > 5
    for r in ranks:
        assert_bitwise(r["small_bucket_grads"], r["a_grads"])


# ------------------------------------------------------------------ failures

def test_nan_on_one_rank_is_reported_on_every_rank(ranks):
    for r in ranks:
        nan = r["nan"]
        assert nan is not None, "a NaN gradient was averaged in silently"
        assert nan["ranks"] == [1]
        assert "rank 1: models[1].grads['weight_hh_l1_reverse']" in nan["message"]
        assert r["nan_unchanged"]
    assert ranks[0]["nan"]["keys"] == []
    assert ranks[1]["nan"]["keys"] == [(1, "weight_hh_l1_reverse")]


def test_shape_mismatch_names_the_key(ranks):
    for r in ranks:
        assert r["shape"] is not None
        assert "models[1].params['weight_ih_l0']" in r["shape"]
        assert "(64, 8) on rank 0" in r["shape"] and "(68, 8) on rank 1" in r["shape"]
        assert r["shape_unchanged"]


def test_argument_errors_name_the_argument(ranks):
    errors = ranks[0]["errors"]
    assert errors["bucket_bytes"].startswith("ValueError: bucket_bytes")
    assert errors["check_finite"].startswith("TypeError: check_finite")
    assert errors["comm"].startswith("TypeError: comm")
    assert errors["weight_zero"].startswith("ValueError: weight")
    assert errors["weight_str"].startswith("TypeError: weight")
    assert errors["root"].startswith("ValueError: root must be a rank in [0, 2)")
    assert errors["stale"].startswith("ValueError: models[1].grads['weight_ih_l0'] is float64")


# ------------------------------------------------------------------ the example

def test_example_two_ranks_follow_the_one_rank_loss_curve(tmp_path):
    mpiexec = mpiexec_or_skip()
    common = [str(EXAMPLE), "--steps", "8", "--hidden", "16", "--backend", "numpy"]
    runs = {"two": [mpiexec, "-n", "2", sys.executable], "one": [sys.executable]}
    curves = {}
    for label, prefix in runs.items():
        path = tmp_path / f"{label}.json"
        proc = subprocess.run(prefix + common + ["--losses", str(path)], env=ENV,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "final loss:" in proc.stdout
        curves[label] = json.loads(path.read_text())
    assert curves["two"]["ranks"] == 2 and curves["one"]["ranks"] == 1
    one, two = np.array(curves["one"]["losses"]), np.array(curves["two"]["losses"])
    assert len(one) == len(two) == 8
    assert one[-1] < one[0]                               # it learns
    np.testing.assert_allclose(two, one, rtol=1e-5)
