"""The hybrid stack: embedding, blocks built from a layer pattern, final norm and output head.

This module is the math only: it runs a range of blocks over one window with the inputs given
to it (``BlockContext``). Process groups come in as arguments: ``tp_group`` (megatron-core's
tensor-parallel group, or None for megatron-core's own default) is handed to the layers and
to the collective helpers of ``sleeptrain.parallel.tensors`` / ``seqpar``; ``cp`` (a
``sleeptrain.parallel.context.ContextParallel``: the context-parallel group, rank and size)
splits windows when the runner asks for it (``window_chunks``, ``BlockContext.cp``); nothing
here looks a group up. Windows, state, eviction and sleep passes live in ``sleeptrain.sleep``.

A pipeline stage (``stage=(lo, hi)``) holds blocks [lo, hi) only, the embedding when it is the
first stage (or the last with tied embeddings: the head's weight), the final norm and the head
when it is the last; the other blocks are parameterless ``RemoteBlock`` placeholders, so every
held parameter keeps its full model's name (``blocks.7.mixer...``) and checkpoints keyed by
name load at any pipeline size. Every stage draws the whole model's weights in the same order
and keeps its share, so the same seed gives the same model at every pipeline size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding

from sleeptrain.config import ModelConfig, loop_range, model_dims
from sleeptrain.config.validate import PATTERN_SYMBOLS, validate_model
from sleeptrain.model.layers import (
    Attention,
    GatedDeltaNet,
    RMSNorm,
    RopeTables,
    SwiGLU,
    column,
    normal_init,
)
from sleeptrain.parallel import seqpar
from sleeptrain.parallel.context import ContextParallel, WindowChunks
from sleeptrain.parallel.tensors import gather_last_dim, vocab_cross_entropy, vocab_parallel_argmax

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass
class BlockContext:
    """What a block needs besides h and its fast weights, constant over one pass: where the
    window starts, what its attention may see and what it carries in (per block index)."""

    pos_start: int
    window: int | None = None  # sliding band width L (None: causal inside the window)
    segment: int | None = None  # block-diagonal attention and conv resets every `segment`
    kv: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    conv: list[torch.Tensor | None] = field(default_factory=list)
    kv_keep: torch.Tensor | None = None  # [B] bool: False drops the KV carry (document start)
    sp_shape: tuple[int, int] | None = None  # (B, T): h is sequence-parallel local tokens
    cp: WindowChunks | None = None  # context parallelism: h is this rank's chunk of the window


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Block(nn.Module):
    """Pre-norm residual block: h + mixer(norm(h)), then h + mlp(norm(h)) if it has an MLP."""

    def __init__(self, symbol: str, cfg: ModelConfig, mp: ModelParallelConfig, tp: int,
                 tp_rank: int, depth: int, tp_group: Any = None,
                 rope: RopeTables | None = None):
        super().__init__()
        kind, has_mlp = PATTERN_SYMBOLS[symbol]
        self.kind = kind
        self.tp, self.tp_group = tp, tp_group
        dims = model_dims(cfg)
        dtype = mp.params_dtype
        std = cfg.init_std
        out_std = std / math.sqrt(2 * depth)
        self.mixer: nn.Module | None = None
        if kind == "attention":
            self.mixer = Attention(cfg.d_model, dims.n_heads, dims.n_kv_heads, dims.head_dim,
                                   cfg.rope_theta, mp, tp, std, out_std, qkv_bias=cfg.qkv_bias,
                                   backend=cfg.attention_backend, tp_group=tp_group, rope=rope)
        elif kind == "gdn":
            self.mixer = GatedDeltaNet(cfg.d_model, dims.gdn_heads, dims.gdn_v_heads,
                                       dims.gdn_head_dim, dims.gdn_v_head_dim, cfg.conv_kernel,
                                       mp, tp, tp_rank, std, out_std, cfg.norm_eps,
                                       backend=cfg.gdn_backend, chunk_size=cfg.gdn_chunk_size,
                                       tp_group=tp_group, input_kernel=cfg.gdn_inputs,
                                       fla_chunk_size=cfg.fla_chunk_size)
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps, dtype) if kind else None
        self.mlp = None
        self.norm2 = None
        if has_mlp:
            self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps, dtype)
            self.mlp = SwiGLU(cfg.d_model, dims.ffn_hidden, mp, std, out_std, tp_group)

    def _sp_maps(self, ctx: BlockContext) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                   Callable[[torch.Tensor], torch.Tensor]]:
        """(into, back): what a sublayer's input and output go through. Without sequence
        parallelism both are the identity; with it, h holds this rank's tokens, a sublayer
        sees the gathered window and its partial output is reduce-scattered back."""
        if ctx.sp_shape is None:
            return _identity, _identity
        shape, group, tp = ctx.sp_shape, self.tp_group, self.tp
        return (lambda x: seqpar.gather(x, shape, group, tp),
                lambda y: seqpar.scatter(y, group, tp))

    def forward(self, h: torch.Tensor, ctx: BlockContext, index: int,
                fast: torch.Tensor | None) -> tuple[torch.Tensor, Any, Any]:
        """Returns (h, S out or None, wake extras: conv state (GDN) or (k, v) (attention))."""
        sp = ctx.sp_shape is not None
        into, back = self._sp_maps(ctx)
        s_out = None
        extra = None
        if self.kind == "attention":
            carry = ctx.kv[index] if ctx.kv else None
            y, extra = self.mixer(into(self.norm1(h)), ctx.pos_start, carry, ctx.window,
                                  ctx.segment, ctx.kv_keep, sp=sp, chunks=ctx.cp)
            h = h + back(y)
        elif self.kind == "gdn":
            conv = ctx.conv[index] if ctx.conv else None
            y, s_out, extra = self.mixer(into(self.norm1(h)), fast, conv, ctx.segment, sp=sp,
                                         chunks=ctx.cp)
            h = h + back(y)
        if self.mlp is not None:
            h = h + back(self.mlp(into(self.norm2(h)), sp=sp))
        return h, s_out, extra


    def decode(self, h: torch.Tensor, fast: torch.Tensor | None, conv: torch.Tensor | None,
               attn: tuple[torch.Tensor, ...] | None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``forward`` for one token per row, h [B, 1, d], where rows sit at different
        positions: attention reads and writes a static KV cache (``attn`` = (positions,
        k_cache, v_cache, slot, key_keep), ``Attention.decode``), GDN takes its fast weights
        and conv state. Returns (h, S out or None, conv state out or None)."""
        s_out = conv_out = None
        if self.kind == "attention":
            h = h + self.mixer.decode(self.norm1(h), *attn)
        elif self.kind == "gdn":
            y, s_out, conv_out = self.mixer(self.norm1(h), fast, conv)
            h = h + y
        if self.mlp is not None:
            h = h + self.mlp(self.norm2(h))
        return h, s_out, conv_out


class RemoteBlock(nn.Module):
    """A block another pipeline stage holds: its kind only (no parameters, never run)."""

    def __init__(self, kind: str | None):
        super().__init__()
        self.kind = kind
        self.mixer = None

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("a block of another pipeline stage was run on this one")


def megatron_config(cfg: ModelConfig, tp: int) -> ModelParallelConfig:
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
    """Embedding -> blocks (pattern) -> final RMSNorm -> vocab-parallel head (tied or not).

    ``tp``/``tp_rank``/``tp_group``: the tensor-parallel layout this process holds a shard
    of; ``sequence_parallel`` splits training windows' residual stream over the TP group;
    ``cp``: the context-parallel group training windows are split over (None: no CP);
    ``stage``: the block range [lo, hi) of this pipeline stage (None: the whole model).
    """

    def __init__(self, cfg: ModelConfig, tp: int = 1, tp_rank: int = 0,
                 sequence_parallel: bool = False, tp_group: Any = None,
                 cp: ContextParallel | None = None, stage: tuple[int, int] | None = None):
        super().__init__()
        validate_model(cfg, tp)
        self.cfg = cfg
        self.tp = tp
        self.tp_group = tp_group
        self.cp = cp if cp is not None and cp.size > 1 else None
        # sequence parallelism of training windows (sleeptrain.parallel.seqpar); TP>1 only
        self.sp = bool(sequence_parallel) and tp > 1
        self.loop_start, self.loop_end = loop_range(cfg)
        # checkpointed regions recompute before any backward hook inside them runs (set by
        # the DeepSpeed engine at ZeRO-3: sleeptrain.sleep.runner._maybe_checkpoint)
        self.recompute_first = False
        mp = megatron_config(cfg, tp)
        self.mp_config = mp
        self.rope = RopeTables()  # shared by the attention blocks
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model,
                                            init_method=normal_init(cfg.init_std), config=mp,
                                            tp_group=tp_group)
        depth = len(cfg.pattern)
        self.blocks = nn.ModuleList(
            Block(s, cfg, mp, tp, tp_rank, depth, tp_group, self.rope) for s in cfg.pattern
        )
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, mp.params_dtype)
        self.head = ColumnParallelLinear(
            cfg.d_model, cfg.vocab_size, config=mp, init_method=normal_init(cfg.init_std),
            bias=False, gather_output=False, skip_weight_param_allocation=cfg.tie_embeddings,
            tp_group=tp_group,
        )
        self.stage = None
        if stage is not None and tuple(stage) != (0, depth):
            self._keep_stage(int(stage[0]), int(stage[1]))
        if self.sp:  # replicated weights see only this rank's tokens: sum their gradients
            for name, p in self.named_parameters():
                if getattr(p, "tensor_model_parallel", False) is False and "norm" in name:
                    p.tp_partial_grad = True

    def _keep_stage(self, lo: int, hi: int) -> None:
        """Drops what pipeline stage [lo, hi) does not hold (built first, so that the random
        draws match the whole model's)."""
        depth = len(self.blocks)
        if not 0 <= lo < hi <= depth:
            raise ValueError(f"pipeline stage blocks [{lo}, {hi}) outside [0, {depth})")
        self.stage = (lo, hi)
        for i in range(depth):
            if not lo <= i < hi:
                self.blocks[i] = RemoteBlock(self.blocks[i].kind)
        first, last = lo == 0, hi == depth
        if not (first or (last and self.cfg.tie_embeddings)):
            self.embed = None
        if not last:
            self.final_norm = None
            self.head = None

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def dtype(self) -> torch.dtype:
        if self.embed is None:
            return self.mp_config.params_dtype
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""
        return next(self.parameters()).device

    @property
    def stage_blocks(self) -> tuple[int, int]:
        """The blocks [lo, hi) this model holds (the whole stack without a pipeline)."""
        return self.stage if self.stage is not None else (0, self.depth)

    def holds(self, name: str) -> bool:
        """Whether a parameter or buffer name of the whole model is held by this stage
        (always, without a pipeline)."""
        if self.stage is None:
            return True
        part, _, rest = name.partition(".")
        if part == "blocks":
            lo, hi = self.stage
            return lo <= int(rest.split(".", 1)[0]) < hi
        return getattr(self, part, None) is not None

    @property
    def cp_size(self) -> int:
        """Ranks of the context-parallel group (1 without CP)."""
        return 1 if self.cp is None else self.cp.size

    @property
    def cp_rank(self) -> int:
        """This process's rank in the context-parallel group (0 without CP)."""
        return 0 if self.cp is None else self.cp.rank

    def window_chunks(self, length: int) -> WindowChunks | None:
        """How a window of ``length`` tokens splits over the CP group (None: it does not,
        without CP or when the window is shorter than the group)."""
        return None if self.cp is None else self.cp.split(length)

    def gdn_blocks(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.kind == "gdn"]

    def attention_blocks(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.kind == "attention"]

    def set_kernels(self, compile: bool) -> None:
        """Every layer's elementwise chains torch.compile'd on CUDA (``compile``) or eager
        (``sleeptrain.model.kernels.fused``)."""
        for m in self.modules():
            if hasattr(type(m), "compiled"):
                m.compiled = bool(compile)

    @contextlib.contextmanager
    def dynamic_kernels(self) -> Iterator[None]:
        """Within: the layers whose chains are compiled run them with symbolic shapes
        (``compiled="dynamic"``: one kernel set for any batch and length, no compile per
        length); eager layers stay eager. For inference calls whose shapes follow the
        samples' lengths (``infer.BatchedStream``); training keeps static shapes."""
        before = [(m, m.compiled) for m in self.modules()
                  if hasattr(type(m), "compiled") and m.compiled]
        for m, _ in before:
            m.compiled = "dynamic"
        try:
            yield
        finally:
            for m, was in before:
                m.compiled = was

    def embed_tokens(self, tokens: torch.Tensor,
                     sp_shape: tuple[int, int] | None = None) -> torch.Tensor:
        """h [B, T, d] for token ids [B, T] (this rank's tokens under sequence parallelism)."""
        h = self.embed(tokens)
        return seqpar.split(h, self.tp_group, self.tp) if sp_shape is not None else h

    def run_blocks(
        self, h: torch.Tensor, lo: int, hi: int, fast: list[torch.Tensor | None],
        ctx: BlockContext,
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
            x = seqpar.gather(x, sp_shape, self.tp_group, self.tp)
        weight = self.embed.weight if self.cfg.tie_embeddings else None
        return column(self.head, x, sp_shape is not None, weight=weight)

    def gather_vocab(self, local: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [..., V] from this rank's slice (differentiable)."""
        return gather_last_dim(local, self.tp_group) if self.tp > 1 else local

    def full_logits(self, h: torch.Tensor,
                    sp_shape: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits over the whole vocabulary [B, T, V] (gathered across TP ranks)."""
        return self.gather_vocab(self.logits(h, sp_shape))

    def cross_entropy(self, local: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [B, l] from this rank's logits slice [B, l, V / tp]."""
        return vocab_cross_entropy(local, targets, self.tp)

    def argmax(self, local: torch.Tensor) -> torch.Tensor:
        """Argmax token ids [B, l] over the full vocabulary of logit slices [B, l, V / tp]."""
        return vocab_parallel_argmax(local, self.tp_group, self.tp)
