"""Batched streaming sleep inference: many samples of different lengths per call.

A ``BatchedStream`` holds ``batch_size`` slots. Each slot's state lives in static buffers,
O(window) per slot whatever the context length: the GDN fast weights and conv states (and,
for sliding eviction, the conv state entering the window), one KV cache per attention block
of ``window_len`` slots (sliding: ``window_len - 1`` carry slots in front of them), the loop
range's wake outputs of the window's tokens (what its sleep passes start from), the window
fill and the position, per slot.

* ``prefill(prompts)``: the samples stream window by window together. Windows are aligned at
  multiples of L from each sample's start, so window w starts at position w L for every
  sample. Sorted longest first, the samples for which window w is not their last are a
  prefix of the batch: they run ``run_window`` (wake pass, N-1 sleep passes, eviction, the
  training code) as one batch. Samples whose last window is w run its wake pass only
  (``wake_blocks``), bucketed by that window's length, and their open window is written into
  their slots: it sleeps when a later token needs room, as in ``Stream``. Returns the logits
  at each sample's last token, in the given order.
* ``step(tokens)``: one token per slot. Slots whose window is full first sleep (N-1 loop-range
  passes over the window's wake outputs, ``_sleep``) and are evicted (``_evict``), grouped by
  window start, eagerly (once per L tokens per slot); which slots are full is known on the
  host from the lengths alone, no device sync. Then the token step runs every block once for
  all slots (``Block.decode``: per-row RoPE positions, the token's keys written into the KV
  cache at its slot, attention over the valid cache keys under a [B, S] mask), updates the
  state in place and returns the logits [B, V]. The token step allocates no state and has
  no host syncs or data-dependent branches, so on CUDA it is captured once as a CUDA graph
  for the fixed (batch, window) shape (``cuda_graph=True``) and replayed; on a CPU it runs
  eagerly.

Per sample, the logits and the state equal ``Stream``'s (tests/test_infer_batched.py): the
same operations on other batch sizes, so float rounding only.

With compiled chains (CUDA, ``train.compile``) every call whose shape follows the samples'
lengths runs them with symbolic shapes (``HybridModel.dynamic_kernels``): the last-window
wake passes and their logits (one call per last-window length and bucket size), full
windows that only a prefix of the batch still has, and the sleeps while decoding (one per
group of slots filling together). With static shapes each new shape compiled every chain
again (long-context suites have a new length in nearly every sample, and a ``fullgraph``
compile raises past its recompile limit). Full windows of the whole batch and the decode
step keep the static kernels of their one shape each.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sleeptrain.config import SleepConfig
from sleeptrain.model.hybrid import BlockContext, HybridModel
from sleeptrain.sleep.runner import _evict, _sleep, run_window, sleep_passes, wake_blocks
from sleeptrain.sleep.state import SleepState, initial_state

Prompt = Sequence[int] | torch.Tensor


def greedy(first_logits: torch.Tensor, max_new_tokens: int, eos_id: int | None,
           step: Any) -> torch.Tensor:
    """Greedy decoding from ``first_logits`` [B, V]: ``step(tokens [B])`` returns the next
    logits. Returns the new tokens [B, max_new_tokens] (after ``eos_id`` a row repeats it)."""
    batch = first_logits.shape[0]
    out = []
    logits = first_logits
    done = torch.zeros(batch, dtype=torch.bool, device=first_logits.device)
    for k in range(max_new_tokens):
        nxt = logits.argmax(-1)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        out.append(nxt)
        if k + 1 < max_new_tokens:
            logits = step(nxt)
    return torch.stack(out, 1) if out else torch.zeros(batch, 0, dtype=torch.long)


def _as_ids(p: Prompt, i: int, vocab: int) -> torch.Tensor:
    """Sample i's token ids as a 1-D CPU int64 tensor (checked)."""
    t = torch.as_tensor(p, dtype=torch.long) if not isinstance(p, torch.Tensor) else p
    if t.dim() != 1:
        raise ValueError(f"sample {i}: tokens must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"sample {i} is empty: every sample needs at least one token")
    t = t.to("cpu", torch.long)
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"sample {i}: token id {bad} outside the vocabulary [0, {vocab})")
    return t


def _rows(state: SleepState, a: int, b: int) -> SleepState:
    """Rows [a, b) of a batched state (views)."""
    return SleepState(
        fast=[None if s is None else s[a:b] for s in state.fast],
        conv=[None if c is None else c[a:b] for c in state.conv],
        kv=[None if kv is None else (kv[0][a:b], kv[1][a:b]) for kv in state.kv],
        position=state.position)


def streaming(method: Callable[..., Any]) -> Callable[..., Any]:
    """An engine method run with the model's RoPE tables in streaming mode
    (``RopeTables.streaming``: the positions it passed are not asked for again, so their
    tables are not kept and memory stays flat in the context length)."""
    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.net.rope.streaming():
            return method(self, *args, **kwargs)
    return run


def stream_settings(stream: Any, model: HybridModel, sleep_cfg: SleepConfig | None,
                    passes: int | None, device: torch.device | str | None) -> None:
    """The settings a streaming engine (``Stream``, ``BatchedStream``) keeps: ``net``, ``cfg``
    (the model's sleep settings unless given), ``passes`` (N, >= 1), ``L``, ``sliding``,
    ``device`` (the model's unless given)."""
    stream.net = model
    stream.cfg = sleep_cfg if sleep_cfg is not None else model.sleep_cfg
    stream.passes = int(stream.cfg.passes if passes is None else passes)
    if stream.passes < 1:
        raise ValueError(f"passes must be >= 1, got {stream.passes}")
    stream.L = int(stream.cfg.window_len)
    stream.sliding = stream.cfg.eviction == "sliding"
    stream.device = torch.device(device) if device is not None else model.embed.weight.device


class BatchedStream:
    """``batch_size`` samples streamed together with sleep (module docstring)."""

    def __init__(self, model: HybridModel, batch_size: int, sleep_cfg: SleepConfig | None = None,
                 passes: int | None = None, device: torch.device | str | None = None,
                 cuda_graph: bool = False, graph_warmup: int = 2):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        stream_settings(self, model, sleep_cfg, passes, device)
        self.carry_len = self.L - 1 if self.sliding else 0
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {self.device}")
        self.batch_size = batch_size
        self.cuda_graph, self.graph_warmup = bool(cuda_graph), int(graph_warmup)
        self.graph: Any = None
        self.graph_replays = 0
        self.eager_steps = 0
        self.windows_slept = 0
        self.lengths: list[int] = []
        self.fill: list[int] = []  # host mirror of fill_dev: tokens in each slot's window
        self.pos: list[int] = []  # host mirror of pos_dev: tokens consumed per slot
        self.buf: dict[str, Any] = {}

    # -- buffers -----------------------------------------------------------------------------
    def _alloc(self, conv: list[Any], kv: list[Any], h_loop: torch.Tensor) -> None:
        """The static buffers, shaped after the first window's tensors (zeros)."""
        B, dev, S = self.batch_size, self.device, self.carry_len + self.L
        net = self.net

        def zeros(like: torch.Tensor, *shape: int) -> torch.Tensor:
            return torch.zeros(B, *shape, dtype=like.dtype, device=dev)

        st = initial_state(net, B, dev)
        gdn, attn = net.gdn_blocks(), net.attention_blocks()
        self.buf = {
            "fast": st.fast,
            "conv": {i: zeros(conv[i], *conv[i].shape[1:]) for i in gdn},
            "conv_start": ({i: zeros(conv[i], *conv[i].shape[1:]) for i in gdn}
                           if self.sliding else {}),
            "k": {i: zeros(kv[i][0], S, *kv[i][0].shape[2:]) for i in attn},
            "v": {i: zeros(kv[i][1], S, *kv[i][1].shape[2:]) for i in attn},
            "h_loop": zeros(h_loop, self.L, h_loop.shape[-1]),
            "carry_valid": torch.zeros(B, dtype=torch.bool, device=dev),
            "fill": torch.zeros(B, dtype=torch.long, device=dev),
            "pos": torch.zeros(B, dtype=torch.long, device=dev),
            "tok": torch.zeros(B, dtype=torch.long, device=dev),
            "rows": torch.arange(B, device=dev),
            "slots": torch.arange(S, device=dev),
        }

    # -- prefill -----------------------------------------------------------------------------
    @streaming
    @torch.no_grad()
    def prefill(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """Streams every sample's context (window by window, with sleep); returns the wake-pass
        logits at each sample's last token [B, V], in the order given. ``len(prompts)`` must
        be the batch size; a stream is prefilled once."""
        if self.lengths:
            raise ValueError("this BatchedStream was prefilled already; make a new one")
        if len(prompts) != self.batch_size:
            raise ValueError(f"{len(prompts)} samples for a BatchedStream of batch_size "
                             f"{self.batch_size}")
        vocab = int(self.net.cfg.vocab_size)
        ids = [_as_ids(p, i, vocab) for i, p in enumerate(prompts)]
        L, B = self.L, self.batch_size
        order = sorted(range(B), key=lambda i: -ids[i].numel())  # longest first
        lens = [ids[i].numel() for i in order]
        n_win = [-(-n // L) for n in lens]
        state = initial_state(self.net, B, self.device)
        parts: list[tuple[list[int], torch.Tensor]] = []
        for w in range(n_win[0]):
            going = sum(n > w + 1 for n in n_win)  # rows [0, going): window w is not the last
            ending = sum(n > w for n in n_win)  # rows [going, ending): window w is the last
            r = going
            while r < ending:  # bucketed by the length of their last window
                e = r
                while e < ending and lens[e] == lens[r]:
                    e += 1
                toks = torch.stack([ids[order[j]][w * L:] for j in range(r, e)])
                parts.append((order[r:e], self._open(toks, _rows(state, r, e), w * L,
                                                     order[r:e])))
                r = e
            if going:
                toks = torch.stack([ids[order[j]][w * L:(w + 1) * L] for j in range(going)])
                # the whole batch: static kernels of its one shape; a prefix: any size
                shapes = (self.net.dynamic_kernels() if going < B
                          else contextlib.nullcontext())
                with shapes:
                    _, state = run_window(self.net, toks.to(self.device),
                                          _rows(state, 0, going), self.passes, self.cfg,
                                          want_logits=False, want_head=False)
                self.windows_slept += going
        out = torch.empty(B, parts[0][1].shape[-1], dtype=parts[0][1].dtype,
                          device=parts[0][1].device)
        for slots, lg in parts:
            out[torch.tensor(slots, device=out.device)] = lg
        self.lengths = [ids[i].numel() for i in range(B)]
        self.pos = list(self.lengths)
        self.fill = [n - (-(-n // L) - 1) * L for n in self.lengths]
        self.buf["fill"].copy_(torch.tensor(self.fill))
        self.buf["pos"].copy_(torch.tensor(self.pos))
        return out

    def _open(self, tokens: torch.Tensor, state: SleepState, start: int,
              slots: list[int]) -> torch.Tensor:
        """The wake pass of the last (open) window of the samples in ``slots``, tokens [r, l]
        starting at position ``start`` with incoming ``state``; writes the open window into
        their slots and returns the logits at its last token [r, V]."""
        net = self.net
        ctx = BlockContext(pos_start=start, window=self.L if self.sliding else None,
                           kv=list(state.kv) if self.sliding else [],
                           conv=list(state.conv) if self.sliding else [])
        with net.dynamic_kernels():  # a shape per last-window length: no compile per length
            h_loop, h, fast, extras = wake_blocks(
                net, net.embed_tokens(tokens.to(self.device)), state.fast, ctx)
            logits = net.full_logits(h[:, -1:])[:, 0]  # [r, V]: r varies with the bucket
        if not self.buf:
            self._alloc(extras, extras, h_loop)
        b, c, n = self.buf, self.carry_len, tokens.shape[1]
        idx = torch.tensor(slots, device=self.device)
        for i in net.gdn_blocks():
            b["fast"][i].index_copy_(0, idx, fast[i].to(b["fast"][i].dtype))
            b["conv"][i].index_copy_(0, idx, extras[i])
            if self.sliding and state.conv[i] is not None:
                b["conv_start"][i].index_copy_(0, idx, state.conv[i])
        for i in net.attention_blocks():
            k, v = extras[i]
            b["k"][i][idx, c:c + n] = k
            b["v"][i][idx, c:c + n] = v
            if self.sliding and state.kv[i] is not None:
                b["k"][i][idx, c - state.kv[i][0].shape[1]:c] = state.kv[i][0]
                b["v"][i][idx, c - state.kv[i][1].shape[1]:c] = state.kv[i][1]
        if self.sliding and start > 0:
            b["carry_valid"][idx] = True
        b["h_loop"][idx, :n] = h_loop
        return logits

    # -- decode ------------------------------------------------------------------------------
    @streaming
    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Appends one token per slot (``tokens`` [B] int64); returns the logits [B, V] of the
        wake pass at that token (with a CUDA graph: a static buffer, overwritten by the next
        step). Full windows sleep and are evicted first."""
        if not self.lengths:
            raise ValueError("step() before prefill(): the stream has no context yet")
        if tokens.dim() != 1 or tokens.shape[0] != self.batch_size:
            raise ValueError(f"tokens must be [{self.batch_size}] (one per sample), got "
                             f"{tuple(tokens.shape)}")
        full = [j for j in range(self.batch_size) if self.fill[j] == self.L]
        if full:
            self._sleep_and_evict(full)
        self.buf["tok"].copy_(tokens)
        if self.graph is None and self.cuda_graph and self.eager_steps >= self.graph_warmup:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            self.graph_replays += 1
            logits = self.buf["logits"]
        else:
            logits = self._token_step()
            self.eager_steps += 1
        self.fill = [f + 1 for f in self.fill]
        self.pos = [p + 1 for p in self.pos]
        return logits

    def _capture(self) -> None:
        """Captures the token step as a CUDA graph (after ``graph_warmup`` eager steps: kernel
        compilation, autotuning and cached masks happen outside capture). Capture records
        kernels without running them, so the state is untouched until the first replay; a
        capture that fails (an uncapturable kernel) turns graphs off with a warning and the
        stream goes on eagerly. The logits a replay returns are one static buffer."""
        state = self._state_tensors()
        ptrs = [t.data_ptr() for t in state]
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                logits = self._token_step()
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
            warnings.warn(f"BatchedStream: CUDA-graph capture of the decode step failed "
                          f"({type(e).__name__}: {e}); decoding eagerly", stacklevel=3)
            self.cuda_graph = False
            return
        if [t.data_ptr() for t in state] != ptrs:
            raise RuntimeError("BatchedStream: a state buffer was replaced during capture "
                               "instead of updated in place")
        self.graph, self.buf["logits"] = graph, logits

    def _state_tensors(self) -> list[torch.Tensor]:
        """Every static buffer the token step reads or writes."""
        out: list[torch.Tensor] = []
        for v in self.buf.values():
            vals = v.values() if isinstance(v, dict) else v if isinstance(v, list) else [v]
            out += [t for t in vals if isinstance(t, torch.Tensor)]
        return out

    def _key_keep(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot [B] where the token's keys go, key_keep [B, S]: the keys it attends to)."""
        b, c = self.buf, self.carry_len
        fill, slots = b["fill"][:, None], b["slots"][None, :]
        keep = (slots >= c) & (slots - c <= fill)  # the window's keys up to its own
        if c:  # sliding: the carry keys within L tokens of it
            keep = keep | ((slots < c) & (slots >= fill) & b["carry_valid"][:, None])
        return b["fill"] + c, keep

    def _token_step(self) -> torch.Tensor:
        """Every block once for one token per slot, state updated in place; logits [B, V].
        Reads only the static buffers (capturable)."""
        net, b = self.net, self.buf
        slot, keep = self._key_keep()
        h = net.embed_tokens(b["tok"][:, None])
        for i, blk in enumerate(net.blocks):
            attn = None
            if blk.kind == "attention":
                attn = (b["pos"], b["k"][i], b["v"][i], slot, keep)
            h, s_out, conv_out = blk.decode(h, b["fast"][i], b["conv"].get(i), attn)
            if s_out is not None:
                b["fast"][i].copy_(s_out)
                b["conv"][i].copy_(conv_out)
            if i == net.loop_end - 1:
                b["h_loop"].index_put_((b["rows"], b["fill"]), h[:, 0])
        b["fill"].add_(1)
        b["pos"].add_(1)
        return net.full_logits(h)[:, 0]

    def _sleep_and_evict(self, full: list[int]) -> None:
        """The full windows of slots ``full`` sleep (N-1 loop-range passes) and are evicted,
        grouped by window start (one batch each), written back into the buffers in place."""
        groups: dict[int, list[int]] = {}
        for j in full:
            groups.setdefault(self.pos[j] - self.L, []).append(j)
        for start, slots in sorted(groups.items()):
            self._sleep_group(start, slots)
            for j in slots:
                self.fill[j] = 0
        self.buf["fill"][torch.tensor(full, device=self.device)] = 0
        self.windows_slept += len(full)

    def _sleep_group(self, start: int, slots: list[int]) -> None:
        net, b, c, L = self.net, self.buf, self.carry_len, self.L
        idx = torch.tensor(slots, device=self.device)
        gdn, attn = net.gdn_blocks(), net.attention_blocks()
        first = start == 0  # nothing was carried into the stream's first window
        kv: list[Any] = [None] * net.depth
        conv: list[Any] = [None] * net.depth
        extras: list[Any] = [None] * net.depth
        for i in attn:
            if self.sliding and not first:
                kv[i] = (b["k"][i][idx, :c], b["v"][i][idx, :c])
            extras[i] = (b["k"][i][idx, c:], b["v"][i][idx, c:])
        for i in gdn:
            if self.sliding and not first:
                conv[i] = b["conv_start"][i][idx]
            extras[i] = b["conv"][i][idx]
        fast = [None if f is None else f[idx] for f in b["fast"]]
        ctx = BlockContext(pos_start=start, window=L if self.sliding else None,
                           kv=kv if self.sliding else [], conv=conv if self.sliding else [])
        with net.dynamic_kernels():  # a shape per group size: no compile per size
            fast = _sleep(net, b["h_loop"][idx], fast, ctx, sleep_passes(self.passes),
                          self.cfg)
            new = _evict(net, SleepState(fast=fast, conv=conv, kv=kv, position=start), fast,
                         extras, L, self.cfg.eviction, L)
        for i in gdn:
            b["fast"][i].index_copy_(0, idx, new.fast[i].to(b["fast"][i].dtype))
            if self.sliding:
                b["conv_start"][i].index_copy_(0, idx, new.conv[i])
            else:
                b["conv"][i].index_fill_(0, idx, 0)
        for i in attn:
            if self.sliding and new.kv[i] is not None:
                b["k"][i][idx, :c] = new.kv[i][0]
                b["v"][i][idx, :c] = new.kv[i][1]
        if self.sliding:
            b["carry_valid"][idx] = True

    # -- inspection --------------------------------------------------------------------------
    def sample_state(self, j: int) -> dict[str, Any]:
        """Slot j's state, trimmed to what is valid: fast weights and conv states per GDN
        block, the window's keys/values and loop-range outputs [fill, ...], the KV carry and
        the conv state entering the window (sliding), fill and position."""
        b, c, n = self.buf, self.carry_len, self.fill[j]
        valid = bool(b["carry_valid"][j]) if c else False
        return {
            "position": self.pos[j], "fill": n,
            "fast": {i: b["fast"][i][j] for i in self.net.gdn_blocks()},
            "conv": {i: b["conv"][i][j] for i in self.net.gdn_blocks()},
            "conv_start": ({i: t[j] for i, t in b["conv_start"].items()} if valid else {}),
            "kv": {i: (b["k"][i][j, c:c + n], b["v"][i][j, c:c + n]) for i in b["k"]},
            "carry": ({i: (b["k"][i][j, :c], b["v"][i][j, :c]) for i in b["k"]}
                      if valid else {}),
            "h_loop": b["h_loop"][j, :n],
        }

    @torch.no_grad()
    def generate(self, max_new_tokens: int, first_logits: torch.Tensor,
                 eos_id: int | None = None) -> torch.Tensor:
        """Greedy decoding from the logits of each sample's last token ([B, V]); returns the
        new tokens [B, max_new_tokens] (after ``eos_id`` a sample repeats ``eos_id``)."""
        if first_logits.shape[0] != self.batch_size:
            raise ValueError(f"first_logits must be [{self.batch_size}, V], got "
                             f"{tuple(first_logits.shape)}")
        return greedy(first_logits, max_new_tokens, eos_id, self.step)


def generate_batched(model: HybridModel, prompts: Sequence[Prompt],
                     max_new_tokens: int | Sequence[int], eos_id: int | None = None,
                     passes: int | None = None, batch_size: int = 32,
                     cuda_graph: bool = False) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token id lists or 1-D tensors), ``batch_size``
    samples per ``BatchedStream`` (longest first, so that a batch's lengths are close).
    ``max_new_tokens``: one for all or one per prompt. A sample's output stops at ``eos_id``.
    ``cuda_graph`` (CUDA models only) replays the decode step as a CUDA graph; off by
    default until its GPU test (graph vs eager) has passed."""
    n = len(prompts)
    if isinstance(max_new_tokens, int):
        budget = [max_new_tokens] * n
    else:
        budget = [int(m) for m in max_new_tokens]
        if len(budget) != n:
            raise ValueError(f"max_new_tokens has {len(budget)} entries for {n} prompts")
    if any(m < 0 for m in budget):
        raise ValueError(f"max_new_tokens must be >= 0, got {min(budget)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    vocab = int(model.cfg.vocab_size)
    ids = [_as_ids(p, i, vocab) for i, p in enumerate(prompts)]
    device = model.embed.weight.device
    order = sorted(range(n), key=lambda i: -ids[i].numel())
    results: list[list[int]] = [[] for _ in range(n)]
    for s in range(0, n, batch_size):
        part = order[s:s + batch_size]
        stream = BatchedStream(model, len(part), passes=passes, device=device,
                               cuda_graph=cuda_graph)
        first = stream.prefill([ids[i] for i in part])
        new = stream.generate(max(budget[i] for i in part), first, eos_id).tolist()
        for j, i in enumerate(part):
            seq = new[j][: budget[i]]
            if eos_id is not None and eos_id in seq:
                seq = seq[: seq.index(eos_id)]
            results[i] = seq
    return results


__all__ = ["BatchedStream", "generate_batched"]
