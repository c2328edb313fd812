"""The host loops: for each cell, the buffers, the time loop (stepwise or persistent), the cache.

Shapes, notation and the masking rule are those of :mod:`fastrnn.backends`; every
loop mirrors the NumPy reference (:mod:`fastrnn.backends.reference`). Each function
takes the runtime ``rt`` (:mod:`.runtime`) and the chosen ``algorithm``.

* Stepwise: per step the recurrent GEMM (``rt.matmul``, cuBLAS on the current stream)
  and the fused pointwise kernel. The kernel is found, and its arguments checked,
  once per sequence (:class:`~.runtime.StepKernel`); a step only indexes its buffers
  and launches.
* Persistent: one launch per direction for the whole sequence (:mod:`.planner` says
  whether it fits; ``algorithm="auto"`` falls back to the stepwise loop where not).
  The LSTM's projection ``w_hr`` (torch's proj_size) runs stepwise only.

Both write the same cache, so a forward of one may be followed by a backward of the other.
"""

from __future__ import annotations

import numpy as np

from fastrnn.backends import gate_count

from . import checks
from .loader import kernel_name, unit_of
from .planner import persistent_plan


def _plan(rt, algorithm, cell, T, B, H, dtype, backward, reset_after=True, projected=False):
    """The persistent plan to use, or None for the stepwise loop.

    The LSTM's projection (``projected``) has no persistent kernels: ``"auto"`` runs it
    stepwise, ``"persistent"`` refuses it.
    """
    if algorithm == "stepwise":
        return None
    if projected:
        if algorithm == "persistent":
            raise NotImplementedError(
                "w_hr (proj_size): the persistent algorithm has no LSTM projection: "
                "h_t = m_t W_hr^T needs m_t of every hidden unit, computed by every block, "
                "before any block can form h_t (a second grid barrier per step); use "
                "set_algorithm('auto') or 'stepwise', which run it stepwise")
        return None
    if T == 0:
        return None
    plan, why = persistent_plan(cell, B, H, dtype, backward, reset_after,
                                limits=rt.persistent_limits())
    if plan is None and algorithm == "persistent":
        raise ValueError(f"the persistent algorithm cannot run {cell} with B={B}, H={H}, "
                         f"{np.dtype(dtype).name}: {why}; use set_algorithm('auto') or "
                         f"'stepwise'")
    return plan


def _stepwise(rt, cell, stage, sfx, B, H):
    """The stepwise kernel ``stage`` of ``cell`` over the (B, H) elements, for one sequence."""
    return rt.kernel(unit_of(cell), kernel_name(cell, stage, sfx), B * H)


def _persistent(rt, cell, stage, sfx, plan, T, B, H, r, *args):
    """The whole sequence in one launch of ``cell``'s persistent kernel ``stage``; the grid
    barrier's arrival counter, zeroed, is appended to ``args``."""
    rt.launch_persistent(unit_of(cell), kernel_name(cell, f"persist_{stage}", sfx), plan,
                         T, B, H, r, *args, rt.xp.zeros((1,), dtype=np.uint32))


# ------------------------------------------------------------------ shared maths

def _steps(T: int, reverse: bool) -> range:
    return range(T - 1, -1, -1) if reverse else range(T)


def _mode(training: bool) -> str:
    return "train" if training else "infer"


def _state_slots(rt, s0, T, r, training):
    """State buffers holding s0 where the first step reads it.

    Training keeps every state, ``[T + 1, B, H]`` (step t reads slot t + r and
    writes t + 1 - r); the persistent inference loop alternates two, ``[2, B, H]``.
    """
    slots = rt.xp.empty((T + 1 if training else 2,) + s0.shape, dtype=s0.dtype)
    slots[r * T if training else 0] = s0
    return slots


def _last_slot(T, r, training):
    """The slot of :func:`_state_slots` that holds the state after the last step."""
    return (1 - r) * T if training else T % 2


def _project(rt, x, w_ih, bias):
    """x W_ih^T + bias for every step at once: (T, B, G)."""
    T, B, I = x.shape
    xw = rt.matmul(x.reshape(T * B, I), w_ih.T).reshape(T, B, -1)
    if bias is not None:
        xw += bias
    return xw


def _param_grads(rt, d_a_x, d_a_h, x, h_prev, w_ih, has_bias):
    """Whole-sequence GEMMs: d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh (as the reference)."""
    T, B, I = x.shape
    G = d_a_x.shape[2]
    d_a_x2 = d_a_x.reshape(T * B, G)
    d_a_h2 = d_a_h.reshape(T * B, G)
    d_x = rt.matmul(d_a_x2, w_ih).reshape(T, B, I)
    d_w_ih = rt.matmul(d_a_x2.T, x.reshape(T * B, I))
    d_w_hh = rt.matmul(d_a_h2.T, h_prev.reshape(T * B, -1))
    if not has_bias:
        return d_x, d_w_ih, d_w_hh, None, None
    return d_x, d_w_ih, d_w_hh, d_a_x2.sum(axis=0), d_a_h2.sum(axis=0)


# ------------------------------------------------------------------ vanilla RNN

def rnn_forward(rt, algorithm, cell, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                training):
    """``rnn_tanh`` or ``rnn_relu`` (``cell``): the kernels differ, the loop does not."""
    x, (h0,), w_ih, w_hh, b_ih, b_hh, _, (T, B, I, H, _) = checks.forward(
        rt.xp, cell, x, (h0,), w_ih, w_hh, b_ih, b_hh)
    xp, r, sfx = rt.xp, int(reverse), checks.suffix(x.dtype)
    lens = checks.lengths(xp, lengths, T, B)
    xw = _project(rt, x, w_ih, None if b_ih is None else b_ih + b_hh)
    out = xp.empty((T, B, H), dtype=x.dtype)
    plan = _plan(rt, algorithm, cell, T, B, H, x.dtype, backward=False)
    if plan is not None:
        hs = _state_slots(rt, h0, T, r, training)
        _persistent(rt, cell, f"fwd_{_mode(training)}", sfx, plan, T, B, H, r,
                    lens, xw, w_hh, hs, out)
        h_n = hs[_last_slot(T, r, training)].copy()
    else:
        w_hh_t = w_hh.T
        hw = xp.empty((B, H), dtype=x.dtype)
        step = _stepwise(rt, cell, f"fwd_{_mode(training)}", sfx, B, H)
        if training:
            hs = _state_slots(rt, h0, T, r, training)
            for t in _steps(T, reverse):
                rt.matmul(hs[t + r], w_hh_t, hw)
                step(B, H, t, lens, xw[t], hw, hs[t + r], hs[t + 1 - r], out[t])
            h_n = hs[_last_slot(T, r, training)].copy()
        else:
            h_n = h0.copy()
            for t in _steps(T, reverse):
                rt.matmul(h_n, w_hh_t, hw)
                step(B, H, t, lens, xw[t], hw, h_n, h_n, out[t])
    if not training:
        return out, h_n, None
    cache = dict(cell=cell, x=x, hs=hs, w_ih=w_ih, w_hh=w_hh, has_bias=b_ih is not None,
                 lengths=lens, reverse=bool(reverse))
    return out, h_n, cache


def rnn_backward(rt, algorithm, d_out, d_h_n, cache):
    d_out, (d_h_n,) = checks.backward(rt.xp, cache, d_out, (d_h_n,))
    x, hs, w_hh, lens, reverse = (cache[k] for k in ("x", "hs", "w_hh", "lengths", "reverse"))
    cell = cache["cell"]
    xp, r, sfx = rt.xp, int(reverse), checks.suffix(x.dtype)
    T, B, _ = x.shape
    H = hs.shape[2]
    d_a = xp.empty((T, B, H), dtype=x.dtype)
    d_h_carry = d_h_n.copy()
    plan = _plan(rt, algorithm, cell, T, B, H, x.dtype, backward=True)
    if plan is not None:
        d_h_gemm = xp.empty((B, H), dtype=x.dtype)
        _persistent(rt, cell, "bwd", sfx, plan, T, B, H, r,
                    lens, w_hh, d_out, d_h_carry, hs, d_a, d_h_gemm)
    else:
        d_h_gemm = xp.zeros((B, H), dtype=x.dtype)
        step = _stepwise(rt, cell, "bwd", sfx, B, H)
        for t in _steps(T, not reverse):
            step(B, H, t, lens, d_out[t], d_h_gemm, d_h_carry, hs[t + 1 - r], d_a[t])
            rt.matmul(d_a[t], w_hh, d_h_gemm)
    d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh = _param_grads(
        rt, d_a, d_a, x, hs[r:T + r], cache["w_ih"], cache["has_bias"])
    return d_x, d_h_carry + d_h_gemm, d_w_ih, d_w_hh, d_b_ih, d_b_hh


# ------------------------------------------------------------------ LSTM

def lstm_forward(rt, algorithm, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                 training, w_hr=None):
    x, (h0, c0), w_ih, w_hh, b_ih, b_hh, w_hr, (T, B, I, H, _) = checks.forward(
        rt.xp, "lstm", x, (h0, c0), w_ih, w_hh, b_ih, b_hh, w_hr)
    xp, r, sfx = rt.xp, int(reverse), checks.suffix(x.dtype)
    G = gate_count("lstm") * H
    lens = checks.lengths(xp, lengths, T, B)
    plan = _plan(rt, algorithm, "lstm", T, B, H, x.dtype, backward=False,
                 projected=w_hr is not None)
    if w_hr is not None:
        return _lstmp_forward(rt, x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, lens, reverse,
                              training)
    xw = _project(rt, x, w_ih, None if b_ih is None else b_ih + b_hh)
    out = xp.empty((T, B, H), dtype=x.dtype)
    if training:
        hs, cs = _state_slots(rt, h0, T, r, True), _state_slots(rt, c0, T, r, True)
        gates = xp.empty((T, B, G), dtype=x.dtype)
        tanh_cs = xp.empty((T, B, H), dtype=x.dtype)
    if plan is not None and training:
        _persistent(rt, "lstm", "fwd_train", sfx, plan, T, B, H, r,
                    lens, xw, w_hh, hs, cs, out, gates, tanh_cs)
    elif plan is not None:
        hs, c_n = _state_slots(rt, h0, T, r, False), c0.copy()   # c is updated in place
        _persistent(rt, "lstm", "fwd_infer", sfx, plan, T, B, H, r,
                    lens, xw, w_hh, hs, c_n, out)
        return out, hs[_last_slot(T, r, False)].copy(), c_n, None
    else:
        w_hh_t = w_hh.T
        hw = xp.empty((B, G), dtype=x.dtype)
        step = _stepwise(rt, "lstm", f"fwd_{_mode(training)}", sfx, B, H)
        if not training:
            h_n, c_n = h0.copy(), c0.copy()
            for t in _steps(T, reverse):
                rt.matmul(h_n, w_hh_t, hw)
                step(B, H, t, lens, xw[t], hw, h_n, c_n, h_n, c_n, out[t])
            return out, h_n, c_n, None
        for t in _steps(T, reverse):
            rt.matmul(hs[t + r], w_hh_t, hw)
            step(B, H, t, lens, xw[t], hw, hs[t + r], cs[t + r], hs[t + 1 - r], cs[t + 1 - r],
                 out[t], gates[t], tanh_cs[t])
    cache = dict(x=x, hs=hs, cs=cs, gates=gates, tanh_cs=tanh_cs, w_ih=w_ih, w_hh=w_hh,
                 has_bias=b_ih is not None, lengths=lens, reverse=bool(reverse))
    last = _last_slot(T, r, True)
    return out, hs[last].copy(), cs[last].copy(), cache


def lstm_backward(rt, algorithm, d_out, d_h_n, d_c_n, cache):
    d_out, (d_h_n, d_c_n) = checks.backward(rt.xp, cache, d_out, (d_h_n, d_c_n))
    x, hs, cs, w_hh, lens, reverse = (cache[k] for k in ("x", "hs", "cs", "w_hh", "lengths",
                                                          "reverse"))
    gates, tanh_cs = cache["gates"], cache["tanh_cs"]
    xp, r, sfx = rt.xp, int(reverse), checks.suffix(x.dtype)
    T, B, _ = x.shape
    H = cs.shape[2]
    projected = cache.get("w_hr") is not None
    plan = _plan(rt, algorithm, "lstm", T, B, H, x.dtype, backward=True, projected=projected)
    if projected:
        return _lstmp_backward(rt, d_out, d_h_n, d_c_n, cache)
    d_a = xp.empty((T, B, gate_count("lstm") * H), dtype=x.dtype)
    d_h_carry, d_c = d_h_n.copy(), d_c_n.copy()
    if plan is not None:
        d_h_gemm = xp.empty((B, H), dtype=x.dtype)
        _persistent(rt, "lstm", "bwd", sfx, plan, T, B, H, r,
                    lens, w_hh, d_out, d_h_carry, d_c, gates, tanh_cs, cs, d_a, d_h_gemm)
    else:
        d_h_gemm = xp.zeros((B, H), dtype=x.dtype)
        step = _stepwise(rt, "lstm", "bwd", sfx, B, H)
        for t in _steps(T, not reverse):
            step(B, H, t, lens, d_out[t], d_h_gemm, d_h_carry, d_c, gates[t], tanh_cs[t],
                 cs[t + r], d_a[t])
            rt.matmul(d_a[t], w_hh, d_h_gemm)
    d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh = _param_grads(
        rt, d_a, d_a, x, hs[r:T + r], cache["w_ih"], cache["has_bias"])
    return d_x, d_h_carry + d_h_gemm, d_c, d_w_ih, d_w_hh, d_b_ih, d_b_hh


def _lstmp_forward(rt, x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, lens, reverse, training):
    """The LSTM with the projection ``w_hr`` (P, H), torch's proj_size, stepwise.

    Per step: the recurrent GEMM, the LSTM kernel with m_t = o tanh(c_t) as its output
    (0 where inactive), the GEMM hp = m_t W_hr^T, and ``lstm_proj_fwd``, which masks
    h_t and out_t. h has P columns and c has H. The LSTM kernel's own h state is a
    scratch nothing reads back: at an inactive step ``lstm_proj_fwd`` keeps h_{t-1}.
    """
    xp, r, sfx = rt.xp, int(reverse), checks.suffix(x.dtype)
    T, B, _ = x.shape
    P, H = w_hr.shape
    xw = _project(rt, x, w_ih, None if b_ih is None else b_ih + b_hh)
    out = xp.empty((T, B, P), dtype=x.dtype)
    w_hh_t, w_hr_t = w_hh.T, w_hr.T
    hw = xp.empty((B, gate_count("lstm") * H), dtype=x.dtype)
    hp = xp.empty((B, P), dtype=x.dtype)
    m_state = xp.zeros((B, H), dtype=x.dtype)
    step = _stepwise(rt, "lstm", f"fwd_{_mode(training)}", sfx, B, H)
    proj = _stepwise(rt, "lstm", "proj_fwd", sfx, B, P)
    if not training:
        h_n, c_n, m = h0.copy(), c0.copy(), xp.empty((B, H), dtype=x.dtype)
        for t in _steps(T, reverse):
            rt.matmul(h_n, w_hh_t, hw)
            step(B, H, t, lens, xw[t], hw, m_state, c_n, m_state, c_n, m)
            rt.matmul(m, w_hr_t, hp)
            proj(B, P, t, lens, hp, h_n, h_n, out[t])
        return out, h_n, c_n, None
    hs, cs = _state_slots(rt, h0, T, r, True), _state_slots(rt, c0, T, r, True)
    gates = xp.empty((T, B, gate_count("lstm") * H), dtype=x.dtype)
    tanh_cs = xp.empty((T, B, H), dtype=x.dtype)
    ms = xp.empty((T, B, H), dtype=x.dtype)
    for t in _steps(T, reverse):
        rt.matmul(hs[t + r], w_hh_t, hw)
        step(B, H, t, lens, xw[t], hw, m_state, cs[t + r], m_state, cs[t + 1 - r], ms[t],
             gates[t], tanh_cs[t])
        rt.matmul(ms[t], w_hr_t, hp)
        proj(B, P, t, lens, hp, hs[t + r], hs[t + 1 - r], out[t])
    cache = dict(x=x, hs=hs, cs=cs, gates=gates, tanh_cs=tanh_cs, ms=ms, w_ih=w_ih, w_hh=w_hh,
                 w_hr=w_hr, has_bias=b_ih is not None, lengths=lens, reverse=bool(reverse))
    last = _last_slot(T, r, True)
    return out, hs[last].copy(), cs[last].copy(), cache


def _lstmp_backward(rt, d_out, d_h_n, d_c_n, cache):
    """Backward of :func:`_lstmp_forward`; ``d_w_hr`` is returned last.

    Per step (in the other time order): ``lstm_proj_bwd`` writes d_hp = dL/dh_t (0 where
    inactive, kept for d_w_hr = sum_t d_hp_t^T m_t), the GEMM d_m = d_hp W_hr, the LSTM
    kernel with d_m as its d_out, and the recurrent GEMM d_h_gemm = d_a W_hh. The state
    gradient of h is d_h_carry + d_h_gemm (P columns), as without the projection; the
    LSTM kernel's own h-gradient (d_h_gemm and d_h_carry) is one zero buffer, which it
    leaves zero (0 where active, 0 + 0 passed through elsewhere).
    """
    x, hs, cs, gates, tanh_cs, ms = (cache[k] for k in ("x", "hs", "cs", "gates", "tanh_cs",
                                                         "ms"))
    w_hh, w_hr, lens, reverse = (cache[k] for k in ("w_hh", "w_hr", "lengths", "reverse"))
    xp, r, sfx = rt.xp, int(reverse), checks.suffix(x.dtype)
    T, B, _ = x.shape
    P, H = w_hr.shape
    d_a = xp.empty((T, B, gate_count("lstm") * H), dtype=x.dtype)
    d_hp = xp.empty((T, B, P), dtype=x.dtype)
    d_m = xp.empty((B, H), dtype=x.dtype)
    zero_h = xp.zeros((B, H), dtype=x.dtype)
    d_h_carry, d_c = d_h_n.copy(), d_c_n.copy()
    d_h_gemm = xp.zeros((B, P), dtype=x.dtype)
    proj = _stepwise(rt, "lstm", "proj_bwd", sfx, B, P)
    step = _stepwise(rt, "lstm", "bwd", sfx, B, H)
    for t in _steps(T, not reverse):
        proj(B, P, t, lens, d_out[t], d_h_gemm, d_h_carry, d_hp[t])
        rt.matmul(d_hp[t], w_hr, d_m)
        step(B, H, t, lens, d_m, zero_h, zero_h, d_c, gates[t], tanh_cs[t], cs[t + r], d_a[t])
        rt.matmul(d_a[t], w_hh, d_h_gemm)
    d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh = _param_grads(
        rt, d_a, d_a, x, hs[r:T + r], cache["w_ih"], cache["has_bias"])
    d_w_hr = rt.matmul(d_hp.reshape(T * B, P).T, ms.reshape(T * B, H))
    return d_x, d_h_carry + d_h_gemm, d_c, d_w_ih, d_w_hh, d_b_ih, d_b_hh, d_w_hr


# ------------------------------------------------------------------ GRU

def gru_forward(rt, algorithm, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training,
                reset_after):
    x, (h0,), w_ih, w_hh, b_ih, b_hh, _, (T, B, I, H, _) = checks.forward(
        rt.xp, "gru", x, (h0,), w_ih, w_hh, b_ih, b_hh)
    xp, r, sfx = rt.xp, int(reverse), checks.suffix(x.dtype)
    G = gate_count("gru") * H
    lens = checks.lengths(xp, lengths, T, B)
    out = xp.empty((T, B, H), dtype=x.dtype)
    hs = _state_slots(rt, h0, T, r, True) if training else None
    h = None if training else h0.copy()

    def states(t):  # (before, after) the step; one buffer updated in place in inference
        return (hs[t + r], hs[t + 1 - r]) if training else (h, h)

    gates = xp.empty((T, B, G), dtype=x.dtype) if training else None
    plan = _plan(rt, algorithm, "gru", T, B, H, x.dtype, backward=False,
                 reset_after=reset_after)
    if reset_after:
        if b_ih is None:
            xw, b_hn = _project(rt, x, w_ih, None), xp.zeros((H,), dtype=x.dtype)
        else:
            bias = b_ih.copy()
            bias[:2 * H] += b_hh[:2 * H]   # b_hn stays inside r * (.)
            xw, b_hn = _project(rt, x, w_ih, bias), xp.ascontiguousarray(b_hh[2 * H:])
        hns = xp.empty((T, B, H), dtype=x.dtype) if training else None
        if plan is not None and training:
            _persistent(rt, "gru", "fwd_train", sfx, plan, T, B, H, r,
                        lens, xw, w_hh, b_hn, hs, out, gates, hns)
        elif plan is not None:
            slots = _state_slots(rt, h0, T, r, False)
            _persistent(rt, "gru", "fwd_infer", sfx, plan, T, B, H, r,
                        lens, xw, w_hh, b_hn, slots, out)
            h = slots[_last_slot(T, r, False)].copy()
        else:
            w_hh_t = w_hh.T
            hw = xp.empty((B, G), dtype=x.dtype)
            step = _stepwise(rt, "gru", f"fwd_{_mode(training)}", sfx, B, H)
            for t in _steps(T, reverse):
                h_prev, h_next = states(t)
                rt.matmul(h_prev, w_hh_t, hw)
                saved = (gates[t], hns[t]) if training else ()   # the cache
                step(B, H, t, lens, xw[t], hw, b_hn, h_prev, h_next, out[t], *saved)
        extra = dict(hns=hns)
    else:
        xw = _project(rt, x, w_ih, None if b_ih is None else b_ih + b_hh)
        w_hrz_t, w_hn_t = w_hh[:2 * H].T, w_hh[2 * H:].T
        hw_rz = xp.empty((B, 2 * H), dtype=x.dtype)
        hw_n = xp.empty((B, H), dtype=x.dtype)
        rhs = xp.empty((T, B, H), dtype=x.dtype) if training else None
        step_gates = None if training else xp.empty((B, G), dtype=x.dtype)
        rh = None if training else xp.empty((B, H), dtype=x.dtype)
        rz_step = _stepwise(rt, "gru", "rb_rz_fwd", sfx, B, H)
        n_step = _stepwise(rt, "gru", "rb_n_fwd", sfx, B, H)
        for t in _steps(T, reverse):
            h_prev, h_next = states(t)
            g_t = gates[t] if training else step_gates
            rh_t = rhs[t] if training else rh
            rt.matmul(h_prev, w_hrz_t, hw_rz)
            rz_step(B, H, xw[t], hw_rz, h_prev, g_t, rh_t)
            rt.matmul(rh_t, w_hn_t, hw_n)
            n_step(B, H, t, lens, xw[t], hw_n, h_prev, g_t, h_next, out[t])
        extra = dict(rhs=rhs)
    if not training:
        return out, h, None
    cache = dict(x=x, hs=hs, gates=gates, w_ih=w_ih, w_hh=w_hh, has_bias=b_ih is not None,
                 lengths=lens, reverse=bool(reverse), reset_after=bool(reset_after), **extra)
    return out, hs[_last_slot(T, r, True)].copy(), cache


def gru_backward(rt, algorithm, d_out, d_h_n, cache):
    d_out, (d_h_n,) = checks.backward(rt.xp, cache, d_out, (d_h_n,))
    x, hs, gates, w_ih, w_hh = (cache[k] for k in ("x", "hs", "gates", "w_ih", "w_hh"))
    lens, reverse, has_bias = cache["lengths"], cache["reverse"], cache["has_bias"]
    xp, r, sfx = rt.xp, int(reverse), checks.suffix(x.dtype)
    T, B, I = x.shape
    H = hs.shape[2]
    G = gate_count("gru") * H
    d_h_carry = d_h_n.copy()
    d_h_gemm = xp.zeros((B, H), dtype=x.dtype)
    if cache["reset_after"]:
        hns = cache["hns"]
        d_a_x = xp.empty((T, B, G), dtype=x.dtype)  # feeds W_ih, b_ih
        d_a_h = xp.empty((T, B, G), dtype=x.dtype)  # feeds W_hh, b_hh
        plan = _plan(rt, algorithm, "gru", T, B, H, x.dtype, backward=True)
        if plan is not None:
            _persistent(rt, "gru", "bwd", sfx, plan, T, B, H, r,
                        lens, w_hh, d_out, d_h_carry, gates, hns, hs, d_a_x, d_a_h, d_h_gemm)
        else:
            step = _stepwise(rt, "gru", "bwd", sfx, B, H)
            for t in _steps(T, not reverse):
                step(B, H, t, lens, d_out[t], d_h_gemm, d_h_carry, gates[t], hns[t], hs[t + r],
                     d_a_x[t], d_a_h[t])
                rt.matmul(d_a_h[t], w_hh, d_h_gemm)
        d_x, d_w_ih, d_w_hh, d_b_ih, d_b_hh = _param_grads(
            rt, d_a_x, d_a_h, x, hs[r:T + r], w_ih, has_bias)
        return d_x, d_h_carry + d_h_gemm, d_w_ih, d_w_hh, d_b_ih, d_b_hh
    # reset_before: the r and z blocks and the n block live in separate buffers, so that
    # each per-step GEMM reads one contiguous block.
    rhs = cache["rhs"]
    w_hrz, w_hn = w_hh[:2 * H], w_hh[2 * H:]
    d_a_rz = xp.empty((T, B, 2 * H), dtype=x.dtype)
    d_a_n = xp.empty((T, B, H), dtype=x.dtype)
    d_rh = xp.empty((B, H), dtype=x.dtype)
    n_step = _stepwise(rt, "gru", "rb_n_bwd", sfx, B, H)
    r_step = _stepwise(rt, "gru", "rb_r_bwd", sfx, B, H)
    for t in _steps(T, not reverse):
        n_step(B, H, t, lens, d_out[t], d_h_gemm, d_h_carry, gates[t], hs[t + r], d_a_rz[t],
               d_a_n[t])
        rt.matmul(d_a_n[t], w_hn, d_rh)
        r_step(B, H, t, lens, d_rh, gates[t], hs[t + r], d_h_carry, d_a_rz[t])
        rt.matmul(d_a_rz[t], w_hrz, d_h_gemm)
    d_a_rz2, d_a_n2 = d_a_rz.reshape(T * B, 2 * H), d_a_n.reshape(T * B, H)
    x2 = x.reshape(T * B, I)
    d_x = (rt.matmul(d_a_rz2, w_ih[:2 * H]) + rt.matmul(d_a_n2, w_ih[2 * H:])).reshape(T, B, I)
    d_w_ih = xp.concatenate([rt.matmul(d_a_rz2.T, x2), rt.matmul(d_a_n2.T, x2)])
    # W_hn's GEMM input is r * h_{t-1} (cached as rhs).
    d_w_hh = xp.concatenate([rt.matmul(d_a_rz2.T, hs[r:T + r].reshape(T * B, H)),
                             rt.matmul(d_a_n2.T, rhs.reshape(T * B, H))])
    d_b_ih = d_b_hh = None
    if has_bias:  # both biases enter the same pre-activations
        d_b_ih = xp.concatenate([d_a_rz2.sum(axis=0), d_a_n2.sum(axis=0)])
        d_b_hh = d_b_ih.copy()
    return d_x, d_h_carry + d_h_gemm, d_w_ih, d_w_hh, d_b_ih, d_b_hh
