"""The training step's fast paths against their plain forms (CPU, float64 where it matters):
the one-call N=1 loss, the device-learning-rate optimizer step, the multi-tensor gradient
clip, the per-step sleep settings."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_cfg, tiny_model

from sleeptrain.sleep import windowed_loss
from sleeptrain.sleep.runner import parallel_applies, parallel_loss
from sleeptrain.train.step import forward_backward


def _batch(b: int, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 16, (b, t), generator=g)
    mask = (torch.rand(b, t, generator=g) < 0.5).long()
    return tokens, mask


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("pattern", ["AGAG", "GaMgA"])
def test_parallel_loss_equals_windowed_loss_at_n1(eviction, pattern):
    # fp64: the two summation orders agree to ~1e-14; 1e-10 is the bound (as for the logits
    # in tests/test_sleep_core.py::test_n1_equals_one_parallel_call).
    cfg, model = tiny_model(f"model.pattern={pattern}", f"sleep.eviction={eviction}",
                            "sleep.window_len=7", "sleep.passes=1")
    tokens, mask = _batch(3, 30)
    ref = windowed_loss(model, tokens, mask, cfg.sleep, return_predictions=True)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got = parallel_loss(model, tokens, mask, cfg.sleep)
    got.loss.backward()
    assert abs(got.loss.item() - ref.loss.item()) <= 1e-10
    assert got.n_tokens.item() == ref.n_tokens.item() and got.n_windows == ref.n_windows
    assert got.n_correct.item() == ref.n_correct.item()
    assert torch.equal(got.predictions, ref.predictions)
    for n, p in model.named_parameters():
        assert (p.grad - ref_grads[n]).abs().max().item() <= 1e-10, n


def test_parallel_applies_only_where_it_is_exact():
    cfg, model = tiny_model("sleep.passes=1")
    assert parallel_applies(model, cfg.sleep, None, None)
    assert not parallel_applies(model, cfg.sleep, 2, None)
    assert not parallel_applies(model, cfg.sleep, None, torch.zeros(1, 2, dtype=torch.bool))
    for extra in ("sleep.checkpoint=true", "sleep.detach_every=1"):
        c = tiny_cfg("sleep.passes=1", extra)
        assert not parallel_applies(model, c.sleep, None, None), extra


def test_forward_backward_falls_back_to_windows_when_n_exceeds_one():
    cfg, model = tiny_model("sleep.window_len=5", "sleep.passes=3")
    tokens, mask = _batch(2, 17, seed=2)
    heads = None
    a = forward_backward(model, tokens, mask, None, cfg.sleep, 1.0, False, heads, parallel=True)
    ga = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    b = forward_backward(model, tokens, mask, None, cfg.sleep, 1.0, False, heads)
    assert torch.equal(a[0], b[0])
    assert all(torch.equal(x, p.grad) for x, p in zip(ga, model.parameters(), strict=True))


def test_device_lr_step_follows_the_float_step_and_keeps_float_lrs():
    from sleeptrain.train.optim import build_optimizer
    from sleeptrain.train.optim_step import DeviceLrStep

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))

    a, b = make(), make()
    kw = dict(muon_lr=0.02, adamw_lr=1e-3, weight_decay=0.1, adamw_betas=(0.9, 0.95),
              adamw_eps=1e-8, muon_momentum=0.95, fused=True)  # fused AdamW takes a tensor lr
    oa = build_optimizer(a.named_parameters(), **kw)
    ob = build_optimizer(b.named_parameters(), **kw)
    step = DeviceLrStep(ob, torch.device("cpu"), graph=False)
    g = torch.Generator().manual_seed(3)
    for it in range(5):
        x = torch.randn(32, 8, generator=g)
        for m in (a, b):
            m.zero_grad()
            m(x).pow(2).mean().backward()
        for grp in oa.param_groups + ob.param_groups:
            grp["lr"] = grp["base_lr"] * (it + 1) / 5
        oa.step()
        step.step()
    # fp32: Muon's update is p + ortho * lr * (-scale) instead of p + ortho * (-(lr * scale))
    for p, q, p0 in zip(a.parameters(), b.parameters(), make().parameters(), strict=True):
        assert (p - q).abs().max().item() <= 1e-6
        assert (q - p0).abs().max().item() > 1e-4  # the steps did move every parameter
    assert all(isinstance(grp["lr"], float) for grp in ob.param_groups)


def test_clip_grad_norm_is_the_global_norm():
    from sleeptrain.parallel.tensors import clip_grad_norm_

    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64, generator=g))
          for _ in range(3)]
    for p in ps:
        p.grad = torch.randn(p.shape, dtype=torch.float64, generator=g)
    ref = torch.sqrt(sum((p.grad ** 2).sum() for p in ps)).item()
    before = [p.grad.clone() for p in ps]
    total = clip_grad_norm_(ps, 0.5).item()
    assert abs(total - ref) <= 1e-6 * ref  # the norm is accumulated in fp32
    for p, b0 in zip(ps, before, strict=True):
        assert torch.allclose(p.grad, b0 * 0.5 / (ref + 1e-6), rtol=1e-6)
    assert abs(clip_grad_norm_(ps, float("inf")).item() - 0.5) <= 1e-6


def test_sleep_for_step_draws_random_passes_per_step():
    from sleeptrain.config import load_config
    from sleeptrain.train.trainer import sleep_for_step, stage_at

    cfg = load_config(None, ["sleep.random_passes=[1,2,3,4]", "train.steps=400"])
    draws = [sleep_for_step(cfg, None, s).passes for s in range(400)]
    assert set(draws) == {1, 2, 3, 4}
    assert draws == [sleep_for_step(cfg, None, s).passes for s in range(400)]  # resumable
    assert all(70 <= draws.count(n) <= 130 for n in (1, 2, 3, 4))
    other = load_config(None, ["sleep.random_passes=[1,2,3,4]", "train.steps=400",
                               "train.seed=1"])
    assert draws != [sleep_for_step(other, None, s).passes for s in range(400)]
    staged = load_config(None, ["sleep.random_passes=[1,2,3,4]", "train.steps=4",
                                "train.stages=[{name: a, steps: 2, passes: 3}, {name: b, "
                                "steps: 2}]"])
    assert [sleep_for_step(staged, stage_at(staged, s)[1], s).passes for s in (0, 1)] == [3, 3]
    assert cfg.sleep.passes == 1  # the config itself is untouched
