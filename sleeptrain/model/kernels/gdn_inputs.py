"""The GDN input chain as two hand-written Triton kernels per direction (``model.gdn_inputs``).

``fused.gdn_inputs`` (the reference, torch.compile'd on CUDA) takes a GDN block's projection
y [B, T, H, G] -- rows per query/key head h, [q_h (dk), k_h (dk), v (r dv), z (r dv), b (r),
a (r)] -- to the delta rule's inputs: the causal depthwise convolution over the [q, k, v]
channels with SiLU, q and k L2-normalized, g = -exp(A_log) softplus(a + dt_bias),
beta = sigmoid(b). Compiled, its backward ran 3-8x its forward's time (docs/benchmarks.md:
the shifted sums' slice gradients, a gradient tensor assembled from slices); at the Rule 110
paper model's 24-token windows the chain was 18% of the step's kernel time.

Here, per (block of BT tokens, sequence, head) program:

* forward (``_fwd``): the convolution from K shifted loads of y's rows (the incoming conv state
  for rows before the window), SiLU, the L2 norms of q and k, the gates; writes q, k, v, z, g,
  beta once (z copied, so that its gradient lands in the one gradient tensor below);
* backward, kernel 1 (``_bwd_pre``): recomputes the convolution, SiLU and norms, takes the
  L2-norm and SiLU gradients to the convolution's pre-activation gradient P (fp32 scratch
  [B, T, H, 2 dk + r dv]), and writes the z, a and b parts of y's gradient;
* backward, kernel 2 (``_bwd_conv``): the convolution's transpose from K shifted loads of P
  (the [q, k, v] part of y's gradient), the incoming conv state's gradient, and per-program
  partial sums of the conv weight's gradient (summed over programs by ``torch.sum``: the same
  order every run, no atomics).

Numerics: every intermediate in fp32 from the stored inputs (the conv state rounded to y's
dtype first, as the reference concatenates it to y); stored outputs rounded once. The taps
are summed oldest first, as in the reference. Deterministic: fixed block sizes, no
autotuning, no atomics. The Triton interpreter (``TRITON_INTERPRET=1``) runs these kernels on
CPU tensors: tests/test_gdn_inputs_kernel.py compares them there with the fp64 reference;
tests/test_fused_gpu.py does on the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sleeptrain.model.kernels.triton_check import require_triton_tensor

EPS = 1e-6  # F.normalize's in the reference (fused._gdn_gates)
# every kernel's launch width: at 4 warps each kernel ran out of registers for the Rule 110
# model's shapes (255 registers and 0.8-3.6 KB of spills per thread, for sm_90 with triton 3.6
# and 3.9), at 8 at most 44 bytes (tools/compile_kernels.py --warps 4,8)
WARPS = 8
# tokens per program (a power of two; calls shorter than it take the next power of two of
# their length). At 32 and 8 warps each program holds 8 warps of an SM's 64 (~255 registers
# per thread); at 8 tokens 80-106 registers, 16-24 warps (tools/compile_kernels.py
# --input-blocks 8,32 --warps 8; docs/design.md). Timed on an H100 (2026-12-08,
# tools/bench_gdn_kernels.py --input-blocks 8,16,32 --input-warps 4,8, eagerly: the tool's
# graph capture failed): 1.1-1.4 ms forward + backward at every setting, against 347.5 us
# for the compiled chain in one graph (docs/benchmarks.md); no setting changes the
# option's standing (off by default)
BLOCK_T = 32


@triton.jit
def _pre(y, st, w, b, h, t, T, off, cg, syb, syt, syh, ssb, ssc, cols, cmask,
         K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_STATE: tl.constexpr):
    """The convolution's pre-activation [BT, BC] (fp32) at rows ``t`` for channels
    ``off + cols`` of head ``h``: sum over taps j of w[:, j] * ext[t + j], ext being the
    K-1 conv-state inputs, then y's rows."""
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    ch = h * cg + off + cols
    for j in tl.static_range(K):
        x = _ext(y, st, b, h, t + j - (K - 1), T, off, cg, syb, syt, syh, ssb, ssc, cols,
                 cmask[None, :], K, HAS_STATE)
        wj = tl.load(w + ch * K + j, mask=cmask, other=0.0).to(tl.float32)
        acc += x * wj[None, :]
    return acc


@triton.jit
def _ext(y, st, b, h, e, T, off, cg, syb, syt, syh, ssb, ssc, cols, m2, K: tl.constexpr,
         HAS_STATE: tl.constexpr):
    """The convolution's inputs [BT, BC] (fp32) at positions ``e`` (y's rows from 0, the
    conv state's K-1 before them, rounded to y's dtype first as the reference concatenates
    it), channels ``off + cols`` of head ``h``; zeros elsewhere and outside ``m2``."""
    x = tl.load(y + b * syb + e[:, None] * syt + h * syh + off + cols[None, :],
                mask=((e >= 0) & (e < T))[:, None] & m2, other=0.0).to(tl.float32)
    if HAS_STATE:
        ch = h * cg + off + cols
        xs = tl.load(st + b * ssb + ch[None, :] * ssc + (e + K - 1)[:, None],
                     mask=((e < 0) & (e >= 1 - K))[:, None] & m2, other=0.0)
        x += xs.to(y.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _softplus(x):
    """torch's softplus (threshold 20) with log1p(exp(x)) by Kahan's formula."""
    u = tl.exp(x)
    wv = 1.0 + u
    lp = tl.where(wv == 1.0, u, tl.log(wv) * (u / (wv - 1.0)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _gate_inputs(y, alog, dtb, b, h, t, tm, T, H, cg, syb, syt, syh, RDV: tl.constexpr,
                 R: tl.constexpr, BR: tl.constexpr):
    """The gates' inputs of rows t, head h: b and a [BT, BR] (fp32), A_log and dt_bias of
    the head's value heads [BR] (fp32), the offsets of g/beta [BT, BR] and their mask."""
    cr = tl.arange(0, BR)
    mr = cr < R
    mm = tm[:, None] & mr[None, :]
    base = y + b * syb + t[:, None] * syt + h * syh + cg + RDV + cr[None, :]
    bb = tl.load(base, mask=mm, other=0.0).to(tl.float32)
    aa = tl.load(base + R, mask=mm, other=0.0).to(tl.float32)
    hv = h * R + cr
    a_log = tl.load(alog + hv, mask=mr, other=0.0).to(tl.float32)
    dt = tl.load(dtb + hv, mask=mr, other=0.0).to(tl.float32)
    return bb, aa, a_log, dt, (b * T + t)[:, None] * (H * R) + hv[None, :], mm


@triton.jit
def _qk_fwd(y, st, w, out, b, h, t, T, off, cg, syb, syt, syh, ssb, ssc, ck, mk, m2, row,
            DK: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
            HAS_STATE: tl.constexpr, EPS: tl.constexpr):
    """q (off 0) or k (off dk): conv, SiLU, L2 norm; stored [B, T, H, dk]."""
    acc = _pre(y, st, w, b, h, t, T, off, cg, syb, syt, syh, ssb, ssc, ck, mk, K, BT, BK,
               HAS_STATE)
    c = tl.where(m2, acc * tl.sigmoid(acc), 0.0)
    n = tl.sqrt(tl.sum(c * c, 1))
    tl.store(out + row[:, None] * DK + ck[None, :],
             (c / tl.maximum(n, EPS)[:, None]).to(out.dtype.element_ty), mask=m2)


@triton.jit
def _qk_bwd(y, st, w, dout, P, b, h, t, T, off, cg, syb, syt, syh, ssb, ssc, ck, mk, m2, row,
            DK: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
            HAS_STATE: tl.constexpr, EPS: tl.constexpr):
    """q's or k's gradient through the L2 norm (F.normalize's: (g - u (u.g)) / |c| with
    u = c / |c|, or g / eps where |c| <= eps) and SiLU, to P's channels off..off+dk."""
    acc = _pre(y, st, w, b, h, t, T, off, cg, syb, syt, syh, ssb, ssc, ck, mk, K, BT, BK,
               HAS_STATE)
    s = tl.sigmoid(acc)
    c = tl.where(m2, acc * s, 0.0)
    n = tl.sqrt(tl.sum(c * c, 1))
    nn = tl.maximum(n, EPS)
    u = c / nn[:, None]
    gq = tl.load(dout + row[:, None] * DK + ck[None, :], mask=m2, other=0.0).to(tl.float32)
    dot = tl.sum(u * gq, 1)
    dc = tl.where((n > EPS)[:, None], (gq - u * dot[:, None]) / nn[:, None], gq / EPS)
    tl.store(P + row[:, None] * cg + off + ck[None, :], dc * s * (1.0 + acc * (1.0 - s)),
             mask=m2)


@triton.jit
def _fwd(y, st, w, alog, dtb, q, k, v, z, g, beta, T, H, syb, syt, syh, ssb, ssc,
         DK: tl.constexpr, RDV: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr,
         HAS_STATE: tl.constexpr, EPS: tl.constexpr):
    tb, b, h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    cg = 2 * DK + RDV
    t = tb * BT + tl.arange(0, BT)
    tm = t < T
    row = (b * T + t) * H + h  # [BT]: the (b, t, h) row of the outputs
    ck = tl.arange(0, BK)
    mk = ck < DK
    m2 = tm[:, None] & mk[None, :]
    _qk_fwd(y, st, w, q, b, h, t, T, 0, cg, syb, syt, syh, ssb, ssc, ck, mk, m2, row,
            DK, K, BT, BK, HAS_STATE, EPS)
    _qk_fwd(y, st, w, k, b, h, t, T, DK, cg, syb, syt, syh, ssb, ssc, ck, mk, m2, row,
            DK, K, BT, BK, HAS_STATE, EPS)
    for vb in tl.static_range(0, RDV, BV):  # v (conv, SiLU) and z (a copy), BV channels a time
        cv = vb + tl.arange(0, BV)
        mv = cv < RDV
        mm = tm[:, None] & mv[None, :]
        acc = _pre(y, st, w, b, h, t, T, 2 * DK, cg, syb, syt, syh, ssb, ssc, cv, mv,
                   K, BT, BV, HAS_STATE)
        tl.store(v + row[:, None] * RDV + cv[None, :],
                 (acc * tl.sigmoid(acc)).to(v.dtype.element_ty), mask=mm)
        zz = tl.load(y + b * syb + t[:, None] * syt + h * syh + cg + cv[None, :], mask=mm)
        tl.store(z + row[:, None] * RDV + cv[None, :], zz, mask=mm)
    bb, aa, a_log, dt, o, mm = _gate_inputs(y, alog, dtb, b, h, t, tm, T, H, cg, syb, syt, syh,
                                            RDV, R, BR)
    gg = -tl.exp(a_log)[None, :] * _softplus(aa + dt[None, :])
    tl.store(g + o, gg, mask=mm)
    tl.store(beta + o, tl.sigmoid(bb), mask=mm)


@triton.jit
def _bwd_pre(y, st, w, alog, dtb, dq, dk, dv, dz, dg, dbeta, P, dy, da_out,
             T, H, syb, syt, syh, ssb, ssc,
             DK: tl.constexpr, RDV: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr,
             HAS_STATE: tl.constexpr, EPS: tl.constexpr):
    tb, b, h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    cg = 2 * DK + RDV
    G = cg + RDV + 2 * R
    t = tb * BT + tl.arange(0, BT)
    tm = t < T
    row = (b * T + t) * H + h
    ck = tl.arange(0, BK)
    mk = ck < DK
    m2 = tm[:, None] & mk[None, :]
    _qk_bwd(y, st, w, dq, P, b, h, t, T, 0, cg, syb, syt, syh, ssb, ssc, ck, mk, m2, row,
            DK, K, BT, BK, HAS_STATE, EPS)
    _qk_bwd(y, st, w, dk, P, b, h, t, T, DK, cg, syb, syt, syh, ssb, ssc, ck, mk, m2, row,
            DK, K, BT, BK, HAS_STATE, EPS)
    for vb in tl.static_range(0, RDV, BV):
        cv = vb + tl.arange(0, BV)
        mv = cv < RDV
        mm = tm[:, None] & mv[None, :]
        acc = _pre(y, st, w, b, h, t, T, 2 * DK, cg, syb, syt, syh, ssb, ssc, cv, mv,
                   K, BT, BV, HAS_STATE)
        s = tl.sigmoid(acc)
        gv = tl.load(dv + row[:, None] * RDV + cv[None, :], mask=mm, other=0.0).to(tl.float32)
        tl.store(P + row[:, None] * cg + 2 * DK + cv[None, :], gv * s * (1.0 + acc * (1.0 - s)),
                 mask=mm)
        gz = tl.load(dz + row[:, None] * RDV + cv[None, :], mask=mm, other=0.0)
        tl.store(dy + row[:, None] * G + cg + cv[None, :], gz.to(dy.dtype.element_ty), mask=mm)
    bb, aa, a_log, dt, o, mm = _gate_inputs(y, alog, dtb, b, h, t, tm, T, H, cg, syb, syt, syh,
                                            RDV, R, BR)
    x = aa + dt[None, :]
    dsp = tl.where(x > 20.0, 1.0, tl.sigmoid(x))
    da = tl.load(dg + o, mask=mm, other=0.0).to(tl.float32) * (-tl.exp(a_log))[None, :] * dsp
    bt = tl.sigmoid(bb)
    db = tl.load(dbeta + o, mask=mm, other=0.0).to(tl.float32) * bt * (1.0 - bt)
    out = dy + row[:, None] * G + cg + RDV + tl.arange(0, BR)[None, :]
    tl.store(out, db.to(dy.dtype.element_ty), mask=mm)
    tl.store(out + R, da.to(dy.dtype.element_ty), mask=mm)
    tl.store(da_out + o, da, mask=mm)


@triton.jit
def _bwd_conv(y, st, w, P, dy, dw, dst, T, H, NTB, syb, syt, syh, ssb, ssc,
              DK: tl.constexpr, RDV: tl.constexpr, CG: tl.constexpr, R: tl.constexpr,
              K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_STATE: tl.constexpr,
              STATE_GRAD: tl.constexpr):
    tb, b, h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    cg = CG
    G = cg + RDV + 2 * R
    C = H * cg
    t = tb * BT + tl.arange(0, BT)
    tm = t < T
    prow = (b * T + t) * H + h
    for cb in tl.static_range(0, CG, BC):  # CG = 2 dk + r dv, a constexpr
        cols = cb + tl.arange(0, BC)
        cmask = cols < cg
        ch = h * cg + cols
        mm = tm[:, None] & cmask[None, :]
        p_here = tl.load(P + prow[:, None] * cg + cols[None, :], mask=mm, other=0.0)
        dx = tl.zeros([BT, BC], dtype=tl.float32)
        for j in tl.static_range(K):
            # y's row t feeds pre[t + K-1-j] through tap j
            src = t + (K - 1) - j
            ms = (src < T)[:, None] & cmask[None, :]
            p = tl.load(P + ((b * T + src) * H + h)[:, None] * cg + cols[None, :], mask=ms,
                        other=0.0)
            wj = tl.load(w + ch * K + j, mask=cmask, other=0.0).to(tl.float32)
            dx += p * wj[None, :]
            # the weight's gradient: pre[t] reads ext[t + j] through tap j
            x = _ext(y, st, b, h, t + j - (K - 1), T, 0, cg, syb, syt, syh, ssb, ssc, cols, mm,
                     K, HAS_STATE)
            tl.store(dw + ((b * NTB + tb) * C + ch) * K + j, tl.sum(p_here * x, 0), mask=cmask)
        tl.store(dy + prow[:, None] * G + cols[None, :], dx.to(dy.dtype.element_ty), mask=mm)
        if STATE_GRAD:
            if tb == 0:  # the conv state's inputs s < K-1 feed pre[s - j] through tap j <= s
                for s in tl.static_range(K - 1):
                    d = tl.zeros([BC], dtype=tl.float32)
                    for j in tl.static_range(s + 1):
                        pm = cmask & (tl.full([BC], s - j, tl.int32) < T)
                        pr = tl.load(P + ((b * T + s - j) * H + h) * cg + cols, mask=pm,
                                     other=0.0)
                        wj = tl.load(w + ch * K + j, mask=cmask, other=0.0).to(tl.float32)
                        d += pr * wj
                    tl.store(dst + b * C * (K - 1) + ch * (K - 1) + s, d, mask=cmask)


def _p2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


class _GdnInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, conv_state, conv_weight, a_log, dt_bias, dk, r, dv,  # type: ignore[override]
                block_t, warps):
        b, t, h, gw = y.shape
        rdv = r * dv
        km = conv_weight.shape[1]
        if gw != 2 * dk + 2 * rdv + 2 * r or conv_weight.shape[0] != h * (2 * dk + rdv):
            raise ValueError(f"gdn_inputs: projection {tuple(y.shape)} and conv weight "
                             f"{tuple(conv_weight.shape)} do not fit dk={dk}, r={r}, dv={dv}")
        y = y if y.stride(-1) == 1 else y.contiguous()
        conv_weight = conv_weight.contiguous()
        has_state = conv_state is not None
        st = conv_state.contiguous() if has_state else y
        q = y.new_empty(b, t, h, dk)
        k = y.new_empty(b, t, h, dk)
        v = y.new_empty(b, t, h * r, dv)
        z = y.new_empty(b, t, h * r, dv)
        g = y.new_empty(b, t, h * r, dtype=torch.float32)
        beta = torch.empty_like(g)
        bt = min(block_t, _p2(t))
        grid = (triton.cdiv(t, bt), b, h)
        meta = dict(DK=dk, RDV=rdv, R=r, K=km, BT=bt, BK=_p2(dk), BV=min(64, _p2(rdv)),
                    BR=_p2(r), HAS_STATE=has_state, EPS=EPS, num_warps=warps)
        strides = (*y.stride()[:3], *(st.stride()[:2] if has_state else (0, 0)))
        _fwd[grid](y, st, conv_weight, a_log, dt_bias, q, k, v, z, g, beta, t, h, *strides,
                   **meta)
        ctx.save_for_backward(y, conv_state, conv_weight, a_log, dt_bias, g)
        ctx.dims = (dk, r, dv, bt, meta)
        return q, k, v, g, beta, z

    @staticmethod
    def backward(ctx, dq, dk_, dv_, dg, dbeta, dz):  # type: ignore[override]
        y, conv_state, conv_weight, a_log, dt_bias, g = ctx.saved_tensors
        dk, r, dv, bt, meta = ctx.dims
        b, t, h, _ = y.shape
        km = conv_weight.shape[1]
        has_state = conv_state is not None
        st = conv_state.contiguous() if has_state else y
        strides = (*y.stride()[:3], *(st.stride()[:2] if has_state else (0, 0)))
        cg = 2 * dk + r * dv
        grid = (triton.cdiv(t, bt), b, h)
        dy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
        p = torch.empty(b, t, h, cg, dtype=torch.float32, device=y.device)
        da = torch.empty(b, t, h * r, dtype=torch.float32, device=y.device)
        dq, dk_, dv_, dz, dg, dbeta = (x.contiguous() for x in (dq, dk_, dv_, dz, dg, dbeta))
        _bwd_pre[grid](y, st, conv_weight, a_log, dt_bias, dq, dk_, dv_, dz, dg, dbeta, p, dy,
                       da, t, h, *strides, **meta)
        state_grad = has_state and ctx.needs_input_grad[1]
        dw = torch.empty(b * grid[0], h * cg, km, dtype=torch.float32, device=y.device)
        dst = (torch.empty(b, h * cg, km - 1, dtype=torch.float32, device=y.device)
               if state_grad else dw)
        _bwd_conv[grid](y, st, conv_weight, p, dy, dw, dst, t, h, grid[0], *strides,
                        DK=dk, RDV=r * dv, CG=cg, R=r, K=km, BT=bt, BC=min(64, _p2(cg)),
                        HAS_STATE=has_state, STATE_GRAD=state_grad,
                        num_warps=meta["num_warps"])
        d_alog = (dg.float() * g).sum((0, 1)).to(a_log.dtype)
        return (dy, dst.to(conv_state.dtype) if state_grad else None,
                dw.sum(0).to(conv_weight.dtype), d_alog, da.sum((0, 1)).to(dt_bias.dtype),
                None, None, None, None, None)


def gdn_inputs(y: torch.Tensor, conv_state: torch.Tensor | None, conv_weight: torch.Tensor,
               a_log: torch.Tensor, dt_bias: torch.Tensor, dk: int, r: int, dv: int,
               block_t: int = BLOCK_T, num_warps: int = WARPS) -> tuple[torch.Tensor, ...]:
    """``fused.gdn_inputs`` in the Triton kernels: the same arguments (``conv_state`` None
    means zeros, with no state gradient to compute) and results (q, k, v, g, beta, z, the new
    conv state); v and z are contiguous tensors here, not views of y. ``block_t``: tokens
    per program (a power of two from 2), ``num_warps``: every kernel's launch width; either
    changes the results by rounding only (the order of the kernels' sums)."""
    if block_t < 2 or block_t & (block_t - 1):
        raise ValueError(f"gdn_inputs: block_t must be a power of two >= 2, got {block_t}")
    require_triton_tensor(y, "model.gdn_inputs='triton'", "'chain'", "'chain' (the reference)")
    b, t, h, _ = y.shape
    km1 = conv_weight.shape[1] - 1
    q, k, v, g, beta, z = _GdnInputs.apply(y, conv_state, conv_weight, a_log, dt_bias, dk, r,
                                           dv, block_t, num_warps)
    cg = 2 * dk + r * dv
    tail = y[:, max(t - km1, 0):, :, :cg].reshape(b, min(t, km1), h * cg)  # the last K-1 rows
    if t < km1:  # with the incoming state's last inputs in front
        prev = (tail.new_zeros(b, km1, h * cg) if conv_state is None
                else conv_state.transpose(1, 2).to(tail.dtype))
        tail = torch.cat([prev, tail], dim=1)[:, -km1:]
    return q, k, v, g, beta, z, tail.transpose(1, 2).contiguous()


__all__ = ["gdn_inputs"]
