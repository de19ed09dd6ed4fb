"""The hybrid stack: embedding, blocks built from a layer pattern, final norm and output head.

This module is the math only: it runs a range of blocks over one window with the state given
to it. Windows, eviction and sleep passes live in ``sleeptrain.sleep``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from megatron.core import parallel_state as mpu
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding

from sleeptrain.config.validate import PATTERN_SYMBOLS, loop_range, validate_model
from sleeptrain.model.layers import (
    Attention,
    GatedDeltaNet,
    RMSNorm,
    SwiGLU,
    column,
    normal_init,
)
from sleeptrain.parallel import seqpar
from sleeptrain.parallel.tensors import gather_last_dim

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass
class SleepState:
    """What crosses window boundaries, per block index (None where a block has no such state).

    fast: GDN fast weights S [B, HV, d_k, d_v] (fp32; fp64 for fp64 models);
    conv: GDN conv state [B, C, K-1] (sliding eviction only);
    kv:   attention KV carry (k, v) [B, c, Hkv, D] of the last c <= L-1 tokens (sliding only);
    position: number of tokens consumed so far (the global position of the next token).
    """

    fast: list[torch.Tensor | None]
    conv: list[torch.Tensor | None]
    kv: list[tuple[torch.Tensor, torch.Tensor] | None]
    position: int = 0

    def detach(self) -> SleepState:
        """The same state cut from the autograd graph."""
        return SleepState(
            fast=[None if s is None else s.detach() for s in self.fast],
            conv=[None if c is None else c.detach() for c in self.conv],
            kv=[None if kv is None else (kv[0].detach(), kv[1].detach()) for kv in self.kv],
            position=self.position,
        )

    def tensors(self) -> list[torch.Tensor]:
        """All tensors of the state, in a fixed order."""
        out: list[torch.Tensor] = [s for s in self.fast if s is not None]
        out += [c for c in self.conv if c is not None]
        for kv in self.kv:
            if kv is not None:
                out += [kv[0], kv[1]]
        return out


@dataclass
class PassContext:
    """Per-window constants of a pass: where the window starts and what it may look back at."""

    pos_start: int
    window: int | None = None  # sliding band width L (None: causal inside the window)
    segment: int | None = None  # parallel form of hard eviction: reset every `segment` tokens
    kv: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    conv: list[torch.Tensor | None] = field(default_factory=list)
    kv_keep: torch.Tensor | None = None  # [B] bool: False drops the KV carry (document start)
    sp_shape: tuple[int, int] | None = None  # (B, T): h is sequence-parallel local tokens


class Block(nn.Module):
    """Pre-norm residual block: h + mixer(norm(h)), then h + mlp(norm(h)) if it has an MLP."""

    def __init__(self, symbol: str, cfg: Any, mp: ModelParallelConfig, tp: int, tp_rank: int,
                 depth: int, tp_group: Any = None):
        super().__init__()
        kind, has_mlp = PATTERN_SYMBOLS[symbol]
        self.kind = kind
        dtype = mp.params_dtype
        std = cfg.init_std
        out_std = std / math.sqrt(2 * depth)
        self.mixer: nn.Module | None = None
        if kind == "attention":
            n_kv = cfg.n_kv_heads or cfg.n_heads
            hd = cfg.head_dim or cfg.d_model // cfg.n_heads
            self.mixer = Attention(cfg.d_model, cfg.n_heads, n_kv, hd, cfg.rope_theta, mp, tp,
                                   std, out_std, qkv_bias=cfg.qkv_bias,
                                   backend=cfg.attention_backend, tp_group=tp_group)
        elif kind == "gdn":
            hv = cfg.gdn_v_heads or cfg.gdn_heads
            self.mixer = GatedDeltaNet(cfg.d_model, cfg.gdn_heads, hv, cfg.gdn_head_dim,
                                       cfg.gdn_v_head_dim or cfg.gdn_head_dim, cfg.conv_kernel,
                                       mp, tp, tp_rank, std, out_std, cfg.norm_eps,
                                       backend=cfg.gdn_backend, chunk_size=cfg.gdn_chunk_size,
                                       tp_group=tp_group)
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps, dtype) if kind else None
        self.mlp = None
        self.norm2 = None
        if has_mlp:
            self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps, dtype)
            self.mlp = SwiGLU(cfg.d_model, ffn_hidden(cfg), mp, std, out_std, tp_group)

    def forward(self, h: torch.Tensor, ctx: PassContext, index: int,
                fast: torch.Tensor | None) -> tuple[torch.Tensor, Any, Any]:
        """Returns (h, S out or None, wake extras: conv state (GDN) or (k, v) (attention))."""
        if ctx.sp_shape is not None:
            return self._forward_sp(h, ctx, index, fast)
        s_out = None
        extra = None
        if self.kind == "attention":
            carry = ctx.kv[index] if ctx.kv else None
            y, extra = self.mixer(self.norm1(h), ctx.pos_start, carry, ctx.window, ctx.segment,
                                  ctx.kv_keep)
            h = h + y
        elif self.kind == "gdn":
            conv = ctx.conv[index] if ctx.conv else None
            y, s_out, extra = self.mixer(self.norm1(h), fast, conv, ctx.segment)
            h = h + y
        if self.mlp is not None:
            h = h + self.mlp(self.norm2(h))
        return h, s_out, extra

    def _forward_sp(self, h: torch.Tensor, ctx: PassContext, index: int,
                    fast: torch.Tensor | None) -> tuple[torch.Tensor, Any, Any]:
        """Sequence parallelism: h holds this rank's tokens; mixers and the MLP see the
        gathered window and their partial outputs are reduce-scattered back."""
        shape = ctx.sp_shape
        s_out = None
        extra = None
        if self.kind == "attention":
            carry = ctx.kv[index] if ctx.kv else None
            y, extra = self.mixer(seqpar.gather(self.norm1(h), shape), ctx.pos_start, carry,
                                  ctx.window, ctx.segment, ctx.kv_keep, sp=True)
            h = h + seqpar.scatter(y)
        elif self.kind == "gdn":
            conv = ctx.conv[index] if ctx.conv else None
            y, s_out, extra = self.mixer(seqpar.gather(self.norm1(h), shape), fast, conv,
                                         ctx.segment, sp=True)
            h = h + seqpar.scatter(y)
        if self.mlp is not None:
            h = h + seqpar.scatter(self.mlp(seqpar.gather(self.norm2(h), shape), sp=True))
        return h, s_out, extra


def ffn_hidden(cfg: Any) -> int:
    """SwiGLU width: model.ffn_hidden, or 8/3 d_model rounded up to a multiple of 64."""
    if cfg.ffn_hidden:
        return int(cfg.ffn_hidden)
    return int(64 * math.ceil(8 * cfg.d_model / 3 / 64))


def megatron_config(cfg: Any, tp: int) -> ModelParallelConfig:
    """The megatron-core layer config for this model at tensor-parallel size ``tp``.

    Weights are initialized on the CPU as full tensors and then split, so that the same seed
    gives the same model at every TP size.
    """
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        params_dtype=DTYPES[cfg.params_dtype],
        use_cpu_initialization=True,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )


class HybridModel(nn.Module):
    """Embedding -> blocks (pattern) -> final RMSNorm -> vocab-parallel head (tied or not)."""

    def __init__(self, cfg: Any, tp: int = 1, tp_rank: int = 0,
                 sequence_parallel: bool = False):
        super().__init__()
        validate_model(cfg, tp)
        self.cfg = cfg
        self.tp = tp
        # sequence parallelism of training windows (sleeptrain.parallel.seqpar); TP>1 only
        self.sp = bool(sequence_parallel) and tp > 1
        self.loop_start, self.loop_end = loop_range(cfg)
        mp = megatron_config(cfg, tp)
        self.mp_config = mp
        # megatron-core's TP group when its parallel state is up (None: its default lookup).
        self.tp_group = (mpu.get_tensor_model_parallel_group()
                         if mpu.model_parallel_is_initialized() else None)
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model,
                                            init_method=normal_init(cfg.init_std), config=mp,
                                            tp_group=self.tp_group)
        depth = len(cfg.pattern)
        self.blocks = nn.ModuleList(
            Block(s, cfg, mp, tp, tp_rank, depth, self.tp_group) for s in cfg.pattern
        )
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, mp.params_dtype)
        self.head = ColumnParallelLinear(
            cfg.d_model, cfg.vocab_size, config=mp, init_method=normal_init(cfg.init_std),
            bias=False, gather_output=False, skip_weight_param_allocation=cfg.tie_embeddings,
            tp_group=self.tp_group,
        )
        if self.sp:  # replicated weights see only this rank's tokens: sum their gradients
            for name, p in self.named_parameters():
                if getattr(p, "tensor_model_parallel", False) is False and "norm" in name:
                    p.tp_partial_grad = True

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def gdn_blocks(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.kind == "gdn"]

    def attention_blocks(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.kind == "attention"]

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> SleepState:
        """The state at the start of a sequence: zero fast weights, empty conv state and KV."""
        device = self.embed.weight.device if device is None else device
        sdt = torch.float64 if self.dtype == torch.float64 else torch.float32
        fast: list[torch.Tensor | None] = []
        for b in self.blocks:
            if b.kind == "gdn":
                m = b.mixer
                fast.append(torch.zeros(batch_size, m.hv_local, m.dk, m.dv, dtype=sdt,
                                        device=device))
            else:
                fast.append(None)
        n = self.depth
        return SleepState(fast=fast, conv=[None] * n, kv=[None] * n, position=0)

    def embed_tokens(self, tokens: torch.Tensor,
                     sp_shape: tuple[int, int] | None = None) -> torch.Tensor:
        """h [B, T, d] for token ids [B, T] (this rank's tokens under sequence parallelism)."""
        h = self.embed(tokens)
        return seqpar.split(h) if sp_shape is not None else h

    def run_blocks(
        self, h: torch.Tensor, lo: int, hi: int, fast: list[torch.Tensor | None],
        ctx: PassContext,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], list[Any]]:
        """Runs blocks [lo, hi) over h; returns (h, fast weights out, per-block extras).

        ``fast`` is indexed by block; the returned list is a copy with blocks lo..hi-1 updated.
        Extras: the GDN conv state or the attention (k, v) of this window, else None.
        """
        fast = list(fast)
        extras: list[Any] = [None] * self.depth
        for i in range(lo, hi):
            h, s_out, extra = self.blocks[i](h, ctx, i, fast[i])
            if s_out is not None:
                fast[i] = s_out
            extras[i] = extra
        return h, fast, extras

    def logits(self, h: torch.Tensor,
               sp_shape: tuple[int, int] | None = None) -> torch.Tensor:
        """This TP rank's vocabulary slice of the logits [B, T, V / tp]."""
        x = self.final_norm(h)
        if sp_shape is not None:
            x = seqpar.gather(x, sp_shape)
        weight = self.embed.weight if self.cfg.tie_embeddings else None
        return column(self.head, x, sp_shape is not None, weight=weight)

    def full_logits(self, h: torch.Tensor,
                    sp_shape: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits over the whole vocabulary [B, T, V] (gathered across TP ranks)."""
        return gather_last_dim(self.logits(h, sp_shape), self.tp_group)

    def forward_parallel(self, tokens: torch.Tensor, window_len: int,
                         eviction: str = "hard") -> torch.Tensor:
        """Full logits [B, T, V] of ``parallel_hidden`` (the N=1 computation in one call)."""
        return self.full_logits(self.parallel_hidden(tokens, window_len, eviction))

    def parallel_hidden(self, tokens: torch.Tensor, window_len: int,
                        eviction: str = "hard") -> torch.Tensor:
        """The N=1 computation over a whole sequence in one call per layer: final hidden states.

        hard: block-diagonal causal attention and conv reset every ``window_len`` tokens;
        sliding: banded causal attention of width ``window_len`` and a continuous conv. The
        GDN recurrence runs through the whole sequence in one kernel call in both cases.
        """
        ctx = PassContext(
            pos_start=0,
            window=window_len if eviction == "sliding" else None,
            segment=window_len if eviction == "hard" else None,
        )
        state = self.init_state(tokens.shape[0], tokens.device)
        h, _, _ = self.run_blocks(self.embed_tokens(tokens), 0, self.depth, state.fast, ctx)
        return h
