"""GPU: the whole sleep model on FLA kernels vs the same weights on the PyTorch reference; CPU:
the fp32 bound of that comparison against TF32 rounding emulated in the reference."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import sleeptrain
from sleeptrain.sleep import windowed_loss

SMALL = ["model.d_model=256", "model.pattern=AGGA", "model.n_heads=4", "model.n_kv_heads=2",
         "model.gdn_heads=2", "model.gdn_v_heads=4", "model.gdn_head_dim=64",
         "model.vocab_size=256", "sleep.window_len=64", "sleep.passes=3",
         "sleep.eviction=sliding", "train.device=cuda"]
#: fp32: FLA's GDN products are TF32 (10 mantissa bits, unit roundoff 4.9e-4), carried
#: through 3 passes over 4 sliding windows. On an H200 (2026-12-02) the largest difference
#: was embed.weight's, 2.1e-3 of its largest entry (a first bound of 2e-3 failed there);
#: rounding only the forward products' operands to TF32 on CPU already moves gradients by
#: up to ~2e-3 (test below), so the bound is 4e-3; a wrong kernel or state hand-over is off
#: by 1e-1 or more. bf16 autocast: both paths round activations to bf16, so gradients agree
#: to a few percent (relative to each tensor's max).
#: The gate gradients (A_log, dt_bias) on Hopper with Triton >= 3.4 and < 3.7.1: FLA runs its
#: TileLang backward there (its Triton kernel is miscompiled, FLA issue #640), and in fp32
#: those were 2.14e-2 apart from float64 on an H100 (2026-12-06), every run alike, ten times
#: what TF32 rounding explains (test below); only the gate gradient comes out of that
#: backward this far (kernels.gated_delta.fla_fp32_gate_caveat; docs/benchmarks.md). There,
#: and for those two tensors only, the bound is GATE_TOL_TILELANG (2.3x the measurement);
#: every other tensor keeps FP32_TOL. Passed with this bound on an H100 (2026-12-07).
FP32_TOL, BF16_TOL, GATE_TOL_TILELANG = 4e-3, 5e-2, 5e-2


def _grads(model, cfg, tokens, mask, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = windowed_loss(model, tokens, mask, cfg.sleep)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 200), generator=g).to(device)
    return tokens, torch.ones_like(tokens)


def _rel_errors(ga, gb):
    return {n: (ga[n] - gb[n]).abs().max().item() / max(gb[n].abs().max().item(), 1e-6)
            for n in gb}


@pytest.mark.gpu
@pytest.mark.parametrize("autocast, tol", [(False, FP32_TOL), (True, BF16_TOL)])
def test_fla_model_matches_reference_model(autocast, tol):
    # Same weights, gdn_backend fla vs chunked (fp32 reference); tolerances: FP32_TOL.
    cfg_f = sleeptrain.load_config(None, [*SMALL, "model.gdn_backend=fla"])
    cfg_r = sleeptrain.load_config(None, [*SMALL, "model.gdn_backend=chunked"])
    m_f = sleeptrain.build_model(cfg_f, seed=1)
    m_r = sleeptrain.build_model(cfg_r, seed=1)
    tokens, mask = _inputs("cuda")
    lf, gf = _grads(m_f, cfg_f, tokens, mask, autocast)
    lr, gr = _grads(m_r, cfg_r, tokens, mask, autocast)
    assert abs(lf.item() - lr.item()) <= tol * abs(lr.item())
    from sleeptrain.model.kernels.gated_delta import fla_fp32_gate_caveat

    tilelang = fla_fp32_gate_caveat() is not None
    for n, err in _rel_errors(gf, gr).items():
        gate = n.endswith(("mixer.A_log", "mixer.dt_bias"))
        assert err <= (max(tol, GATE_TOL_TILELANG) if gate and tilelang else tol), (n, err)


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """x (detached) with its mantissa rounded to TF32's 10 bits, to nearest."""
    bits = x.detach().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _sum_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """g summed over the dimensions a broadcasting matmul added to an operand of ``shape``."""
    while g.dim() > len(shape):
        g = g.sum(0)
    for i, n in enumerate(shape):
        if n == 1 and g.shape[i] != 1:
            g = g.sum(i, keepdim=True)
    return g


class _TF32MatMul(torch.autograd.Function):
    """a @ b with TF32-rounded operands, and its backward's two products likewise (FLA's
    kernels multiply fp32 in TF32 in both directions)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return torch.matmul(_tf32(a), _tf32(b))

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g = _tf32(g)
        return (_sum_to(torch.matmul(g, _tf32(b).transpose(-1, -2)), a.shape),
                _sum_to(torch.matmul(_tf32(a).transpose(-1, -2), g), b.shape))


class _TF32Products(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul) and \
                args[0].dtype == torch.float32 and args[0].dim() >= 2 and args[1].dim() >= 2:
            with torch._C.DisableTorchFunction():
                return _TF32MatMul.apply(args[0], args[1])
        return func(*args, **(kwargs or {}))


@pytest.mark.slow
def test_fp32_bound_covers_tf32_rounding_of_the_gdn_products(monkeypatch):
    """CPU, the GPU test's model in fp32 on the reference kernel, once exact and once with the
    chunk kernel's matrix products on TF32-rounded operands, in the forward and in the
    backward: the largest gradient difference, relative to each tensor's largest entry,
    must lie between FP32_TOL / 4 and FP32_TOL -- rounding of this kind reaches the order
    of the bound, and the bound leaves room above it (measured 2026-12-06: 2.2e-3, A_log and
    dt_bias; 2.1e-3 with the forward's products alone)."""
    import sleeptrain.model.kernels.gated_delta as gd

    cfg = sleeptrain.load_config(None, [*SMALL[:-1], "train.device=cpu",
                                        "model.gdn_backend=chunked",
                                        "model.params_dtype=float32"])
    model = sleeptrain.build_model(cfg, seed=1)
    tokens, mask = _inputs("cpu")
    l_exact, g_exact = _grads(model, cfg, tokens, mask, False)
    exact_kernel = gd.chunked_gated_delta_rule

    def rounded(*a, **k):
        with _TF32Products():
            return exact_kernel(*a, **k)

    monkeypatch.setattr(gd, "chunked_gated_delta_rule", rounded)
    l_tf32, g_tf32 = _grads(model, cfg, tokens, mask, False)
    worst = max(_rel_errors(g_tf32, g_exact).values())
    assert FP32_TOL / 4 <= worst <= FP32_TOL, worst
    assert abs(l_tf32.item() - l_exact.item()) <= 1e-5 * abs(l_exact.item())
