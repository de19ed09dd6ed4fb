"""One pipeline stage's share of the sleep loop: its visits' forwards and backwards.

A stage holds blocks [lo, hi) (``HybridModel(stage=...)``). ``StageRunner`` runs the visits of
``sleeptrain.parallel.schedule.visit_chain`` that fall on it, for several micro-batches at
once, with plain tensors in and out; the pipeline runtime moves the hidden states between
stages. What each visit computes is what ``run_window`` computes for those blocks:

- ``wake`` (window w): the incoming state of the stage's layers (reset for sequences where a
  document starts), blocks [lo, hi) over the received hidden states (stage 0: the window's
  token embeddings, looked up once per micro-batch as ``windowed_loss`` does), the hidden
  state after block b-1 (``loop`` slot) when the window sleeps, the output head and the
  masked loss sum on the last stage, and the stage's part of the eviction (conv state and KV
  carry from the wake pass under sliding eviction);
- ``sleep`` (window w, pass p): the stage's part of the loop range over the received hidden
  states with the fast weights of pass p-1, the window's incoming conv state and KV carry;
- ``sleeps``: all passes of a loop range that lies on this stage (``runner._sleep``: every
  gradient mode, per-pass activation checkpointing).

Every visit's inputs are detached leaves (the received hidden state, the state tensors it
reads) and its outputs are kept with their graph, so that its backward is
``torch.autograd.backward(outputs, gradients)``: the gradients of its hidden-state outputs
(from the consumers' backwards, summed by the caller), of its state outputs (the ``.grad``
the later visits of this stage left on the leaves they read) and of the loss (1 / denom).
No graph spans two visits. With ``sleep.checkpoint`` every visit is recomputed in its
backward (``runner._maybe_checkpoint``), so a stage keeps only boundary tensors between
forward and backward. Gradient modes over a loop range split across stages: ``full``;
``truncated`` (the free passes run without gradient); ``implicit/phantom`` (the gradient at
the entry of the first unrolled pass is handed unchanged to the wake pass's outputs: the hidden
state by the caller, the fast weights here); ``implicit/neumann`` needs the loop range on one
stage (``sleeps``). ``detach_every`` cuts the state between windows as ``windowed_loss`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from sleeptrain.config import SleepConfig
from sleeptrain.model.hybrid import BlockContext, HybridModel
from sleeptrain.sleep.runner import (
    _evict,
    _maybe_checkpoint,
    _reset_state,
    _sleep,
    _window_embeddings,
    _window_has,
    _window_resets,
    sleep_passes,
)
from sleeptrain.sleep.state import SleepState, initial_state


class VisitLike(Protocol):
    """What a stage needs to know of a visit (``sleeptrain.parallel.schedule.Visit``)."""

    index: int
    stage: int
    kind: str
    window: int
    pass_: int
    lo: int
    hi: int
    grad: bool
    n_sleep: int
    h_src: tuple[int, str] | None
    h_grad_dst: tuple[int, str] | None


def free_passes(sleep_cfg: SleepConfig, n_sleep: int) -> tuple[int, bool]:
    """(leading sleep passes of a window run without gradient, whether their gradient is
    handed through unchanged) for a loop range split over stages: truncated and
    implicit/phantom run the first n - k passes under no_grad (phantom then hands the
    gradient at pass n - k + 1's entry to the wake pass), full none. implicit/neumann is
    refused there (``check_pipeline``)."""
    if sleep_cfg.grad_mode == "full" or n_sleep <= 0:
        return 0, False
    free = max(0, n_sleep - int(sleep_cfg.grad_passes))
    return free, sleep_cfg.grad_mode == "implicit"


def check_pipeline(sleep_cfg: SleepConfig, loop_split: bool) -> None:
    """ValueError naming the setting a loop range split over pipeline stages cannot run."""
    if loop_split and sleep_cfg.grad_mode == "implicit" and \
            sleep_cfg.implicit_method == "neumann":
        raise ValueError(
            "sleep.implicit_method=neumann (sleep.grad_mode=implicit) needs the loop range on "
            "one pipeline stage: its vector-Jacobian products over the loop range are not "
            "composed across stages. Use implicit_method=phantom or grad_mode=truncated, or "
            "a parallel.pp_split that keeps the loop range in one stage")


@dataclass
class _Record:
    """What a visit's backward needs: outputs with their graph, the leaves it created."""

    h_in: torch.Tensor | None = None
    h_outs: dict[str, torch.Tensor] = field(default_factory=dict)
    state_outs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    loss: torch.Tensor | None = None
    aliases: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class _Micro:
    """One micro-batch on this stage: its windows and the state of the stage's layers."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    starts: list[int]
    heads: list[bool]
    resets: list[torch.Tensor | None]
    state: SleepState
    embedded: list[torch.Tensor | None]
    window_in: dict[int, SleepState] = field(default_factory=dict)
    after_wake: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)
    records: dict[int, _Record] = field(default_factory=dict)
    embed_outs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    loss_sum: torch.Tensor | None = None
    n_correct: torch.Tensor | None = None


def _leaf(t: torch.Tensor | None, rec: _Record | None) -> torch.Tensor | None:
    """A detached copy of state tensor ``t`` for the visits that read it; the pair is kept in
    ``rec`` so that the producer's backward gets the leaf's gradient."""
    if t is None:
        return None
    leaf = t.detach().requires_grad_(t.requires_grad)
    if rec is not None and t.requires_grad:
        rec.state_outs.append((t, leaf))
    return leaf


class StageRunner:
    """The visits of one pipeline stage for the micro-batches of one step (module docstring).

    ``add(m, tokens, loss_mask, doc_starts, heads)`` registers micro-batch m ([B, T] rows, as
    ``windowed_loss`` takes them); ``forward(m, visit, h_in)`` returns the visit's hidden
    outputs by slot; ``backward(m, visit, grads)`` takes their gradients by slot and returns
    the gradient of the received hidden state (None where it has none). ``denom`` scales the
    loss (the trainer's global token count).
    """

    def __init__(self, net: HybridModel, sleep_cfg: SleepConfig, passes: int,
                 denom: float | torch.Tensor = 1.0, static_resets: bool = False):
        self.net, self.cfg, self.passes = net, sleep_cfg, int(passes)
        self.lo, self.hi = net.stage_blocks
        self.first, self.last = self.lo == 0, self.hi == net.depth
        self.denom = denom
        self.static = static_resets
        self.micros: dict[int, _Micro] = {}
        self.ldt = torch.float64 if net.dtype == torch.float64 else torch.float32

    def add(self, m: int, tokens: torch.Tensor, loss_mask: torch.Tensor,
            doc_starts: torch.Tensor | None = None, heads: Sequence[bool] | None = None) -> None:
        """Registers micro-batch ``m`` (tokens, loss_mask [B, T]; doc_starts [B, windows])."""
        L = self.cfg.window_len
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        t_in = inputs.shape[1]
        starts = list(range(0, t_in, L))
        self.micros[m] = _Micro(
            inputs=inputs, targets=targets, mask=loss_mask[:, 1:].to(self.ldt), starts=starts,
            heads=_window_has(heads, loss_mask, L, len(starts)),
            resets=_window_resets(doc_starts, tokens.shape[0], len(starts), t_in, L,
                                  self.static, tokens.device),
            state=initial_state(self.net, tokens.shape[0], tokens.device),
            embedded=[None] * len(starts))

    def window_sleeps(self, m: int) -> list[int]:
        """Sleep passes of each window of micro-batch m (the last window none)."""
        n = len(self.micros[m].starts)
        return [sleep_passes(self.passes, w == n - 1) for w in range(n)]

    def hidden_shape(self, m: int, window: int) -> tuple[int, ...]:
        """The shape of a hidden state crossing stages in ``window`` of micro-batch m:
        [B, l, d], or this rank's [ceil(B l / tp), d] tokens under sequence parallelism."""
        mc = self.micros[m]
        b, length = mc.inputs.shape[0], self._length(mc, window)
        d = self.net.cfg.d_model
        if self.net.sp:
            return (-(-b * length // self.net.tp), d)
        return (b, length, d)

    def _length(self, mc: _Micro, w: int) -> int:
        return min(mc.starts[w] + self.cfg.window_len, mc.inputs.shape[1]) - mc.starts[w]

    def _ctx(self, mc: _Micro, w: int, state: SleepState,
             kv_keep: torch.Tensor | None) -> BlockContext:
        sliding = self.cfg.eviction == "sliding"
        b = mc.inputs.shape[0]
        return BlockContext(
            pos_start=state.position, window=self.cfg.window_len if sliding else None,
            kv=list(state.kv) if sliding else [], conv=list(state.conv) if sliding else [],
            kv_keep=kv_keep if sliding else None,
            sp_shape=(b, self._length(mc, w)) if self.net.sp else None)

    def forward(self, m: int, v: VisitLike, h_in: torch.Tensor | None
                ) -> dict[str, torch.Tensor]:
        """Runs visit ``v`` of micro-batch m on ``h_in`` (received; None on stage 0's wake);
        returns its hidden outputs by slot (``out``, ``loop``)."""
        mc = self.micros[m]
        rec = _Record()
        if h_in is not None:
            rec.h_in = h_in.detach().requires_grad_(v.h_grad_dst is not None)
        mc.records[v.index] = rec
        grad = torch.is_grad_enabled() and v.grad
        with torch.set_grad_enabled(grad):
            if v.kind == "wake":
                self._wake(mc, v, rec)
            elif v.kind == "sleep":
                self._sleep_pass(mc, v, rec)
            else:
                self._sleeps(mc, v, rec)
        if not grad:
            mc.records.pop(v.index)
        return dict(rec.h_outs)

    def _window_start(self, mc: _Micro, w: int, rec: _Record) -> torch.Tensor | None:
        """The window's embeddings (stage 0: one lookup per micro-batch at window 0) and the
        state entering it (detached after every ``detach_every``-th window)."""
        k = int(self.cfg.detach_every)
        if k and w > 0 and w % k == 0:
            mc.state = mc.state.detach()
        mc.window_in[w] = mc.state
        if not self.first:
            return None
        if w == 0:
            pieces = _window_embeddings(self.net, mc.inputs, self.cfg.window_len,
                                        len(mc.starts))
            mc.embedded = [None if p is None else (p if i == 0 else _leaf(p, None))
                           for i, p in enumerate(pieces)]
            mc.embed_outs = [(p, e) for p, e in zip(pieces[1:], mc.embedded[1:], strict=True)
                             if p is not None and p.requires_grad]
        return mc.embedded[w]

    def _wake(self, mc: _Micro, v: VisitLike, rec: _Record) -> None:
        w, net = v.window, self.net
        s, e = mc.starts[w], mc.starts[w] + self._length(mc, w)
        embedded = self._window_start(mc, w, rec)
        state, kv_keep = mc.state, None
        if mc.resets[w] is not None:
            state, kv_keep = _reset_state(state, mc.resets[w], mc.inputs.shape[0],
                                          mc.inputs.device)
        ctx = self._ctx(mc, w, state, kv_keep)
        head = self.last and mc.heads[w]
        tgt = mc.targets[:, s:e] if head else None
        msk = mc.mask[:, s:e] if head else None
        tokens = mc.inputs[:, s:e]

        def fn(h, fast_in, kv, conv, tgt, msk):
            c = BlockContext(ctx.pos_start, ctx.window, None, kv, conv, ctx.kv_keep, ctx.sp_shape)
            if h is None:
                h = net.embed_tokens(tokens, c.sp_shape)
            return _stage_wake(net, h, fast_in, c, (v.lo, v.hi), head, tgt, msk)

        h0 = rec.h_in if rec.h_in is not None else embedded
        h_loop, h, fast, extras, loss_sum, n_correct = _maybe_checkpoint(
            bool(self.cfg.checkpoint), fn, h0, state.fast, ctx.kv, ctx.conv, tgt, msk)
        new = _evict(net, state, fast, extras, e - s, self.cfg.eviction, self.cfg.window_len)
        if not self.last:
            rec.h_outs["out"] = h
        if h_loop is not None and v.n_sleep > 0:
            rec.h_outs["loop"] = h_loop
        if loss_sum is not None:
            rec.loss = loss_sum
            mc.loss_sum = loss_sum.detach() if mc.loss_sum is None else \
                mc.loss_sum + loss_sum.detach()
            mc.n_correct = n_correct if mc.n_correct is None else mc.n_correct + n_correct
        mc.state = self._keep(new, rec)
        mc.after_wake[w] = list(mc.state.fast)

    def _keep(self, state: SleepState, rec: _Record) -> SleepState:
        """The stage's state as leaves for the visits that read it next."""
        return SleepState(
            fast=[_leaf(t, rec) for t in state.fast], conv=[_leaf(t, rec) for t in state.conv],
            kv=[None if kv is None else (_leaf(kv[0], rec), _leaf(kv[1], rec))
                for kv in state.kv],
            position=state.position)

    def _sleep_ctx(self, mc: _Micro, w: int) -> BlockContext:
        """The context of window w's sleep passes: the state entering the window (conv
        state reset where a document starts, recomputed here so that no graph spans two
        visits), the same KV carry and position as the wake pass."""
        state, kv_keep = mc.window_in[w], None
        if mc.resets[w] is not None:
            state, kv_keep = _reset_state(state, mc.resets[w], mc.inputs.shape[0],
                                          mc.inputs.device)
        return self._ctx(mc, w, state, kv_keep)

    def _pass_fast(self, mc: _Micro, v: VisitLike, rec: _Record) -> list[torch.Tensor | None]:
        """The fast weights entering sleep pass ``v.pass_``; at the first unrolled pass of
        implicit/phantom, fresh leaves whose gradient goes to the wake pass's outputs."""
        fast = list(mc.state.fast)
        free, phantom = free_passes(self.cfg, v.n_sleep)
        if phantom and free and v.pass_ == free + 1 and v.grad:
            woke = mc.after_wake[v.window]
            for i in range(v.lo, v.hi):
                if fast[i] is not None:
                    fast[i] = fast[i].detach().requires_grad_(True)
                    if woke[i] is not None and woke[i].requires_grad:
                        rec.aliases.append((fast[i], woke[i]))
        return fast

    def _sleep_pass(self, mc: _Micro, v: VisitLike, rec: _Record) -> None:
        net, ctx = self.net, self._sleep_ctx(mc, v.window)
        fast = self._pass_fast(mc, v, rec)
        gdn = [i for i in range(v.lo, v.hi) if fast[i] is not None]

        def fn(h, *s):
            f = list(fast)
            for i, t in zip(gdn, s, strict=True):
                f[i] = t
            h, f, _ = net.run_blocks(h, v.lo, v.hi, f, ctx)
            return (h, *[f[i] for i in gdn])

        h, *s_out = _maybe_checkpoint(bool(self.cfg.checkpoint), fn, rec.h_in,
                                      *[fast[i] for i in gdn])
        rec.h_outs["out"] = h
        state = mc.state
        new_fast = list(state.fast)
        for i, t in zip(gdn, s_out, strict=True):
            new_fast[i] = _leaf(t, rec)
        mc.state = SleepState(new_fast, state.conv, state.kv, state.position)

    def _sleeps(self, mc: _Micro, v: VisitLike, rec: _Record) -> None:
        ctx = self._sleep_ctx(mc, v.window)
        state = mc.state
        fast = _sleep(self.net, rec.h_in, list(state.fast), ctx, v.n_sleep, self.cfg)
        new_fast = [_leaf(t, rec) if v.lo <= i < v.hi else t for i, t in enumerate(fast)]
        mc.state = SleepState(new_fast, state.conv, state.kv, state.position)

    def backward(self, m: int, v: VisitLike, grads: dict[str, torch.Tensor | None]
                 ) -> torch.Tensor | None:
        """The backward of visit ``v`` of micro-batch m given its hidden outputs' gradients
        by slot (missing: none); returns the gradient of its received hidden state."""
        mc = self.micros[m]
        rec = mc.records.pop(v.index)
        outs: list[torch.Tensor] = []
        gs: list[torch.Tensor] = []
        for slot, t in rec.h_outs.items():
            g = grads.get(slot)
            if g is not None and t.requires_grad:
                outs.append(t)
                gs.append(g)
        for t, leaf in rec.state_outs:
            if leaf.grad is not None:
                outs.append(t)
                gs.append(leaf.grad)
        if rec.loss is not None and rec.loss.requires_grad:
            outs.append(rec.loss)
            gs.append(torch.ones_like(rec.loss) / self.denom)
        if v.kind == "wake" and v.window == 0 and self.first:
            for p, e in mc.embed_outs:
                if e.grad is not None:
                    outs.append(p)
                    gs.append(e.grad)
            mc.embed_outs = []
        if outs:
            torch.autograd.backward(outs, gs)
        for src, dst in rec.aliases:
            if src.grad is not None:
                dst.grad = src.grad if dst.grad is None else dst.grad + src.grad
        if v.kind == "wake" and v.window == 0:
            self._drop(mc)
        return None if rec.h_in is None else rec.h_in.grad

    def _drop(self, mc: _Micro) -> None:
        """Frees what the micro-batch held once its last backward on this stage ran."""
        mc.window_in.clear()
        mc.after_wake.clear()
        mc.embedded = []

    def results(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(sum of masked token losses in float64, number of correct targets) over the
        micro-batches (None off the last stage)."""
        loss = correct = None
        if self.last:
            dev = self.net.device
            loss = torch.zeros((), dtype=torch.float64, device=dev)
            correct = torch.zeros((), dtype=torch.int64, device=dev)
            for mc in self.micros.values():  # in float64 per micro-batch, as the trainer
                if mc.loss_sum is not None:
                    loss += mc.loss_sum.double()
                    correct += mc.n_correct
        return loss, correct


def _stage_wake(net: HybridModel, h: torch.Tensor, fast: list[torch.Tensor | None],
                ctx: BlockContext, blocks: tuple[int, int], head: bool,
                targets: torch.Tensor | None, mask: torch.Tensor | None) -> tuple[Any, ...]:
    """The wake pass over blocks [lo, hi) of h [B, l, d]: (h after block b-1 when it lies in
    the range, else None; the last h; fast weights; per-block extras; the masked
    cross-entropy sum and the correct count when ``head``, else None)."""
    lo, hi = blocks
    b = net.loop_end
    h_loop = None
    if lo < b <= hi:
        h, fast, ex0 = net.run_blocks(h, lo, b, fast, ctx)
        h_loop = h
        h, fast, ex1 = net.run_blocks(h, b, hi, fast, ctx)
        extras = [x if x is not None else y for x, y in zip(ex0, ex1, strict=True)]
    else:
        h, fast, extras = net.run_blocks(h, lo, hi, fast, ctx)
    loss_sum = n_correct = None
    if head:
        local = net.logits(h, ctx.sp_shape)
        ce = net.cross_entropy(local, targets)
        loss_sum = (ce * mask).sum()
        preds = net.argmax(local.detach())
        n_correct = ((preds == targets) & (mask > 0)).sum()
    return h_loop, h, fast, extras, loss_sum, n_correct


__all__ = ["StageRunner", "VisitLike", "check_pipeline", "free_passes"]
