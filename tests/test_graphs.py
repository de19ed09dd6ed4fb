"""CPU: the capturable form of windowed_loss equals the plain one; graph selection and fallback."""

from __future__ import annotations

import pytest
import torch

import sleeptrain
from sleeptrain.config.validate import ConfigError
from sleeptrain.sleep import windowed_loss
from sleeptrain.sleep.runner import heads_from_counts, target_counts, window_heads
from sleeptrain.train.step import (
    MicroBatchGraphs,
    forward_backward,
    graphs_unavailable,
    zero_grads,
)

TINY = ["model.d_model=32", "model.pattern=AGAG", "model.n_heads=2", "model.n_kv_heads=1",
        "model.gdn_heads=2", "model.gdn_head_dim=16", "model.vocab_size=32",
        "model.params_dtype=float64", "sleep.window_len=8", "sleep.passes=2",
        "train.device=cpu"]


def test_window_heads_marks_windows_with_targets():
    mask = torch.zeros(2, 26, dtype=torch.long)  # 25 inputs: windows [0,8) [8,16) [16,24) [24,25)
    mask[0, 3] = 1  # target 3 is predicted at input 2: window 0
    mask[1, 17] = 1  # input 16: window 2
    assert window_heads(mask, 8) == [True, False, True, False]
    mask[1, 25] = 1  # input 24: the short last window
    assert window_heads(mask, 8) == [True, False, True, True]
    # micro-batches stacked [M, B, T]: any of them
    assert window_heads(torch.stack([mask, torch.zeros_like(mask)]), 8) == [True, False, True,
                                                                             True]


@pytest.mark.parametrize("t,window", [(26, 8), (25, 8), (104, 24), (2, 8), (1, 4), (17, 1)])
def test_target_counts_give_the_mask_reductions(t, window):
    # what the trainer takes from the host copy of target_counts (T-1 numbers) equals what it
    # computed from the whole [B, T] mask before: the loss normalizer and each window's "any
    # target" (a window of inputs [s, s+L) holds targets s+1..s+L), for sparse random masks
    g = torch.Generator().manual_seed(t * 31 + window)
    for dtype in (torch.long, torch.float32):
        mask = (torch.rand(5, t, generator=g) < 0.05).to(dtype)
        counts = target_counts(mask)
        assert counts.shape == (max(t - 1, 0),)
        assert int(counts.numpy().sum()) == int(mask[:, 1:].sum())
        has = mask[:, 1:].any(0).tolist()
        want = [any(has[s:s + window]) for s in range(0, t - 1, window)]
        assert heads_from_counts(counts, window) == want == window_heads(mask, window)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_static_form_equals_plain_windowed_loss(eviction):
    # heads given + document resets applied at every window (torch.where with an all-keep
    # mask where no document starts) must give the very same loss and gradients (fp64, exact).
    cfg = sleeptrain.load_config(None, [*TINY, f"sleep.eviction={eviction}"])
    model = sleeptrain.build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 32, (3, 30), generator=g)
    mask = (torch.rand(3, 30, generator=g) < 0.5).long()
    starts = torch.zeros(3, 4, dtype=torch.bool)
    starts[2, 2] = True

    def run(**kw):
        model.zero_grad(set_to_none=True)
        out = windowed_loss(model, tokens, mask, cfg.sleep, doc_starts=starts, **kw)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    l0, g0 = run()
    l1, g1 = run(heads=window_heads(mask, 8), static_resets=True)
    assert torch.equal(l0, l1)
    for a, b in zip(g0, g1, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="heads has 2 entries for 4 windows"):
        windowed_loss(model, tokens, mask, cfg.sleep, heads=[True, True])


def test_micro_batch_graphs_fall_back_to_forward_backward_off_cuda():
    # Off CUDA, MicroBatchGraphs.step is forward_backward (same values, same in-place
    # accumulation) and captures nothing. Capture and replay themselves are tested on a GPU
    # (tests/test_graphs_gpu.py): a CPU test cannot exercise them.
    cfg = sleeptrain.load_config(None, TINY)
    m_a = sleeptrain.build_model(cfg, seed=0)
    m_b = sleeptrain.build_model(cfg, seed=0)
    graphs = MicroBatchGraphs(m_b, warmup=0, verbose=False)
    tokens = torch.randint(0, 32, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    heads = window_heads(mask, 8)
    for _ in range(2):
        la, ca = forward_backward(m_a, tokens, mask, None, cfg.sleep, 7.0, False, heads)
        lb, cb = graphs.step(tokens, mask, None, cfg.sleep, 7.0, False, heads)
        assert torch.equal(la, lb) and torch.equal(ca, cb)
    for pa, pb in zip(m_a.parameters(), m_b.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad)  # accumulated over the two calls
    assert graphs.captures == 0 and graphs.replays == 0 and not graphs.graphs
    buffers = [p.grad for p in m_b.parameters()]
    zero_grads(list(m_b.parameters()))
    for p, buf in zip(m_b.parameters(), buffers, strict=True):
        assert p.grad is buf and not p.grad.any()  # zeroed in place, not replaced


def test_forward_backward_divides_by_the_step_normalizer():
    cfg = sleeptrain.load_config(None, TINY)
    model = sleeptrain.build_model(cfg, seed=0)
    tokens = torch.randint(0, 32, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(tokens)
    loss_sum, _ = forward_backward(model, tokens, mask, None, cfg.sleep, 4.0, False, None)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    out = windowed_loss(model, tokens, mask, cfg.sleep)
    (out.loss_sum / 4.0).backward()
    assert torch.equal(loss_sum, out.loss_sum.detach())
    for a, p in zip(grads, model.parameters(), strict=True):
        assert torch.equal(a, p.grad)
    # no target at all: nothing to differentiate, no error
    model.zero_grad(set_to_none=True)
    forward_backward(model, tokens, torch.zeros_like(mask), None, cfg.sleep, 1.0, False, None)
    assert all(p.grad is None for p in model.parameters())


def test_graphs_unavailable_reasons():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert graphs_unavailable(cuda, 1, "auto") is None
    assert graphs_unavailable(cuda, 1, "on") is None
    assert graphs_unavailable(cuda, 2, "on") is None
    assert "tensor parallelism" in graphs_unavailable(cuda, 2, "auto")
    assert "cpu" in graphs_unavailable(cpu, 1, "on")
    assert graphs_unavailable(cuda, 1, "off") == "train.cuda_graphs=off"


def test_cuda_graphs_setting_is_validated():
    with pytest.raises(ConfigError, match="train.cuda_graphs"):
        sleeptrain.load_config(None, ["train.cuda_graphs=always"])


def test_switch_words_survive_yaml():
    # YAML reads on/off as booleans; the three-way switches take them back as words
    cfg = sleeptrain.load_config(None, ["train.cuda_graphs=off", "train.compile=on"])
    assert cfg.train.cuda_graphs == "off" and cfg.train.compile == "on"
    with pytest.raises(ConfigError, match="train.compile"):
        sleeptrain.load_config(None, ["train.compile=fast"])
