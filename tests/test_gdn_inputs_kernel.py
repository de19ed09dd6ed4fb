"""The Triton GDN input kernels (``sleeptrain.model.kernels.gdn_inputs``) against the reference
chain ``fused.gdn_inputs`` in fp64, on CPU under the Triton interpreter (a subprocess with
``TRITON_INTERPRET=1``: the variable must be set before the kernels are defined). The same
comparison runs on the GPU in tests/test_fused_gpu.py."""

from __future__ import annotations

import pytest

from tests._interp import run_interpreted

SCRIPT = r"""
import json, sys
import torch
from sleeptrain.model.kernels import fused
from sleeptrain.model.kernels.gdn_inputs import gdn_inputs

def case(t, state, dtype, h=2, dk=8, r=2, dv=4, b=2, seed=0, block_t=32):
    g = torch.Generator().manual_seed(seed)
    cg = 2 * dk + r * dv
    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    y = rnd(b, t, h, cg + r * dv + 2 * r)
    y[0, 0, 0, :dk] *= 1e-9  # one q row below the L2 norm's eps
    st = rnd(b, h * cg, 3) if state else None
    w = rnd(h * cg, 4, scale=0.5)
    alog = rnd(h * r, scale=0.5)  # g of order 1: the test loss's sin(4 g) amplifies less
    dtb = rnd(h * r, scale=0.1)
    dtb[0] = 25.0  # softplus above its threshold for some tokens
    def run(fn, dt, pdt):
        ins = [y.to(dt), None if st is None else st.to(dt), w.to(pdt), alog.to(pdt),
               dtb.to(pdt)]
        ins = [x if x is None else x.clone().requires_grad_() for x in ins]
        outs = fn(*ins, dk, r, dv)
        loss = sum((o.double() * (i + 1)).sin().sum() for i, o in enumerate(outs[:-1]))
        loss.backward()
        return [o.detach().double() for o in outs] + [x.grad.double() for x in ins
                                                      if x is not None]
    def ref(yy, ss, *a):
        if ss is None:
            ss = yy.new_zeros(yy.shape[0], a[0].shape[0], 3)
        return fused.gdn_inputs(yy, ss, *a)
    exact = run(ref, torch.float64, torch.float64)
    eager = run(ref, dtype, torch.float32)
    fast = run(lambda *a: gdn_inputs(*a, block_t=block_t), dtype, torch.float32)
    out = []
    for r_, e, f in zip(exact, eager, fast, strict=True):
        assert r_.shape == f.shape, (r_.shape, f.shape)
        scale = max(r_.abs().max().item(), 1e-6)
        out.append([(e - r_).abs().max().item() / scale, (f - r_).abs().max().item() / scale])
    return out

res = {}
for t, state, dt, bt in [(7, True, "float32", 32), (2, True, "float32", 32),
                         (5, False, "float32", 32), (40, True, "float32", 32),
                         (7, True, "bfloat16", 32), (24, True, "float32", 8)]:
    res[f"{t}-{state}-{bt}-{dt}"] = case(t, state, getattr(torch, dt), block_t=bt)

from tests._interp import step_errors
for ev in ("hard", "sliding"):
    res[f"model-{ev}"] = step_errors([f"sleep.eviction={ev}"], "model.gdn_inputs", "chain",
                                     "triton")
print("RESULT" + json.dumps(res))
"""


def test_triton_gdn_inputs_match_the_reference_under_the_interpreter():
    # Outputs (q, k, v, g, beta, z, new conv state) and the gradients of y, the conv state,
    # the conv weight, A_log and dt_bias; 40 tokens span two 32-row blocks (the convolution's
    # transpose crosses the block edge), 2 tokens are fewer than K-1 (the new conv state
    # keeps some of the old), 24 tokens in 8-token programs cross two block edges. One q row
    # lies below the L2 norm's eps and one dt_bias puts softplus above its threshold. Bound,
    # relative to each tensor's largest entry, as in tests/test_fused_gpu.py: within 2x the
    # eager reference chain's error in the same dtype + 1e-6 (fp32) / 4e-3 (bf16, one
    # rounding of 2^-8). The eager fp32 error is not tiny everywhere: the test loss's
    # sin((i + 1) g) turns g's fp32 rounding into dg's error.
    # Then a whole training step of a tiny AG model (N=2, hard and sliding eviction: the
    # conv state enters and leaves the kernels with gradients) with model.gdn_inputs=triton
    # against chain, fp32: the loss and every parameter gradient within 1e-5 of the largest
    # entry (two fp32 computations of the same sums, no fp64 reference in between).
    pytest.importorskip("triton")
    res = run_interpreted(SCRIPT)
    for name, errs in res.items():
        for i, (err_e, err_f) in enumerate(errs):
            if name.startswith("model"):  # fp32 against fp32: two roundings' worth
                bound = 1e-5
            else:
                bound = 2 * err_e + (1e-6 if name.endswith("float32") else 4e-3)
            assert err_f <= bound, (name, i, err_f, err_e)


def test_triton_gdn_inputs_refuse_a_block_that_is_not_a_power_of_two():
    import torch

    from sleeptrain.model.kernels.gdn_inputs import gdn_inputs

    y = torch.zeros(1, 4, 1, 2 * 8 + 2 * 4 + 2)
    with pytest.raises(ValueError, match="block_t must be a power of two >= 2, got 12"):
        gdn_inputs(y, None, torch.zeros(16 + 4, 4), torch.zeros(1), torch.zeros(1), 8, 1, 4,
                   block_t=12)
