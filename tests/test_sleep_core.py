"""Semantics of the sleep recurrence (DESIGN.md section 1), in float64 on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import sleeptrain
from sleeptrain.sleep import windowed_loss


def _tokens(b: int, t: int, vocab: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g)


def _stream_logits(model, tokens: torch.Tensor, window: int, passes: int) -> torch.Tensor:
    """Wake-pass logits of every position, composing step_window (last window: no sleep)."""
    state = model.init_state(tokens.shape[0])
    outs = []
    starts = list(range(0, tokens.shape[1], window))
    for i, s in enumerate(starts):
        n = 1 if i == len(starts) - 1 else passes
        logits, state = model.step_window(tokens[:, s : s + window], state, passes=n)
        outs.append(logits)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("pattern", ["AGAG", "GaMgA"])
def test_n1_equals_one_parallel_call(eviction, pattern):
    # Window-by-window N=1 vs one call per layer over the whole sequence with a block-diagonal
    # (hard) or banded (sliding) mask and the GDN recurrence running through. fp64: the two
    # orders of summation agree to ~1e-14; 1e-10 is the acceptance bound.
    cfg, model = tiny_model(f"model.pattern={pattern}", f"sleep.eviction={eviction}",
                            "sleep.window_len=7")
    tokens = _tokens(2, 33)
    with torch.no_grad():
        windowed = _stream_logits(model, tokens, 7, passes=1)
        parallel = model.forward_parallel(tokens, 7, eviction)
    assert windowed.shape == parallel.shape == (2, 33, 16)
    assert (windowed - parallel).abs().max().item() <= 1e-10
    # ...and the comparison is not vacuous: a different window length changes the logits.
    with torch.no_grad():
        other = model.forward_parallel(tokens, 5, eviction)
    assert (other - parallel).abs().max().item() > 1e-6


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_wake_latency_semantics(eviction):
    # First-window logits never depend on N (prediction is one pass); later windows' do.
    cfg, model = tiny_model(f"sleep.eviction={eviction}", "sleep.window_len=6")
    tokens = _tokens(2, 18, seed=1)
    with torch.no_grad():
        ref = _stream_logits(model, tokens, 6, passes=1)
        for n in (2, 3, 4):
            got = _stream_logits(model, tokens, 6, passes=n)
            assert torch.equal(got[:, :6], ref[:, :6])
            assert (got[:, 6:] - ref[:, 6:]).abs().max().item() > 1e-6


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("passes", [1, 3])
def test_windowed_loss_equals_step_window_composition(eviction, passes):
    cfg, model = tiny_model(f"sleep.eviction={eviction}", "sleep.window_len=5",
                            f"sleep.passes={passes}")
    tokens = _tokens(3, 17, seed=2)
    mask = torch.zeros_like(tokens)
    mask[:, 3:] = 1
    mask[0, 10] = 0
    with torch.no_grad():
        out = windowed_loss(model, tokens, mask, cfg.sleep, return_predictions=True)
        logits = _stream_logits(model, tokens[:, :-1], 5, passes)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), tokens[:, 1:].reshape(-1),
                                           reduction="none").reshape(3, 16)
    m = mask[:, 1:].double()
    expect = (ce * m).sum() / m.sum()
    assert abs(out.loss.item() - expect.item()) <= 1e-12
    assert torch.equal(out.predictions, logits.argmax(-1))
    assert out.n_tokens.item() == int(m.sum().item())


def test_last_window_never_sleeps():
    # Changing N cannot change anything when there is a single window.
    cfg, model = tiny_model("sleep.window_len=32")
    tokens = _tokens(2, 20, seed=3)
    mask = torch.ones_like(tokens)
    with torch.no_grad():
        a = windowed_loss(model, tokens, mask, cfg.sleep, passes=1).loss
        b = windowed_loss(model, tokens, mask, cfg.sleep, passes=5).loss
    assert a.item() == b.item()


def test_sleep_refines_only_the_loop_range():
    # Loop range [1, 3): GDN block 3 outside it must hold the wake-pass state only,
    # GDN block 1 inside it must differ between N=1 and N=3.
    cfg, model = tiny_model("model.pattern=AGAG", "model.loop_start=1", "model.loop_end=3",
                            "sleep.window_len=6")
    tokens = _tokens(2, 6, seed=4)
    with torch.no_grad():
        _, s1 = model.step_window(tokens, model.init_state(2), passes=1)
        _, s3 = model.step_window(tokens, model.init_state(2), passes=3)
    assert torch.equal(s1.fast[3], s3.fast[3])
    assert (s1.fast[1] - s3.fast[1]).abs().max().item() > 1e-8


def test_sliding_carry_and_hard_eviction_state():
    cfg, model = tiny_model("sleep.eviction=sliding", "sleep.window_len=6")
    tokens = _tokens(2, 6, seed=5)
    with torch.no_grad():
        _, st = model.step_window(tokens[:, :4], model.init_state(2), passes=2)
    assert st.kv[0][0].shape[1] == 4 and st.position == 4  # carry grows up to L-1 = 5
    assert st.conv[1].shape[-1] == cfg.model.conv_kernel - 1
    cfg_h, model_h = tiny_model("sleep.eviction=hard", "sleep.window_len=6")
    with torch.no_grad():
        _, st_h = model_h.step_window(tokens, model_h.init_state(2), passes=2)
    assert all(c is None for c in st_h.conv) and all(kv is None for kv in st_h.kv)
    assert st_h.fast[1] is not None


def test_window_longer_than_window_len_is_rejected():
    cfg, model = tiny_model("sleep.window_len=4")
    with pytest.raises(ValueError, match="sleep.window_len=4"):
        model.step_window(_tokens(1, 5), model.init_state(1))


def test_public_api_matches_readme():
    assert callable(sleeptrain.load_config) and callable(sleeptrain.build_model)
    cfg, model = tiny_model()
    state = model.init_state(2)
    logits, state = model.step_window(_tokens(2, 4), state, passes=2)
    assert logits.shape == (2, 4, 16) and state.position == 4
