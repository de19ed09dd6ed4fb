"""CPU: the fused linears (sleeptrain.model.kernels.linear) against megatron-core's path.

fp64 weights, so the fused path multiplies by the weights themselves and accumulates weight
gradients with ``addmm_``; the only difference from megatron-core's linear + autograd's
accumulation is the order of fp64 additions: |diff| <= 1e-10 * (1 + max|g|).
"""

from __future__ import annotations

import pytest
import torch

import sleeptrain
from sleeptrain.model.kernels import linear as fused_linear
from sleeptrain.sleep.runner import window_heads
from sleeptrain.train.step import forward_backward
from tests.conftest import TINY


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sleep", [
    ["sleep.eviction=hard", "sleep.passes=3"],
    ["sleep.eviction=sliding", "sleep.passes=2", "model.tie_embeddings=true"],
    ["sleep.eviction=hard", "sleep.passes=3", "sleep.grad_mode=truncated",
     "sleep.grad_passes=1", "sleep.checkpoint=true"],
    ["sleep.eviction=sliding", "sleep.passes=3", "sleep.grad_mode=implicit",
     "sleep.checkpoint=true"],
    ["sleep.eviction=hard", "sleep.passes=3", "sleep.grad_mode=implicit",
     "sleep.implicit_method=phantom"],
], ids=["hard-N3", "sliding-N2-tied", "truncated-ckpt", "implicit-neumann-ckpt",
        "implicit-phantom"])
def test_fused_linears_give_megatron_core_gradients(sleep):
    cfg = sleeptrain.load_config(None, [*TINY, "sleep.window_len=8", *sleep])
    model = sleeptrain.build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 30), generator=g)
    mask = (torch.rand(2, 30, generator=g) < 0.7).long()
    heads = window_heads(mask, 8)

    def run(flag: bool):
        model.zero_grad(set_to_none=True)
        loss, correct = forward_backward(model, tokens, mask, None, cfg.sleep, 5.0, False, heads,
                                         fused_linears=flag)
        return loss, correct, _grads(model)

    l0, c0, g0 = run(False)
    l1, c1, g1 = run(True)
    assert torch.equal(c0, c1)
    assert abs(l0.item() - l1.item()) <= 1e-10 * (1 + abs(l0.item()))
    assert set(g0) == set(g1)
    for name, a in g0.items():
        tol = 1e-10 * (1 + a.abs().max().item())
        assert (a - g1[name]).abs().max().item() <= tol, name
    # the context is left after the micro-batch
    assert all(fused_linear.active(m) is None for m in model.modules())


def test_fused_linears_accumulate_into_existing_grads():
    cfg = sleeptrain.load_config(None, [*TINY, "sleep.window_len=8"])
    model = sleeptrain.build_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 20),
                           generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(tokens)
    heads = window_heads(mask, 8)
    forward_backward(model, tokens, mask, None, cfg.sleep, 1.0, False, heads, fused_linears=True)
    once = _grads(model)
    buffers = {n: p.grad for n, p in model.named_parameters()}
    forward_backward(model, tokens, mask, None, cfg.sleep, 1.0, False, heads, fused_linears=True)
    for n, p in model.named_parameters():
        assert p.grad is buffers[n], n  # in place (what CUDA-graph replays need)
        assert torch.allclose(p.grad, 2 * once[n], rtol=1e-12, atol=1e-14), n


def test_plain_weight_grads_return_gradients_for_autograd_grad():
    # what the implicit-gradient backward relies on: torch.autograd.grad through a fused
    # linear recorded under plain_weight_grads returns the weight gradient and leaves .grad
    cfg = sleeptrain.load_config(None, [*TINY, "sleep.window_len=8"])
    model = sleeptrain.build_model(cfg, seed=0)
    w = fused_linear.matrix_weights(model)[0]
    x = torch.randn(3, 5, w.shape[1], dtype=w.dtype)
    ref = torch.autograd.grad((x @ w.t()).square().sum(), w)[0]
    with fused_linear.for_model(model, None) as ctx:
        with fused_linear.plain_weight_grads(model):
            y = fused_linear.linear(ctx, x, w)
        got = torch.autograd.grad(y.square().sum(), w)[0]
        assert torch.count_nonzero(w.grad) == 0  # zero-filled on entry, untouched
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-14)


def test_fused_linear_misuse_is_reported():
    cfg = sleeptrain.load_config(None, TINY)
    model = sleeptrain.build_model(cfg, seed=0)
    w = fused_linear.matrix_weights(model)[0]
    ctx = fused_linear.for_model(model, torch.bfloat16)
    assert fused_linear.for_model(model, torch.bfloat16) is ctx  # copies are reused
    with ctx:
        with pytest.raises(RuntimeError, match="do not nest"):
            fused_linear.for_model(model, None).__enter__()
        stray = torch.zeros_like(w)
        with pytest.raises(KeyError, match="not one of the model's"):
            fused_linear.linear(ctx, torch.zeros(2, w.shape[1], dtype=w.dtype), stray)
        assert ctx.copies[id(w)].dtype == torch.bfloat16
        assert torch.equal(ctx.copies[id(w)], w.detach().to(torch.bfloat16))
        assert fused_linear.active(model.blocks[0].mixer.qkv) is ctx
    assert all(fused_linear.active(m) is None for m in model.modules())


def test_grad_accum_fusion_switch_is_validated():
    from sleeptrain.config.validate import ConfigError

    cfg = sleeptrain.load_config(None, ["train.grad_accum_fusion=off"])
    assert cfg.train.grad_accum_fusion == "off"
    with pytest.raises(ConfigError, match="train.grad_accum_fusion"):
        sleeptrain.load_config(None, ["train.grad_accum_fusion=maybe"])
