"""The gated delta rule over at most 64 tokens as one Triton kernel per direction
(``model.gdn_backend=short``).

The paper's task models run the rule over short windows (Rule 110: 24 tokens, every wake and
sleep pass), where FLA's chunked kernels spend a dozen launches per call on one chunk:
separate kernels for the cumulative decay, the triangular solve, the WY factors, the state
pass, the output, and as many again backward, each reading or writing the [K, V] fp32 state
per sequence and head. Here one program per (sequence, value head) holds the whole call:

forward, with gc = cumsum(g), G_ij = exp(gc_i - gc_j) (i >= j), beta, k, q, v rows,
    A = strictly_lower(beta_i (k_i . k_j) G_ij),  T = (I + A)^-1 (a product of
    (I + (-A)^(2^n)) factors: A is nilpotent),
    U = T (beta v),  W = T (beta exp(gc) k),  V' = U - W S0,
    o = scale (exp(gc) q S0 + (q k^T * G) V'),  S = exp(gc_T) S0 + (exp(gc_T - gc) k)^T V'
(the WY form of the rule ``gated_delta.recurrent_gated_delta_rule`` computes token by
token); backward recomputes those and takes every product's gradient in the same program.
Value head j reads query/key head j // (HV / H); q and k gradients are written per value
head and summed over each group by ``torch.sum`` (no atomics). Matrix products accumulate
in fp32 from IEEE fp32 inputs for fp32 tensors, TF32 ones for bf16/fp16 tensors
(``_precision``). The Triton interpreter runs these kernels on CPU tensors:
tests/test_gdn_short.py compares them there with the fp64 recurrent reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sleeptrain.model.kernels.triton_check import require_triton_tensor

MAX_T = 64  # one program holds the whole call
# launch width: a program holds the [K, V] state, its gradient and ~20 [BT, K] tiles. At 8
# warps the backward spills least for sm_90 (tools/compile_kernels.py --warps 4,8,16), but 4
# ran faster on an H100 (2026-12-07, tools/bench_gdn_kernels.py at the Rule 110 paper model's
# window shape: forward + backward 460.7 us at 4 warps, 499.1 us at 8; docs/benchmarks.md)
WARPS = 4


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _recompute(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, s0_ptr, T, H, HV, R,
               K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, NSQ: tl.constexpr,
               HAS_S0: tl.constexpr, PREC: tl.constexpr):
    """The forward's quantities for this program's (sequence, value head) ``pid``."""
    pid = tl.program_id(0).to(tl.int64)
    bidx, hv = pid // HV, pid % HV
    h = hv // R
    rows = tl.arange(0, BT)
    rm = rows < T
    ck = tl.arange(0, K)
    cv = tl.arange(0, V)
    tq = (bidx * T + rows) * H + h  # [BT] rows of q, k
    tv = (bidx * T + rows) * HV + hv  # rows of v, g, beta
    q = tl.load(q_ptr + tq[:, None] * K + ck[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
    k = tl.load(k_ptr + tq[:, None] * K + ck[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
    v = tl.load(v_ptr + tv[:, None] * V + cv[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
    g = tl.load(g_ptr + tv, mask=rm, other=0.0).to(tl.float32)
    beta = tl.load(b_ptr + tv, mask=rm, other=0.0).to(tl.float32)
    if HAS_S0:
        s0 = tl.load(s0_ptr + (bidx * HV + hv) * K * V + ck[:, None] * V + cv[None, :])
    else:
        s0 = tl.zeros([K, V], dtype=tl.float32)
    gc = tl.cumsum(g, 0)
    gl = tl.sum(tl.where(rows == T - 1, gc, 0.0), 0)  # gc at the last token
    incl = rows[:, None] >= rows[None, :]
    strict = rows[:, None] > rows[None, :]
    gam = tl.exp(tl.where(incl, gc[:, None] - gc[None, :], -float("inf")))
    kk = _dot(k, tl.trans(k), PREC)
    a = tl.where(strict, beta[:, None] * kk * gam, 0.0)
    eye = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    n = -a
    tinv = eye + n
    for _ in tl.static_range(NSQ):  # (I + N)(I + N^2)(I + N^4)... = (I + A)^-1
        n = _dot(n, n, PREC)
        tinv = _dot(tinv, eye + n, PREC)
    eg = tl.exp(gc)
    u = _dot(tinv, v * beta[:, None], PREC)
    w = _dot(tinv, k * (beta * eg)[:, None], PREC)
    vn = u - _dot(w, s0, PREC)
    qk = _dot(q, tl.trans(k), PREC)
    return (pid, q, k, v, beta, s0, gc, gl, gam, kk, a, tinv, eg, u, w, vn, qk, rows, rm, tv,
            ck, cv)


@triton.jit
def _fwd(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, s0_ptr, o_ptr, st_ptr, scale, T, H, HV, R,
         K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, NSQ: tl.constexpr,
         HAS_S0: tl.constexpr, PREC: tl.constexpr):
    (pid, q, k, v, beta, s0, gc, gl, gam, kk, a, tinv, eg, u, w, vn, qk, rows, rm, tv, ck,
     cv) = _recompute(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, s0_ptr, T, H, HV, R, K, V, BT, NSQ,
                      HAS_S0, PREC)
    o = scale * (_dot(q * eg[:, None], s0, PREC) + _dot(qk * gam, vn, PREC))
    tl.store(o_ptr + tv[:, None] * V + cv[None, :], o.to(o_ptr.dtype.element_ty),
             mask=rm[:, None])
    kd = k * tl.exp(gl - gc)[:, None]
    st = tl.exp(gl) * s0 + _dot(tl.trans(kd), vn, PREC)
    tl.store(st_ptr + pid * K * V + ck[:, None] * V + cv[None, :], st)


@triton.jit
def _bwd(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, s0_ptr, do_ptr, dst_ptr, dq_ptr, dk_ptr, dv_ptr,
         dg_ptr, db_ptr, ds0_ptr, scale, T, H, HV, R, K: tl.constexpr, V: tl.constexpr,
         BT: tl.constexpr, NSQ: tl.constexpr, HAS_S0: tl.constexpr, HAS_DST: tl.constexpr,
         PREC: tl.constexpr):
    (pid, q, k, v, beta, s0, gc, gl, gam, kk, a, tinv, eg, u, w, vn, qk, rows, rm, tv, ck,
     cv) = _recompute(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, s0_ptr, T, H, HV, R, K, V, BT, NSQ,
                      HAS_S0, PREC)
    do = tl.load(do_ptr + tv[:, None] * V + cv[None, :], mask=rm[:, None],
                 other=0.0).to(tl.float32)
    if HAS_DST:
        dst = tl.load(dst_ptr + pid * K * V + ck[:, None] * V + cv[None, :])
    else:
        dst = tl.zeros([K, V], dtype=tl.float32)
    incl = rows[:, None] >= rows[None, :]
    strict = rows[:, None] > rows[None, :]
    eout = tl.exp(gl - gc)  # the state's decay from each token to the last
    kd = k * eout[:, None]
    m = qk * gam
    # o = scale (eg q S0 + M V'),  S = exp(gl) S0 + kd^T V'
    dvn = scale * _dot(tl.trans(m), do, PREC) + _dot(kd, dst, PREC)
    dm = tl.where(incl, scale * _dot(do, tl.trans(vn), PREC), 0.0)
    dqk = dm * gam
    dq_s0 = scale * _dot(do, tl.trans(s0), PREC) * eg[:, None]  # through eg q S0
    dq = dq_s0 + _dot(dqk, k, PREC)
    dkd = _dot(vn, tl.trans(dst), PREC)
    dk = _dot(tl.trans(dqk), q, PREC) + dkd * eout[:, None]
    ds0 = scale * _dot(tl.trans(q * eg[:, None]), do, PREC) + tl.exp(gl) * dst
    # V' = U - W S0,  U = T (beta v),  W = T (beta eg k),  T = (I + A)^-1
    ds0 -= _dot(tl.trans(w), dvn, PREC)
    dw = -_dot(dvn, tl.trans(s0), PREC)
    drv = _dot(tl.trans(tinv), dvn, PREC)
    drk = _dot(tl.trans(tinv), dw, PREC)
    da = tl.where(strict, -(_dot(drv, tl.trans(u), PREC) + _dot(drk, tl.trans(w), PREC)),
                  0.0)
    dv = drv * beta[:, None]
    dbeta = tl.sum(drv * v, 1) + tl.sum(drk * k, 1) * eg + tl.sum(da * kk * gam, 1)
    dkk = da * beta[:, None] * gam  # A = strictly_lower(beta_i kk_ij G_ij)
    dk += _dot(dkk, k, PREC) + _dot(tl.trans(dkk), k, PREC) + drk * (beta * eg)[:, None]
    # the cumulative decay's gradient, then g's (a reverse cumulative sum)
    e_m = dqk * qk
    e_a = da * a
    dgc = tl.sum(dq_s0 * q, 1) + tl.sum(e_m, 1) - tl.sum(e_m, 0) + tl.sum(e_a, 1) \
        - tl.sum(e_a, 0) + tl.sum(drk * k, 1) * beta * eg - tl.sum(dkd * kd, 1)
    last = tl.sum(dkd * kd) + tl.exp(gl) * tl.sum(dst * s0)
    dgc += tl.where(rows == T - 1, last, 0.0)
    dg = tl.cumsum(dgc, 0, reverse=True)
    tl.store(dq_ptr + tv[:, None] * K + ck[None, :], dq, mask=rm[:, None])
    tl.store(dk_ptr + tv[:, None] * K + ck[None, :], dk, mask=rm[:, None])
    tl.store(dv_ptr + tv[:, None] * V + cv[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=rm[:, None])
    tl.store(dg_ptr + tv, dg, mask=rm)
    tl.store(db_ptr + tv, dbeta, mask=rm)
    tl.store(ds0_ptr + pid * K * V + ck[:, None] * V + cv[None, :], ds0)


def _block(t: int) -> dict:
    """The row block (a power of two >= 16 holding the call) and the number of squarings
    that make (I + A)^-1 exact for it: N^(BT-1) is the last nonzero power."""
    bt = max(16, triton.next_power_of_2(t))
    return {"BT": bt, "NSQ": bt.bit_length() - 2}


def _precision(x: torch.Tensor) -> str:
    """The matrix products' input precision: IEEE fp32 for fp32 inputs; TF32 for bf16/fp16
    ones (products of their values are exact in TF32; the fp32 intermediates -- the WY
    factors, the state -- are rounded to TF32's 10-bit mantissa in the products, a finer
    rounding than the inputs' own 7 or 10 bits)."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


class _ShortRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, s0, scale, warps):  # type: ignore[override]
        b, t, h, kd = q.shape
        hv, vd = v.shape[2], v.shape[3]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        g_dtype, beta_dtype = g.dtype, beta.dtype
        g, beta = g.float().contiguous(), beta.float().contiguous()
        s0c = None if s0 is None else s0.float().contiguous()
        o = torch.empty_like(v)
        st = torch.empty(b, hv, kd, vd, dtype=torch.float32, device=v.device)
        _fwd[(b * hv,)](q, k, v, g, beta, s0c if s0c is not None else st, o, st, scale, t, h,
                        hv, hv // h, K=kd, V=vd, HAS_S0=s0c is not None,
                        PREC=_precision(q), num_warps=warps, **_block(t))
        ctx.save_for_backward(q, k, v, g, beta, s0c)
        ctx.scale, ctx.warps = scale, warps
        ctx.dtypes = (g_dtype, beta_dtype, None if s0 is None else s0.dtype)
        return o, st

    @staticmethod
    def backward(ctx, do, dst):  # type: ignore[override]
        q, k, v, g, beta, s0 = ctx.saved_tensors
        b, t, h, kd = q.shape
        hv, vd = v.shape[2], v.shape[3]
        dq = torch.empty(b, t, hv, kd, dtype=torch.float32, device=q.device)
        dk = torch.empty_like(dq)
        dv = torch.empty_like(v)
        dg = torch.empty_like(g)
        db = torch.empty_like(beta)
        ds0 = torch.empty(b, hv, kd, vd, dtype=torch.float32, device=q.device)
        do = do.contiguous()
        dst = None if dst is None else dst.float().contiguous()
        _bwd[(b * hv,)](q, k, v, g, beta, s0 if s0 is not None else ds0, do,
                        dst if dst is not None else ds0, dq, dk, dv, dg, db, ds0, ctx.scale,
                        t, h, hv, hv // h, K=kd, V=vd, HAS_S0=s0 is not None,
                        HAS_DST=dst is not None, PREC=_precision(q), num_warps=ctx.warps,
                        **_block(t))
        r = hv // h
        dq = dq.view(b, t, h, r, kd).sum(3).to(q.dtype)
        dk = dk.view(b, t, h, r, kd).sum(3).to(k.dtype)
        g_dtype, beta_dtype, s0_dtype = ctx.dtypes
        return (dq, dk, dv, dg.to(g_dtype), db.to(beta_dtype),
                None if s0 is None else ds0.to(s0_dtype), None, None)


def short_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, scale: float | None = None,
                           initial_state: torch.Tensor | None = None, num_warps: int = WARPS
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule over ``t <= MAX_T`` tokens (the layout and results of
    ``gated_delta.gated_delta_rule``): o [B, T, HV, V] in v's dtype, the final state fp32.
    Head dims must be powers of two (16..128). ``num_warps``: both kernels' launch width
    (``tools/bench_gdn_kernels.py --warps`` times the choices)."""
    t, kd, vd = q.shape[1], q.shape[-1], v.shape[-1]
    require_triton_tensor(q, "model.gdn_backend='short'", "'chunked'",
                          "'chunked' or 'recurrent'")
    if t > MAX_T:
        raise ValueError(f"short_gated_delta_rule: {t} tokens; at most {MAX_T}")
    for d in (kd, vd):
        if d < 16 or d > 128 or d & (d - 1):
            raise ValueError(f"short_gated_delta_rule: head dim {d} is not a power of two "
                             "in [16, 128]")
    scale = kd ** -0.5 if scale is None else scale
    return _ShortRule.apply(q, k, v, g, beta, initial_state, scale, num_warps)


__all__ = ["MAX_T", "short_gated_delta_rule"]
