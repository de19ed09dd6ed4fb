"""Packed documents: the state (fast weights, conv state, KV carry) is reset at a document start,
so no document's tokens influence another's logits."""

from __future__ import annotations

import pytest
import torch

from sleeptrain.sleep import windowed_loss
from tests.conftest import tiny_model

L = 6


def _tokens(b: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 16, (b, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens, doc_starts, passes):
    """Wake-pass logits of every position, composing step_window with resets."""
    state = model.init_state(tokens.shape[0])
    starts = list(range(0, tokens.shape[1], L))
    outs = []
    for w, s in enumerate(starts):
        n = 1 if w == len(starts) - 1 else passes
        reset = doc_starts[:, w] if w > 0 else None
        logits, state = model.step_window(tokens[:, s : s + L], state, passes=n, reset=reset)
        outs.append(logits)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("passes", [1, 3])
def test_packed_document_is_isolated(eviction, passes):
    # Row 0 packs document A (windows 0-1) and document B (windows 2-3); row 1 is one document.
    cfg, model = tiny_model(f"sleep.eviction={eviction}", f"sleep.window_len={L}",
                            f"sleep.passes={passes}")
    tokens = _tokens(2, 4 * L, seed=3)
    starts = torch.zeros(2, 4, dtype=torch.bool)
    starts[0, 2] = True
    other = tokens.clone()
    other[0, : 2 * L] = _tokens(1, 2 * L, seed=4)  # a different document A
    with torch.no_grad():
        ref = _logits(model, tokens, starts, passes)
        got = _logits(model, other, starts, passes)
        alone = _logits(model, tokens[:1, 2 * L :], starts[:1, :2], passes)
        leak = _logits(model, other, torch.zeros_like(starts), passes)
        ref_noreset = _logits(model, tokens, torch.zeros_like(starts), passes)
    # Document B's logits do not see document A. Exact in exact arithmetic; 1e-12 leaves room
    # for the order of float64 sums inside fused CPU attention kernels.
    assert (got[0, 2 * L :] - ref[0, 2 * L :]).abs().max().item() <= 1e-12
    # ... and equal B processed alone from a fresh state (positions shift by 2L: RoPE is
    # relative, so only rounding differs; float64, 1e-10).
    assert (alone[0] - ref[0, 2 * L :]).abs().max().item() <= 1e-10
    # Row 1 (no reset) is untouched by row 0's reset.
    assert torch.equal(ref[1], ref_noreset[1])
    # Control: without the reset, document A does leak into B.
    assert (leak[0, 2 * L :] - ref_noreset[0, 2 * L :]).abs().max().item() > 1e-6


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_windowed_loss_with_doc_starts_matches_step_window(eviction):
    cfg, model = tiny_model(f"sleep.eviction={eviction}", f"sleep.window_len={L}",
                            "sleep.passes=2")
    tokens = _tokens(3, 3 * L + 1, seed=5)
    mask = torch.ones_like(tokens)
    starts = torch.tensor([[False, True, False], [False, False, True], [False, False, False]])
    with torch.no_grad():
        out = windowed_loss(model, tokens, mask, cfg.sleep, doc_starts=starts)
        plain = windowed_loss(model, tokens, mask, cfg.sleep)
        logits = _logits(model, tokens[:, :-1], starts, 2)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), tokens[:, 1:].reshape(-1))
    assert abs(out.loss.item() - ce.item()) <= 1e-12
    assert abs(out.loss.item() - plain.loss.item()) > 1e-6


def test_doc_reset_gradient_does_not_cross(eviction="sliding"):
    # The loss on document B has zero gradient w.r.t. document A's input embeddings.
    tokens = _tokens(1, 3 * L + 1, seed=6)
    cfg, model = tiny_model(f"sleep.eviction={eviction}", f"sleep.window_len={L}",
                            "sleep.passes=2", "sleep.checkpoint=false")
    mask = torch.zeros_like(tokens)
    mask[0, L + 1 :] = 1  # targets only in document B (windows 1-2)
    starts = torch.tensor([[False, True, False]])
    grads = []

    def keep(_mod, _inp, out):
        out.retain_grad()
        grads.append(out)

    handle = model.embed.register_forward_hook(keep)
    try:
        windowed_loss(model, tokens, mask, cfg.sleep, doc_starts=starts).loss.backward()
    finally:
        handle.remove()
    assert len(grads) == 1  # one lookup for the whole sequence, split into windows
    g = grads[0].grad
    assert g is not None
    assert g[:, :L].abs().max().item() == 0.0  # window 0 = document A
    assert g[:, L:].abs().max().item() > 0.0


def test_doc_starts_shape_error():
    cfg, model = tiny_model(f"sleep.window_len={L}")
    tokens = _tokens(2, 2 * L + 1, seed=7)
    with pytest.raises(ValueError, match="doc_starts must be a bool tensor"):
        windowed_loss(model, tokens, torch.ones_like(tokens), cfg.sleep,
                      doc_starts=torch.zeros(2, 3, dtype=torch.bool))
