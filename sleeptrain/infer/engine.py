"""Streaming sleep inference: consume a context of any length window by window, then decode.

A ``Stream`` holds a batch of sequences that advance together (same length so far):

* ``feed(tokens)`` appends tokens. They enter the current window in chunks; when the window
  holds ``window_len`` tokens and more tokens come, the window sleeps (N-1 passes of the loop
  range, exactly as in training) and is evicted before the next token enters.
* Within a window, a chunk runs every block once with the state reached so far: the fast
  weights, the GDN conv states, and the keys/values of the window's earlier tokens (plus the
  sliding-eviction carry). Attention over the window's own keys is the window's KV cache; it
  is dropped at eviction, so memory is O(window) whatever the context length.
* The logits of a chunk are those of the wake pass over its tokens: a long context fed in
  one call gives the logits ``windowed_loss`` computes (tested), and ``generate`` decodes
  greedily with one single-token forward pass per new token.

``generate`` runs requests of any lengths together through ``sleeptrain.infer.batched``
(the same math, per-sample lengths in one batch, a static decode step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sleeptrain.config import SleepConfig
from sleeptrain.infer.batched import generate_batched, greedy, stream_settings, streaming
from sleeptrain.model.hybrid import BlockContext, HybridModel
from sleeptrain.sleep.runner import _evict, _sleep, sleep_passes, wake_blocks
from sleeptrain.sleep.state import SleepState, initial_state


@dataclass
class _Window:
    """The current, unfinished window: its entering state and what its tokens produced."""

    start: SleepState  # state entering the window (carry and position for sleep/eviction)
    fast: list[torch.Tensor | None]  # fast weights after the window's tokens so far
    conv: list[torch.Tensor | None]  # GDN conv states after those tokens
    kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    h_loop: list[torch.Tensor] = field(default_factory=list)  # loop-range outputs, per chunk
    n: int = 0  # tokens in the window


class Stream:
    """A batch of sequences consumed window by window with sleep (module docstring)."""

    def __init__(self, model: HybridModel, batch_size: int, sleep_cfg: SleepConfig | None = None,
                 passes: int | None = None, device: torch.device | str | None = None):
        stream_settings(self, model, sleep_cfg, passes, device)
        self.batch_size = batch_size
        st = initial_state(model, batch_size, self.device)
        self.win = _Window(start=st, fast=list(st.fast), conv=[None] * model.depth)
        self.windows_slept = 0

    @property
    def position(self) -> int:
        """Tokens consumed so far."""
        return self.win.start.position + self.win.n

    @streaming
    @torch.no_grad()
    def feed(self, tokens: torch.Tensor, want: str = "last") -> torch.Tensor | None:
        """Consumes tokens [B, t]; returns the wake-pass logits of every token ([B, t, V],
        ``want='all'``), of the last one ([B, V], ``'last'``) or nothing (``'none'``)."""
        if tokens.dim() != 2 or tokens.shape[0] != self.batch_size:
            raise ValueError(f"tokens must be [{self.batch_size}, t], got {tuple(tokens.shape)}")
        if want not in ("all", "last", "none"):
            raise ValueError(f"want must be 'all', 'last' or 'none', got {want!r}")
        tokens = tokens.to(self.device)
        outs = []
        s, t = 0, tokens.shape[1]
        while s < t:
            if self.win.n == self.L:
                self._sleep_and_evict()
            e = min(t, s + self.L - self.win.n)
            last_chunk = e == t
            h = self._advance(tokens[:, s:e], want == "all" or (want == "last" and last_chunk))
            if h is not None:
                outs.append(h if want == "all" else h[:, -1:])
            s = e
        if not outs:
            return None
        h = torch.cat(outs, dim=1)
        logits = self.net.full_logits(h)
        return logits if want == "all" else logits[:, -1]

    def _advance(self, tokens: torch.Tensor, want_hidden: bool) -> torch.Tensor | None:
        """Runs a chunk that fits in the current window; returns its final hidden states."""
        net, w = self.net, self.win
        kv: list[Any] = [None] * net.depth
        for i, blk in enumerate(net.blocks):
            if blk.kind != "attention":
                continue
            parts = ([w.start.kv[i]] if self.sliding and w.start.kv[i] is not None else [])
            parts += w.kv.get(i, [])
            if parts:
                kv[i] = (torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1))
        ctx = BlockContext(pos_start=self.position, window=self.L if self.sliding else None,
                           kv=kv, conv=list(w.conv))
        h_loop, h, fast, extras = wake_blocks(net, net.embed_tokens(tokens), w.fast, ctx)
        for i, blk in enumerate(net.blocks):
            extra = extras[i]
            if blk.kind == "attention":
                w.kv.setdefault(i, []).append(extra)
            elif blk.kind == "gdn":
                w.conv[i] = extra
        w.fast = fast
        w.h_loop.append(h_loop)
        w.n += tokens.shape[1]
        return h if want_hidden else None

    def _sleep_and_evict(self) -> None:
        """The full window sleeps (passes-1 loop-range passes), then eviction."""
        net, w = self.net, self.win
        start = w.start
        ctx = BlockContext(pos_start=start.position, window=self.L if self.sliding else None,
                           kv=list(start.kv) if self.sliding else [],
                           conv=list(start.conv) if self.sliding else [])
        fast = _sleep(net, torch.cat(w.h_loop, 1), w.fast, ctx, sleep_passes(self.passes),
                      self.cfg)
        extras: list[Any] = [None] * net.depth
        for i, blk in enumerate(net.blocks):
            if blk.kind == "attention" and i in w.kv:
                extras[i] = (torch.cat([p[0] for p in w.kv[i]], 1),
                             torch.cat([p[1] for p in w.kv[i]], 1))
            elif blk.kind == "gdn":
                extras[i] = w.conv[i]
        new = _evict(net, start, fast, extras, w.n, self.cfg.eviction, self.L)
        self.win = _Window(start=new, fast=list(new.fast),
                           conv=list(new.conv) if self.sliding else [None] * net.depth)
        self.windows_slept += 1

    @torch.no_grad()
    def generate(self, max_new_tokens: int, first_logits: torch.Tensor,
                 eos_id: int | None = None) -> torch.Tensor:
        """Greedy decoding from the logits of the last fed token ([B, V]); returns the new
        tokens [B, max_new_tokens] (after ``eos_id``, a sequence repeats ``eos_id``)."""
        return greedy(first_logits, max_new_tokens, eos_id,
                      lambda nxt: self.feed(nxt[:, None], want="last"))


def generate(model: HybridModel, prompts: list[list[int]], max_new_tokens: int | list[int],
             eos_id: int | None = None, passes: int | None = None, batch_size: int = 32,
             cuda_graph: bool = False) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token id lists) with streaming sleep inference:
    ``batch_size`` prompts of any lengths per batch (``sleeptrain.infer.batched``), the decode
    step a CUDA graph with ``cuda_graph`` (CUDA only). ``max_new_tokens``: one for all or
    one per prompt. A sequence's output stops at ``eos_id``."""
    return generate_batched(model, prompts, max_new_tokens, eos_id=eos_id, passes=passes,
                            batch_size=batch_size, cuda_graph=cuda_graph)


__all__ = ["Stream", "generate"]
