"""Streaming inference: chunked feeding equals the training-time window computation, decoding
equals plain greedy decoding where no window is evicted, memory stays O(window)."""

from __future__ import annotations

import pytest
import torch

from sleeptrain.infer import Stream, generate
from sleeptrain.sleep import windowed_loss
from tests.conftest import tiny_model

L = 6


def _tokens(b: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 16, (b, t), generator=torch.Generator().manual_seed(seed))


def _window_logits(model, tokens, passes):
    """Wake-pass logits by composing step_window (equal to windowed_loss, tested elsewhere)."""
    state = model.init_state(tokens.shape[0])
    starts = list(range(0, tokens.shape[1], L))
    outs = []
    for w, s in enumerate(starts):
        n = 1 if w == len(starts) - 1 else passes
        logits, state = model.step_window(tokens[:, s : s + L], state, passes=n)
        outs.append(logits)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("chunk", [1, 4, 6, 100])
def test_stream_logits_equal_window_logits(eviction, chunk):
    cfg, model = tiny_model(f"sleep.eviction={eviction}", f"sleep.window_len={L}",
                            "sleep.passes=3", "model.pattern=GaMgA", "model.loop_start=1",
                            "model.loop_end=4")
    tokens = _tokens(2, 5 * L + 2, seed=1)
    with torch.no_grad():
        ref = _window_logits(model, tokens, 3)
        stream = Stream(model, 2)
        got = torch.cat([stream.feed(tokens[:, s : s + chunk], want="all")
                         for s in range(0, tokens.shape[1], chunk)], dim=1)
    # The same operations up to chunking of the recurrences: float64 rounding only.
    assert (got - ref).abs().max().item() <= 1e-10
    assert stream.windows_slept == 5
    # and the loss from those logits is windowed_loss's
    full = torch.cat([tokens, tokens[:, :1]], 1)
    with torch.no_grad():
        out = windowed_loss(model, full, torch.ones_like(full), cfg.sleep)
    ce = torch.nn.functional.cross_entropy(got.reshape(-1, 16), full[:, 1:].reshape(-1))
    assert abs(ce.item() - out.loss.item()) <= 1e-10


def test_generation_without_eviction_is_plain_greedy():
    cfg, model = tiny_model("sleep.window_len=64", "sleep.passes=1")
    prompt = _tokens(1, 9, seed=2)[0].tolist()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):  # plain greedy: the whole sequence through the model each time
            logits = model.forward_parallel(torch.tensor([seq]), window_len=64)
            seq.append(int(logits[0, -1].argmax()))
    assert generate(model, [prompt], 12) == [seq[len(prompt):]]


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_generation_through_evictions_matches_recomputation(eviction):
    # Decoding across several window fills equals recomputing the whole sequence window by
    # window (with sleep) for every new token.
    cfg, model = tiny_model(f"sleep.eviction={eviction}", f"sleep.window_len={L}",
                            "sleep.passes=2")
    prompt = _tokens(1, 8, seed=3)[0].tolist()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            logits = _window_logits(model, torch.tensor([seq]), 2)
            seq.append(int(logits[0, -1].argmax()))
    assert generate(model, [prompt], 10) == [seq[len(prompt):]]


def test_mixed_length_requests_equal_single_requests():
    cfg, model = tiny_model(f"sleep.window_len={L}", "sleep.passes=2")
    prompts = [_tokens(1, n, seed=n)[0].tolist() for n in (3, 11, 11, 14)]
    batched = generate(model, prompts, 7)
    single = [generate(model, [p], 7)[0] for p in prompts]
    assert batched == single


def test_eos_stops_a_sequence():
    cfg, model = tiny_model(f"sleep.window_len={L}")
    prompt = _tokens(1, 5, seed=4)[0].tolist()
    free = generate(model, [prompt], 8)[0]
    eos = free[2]
    cut = generate(model, [prompt], 8, eos_id=eos)[0]
    assert cut == free[: free.index(eos)]


def test_stream_state_is_bounded_by_the_window():
    # The engine keeps only the current window: after any number of windows, the KV it
    # holds is at most one window (+ the carry), independent of the context length.
    cfg, model = tiny_model("sleep.eviction=sliding", f"sleep.window_len={L}")
    stream = Stream(model, 1)
    for n in range(1, 40):
        stream.feed(_tokens(1, 1, seed=n))
        held = sum(k.shape[1] for parts in stream.win.kv.values() for k, _ in parts)
        n_attn = sum(b.kind == "attention" for b in model.blocks)
        assert held <= n_attn * L
        carry = [kv for kv in stream.win.start.kv if kv is not None]
        assert all(k.shape[1] <= L - 1 for k, _ in carry)


def test_bad_input_is_named():
    cfg, model = tiny_model(f"sleep.window_len={L}")
    stream = Stream(model, 2)
    with pytest.raises(ValueError, match=r"tokens must be \[2, t\]"):
        stream.feed(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 3)
