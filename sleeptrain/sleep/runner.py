"""Windows, eviction, wake and sleep passes, gradient modes (DESIGN.md section 1).

One window, in order: (1) wake pass: embed the window and run every block once with the
incoming state; logits (and the loss) come from this pass only. (2) sleep: if another window
follows, run the loop range [a, b) N-1 more times, pass n taking the loop range's output
hidden states and fast weights of pass n-1. (3) evict: ``hard`` keeps only the fast weights;
``sliding`` also keeps the GDN conv state and the last L-1 keys/values of the wake pass.

Gradient modes for the sleep passes (the wake pass always carries gradient):

- ``full``: backpropagation through every pass and every window (full BPTT).
- ``truncated`` (k = ``grad_passes``): the first N-1-k sleep passes of a window run under
  no_grad, so the gradient is that of full BPTT with the hidden states and fast weights
  entering sleep pass N-k treated as constants. k >= N-1 is exactly ``full``. With k < N-1
  this also cuts the gradient path through the state into earlier windows at every window
  that sleeps (as in Huginn's truncated recurrence).
- ``implicit``: the sleep passes are a fixed-point iteration z <- F(z) of z = (h, S) over the
  loop range; the forward runs under no_grad and the memory held for backward does not grow
  with N. ``neumann`` (m = ``neumann_terms``): with g the gradient at the last iterate z_N and
  J = dF/dz at z_{N-1}, the parameter (and KV-carry/conv-state) gradient is that of the last
  pass applied to sum_{j<m} (J^T)^j g, and the gradient handed to the wake pass (and so to
  earlier windows) is (J^T)^m g: full BPTT with every Jacobian frozen at the last iterate and
  the series cut after m terms (m is clipped to N-1; exact for N = 2). ``phantom``
  (k = ``grad_passes``): the last k passes are unrolled with gradient from the no_grad iterate
  z_{N-k}, and the gradient reaching z_{N-k} is handed to the wake pass unchanged
  (Jacobian-free: dz_{N-k}/dz_1 taken as the identity). k >= N-1 is exactly ``full``.

``detach_every`` K > 0 detaches the state after every K-th window in any mode.
With ``checkpoint`` on, each window-pass keeps only its boundary tensors (hidden states
entering the pass, the state, the KV carry) and is recomputed in backward.

Context parallelism (``context_parallel=True`` with a model built with a CP group of C > 1
ranks): every window (every pass) runs on this rank's contiguous chunk of its tokens
(``HybridModel.window_chunks``); the mixers exchange what crosses chunks, the state after the
window is the whole window's and the same on every rank, and the loss sums are this rank's
chunk's (the caller sums them, and the gradients, over the CP group). A window shorter than
C runs whole on every rank, its targets counted on CP rank 0 only. Every mode above works
unchanged: all ranks run the same collectives in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from sleeptrain.config import SleepConfig
from sleeptrain.model.hybrid import BlockContext, HybridModel, WindowChunks
from sleeptrain.model.kernels import linear as fused_linear
from sleeptrain.sleep.state import SleepState, initial_state


@dataclass
class WindowOutput:
    """What the wake pass of one window produced.

    logits: full-vocabulary logits [B, l, V] (only when asked for);
    loss_sum: sum of masked token cross-entropies (fp32 scalar) when targets were given;
    n_correct: number of masked targets predicted exactly (argmax), as a tensor;
    predictions: argmax token ids [B, l] (when targets were given);
    token_loss: the per-token cross-entropy [B, l] (fp32), unmasked (when targets were given).
    """

    logits: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    n_correct: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None


@dataclass
class LossOutput:
    """windowed_loss's result: the mean masked loss and the sums it came from.

    loss = loss_sum / max(n_tokens, 1); n_tokens and n_correct are tensors (no host sync);
    predictions [B, T-1] are the argmax of the wake-pass logits at every input position;
    token_loss [B, T-1] the cross-entropy of every next token (``return_token_loss``).
    """

    loss: torch.Tensor
    loss_sum: torch.Tensor
    n_tokens: torch.Tensor
    n_correct: torch.Tensor
    predictions: torch.Tensor | None = None
    n_windows: int = 0
    token_loss: torch.Tensor | None = None


def _through_saved_one(out: Any) -> Any:
    """Every floating tensor of ``out`` (nested tuples and lists) that requires grad, times
    a saved scalar one: exact (x * 1 == x, and so its gradient), and in backward the first
    node of a checkpointed region then needs a saved tensor."""
    if isinstance(out, (tuple, list)):
        return type(out)(_through_saved_one(o) for o in out)
    if isinstance(out, torch.Tensor) and out.requires_grad and out.is_floating_point():
        return out * torch.ones((), dtype=out.dtype, device=out.device)
    return out


def _maybe_checkpoint(enabled: bool, fn: Callable[..., Any], *args: Any,
                      recompute_first: bool = False) -> Any:
    """``fn(*args)``, as a non-reentrant activation checkpoint when ``enabled`` and grad is on.

    ``recompute_first`` (``HybridModel.recompute_first``, set by the DeepSpeed engine at
    ZeRO-3): the region's outputs pass through ``_through_saved_one``, so that in backward
    the region is recomputed before the gradient reaches any module inside it. ZeRO-3
    gathers a module's parameters when the gradient reaches the module's output and
    releases them when the module's forward ends; a recompute started inside a module's
    backward would end that module's forward again and release its parameters before
    their gradients are accumulated (docs/design.md, "DeepSpeed engine")."""
    # The model draws no random numbers, so recomputation needs no RNG state: not saving it
    # keeps the checkpointed passes capturable in CUDA graphs (sleeptrain.train.step).
    if enabled and torch.is_grad_enabled():
        run = (lambda *a: _through_saved_one(fn(*a))) if recompute_first else fn
        return activation_checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


class _LoopRange:
    """The sleep map F over the loop range, as a function of flat tensors.

    z = [h, S of each GDN block in the loop range]; ctx tensors = the KV carry of attention
    blocks and the conv state of GDN blocks in the loop range (sliding eviction).
    """

    def __init__(self, net: HybridModel, ctx: BlockContext, fast: list[torch.Tensor | None]):
        self.net = net
        self.ctx = ctx
        self.lo, self.hi = net.loop_start, net.loop_end
        self.fast_template = list(fast)
        self.gdn = [i for i in net.gdn_blocks() if self.lo <= i < self.hi]
        self.ctx_slots: list[tuple[str, int, int]] = []
        for i in range(self.lo, self.hi):
            if ctx.kv and ctx.kv[i] is not None:
                self.ctx_slots += [("kv", i, 0), ("kv", i, 1)]
            if ctx.conv and ctx.conv[i] is not None:
                self.ctx_slots.append(("conv", i, 0))

    def pack(self, h: torch.Tensor, fast: list[torch.Tensor | None]) -> list[torch.Tensor]:
        return [h] + [fast[i] for i in self.gdn]

    def unpack(self, z: Sequence[torch.Tensor], fast: list[torch.Tensor | None]
               ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        fast = list(fast)
        for j, i in enumerate(self.gdn):
            fast[i] = z[1 + j]
        return z[0], fast

    def ctx_tensors(self) -> list[torch.Tensor]:
        out = []
        for kind, i, j in self.ctx_slots:
            out.append(self.ctx.kv[i][j] if kind == "kv" else self.ctx.conv[i])
        return out

    def with_ctx(self, tensors: Sequence[torch.Tensor]) -> BlockContext:
        kv = list(self.ctx.kv)
        conv = list(self.ctx.conv)
        pending: dict[int, list[torch.Tensor]] = {}
        for (kind, i, _j), t in zip(self.ctx_slots, tensors, strict=True):
            if kind == "kv":
                pending.setdefault(i, []).append(t)
            else:
                conv[i] = t
        for i, pair in pending.items():
            kv[i] = (pair[0], pair[1])
        return BlockContext(self.ctx.pos_start, self.ctx.window, self.ctx.segment, kv, conv,
                           self.ctx.kv_keep, self.ctx.sp_shape, self.ctx.cp)

    def step(self, z: Sequence[torch.Tensor], ctx: BlockContext | None = None
             ) -> list[torch.Tensor]:
        h, fast = self.unpack(z, self.fast_template)
        h, fast, _ = self.net.run_blocks(h, self.lo, self.hi, fast, ctx or self.ctx)
        return self.pack(h, fast)


class _JacobianFreeBridge(torch.autograd.Function):
    """Runs n sleep passes under no_grad; backward hands the gradient through unchanged."""

    @staticmethod
    def forward(fctx, loop: _LoopRange, n: int, *z: torch.Tensor):  # type: ignore[override]
        zz = list(z)
        for _ in range(n):
            zz = loop.step(zz)
        return tuple(zz)

    @staticmethod
    def backward(fctx, *grads: torch.Tensor):  # type: ignore[override]
        return (None, None, *grads)


def _autocast_state() -> tuple[str, bool, torch.dtype] | None:
    for dev in ("cuda", "cpu"):
        if torch.is_autocast_enabled(dev):
            return dev, True, torch.get_autocast_dtype(dev)
    return None


class _NeumannSleep(torch.autograd.Function):
    """n sleep passes under no_grad; backward: truncated Neumann series at the last iterate."""

    @staticmethod
    def forward(fctx, loop: _LoopRange, n: int, m: int, n_z: int, n_ctx: int,
                *inputs: torch.Tensor):  # type: ignore[override]
        z = list(inputs[:n_z])
        ctx_t = list(inputs[n_z : n_z + n_ctx])
        for _ in range(n - 1):
            z = loop.step(z)
        z_prev = [t.detach() for t in z]
        z_out = loop.step(z)
        fctx.loop, fctx.m, fctx.n_z, fctx.n_ctx = loop, m, n_z, n_ctx
        fctx.params = list(inputs[n_z + n_ctx :])
        fctx.autocast = _autocast_state()
        fctx.save_for_backward(*z_prev, *ctx_t)
        return tuple(z_out)

    @staticmethod
    def backward(fctx, *grads: torch.Tensor):  # type: ignore[override]
        saved = fctx.saved_tensors
        z_prev, ctx_t = saved[: fctx.n_z], saved[fctx.n_z :]
        params = fctx.params
        # the recomputed graph is differentiated with torch.autograd.grad: its linears must
        # return weight gradients, not add them into .grad (sleeptrain.model.kernels.linear)
        with torch.enable_grad(), fused_linear.plain_weight_grads(fctx.loop.net):
            z_in = [t.detach().requires_grad_(True) for t in z_prev]
            c_in = [t.detach().requires_grad_(t.requires_grad) for t in ctx_t]
            ac = fctx.autocast
            if ac is not None:
                with torch.autocast(ac[0], dtype=ac[2], enabled=ac[1]):
                    z_out = fctx.loop.step(z_in, fctx.loop.with_ctx(c_in))
            else:
                z_out = fctx.loop.step(z_in, fctx.loop.with_ctx(c_in))

            def vjp(targets: list[torch.Tensor], v: list[torch.Tensor]) -> list[torch.Tensor]:
                pairs = [(o, g) for o, g in zip(z_out, v, strict=True) if o.requires_grad]
                got = torch.autograd.grad([o for o, _ in pairs], targets, [g for _, g in pairs],
                                          retain_graph=True, allow_unused=True)
                return [torch.zeros_like(t) if gr is None else gr
                        for t, gr in zip(targets, got, strict=True)]

            v = [torch.zeros_like(o) if g is None else g for o, g in zip(z_out, grads,
                                                                          strict=True)]
            acc = [t.clone() for t in v]
            for j in range(1, fctx.m + 1):
                v = vjp(z_in, v)
                if j < fctx.m:
                    acc = [a + b for a, b in zip(acc, v, strict=True)]
            wants = [c for c in c_in if c.requires_grad] + [p for p in params if p.requires_grad]
            rest = vjp(wants, acc) if wants else []
        it = iter(rest)
        ctx_grads = [next(it) if c.requires_grad else None for c in c_in]
        param_grads = [next(it) if p.requires_grad else None for p in params]
        return (None, None, None, None, None, *v, *ctx_grads, *param_grads)


def _sleep(net: HybridModel, h: torch.Tensor, fast: list[torch.Tensor | None],
           ctx: BlockContext, n_sleep: int, sleep_cfg: SleepConfig) -> list[torch.Tensor | None]:
    """Runs the N-1 sleep passes of one window; returns the refined fast weights."""
    if n_sleep <= 0:
        return fast
    loop = _LoopRange(net, ctx, fast)
    ckpt = bool(sleep_cfg.checkpoint)
    mode = sleep_cfg.grad_mode
    z = loop.pack(h, fast)

    def run(z_list: list[torch.Tensor], count: int) -> list[torch.Tensor]:
        for _ in range(count):
            z_list = _maybe_checkpoint(ckpt, lambda *t: tuple(loop.step(list(t))), *z_list,
                                       recompute_first=net.recompute_first)
            z_list = list(z_list)
        return z_list

    if not torch.is_grad_enabled() or mode == "full":
        z = run(z, n_sleep)
    elif mode == "truncated":
        free = max(0, n_sleep - sleep_cfg.grad_passes)
        if free:
            with torch.no_grad():
                z = run(z, free)
            z = [t.detach() for t in z]
        z = run(z, n_sleep - free)
    elif sleep_cfg.implicit_method == "phantom":
        free = max(0, n_sleep - sleep_cfg.grad_passes)
        if free:
            z = list(_JacobianFreeBridge.apply(loop, free, *z))
        z = run(z, n_sleep - free)
    else:
        m = min(sleep_cfg.neumann_terms, n_sleep)
        ctx_t = loop.ctx_tensors()
        params = [p for i in range(loop.lo, loop.hi) for p in net.blocks[i].parameters()
                  if p.requires_grad]
        z = list(_NeumannSleep.apply(loop, n_sleep, m, len(z), len(ctx_t), *z, *ctx_t,
                                     *params))
    _, fast = loop.unpack(z, fast)
    return fast


def wake_blocks(net: HybridModel, h: torch.Tensor, fast: list[torch.Tensor | None],
                ctx: BlockContext) -> tuple[torch.Tensor, torch.Tensor,
                                            list[torch.Tensor | None], list[Any]]:
    """Every block once over embedded tokens h [B, l, d] (the wake pass without its head):
    (h at the loop range's end -- what sleep passes start from --, the final h, the fast
    weights after the blocks, per-block extras: conv state or (k, v))."""
    a, b = net.loop_start, net.loop_end
    h, fast, ex0 = net.run_blocks(h, 0, a, fast, ctx)
    h_loop, fast, ex1 = net.run_blocks(h, a, b, fast, ctx)
    h, fast, ex2 = net.run_blocks(h_loop, b, net.depth, fast, ctx)
    extras = [x if x is not None else (y if y is not None else w)
              for x, y, w in zip(ex0, ex1, ex2, strict=True)]
    return h_loop, h, fast, extras


def _wake(net: HybridModel, tokens: torch.Tensor, fast: list[torch.Tensor | None],
          ctx: BlockContext, targets: torch.Tensor | None, mask: torch.Tensor | None,
          want_logits: bool, want_head: bool, embedded: torch.Tensor | None = None):
    """The wake pass: every block once; returns (h at the loop end, fast, extras, outputs).
    ``embedded``: the window's token embeddings, already looked up (else from ``tokens``)."""
    h = net.embed_tokens(tokens, ctx.sp_shape) if embedded is None else embedded
    h_loop, h, fast, extras = wake_blocks(net, h, fast, ctx)
    logits = loss_sum = n_correct = preds = ce = None
    if want_head:
        local = net.logits(h, ctx.sp_shape)
        if targets is not None:
            ce = net.cross_entropy(local, targets)
            loss_sum = (ce * mask).sum()
            preds = net.argmax(local.detach())
            n_correct = ((preds == targets) & (mask > 0)).sum()
        if want_logits:
            logits = net.gather_vocab(local)
    return h_loop, fast, extras, (logits, loss_sum, n_correct, preds, ce)


def _evict(net: HybridModel, state: SleepState, fast: list[torch.Tensor | None],
           extras: list[Any], window_tokens: int, eviction: str, window_len: int) -> SleepState:
    """The state after the window: fast weights always; conv and KV carry only if sliding."""
    n = net.depth
    conv: list[torch.Tensor | None] = [None] * n
    kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n
    if eviction == "sliding":
        keep = window_len - 1
        for i, blk in enumerate(net.blocks):
            if blk.kind == "gdn":
                conv[i] = extras[i]
            elif blk.kind == "attention" and keep > 0 and extras[i] is not None:
                k, v = extras[i]  # (None: a block of another pipeline stage)
                old = state.kv[i]
                if old is not None:
                    k = torch.cat([old[0], k], dim=1)
                    v = torch.cat([old[1], v], dim=1)
                kv[i] = (k[:, -keep:], v[:, -keep:])
    return SleepState(fast=fast, conv=conv, kv=kv, position=state.position + window_tokens)


def _reset_state(state: SleepState, reset: torch.Tensor, batch: int, device: torch.device
                 ) -> tuple[SleepState, torch.Tensor | None]:
    """Clears the state of the sequences flagged in ``reset`` [B] (bool).

    Fast weights and conv state become exact zeros there (``torch.where``, so gradients of the
    other sequences are untouched); the KV carry cannot be cut per sequence, so a [B] keep-mask
    is returned for attention to hide it (None when there is no carry).
    """
    if reset.shape != (batch,) or reset.dtype != torch.bool:
        raise ValueError(f"reset must be a bool tensor of shape [{batch}], got "
                         f"{reset.dtype} {tuple(reset.shape)}")
    keep = ~reset.to(device)

    def clear(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        return torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x, torch.zeros_like(x))

    kv_keep = keep if any(kv is not None for kv in state.kv) else None
    return SleepState(fast=[clear(s) for s in state.fast], conv=[clear(c) for c in state.conv],
                      kv=state.kv, position=state.position), kv_keep


def _context_split(net: HybridModel, length: int, tokens: torch.Tensor,
                   targets: torch.Tensor | None, loss_mask: torch.Tensor | None,
                   embedded: torch.Tensor | None) -> tuple[WindowChunks | None, ...]:
    """Context parallelism: (the window's split, this rank's chunk of tokens, targets,
    loss_mask, embedded [B, l, ...]). A window shorter than the CP group is not split (None):
    every rank runs it whole and only CP rank 0 keeps its targets' mask."""
    chunks = net.window_chunks(length)
    if chunks is None:
        if net.cp_rank > 0 and loss_mask is not None:
            loss_mask = torch.zeros_like(loss_mask)
        return None, tokens, targets, loss_mask, embedded
    a, b = chunks.start, chunks.end
    return (chunks, tokens[:, a:b], None if targets is None else targets[:, a:b],
            None if loss_mask is None else loss_mask[:, a:b],
            None if embedded is None else embedded[:, a:b])


def run_window(
    net: HybridModel,
    tokens: torch.Tensor,
    state: SleepState,
    passes: int,
    sleep_cfg: SleepConfig,
    targets: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    want_logits: bool = True,
    want_head: bool = True,
    reset: torch.Tensor | None = None,
    embedded: torch.Tensor | None = None,
    context_parallel: bool = False,
) -> tuple[WindowOutput, SleepState]:
    """One window [B, l] (l <= window_len): wake pass, passes-1 sleep passes, eviction.

    ``targets``/``loss_mask`` [B, l] (next tokens and their mask) make the wake pass return the
    masked cross-entropy sum. ``want_head`` False skips the output head (no loss in window).
    ``reset`` [B] bool: sequences where a new document starts with this window; their state
    (fast weights, conv state, KV carry) is cleared first, as if the window began a sequence.
    ``embedded`` [B, l, d]: the embeddings of ``tokens`` (``windowed_loss`` looks up a whole
    sequence at once); not with sequence parallelism. ``context_parallel``: split the window
    over the model's CP group (module docstring); the outputs (logits, sums, predictions)
    are then this rank's chunk's.
    """
    length = tokens.shape[1]
    if length > sleep_cfg.window_len:
        raise ValueError(
            f"window of {length} tokens is longer than sleep.window_len={sleep_cfg.window_len}"
        )
    chunks = None
    if context_parallel and net.cp_size > 1:
        chunks, tokens, targets, loss_mask, embedded = _context_split(
            net, length, tokens, targets, loss_mask, embedded)
    sliding = sleep_cfg.eviction == "sliding"
    kv_keep = None
    if reset is not None:
        state, kv_keep = _reset_state(state, reset, tokens.shape[0], tokens.device)
    ctx = BlockContext(
        pos_start=state.position,
        window=sleep_cfg.window_len if sliding else None,
        kv=list(state.kv) if sliding else [],
        conv=list(state.conv) if sliding else [],
        kv_keep=kv_keep if sliding else None,
        sp_shape=tuple(tokens.shape) if net.sp else None,
        cp=chunks,
    )
    ldt = torch.float64 if net.dtype == torch.float64 else torch.float32
    mask = None if loss_mask is None else loss_mask.to(ldt)

    if embedded is not None and (net.sp or embedded.shape[:2] != tokens.shape):
        raise ValueError(f"embedded {tuple(embedded.shape)} must be [B, l, d] for tokens "
                         f"{tuple(tokens.shape)}, without sequence parallelism")

    def wake_fn(tok, fast_in, ctx_kv, ctx_conv, tgt, msk, emb):
        c = BlockContext(ctx.pos_start, ctx.window, None, ctx_kv, ctx_conv, ctx.kv_keep,
                        ctx.sp_shape, ctx.cp)
        return _wake(net, tok, fast_in, c, tgt, msk, want_logits, want_head, emb)

    h_loop, fast, extras, outs = _maybe_checkpoint(
        bool(sleep_cfg.checkpoint), wake_fn, tokens, state.fast, ctx.kv, ctx.conv, targets, mask,
        embedded, recompute_first=net.recompute_first,
    )
    fast = _sleep(net, h_loop, fast, ctx, sleep_passes(passes), sleep_cfg)
    new_state = _evict(net, state, fast, extras, length, sleep_cfg.eviction,
                       sleep_cfg.window_len)
    logits, loss_sum, n_correct, preds, ce = outs
    return WindowOutput(logits, loss_sum, n_correct, preds, ce), new_state


def target_counts(loss_mask: torch.Tensor) -> torch.Tensor:
    """Per target position 1..T-1, the sum over the rows of ``loss_mask`` [B, T] (a 0/1 mask:
    how many rows hold a target there): [T-1], computed where the mask is. What the host
    needs of a step's mask (``window_heads``, the loss normalizer) follows from it, so the
    trainer copies these T-1 numbers to the host rather than the [B, T] mask, and reduces
    nothing large there (docs/benchmarks.md: the host's reductions of a 512 x 104 mask added
    18-30 ms to a Rule 110 step, the GPU idle meanwhile)."""
    return loss_mask[..., 1:].sum(dim=tuple(range(loss_mask.dim() - 1)))


def heads_from_counts(counts: torch.Tensor, window_len: int) -> list[bool]:
    """``window_heads`` from the host copy of ``target_counts``: which windows of
    ``window_len`` target positions hold a target (numpy on the host: one thread, no sync)."""
    has = counts.numpy() != 0
    if has.shape[0] == 0:
        return []
    return np.logical_or.reduceat(has, np.arange(0, has.shape[0], window_len)).tolist()


def window_heads(loss_mask: torch.Tensor, window_len: int) -> list[bool]:
    """Which windows of rows ``loss_mask`` [B, T] (0/1) hold at least one target (need the
    head).

    Reads the mask on the host: a device-to-host copy of ``target_counts`` for a CUDA mask.
    The trainer copies the step's counts to the host before any of its micro-batches runs
    and passes the result (``heads_from_counts``) to ``windowed_loss``, which then syncs with
    the host nowhere.
    """
    return heads_from_counts(target_counts(loss_mask).cpu(), window_len)


def parallel_hidden(net: HybridModel, tokens: torch.Tensor, window_len: int,
                    eviction: str = "hard") -> torch.Tensor:
    """The N=1 computation over a whole sequence in one call per layer: final hidden states.

    hard: block-diagonal causal attention and conv reset every ``window_len`` tokens;
    sliding: banded causal attention of width ``window_len`` and a continuous conv. The
    GDN recurrence runs through the whole sequence in one kernel call in both cases.
    """
    return _parallel_hidden(net, tokens, window_len, eviction)[:, : tokens.shape[1]]


def _parallel_hidden(net: HybridModel, tokens: torch.Tensor, window_len: int,
                     eviction: str) -> torch.Tensor:
    """``parallel_hidden`` before its last slice: with hard eviction the sequence is padded
    at its end to a whole number of windows first (pad tokens come after every real one, and
    every layer is causal, so the real positions' values do not change), and the hidden
    states of the padded length are returned. Every layer's block-diagonal view of its
    activations ([B, T] -> [B * windows, L]) is then a reshape, where a sequence with a
    short last window would pad and slice each activation of each layer (a copy apiece,
    forward and backward)."""
    pad = (-tokens.shape[1]) % window_len if eviction == "hard" else 0
    if pad:
        tokens = F.pad(tokens, (0, pad))
    ctx = BlockContext(
        pos_start=0,
        window=window_len if eviction == "sliding" else None,
        segment=window_len if eviction == "hard" else None,
    )
    state = initial_state(net, tokens.shape[0], tokens.device)
    h, _, _ = net.run_blocks(net.embed_tokens(tokens), 0, net.depth, state.fast, ctx)
    return h


def parallel_applies(model: HybridModel, sleep_cfg: SleepConfig, passes: int | None,
                     doc_starts: torch.Tensor | None) -> bool:
    """Whether ``parallel_loss`` computes exactly what ``windowed_loss`` does (up to float
    rounding): N=1 (no window sleeps), no document resets, no state detaching, no window x
    pass checkpointing (the one call keeps every activation), no sequence parallelism and no
    context parallelism (the one call does not split windows)."""
    n_pass = sleep_cfg.passes if passes is None else passes
    return (n_pass == 1 and doc_starts is None and not int(sleep_cfg.detach_every)
            and not bool(sleep_cfg.checkpoint) and not model.sp and model.cp_size == 1)


def parallel_loss(model: HybridModel, tokens: torch.Tensor, loss_mask: torch.Tensor,
                  sleep_cfg: SleepConfig) -> LossOutput:
    """``windowed_loss`` at N=1 in one call per layer: with hard eviction block-diagonal
    causal attention and a conv reset every ``window_len`` tokens, with sliding eviction a
    band of ``window_len`` keys and a continuous conv; the GDN recurrence runs through the
    sequence in one kernel call. Same loss and gradients as the window-by-window form
    (tests/test_sleep_core.py), far fewer kernel launches. tokens, loss_mask [B, T]."""
    if tokens.dim() != 2 or tokens.shape != loss_mask.shape:
        raise ValueError(f"tokens and loss_mask must both be [B, T]; got {tuple(tokens.shape)} "
                         f"and {tuple(loss_mask.shape)}")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    ldt = torch.float64 if model.dtype == torch.float64 else torch.float32
    mask = loss_mask[:, 1:].to(ldt)
    h = _parallel_hidden(model, inputs, sleep_cfg.window_len, sleep_cfg.eviction)
    t, extra = inputs.shape[1], h.shape[1] - inputs.shape[1]
    if extra:  # the padded tail (see _parallel_hidden) has no targets: weight 0 in the loss
        targets, mask = F.pad(targets, (0, extra)), F.pad(mask, (0, extra))
    local = model.logits(h)
    loss_sum = (model.cross_entropy(local, targets) * mask).sum()
    preds = model.argmax(local.detach())
    n_correct = ((preds == targets) & (mask > 0)).sum()
    preds = preds[:, :t]
    n_tokens = loss_mask[:, 1:].sum().to(torch.int64)
    loss = loss_sum / n_tokens.clamp(min=1).to(loss_sum.dtype)
    n_windows = -(-inputs.shape[1] // sleep_cfg.window_len)
    return LossOutput(loss=loss, loss_sum=loss_sum, n_tokens=n_tokens, n_correct=n_correct,
                      predictions=preds, n_windows=n_windows)


def sleep_passes(passes: int, last: bool = False) -> int:
    """How many sleep passes a window gets at N = ``passes`` (the wake pass included in N):
    N-1 when another window follows, none for the last window of a sequence (nothing
    follows it, DESIGN.md section 1). The one place this is decided."""
    return 0 if last else passes - 1


def _check_batch(tokens: torch.Tensor, loss_mask: torch.Tensor) -> None:
    if tokens.dim() != 2 or tokens.shape != loss_mask.shape:
        raise ValueError(
            f"tokens and loss_mask must both be [B, T]; got {tuple(tokens.shape)} and "
            f"{tuple(loss_mask.shape)}"
        )
    if tokens.shape[1] < 2:
        raise ValueError(f"sequences need at least 2 tokens, got T={tokens.shape[1]}")


def _window_resets(doc_starts: torch.Tensor | None, batch: int, n_windows: int, t_in: int,
                   window_len: int, static: bool, device: torch.device
                   ) -> list[torch.Tensor | None]:
    """Per window, the [B] bool reset flags ``run_window`` takes (None: no reset there)."""
    if doc_starts is None:
        return [None] * n_windows
    if doc_starts.shape != (batch, n_windows) or doc_starts.dtype != torch.bool:
        raise ValueError(
            f"doc_starts must be a bool tensor [B, n_windows] = [{batch}, {n_windows}] for "
            f"T-1={t_in} inputs and window_len={window_len}; got {doc_starts.dtype} "
            f"{tuple(doc_starts.shape)}"
        )
    any_start = ([True] * n_windows if static
                 else doc_starts.any(0).tolist())  # free for the loader's CPU tensor
    ds = doc_starts.to(device)
    return [ds[:, w] if w > 0 and any_start[w] else None for w in range(n_windows)]


def _window_has(heads: Sequence[bool] | None, loss_mask: torch.Tensor, window_len: int,
                n_windows: int) -> list[bool]:
    """Which windows hold a target at all: ``heads`` as given (checked), else one host sync
    per batch (not per window) in ``window_heads``."""
    window_has = list(heads) if heads is not None else window_heads(loss_mask, window_len)
    if len(window_has) != n_windows:
        raise ValueError(f"heads has {len(window_has)} entries for {n_windows} windows")
    return window_has


def _window_embeddings(model: HybridModel, inputs: torch.Tensor, window_len: int,
                       n_windows: int) -> Sequence[torch.Tensor | None]:
    """Per window, its token embeddings [B, l, d] from one lookup of the whole sequence: its
    backward is one dense table gradient and one concatenation, not one table-sized gradient
    per window. (Under sequence parallelism each window's lookup is split over the TP ranks
    instead: None per window.)"""
    if model.sp:
        return [None] * n_windows
    return torch.split(model.embed_tokens(inputs), window_len, dim=1)


def windowed_loss(
    model: HybridModel,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    sleep_cfg: SleepConfig,
    passes: int | None = None,
    return_predictions: bool = False,
    return_token_loss: bool = False,
    doc_starts: torch.Tensor | None = None,
    heads: Sequence[bool] | None = None,
    static_resets: bool = False,
    context_parallel: bool = False,
) -> LossOutput:
    """Masked next-token cross-entropy of a batch processed window by window with sleep.

    tokens, loss_mask [B, T]: position j of ``loss_mask`` marks token j as a target, predicted
    from the logits at position j-1. Inputs tokens[:, :-1] are cut into windows of
    ``sleep.window_len``; every window but the last sleeps (``passes`` overrides sleep.passes).
    The loss is the sum over all masked targets divided by their number.

    ``doc_starts`` [B, n_windows] bool (packed documents): True where a new document starts
    with that window; the state of that sequence is reset there (``run_window``'s ``reset``).
    Column 0 is ignored (every sequence starts from a fresh state).

    ``heads`` (``window_heads(loss_mask, L)``, computed by the caller) and ``static_resets``
    (apply ``doc_starts`` at every window, not only where some sequence starts a document: the
    same values, ``torch.where`` with an all-keep mask is exact) make the call free of host
    syncs and of data-dependent Python branches, as CUDA-graph capture needs.

    ``context_parallel`` (a model with a CP group of C > 1): every window is split over the
    group (module docstring); loss_sum and n_correct are then this rank's share (n_tokens
    still counts the whole batch), to be summed over the group with the gradients.
    """
    _check_batch(tokens, loss_mask)
    if context_parallel and model.cp_size > 1 and (return_predictions or return_token_loss):
        raise ValueError("windowed_loss(context_parallel=True) returns this rank's sums only; "
                         "predictions and token losses are not gathered over the CP group")
    n_pass = sleep_cfg.passes if passes is None else passes
    inputs, targets, mask = tokens[:, :-1], tokens[:, 1:], loss_mask[:, 1:]
    t_in, L = inputs.shape[1], sleep_cfg.window_len
    starts = list(range(0, t_in, L))
    window_has = _window_has(heads, loss_mask, L, len(starts))
    resets = _window_resets(doc_starts, tokens.shape[0], len(starts), t_in, L, static_resets,
                            tokens.device)
    state = initial_state(model, tokens.shape[0], tokens.device)
    ldt = torch.float64 if model.dtype == torch.float64 else torch.float32
    loss_sum = torch.zeros((), dtype=ldt, device=tokens.device)
    n_correct = torch.zeros((), dtype=torch.int64, device=tokens.device)
    preds, token_losses = [], []
    detach_every = int(sleep_cfg.detach_every)
    embedded = _window_embeddings(model, inputs, L, len(starts))
    for w, s in enumerate(starts):
        last = w == len(starts) - 1
        e = min(s + L, t_in)
        head = window_has[w] or return_predictions or return_token_loss
        out, state = run_window(
            model, inputs[:, s:e], state, 1 + sleep_passes(n_pass, last), sleep_cfg,
            targets=targets[:, s:e] if head else None,
            loss_mask=mask[:, s:e] if head else None,
            want_logits=False, want_head=head, reset=resets[w], embedded=embedded[w],
            context_parallel=context_parallel,
        )
        if out.loss_sum is not None:
            loss_sum = loss_sum + out.loss_sum
            n_correct = n_correct + out.n_correct
        preds.append(out.predictions)
        token_losses.append(out.token_loss)
        if detach_every and (w + 1) % detach_every == 0 and not last:
            state = state.detach()
    n_tokens = mask.sum().to(torch.int64)
    return LossOutput(
        loss=loss_sum / n_tokens.clamp(min=1).to(loss_sum.dtype),
        loss_sum=loss_sum,
        n_tokens=n_tokens,
        n_correct=n_correct,
        predictions=torch.cat(preds, dim=1) if return_predictions else None,
        token_loss=torch.cat(token_losses, dim=1) if return_token_loss else None,
        n_windows=len(starts),
    )
