"""Dot attention: against torch's attention maths, finite differences, masking, bad input;
and a smoke test of the seq2seq example."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import torch_or_skip
from fastrnn.attention import dot_attention, dot_attention_backward

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(rng, B=3, S=5, H=4, Hv=6, masked=True, dtype=np.float64):
    q = rng.standard_normal((B, H)).astype(dtype)
    k = rng.standard_normal((B, S, H)).astype(dtype)
    v = rng.standard_normal((B, S, Hv)).astype(dtype)
    mask = None
    if masked:
        lengths = rng.integers(1, S + 1, size=B)
        mask = np.arange(S)[None, :] < lengths[:, None]
    return q, k, v, mask


@pytest.mark.parametrize("masked", [False, True])
def test_matches_torch(masked):
    torch = torch_or_skip()
    rng = np.random.default_rng(int(masked))
    q, k, v, mask = make_inputs(rng, masked=masked)
    d_ctx = rng.standard_normal((3, 6))
    ctx, w, cache = dot_attention(q, k, v, mask)
    d_q, d_k, d_v = dot_attention_backward(d_ctx, cache)

    qt, kt, vt = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    scores = torch.bmm(kt, qt.unsqueeze(2)).squeeze(2)
    if mask is not None:
        scores = scores.masked_fill(~torch.from_numpy(mask), float("-inf"))
    wt = torch.softmax(scores, dim=1)
    ct = torch.bmm(wt.unsqueeze(1), vt).squeeze(1)
    (ct * torch.from_numpy(d_ctx)).sum().backward()
    tol = dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ctx, ct.detach().numpy(), **tol)
    np.testing.assert_allclose(w, wt.detach().numpy(), **tol)
    np.testing.assert_allclose(d_q, qt.grad.numpy(), **tol)
    np.testing.assert_allclose(d_k, kt.grad.numpy(), **tol)
    np.testing.assert_allclose(d_v, vt.grad.numpy(), **tol)


@pytest.mark.parametrize("masked", [False, True])
def test_finite_differences(masked):
    rng = np.random.default_rng(10 + masked)
    q, k, v, mask = make_inputs(rng, B=2, S=4, H=3, Hv=2, masked=masked)
    w_ctx = rng.standard_normal((2, 2))
    _, _, cache = dot_attention(q, k, v, mask)
    analytic = dict(zip("qkv", dot_attention_backward(w_ctx, cache)))
    eps = 1e-6
    for name, a in zip("qkv", (q, k, v)):
        numeric = np.empty_like(a)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + eps
            plus = (dot_attention(q, k, v, mask)[0] * w_ctx).sum()
            a[idx] = old - eps
            minus = (dot_attention(q, k, v, mask)[0] * w_ctx).sum()
            a[idx] = old
            numeric[idx] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(analytic[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)


def test_masked_positions_are_ignored_and_get_no_gradient():
    rng = np.random.default_rng(3)
    q, k, v, _ = make_inputs(rng, B=2, S=5, masked=False)
    mask = np.array([[True, True, False, False, False], [True] * 5])
    ctx, w, cache = dot_attention(q, k, v, mask)
    assert (w[0, 2:] == 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-14)
    k2, v2 = k.copy(), v.copy()
    k2[0, 2:] = 1e6     # garbage at padded positions changes nothing
    v2[0, 2:] = -1e6   # (NaN would propagate, as 0 * NaN does in torch too)
    ctx2, w2, _ = dot_attention(q, k2, v2, mask)
    np.testing.assert_array_equal(ctx2[0], ctx[0])
    np.testing.assert_array_equal(w2, w)
    _, d_k, d_v = dot_attention_backward(np.ones((2, 6)), cache)
    assert (d_k[0, 2:] == 0).all() and (d_v[0, 2:] == 0).all()


def test_large_scores_do_not_overflow():
    rng = np.random.default_rng(4)
    q, k, v, mask = make_inputs(rng, dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        ctx, w, cache = dot_attention(q * 1e3, k * 1e3, v, mask)
        dot_attention_backward(np.ones_like(ctx), cache)
    assert np.isfinite(w).all() and np.isfinite(ctx).all()
    assert ctx.dtype == np.float32


def test_bad_inputs():
    rng = np.random.default_rng(5)
    q, k, v, mask = make_inputs(rng)
    with pytest.raises(TypeError, match="float32.*float64"):
        dot_attention(q, k.astype(np.float32), v)
    with pytest.raises(ValueError, match="keys must have shape"):
        dot_attention(q, k[:, :, :2], v)
    with pytest.raises(ValueError, match="values must have shape"):
        dot_attention(q, k, v[:, :4])
    with pytest.raises(ValueError, match="query must have shape"):
        dot_attention(q[0], k, v)
    with pytest.raises(TypeError, match="mask must be a bool"):
        dot_attention(q, k, v, mask.astype(np.int64))
    with pytest.raises(ValueError, match="mask must have shape"):
        dot_attention(q, k, v, mask[:, :2])
    mask[1] = False
    with pytest.raises(ValueError, match="no valid source position"):
        dot_attention(q, k, v, mask)
    _, _, cache = dot_attention(q, k, v)
    with pytest.raises(ValueError, match="d_context must have the shape"):
        dot_attention_backward(np.ones((3, 5)), cache)
    with pytest.raises(TypeError, match="d_context has dtype float32"):
        dot_attention_backward(np.ones((3, 6), np.float32), cache)


def test_seq2seq_example_quick(backend):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "seq2seq_attention.py"),
                           "--quick", "--backend", backend], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert f"backend: {backend}" in proc.stdout
    assert last.startswith("final accuracy: ")
    assert 0.0 <= float(last.split(": ")[1]) <= 1.0
