"""The layers of the hybrid: RMSNorm, RoPE, SwiGLU MLP, GQA attention, gated DeltaNet.

Linears are megatron-core's tensor-parallel layers. Every fused projection uses a layout that
does not depend on the tensor-parallel size: its output rows are grouped (per key/value head
for attention, per query/key head for GDN, per hidden unit for the SwiGLU gate/up pair), and TP
shards whole groups. So a checkpoint's full tensors are the same at every TP size, and TP rank
r holds the contiguous slice r of each.

All layers take and return [B, T, d_model] hidden states; head counts below are per TP rank.
Under context parallelism (``chunks``, a ``sleeptrain.parallel.context.WindowChunks``) T is
this rank's chunk of the window and the mixers exchange what crosses chunk boundaries over
the CP group given in it (attention: the window's keys/values; GDN: each chunk's state map
and its last K-1 conv inputs).
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from sleeptrain.model.kernels import attention as attention_op
from sleeptrain.model.kernels import (
    chunk_transition,
    compose_chunk_states,
    fused,
    gated_delta_rule,
)
from sleeptrain.model.kernels import linear as fused_linear
from sleeptrain.model.kernels.gated_delta import FLA_CHUNKS
from sleeptrain.parallel.context import (
    WindowChunks,
    all_gather_stacked,
    gather_tails,
    gather_window,
)


def normal_init(std: float) -> Callable[[torch.Tensor], None]:
    """An init_method for megatron-core layers: N(0, std^2)."""

    def init(w: torch.Tensor) -> None:
        nn.init.normal_(w, mean=0.0, std=std)

    return init


def _plus_bias(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The layer's output with its bias, as megatron-core adds it (unless skip_bias_add)."""
    return y if layer.bias is None or layer.skip_bias_add else y + layer.bias


def column(layer: nn.Module, x: torch.Tensor, sp: bool = False,
           weight: torch.Tensor | None = None) -> torch.Tensor:
    """A megatron-core column-parallel linear. ``weight``: use this weight (the tied output
    head). Inside a ``FusedLinears`` context (the training step's micro-batches,
    :mod:`sleeptrain.model.kernels.linear`) the matmul is the fused one, and megatron-core's
    region mapping all-reduces the input gradient over TP. With ``sp`` the input was
    all-gathered by sequence parallelism, whose backward reduce-scatters the input gradient:
    the product is then a plain ``F.linear`` with no communication of its own."""
    w = layer.weight if weight is None else weight
    ctx = fused_linear.active(layer)
    if ctx is not None:
        if not sp and layer.allreduce_dgrad:
            x = copy_to_tensor_model_parallel_region(x, group=layer.tp_group)
        return _plus_bias(layer, fused_linear.linear(ctx, x, w))
    if sp:
        return _plus_bias(layer, F.linear(x, w))
    return layer(x, **({} if weight is None else {"weight": weight}))[0]


def row(layer: nn.Module, x: torch.Tensor, sp: bool = False) -> torch.Tensor:
    """A megatron-core row-parallel linear: all-reduced output, or with ``sp`` this rank's
    partial sums (sequence parallelism reduce-scatters them)."""
    if sp and layer.bias is not None:
        raise ValueError("sequence parallelism: row-parallel biases are not supported")
    ctx = fused_linear.active(layer)
    if ctx is not None:
        y = fused_linear.linear(ctx, x, layer.weight)
        if not sp:
            y = reduce_from_tensor_model_parallel_region(y, group=layer.tp_group)
        return _plus_bias(layer, y)
    if not sp:
        return layer(x)[0]
    return F.linear(x, layer.weight)


def zeros_init(w: torch.Tensor) -> None:
    """An init_method that zeroes the weight (retrofits: new layers start as identity)."""
    nn.init.zeros_(w)


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32 (fp64 for fp64 inputs). Its consumers are
    linears: under CUDA autocast the output is already in the autocast dtype."""

    # torch.compile'd chain on CUDA: True static shapes, "dynamic" symbolic
    # (HybridModel.set_kernels, HybridModel.dynamic_kernels)
    compiled: bool | str = False

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None  # under CUDA autocast: the autocast dtype (the consumer is a linear)
        if x.is_cuda and torch.is_autocast_enabled("cuda") and x.dtype == torch.float32:
            out = torch.get_autocast_dtype("cuda")
        return fused.rms_norm(x, self.weight, self.eps, out, compiled=self.compiled)


def _rope_table(start: int, length: int, dim: int, theta: float, device: torch.device,
                cdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=cdt) / dim)
    pos = torch.arange(start, start + length, device=device)
    ang = pos.to(cdt)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def rope_rows(positions: torch.Tensor, dim: int, theta: float,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, dim] at one absolute position per row (``positions`` [B] int64): the
    same values as ``_rope_table`` gives at those positions (fp32; fp64 for fp64 ``dtype``).
    Computed on the device without host syncs (decoding rows at different positions)."""
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=cdt) / dim)
    ang = positions.to(cdt)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def _table_bytes(table: tuple[torch.Tensor, torch.Tensor]) -> int:
    return sum(x.numel() * x.element_size() for x in table)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class RopeTables:
    """cos/sin tables of rotate-half RoPE, kept per model (its attention blocks share one).

    Every attention block of a window asks for the same positions, and a training run asks
    for the same windows every micro-batch: the tables are kept (least recently used first
    out, ``max_bytes`` in all, no autograd history) so that a window costs no RoPE kernels
    after the first. While a CUDA graph is being captured, a kept table it reads is pinned
    (never evicted: the graph holds its address, not a reference), and a missing table is
    computed inside the graph and not kept (capture records kernels without running them,
    so its values would exist only once replayed). Pinned tables are bounded by the windows
    of the captured layouts.

    Streaming inference (``streaming()``) visits each window's positions once, never again:
    there a miss first drops the kept tables of every other start (not pinned ones), so what
    is kept stays one window's tables however long the stream is, where a long prefill would
    otherwise fill ``max_bytes`` with tables it never reads again.
    """

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes  # a table above a quarter of it is not kept
        self.cache: OrderedDict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = (
            OrderedDict())
        self.held = 0
        self.pinned: set[tuple[Any, ...]] = set()
        self._streaming = False

    @contextlib.contextmanager
    def streaming(self) -> Iterator[None]:
        """Within: positions only move on (a streaming engine's calls); see the class."""
        outer, self._streaming = self._streaming, True
        try:
            yield
        finally:
            self._streaming = outer

    def _drop(self, key: tuple[Any, ...]) -> None:
        self.held -= _table_bytes(self.cache.pop(key))

    def get(self, start: int, length: int, dim: int, theta: float, device: torch.device,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, dim] at absolute positions start, start + 1, ... (fp32; fp64
        for fp64 ``dtype``)."""
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        dev = torch.device(device)
        key = (start, length, dim, float(theta), str(dev), cdt)
        capturing = _capturing(dev)
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            if capturing:
                self.pinned.add(key)
            return hit
        if capturing:
            return _rope_table(start, length, dim, theta, dev, cdt)
        if self._streaming:
            for k in [k for k in self.cache if k[0] != start and k not in self.pinned]:
                self._drop(k)
        with torch.inference_mode(False), torch.no_grad():
            table = _rope_table(start, length, dim, theta, dev, cdt)
        size = _table_bytes(table)
        if 4 * size <= self.max_bytes:
            self.cache[key] = table
            self.held += size
            while self.held > self.max_bytes:
                victim = next((k for k in self.cache if k not in self.pinned), None)
                if victim is None:
                    break
                self._drop(victim)
        return table


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate/up fused and interleaved per hidden unit."""

    # torch.compile'd chain on CUDA: True static shapes, "dynamic" symbolic
    # (HybridModel.set_kernels, HybridModel.dynamic_kernels)
    compiled: bool | str = False

    def __init__(self, d_model: int, hidden: int, config: ModelParallelConfig, std: float,
                 out_std: float, tp_group: Any = None):
        super().__init__()
        self.fc1 = ColumnParallelLinear(d_model, 2 * hidden, config=config,
                                        init_method=normal_init(std), bias=False,
                                        gather_output=False, tp_group=tp_group)
        self.fc2 = RowParallelLinear(hidden, d_model, config=config,
                                     init_method=normal_init(out_std), bias=False,
                                     input_is_parallel=True, skip_bias_add=False,
                                     tp_group=tp_group)

    def forward(self, x: torch.Tensor, sp: bool = False) -> torch.Tensor:
        return row(self.fc2, fused.swiglu(column(self.fc1, x, sp), compiled=self.compiled), sp)


class Attention(nn.Module):
    """GQA self-attention with RoPE at global positions and an optional carried KV.

    Fused qkv rows are grouped per key/value head: [q of the group's heads, k, v]. ``rope``:
    the RoPE tables (shared by the model's attention blocks; default: this block's own).
    """

    # torch.compile'd chains on CUDA: True static shapes, "dynamic" symbolic
    # (HybridModel.set_kernels, HybridModel.dynamic_kernels)
    compiled: bool | str = False

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 rope_theta: float, config: ModelParallelConfig, tp: int, std: float,
                 out_std: float, qkv_bias: bool = False, backend: str = "sdpa",
                 tp_group: Any = None, rope: RopeTables | None = None):
        super().__init__()
        self.rope = rope if rope is not None else RopeTables()
        self.head_dim = head_dim
        self.group = n_heads // n_kv_heads
        self.kv_local = n_kv_heads // tp
        self.rope_theta = rope_theta
        self.backend = backend
        width = (n_heads + 2 * n_kv_heads) * head_dim
        self.qkv = ColumnParallelLinear(d_model, width, config=config,
                                        init_method=normal_init(std), bias=qkv_bias,
                                        gather_output=False, tp_group=tp_group)
        self.out = RowParallelLinear(n_heads * head_dim, d_model, config=config,
                                     init_method=normal_init(out_std), bias=False,
                                     input_is_parallel=True, skip_bias_add=False,
                                     tp_group=tp_group)

    def project(self, x: torch.Tensor, pos_start: int,
                sp: bool = False) -> tuple[torch.Tensor, ...]:
        """q [B, T, Hq, D], k, v [B, T, Hkv, D] with RoPE applied at pos_start + t."""
        y = column(self.qkv, x, sp)
        b, t = x.shape[:2]
        hd = self.head_dim
        y = y.view(b, t, self.kv_local, (self.group + 2) * hd)
        cos, sin = self.rope.get(pos_start, t, hd, self.rope_theta, x.device, x.dtype)
        return fused.qkv_rope(y, cos, sin, self.group, compiled=self.compiled)

    def forward(
        self,
        x: torch.Tensor,
        pos_start: int,
        carry: tuple[torch.Tensor, torch.Tensor] | None = None,
        window: int | None = None,
        segment: int | None = None,
        carry_keep: torch.Tensor | None = None,
        sp: bool = False,
        chunks: WindowChunks | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Returns (output [B, T, d], (k, v) of this call's tokens, post-RoPE).

        ``carry``: keys/values of earlier tokens to attend to (sliding eviction);
        ``carry_keep`` [B] bool: False hides the carry from that sequence (a document starts);
        ``window``: band width L (query sees L tokens including itself), None = causal;
        ``segment``: block-diagonal causal attention over segments of this length
        (the parallel form of hard eviction); ``sp``: sequence parallelism (partial output);
        ``chunks``: context parallelism: x is this rank's chunk of the window starting at
        ``pos_start``; the window's keys/values are all-gathered, the queries attend over
        those up to the chunk's end, and the returned (k, v) are the whole window's.
        """
        if chunks is not None and segment is not None:
            raise ValueError("context parallelism splits windows; it has no segment form")
        q, k, v = self.project(x, pos_start + (chunks.start if chunks is not None else 0), sp)
        b, t = x.shape[:2]
        if chunks is not None:  # the window's keys/values; this chunk sees those up to its end
            k, v = gather_window(torch.stack([k, v]), chunks, dim=2).unbind(0)
        if segment is not None:
            pad = (-t) % segment  # none in sleeptrain's own callers (runner._parallel_hidden)
            qs, ks, vs = (F.pad(z, (0, 0, 0, 0, 0, pad)) if pad else z for z in (q, k, v))
            n = (t + pad) // segment
            qs, ks, vs = (z.reshape(b * n, segment, *z.shape[2:]) for z in (qs, ks, vs))
            o = attention_op(qs, ks, vs, None, None, self.backend)
            o = o.reshape(b, n * segment, *o.shape[2:])[:, :t]
        else:
            kk, vv, key_keep = k, v, None
            if chunks is not None:
                kk, vv = k[:, : chunks.end], v[:, : chunks.end]
            if carry is not None:
                kk = torch.cat([carry[0].to(k.dtype), kk], dim=1)
                vv = torch.cat([carry[1].to(v.dtype), vv], dim=1)
                if carry_keep is not None:
                    key_keep = torch.cat([carry_keep[:, None].expand(b, carry[0].shape[1]),
                                          carry_keep.new_ones(b, kk.shape[1] - carry[0].shape[1])],
                                         dim=1)
            o = attention_op(q, kk, vv, window, None, self.backend, key_keep)
        return row(self.out, o.reshape(b, t, -1), sp), (k, v)


    def decode(self, x: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, slot: torch.Tensor, key_keep: torch.Tensor
               ) -> torch.Tensor:
        """One token per row: x [B, 1, d] at absolute ``positions`` [B]. Its post-RoPE
        (k, v) are written into the static caches [B, S, Hkv, D] at index ``slot`` [B]
        (in place), then it attends over the cache keys where ``key_keep`` [B, S] is True
        (its own key included). Returns the output [B, 1, d]. No host syncs and no
        shape-dependent branches: capturable in a CUDA graph for a fixed (B, S)."""
        b = x.shape[0]
        hd = self.head_dim
        y = column(self.qkv, x).view(1, b, self.kv_local, (self.group + 2) * hd)
        cos, sin = rope_rows(positions, hd, self.rope_theta, x.dtype)
        # rows as the time axis: qkv_rope's [T, D] tables then hold one position per row
        q, k, v = (z.transpose(0, 1) for z in fused.qkv_rope(y, cos, sin, self.group,
                                                              compiled=self.compiled))
        rows = torch.arange(b, device=x.device)
        k_cache.index_put_((rows, slot), k[:, 0].to(k_cache.dtype))
        v_cache.index_put_((rows, slot), v[:, 0].to(v_cache.dtype))
        o = attention_op(q, k_cache.to(q.dtype), v_cache.to(q.dtype), None, None, self.backend,
                         key_keep)
        return row(self.out, o.reshape(b, 1, -1))


# model.gdn_inputs: the chain from the projection to the delta rule's inputs as
# fused.gdn_inputs (eager, or compiled with train.compile) or as kernels.gdn_inputs' Triton
# kernels (CUDA)
INPUT_KERNELS = ("chain", "triton")


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet mixer with explicit state (fast weights S and the conv state).

    in_proj rows, grouped per query/key head h (r = value heads per qk head):
    [q_h (dk), k_h (dk), v (r*dv), z (r*dv), b (r), a (r)]. The short causal depthwise conv
    runs over the [q, k, v] channels of each group, then SiLU; q, k are L2-normalized;
    g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b); the gated delta rule; the
    output is RMSNorm(o) * silu(z) per value head, then out_proj. ``backend``: the delta
    rule's kernels (``gated_delta_rule``; ``fla_chunk_size``: FLA's chunk length,
    ``fla_chunk``); ``input_kernel``: the kernels of everything between the projection and
    the rule (``INPUT_KERNELS``).
    """

    # torch.compile'd chains on CUDA: True static shapes, "dynamic" symbolic
    # (HybridModel.set_kernels, HybridModel.dynamic_kernels)
    compiled: bool | str = False

    def __init__(self, d_model: int, n_heads: int, n_v_heads: int, head_dim: int,
                 v_head_dim: int, conv_kernel: int, config: ModelParallelConfig, tp: int,
                 tp_rank: int, std: float, out_std: float, norm_eps: float,
                 backend: str = "auto", chunk_size: int = 32, zero_out: bool = False,
                 tp_group: Any = None, input_kernel: str = "chain", fla_chunk_size: int = 64):
        super().__init__()
        if fla_chunk_size not in (0, *FLA_CHUNKS):
            raise ValueError(f"model.fla_chunk_size: {fla_chunk_size}; one of "
                             f"{(0, *FLA_CHUNKS)} (0: by the call's length)")
        self.fla_chunk_size = fla_chunk_size
        if input_kernel not in INPUT_KERNELS:
            raise ValueError(f"model.gdn_inputs: unknown kernel {input_kernel!r}; one of "
                             f"{INPUT_KERNELS}")
        self.input_kernel = input_kernel
        self.h_local = n_heads // tp
        self.r = n_v_heads // n_heads
        self.hv_local = self.h_local * self.r
        self.dk, self.dv = head_dim, v_head_dim
        self.kernel = conv_kernel
        self.backend = backend
        self.chunk_size = chunk_size
        self.norm_eps = norm_eps
        self.group_width = 2 * head_dim + 2 * self.r * v_head_dim + 2 * self.r
        self.conv_group = 2 * head_dim + self.r * v_head_dim
        self.in_proj = ColumnParallelLinear(d_model, n_heads * self.group_width, config=config,
                                            init_method=normal_init(std), bias=False,
                                            gather_output=False, tp_group=tp_group)
        dtype = config.params_dtype
        # Full tensors drawn in the same order on every TP rank, then sliced: TP-invariant init.
        conv_full = torch.empty(n_heads * self.conv_group, conv_kernel, dtype=dtype)
        bound = 1.0 / math.sqrt(conv_kernel)
        nn.init.uniform_(conv_full, -bound, bound)
        a_full = torch.empty(n_v_heads, dtype=torch.float32).uniform_(1.0, 16.0).log()
        dt = torch.exp(torch.empty(n_v_heads, dtype=torch.float32).uniform_(
            math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
        dt_bias_full = dt + torch.log(-torch.expm1(-dt))
        cs = n_heads * self.conv_group // tp
        self.conv_weight = nn.Parameter(conv_full[tp_rank * cs : (tp_rank + 1) * cs].clone())
        hs = self.hv_local
        self.A_log = nn.Parameter(a_full[tp_rank * hs : (tp_rank + 1) * hs].to(dtype).clone())
        self.dt_bias = nn.Parameter(
            dt_bias_full[tp_rank * hs : (tp_rank + 1) * hs].to(dtype).clone())
        for p in (self.conv_weight, self.A_log, self.dt_bias):
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)
        self.out_norm_weight = nn.Parameter(torch.ones(v_head_dim, dtype=dtype))
        # shared by every head, so each TP rank's gradient covers only its heads: summed over
        # the TP group before the optimizer step (sleeptrain.parallel.tensors.sync_tp_grads)
        self.out_norm_weight.tp_partial_grad = True
        self.out_proj = RowParallelLinear(n_v_heads * v_head_dim, d_model, config=config,
                                          init_method=zeros_init if zero_out else
                                          normal_init(out_std), bias=False,
                                          input_is_parallel=True, skip_bias_add=False,
                                     tp_group=tp_group)

    @property
    def conv_channels(self) -> int:
        """Channels of the short convolution on this TP rank."""
        return self.h_local * self.conv_group

    def _inputs(self, y: torch.Tensor, conv_state: torch.Tensor | None,
                segment: int | None) -> tuple[torch.Tensor, ...]:
        """``fused.gdn_inputs`` (or the Triton kernels, ``input_kernel``) of the projection
        y [B, T, H, G] with the K-1 conv inputs ``conv_state`` [B, C, K-1] (zeros when None):
        q, k, v, g, beta, z, new conv state.
        ``segment``: the conv restarts from zeros every ``segment`` tokens (the parallel form
        of hard eviction); the new conv state is then the last K-1 inputs of y."""
        b, t, h, gw = y.shape
        km1, c = self.kernel - 1, self.conv_channels
        args = (self.conv_weight, self.A_log, self.dt_bias, self.dk, self.r, self.dv)
        kernel = None
        if self.input_kernel == "triton":  # imported here: Triton kernels only when chosen
            from sleeptrain.model.kernels.gdn_inputs import gdn_inputs as kernel
        if segment is None:
            if kernel is not None:
                return kernel(y, conv_state, *args)
            if conv_state is None:
                conv_state = y.new_zeros(b, c, km1)
            return fused.gdn_inputs(y, conv_state, *args, compiled=self.compiled)
        pad = (-t) % segment
        n = (t + pad) // segment
        ys = (F.pad(y, (0, 0, 0, 0, 0, pad)) if pad else y).reshape(b * n, segment, h, gw)
        if kernel is not None:
            outs = kernel(ys, None, *args)[:-1]
        else:
            outs = fused.gdn_inputs(ys, y.new_zeros(b * n, c, km1), *args,
                                    compiled=self.compiled)[:-1]
        outs = [o.reshape(b, n * segment, *o.shape[2:])[:, :t] for o in outs]
        tail = y[:, max(t - km1, 0):, :, : self.conv_group].reshape(b, -1, c)
        tail = F.pad(tail, (0, 0, km1 - tail.shape[1], 0))
        return (*outs, tail.transpose(1, 2).contiguous())

    def _conv_contexts(self, y: torch.Tensor, conv_state: torch.Tensor | None,
                       chunks: WindowChunks) -> tuple[torch.Tensor, torch.Tensor]:
        """(the K-1 conv inputs before this rank's chunk, the window's last K-1 inputs),
        both [B, C, K-1]: the last K-1 of (conv state or zeros, chunk 0, ..., chunk r-1),
        resp. of all chunks, from every chunk's last K-1 inputs (gathered). Both are slices
        of one concatenation of everything gathered, so that every rank's backward depends
        on the gather alike (the CP ranks' autograd graphs must run the collectives' backward
        in the same order)."""
        b, t = y.shape[:2]
        km1, c = self.kernel - 1, self.conv_channels
        x = y[..., : self.conv_group].reshape(b, t, c)
        tails = gather_tails(x, chunks, km1)  # [size, B, K-1, C], left-padded
        real = [min(n, km1) for n in chunks.lengths]
        seq = torch.cat([x.new_zeros(b, km1, c) if conv_state is None
                         else conv_state.transpose(1, 2).to(x.dtype)]
                        + [tails[j][:, km1 - n:] for j, n in enumerate(real)], dim=1)
        end = km1 + sum(real[: chunks.rank])  # where this rank's chunk would start in seq
        left = seq[:, end - km1 : end]
        return left.transpose(1, 2), seq[:, seq.shape[1] - km1:].transpose(1, 2).contiguous()

    def _chunk_rule(self, y: torch.Tensor, state: torch.Tensor | None,
                    conv_state: torch.Tensor | None, chunks: WindowChunks
                    ) -> tuple[torch.Tensor, ...]:
        """Context parallelism: the GDN over this rank's chunk y [B, n, H, G] of the window.

        The rule is affine in the incoming state per chunk (S_out = M_r S_in + E_r,
        ``chunk_transition``); every rank's (M_r, E_r) is all-gathered and composed from the
        window's incoming state S_0 (``compose_chunk_states``): this chunk runs from its exact
        incoming state, and the window's outgoing state is composed identically on every
        rank. Returns z, o (this chunk's), S out and the conv state (the window's).
        """
        left, window_conv = self._conv_contexts(y, conv_state, chunks)
        q, k, v, g, beta, z, _ = self._inputs(y, left, None)

        def transition(*x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return chunk_transition(*x, backend=self.backend, chunk_size=self.chunk_size)

        # recomputed in backward: its kernel's activations (d_k + d_v wide) are not kept,
        # so that a rank's memory falls with its chunk (q..beta are kept for the output pass)
        if torch.is_grad_enabled():
            m, e = activation_checkpoint(transition, q, k, v, g, beta, use_reentrant=False,
                                         preserve_rng_state=False)
        else:
            m, e = transition(q, k, v, g, beta)
        maps = all_gather_stacked(torch.cat([e, m], dim=-1), chunks.group, chunks.size)
        if state is None:
            state = e.new_zeros(e.shape)
        dv = self.dv
        states = compose_chunk_states(maps[..., dv:], maps[..., :dv], state.to(e.dtype))
        # this chunk's incoming state picked from all of them: every rank's output then
        # depends on the gathered maps alike (same backward order of the collectives)
        s_in = torch.stack(states)[chunks.rank]
        o, _ = gated_delta_rule(q, k, v, g, beta, initial_state=s_in, backend=self.backend,
                                chunk_size=self.chunk_size, fla_chunk_size=self.fla_chunk_size)
        return z, o, states[-1], window_conv

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None,
        conv_state: torch.Tensor | None = None,
        segment: int | None = None,
        sp: bool = False,
        chunks: WindowChunks | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output [B, T, d], S out [B, HV, dk, dv] fp32, conv state [B, C, K-1]).

        ``state`` None means zeros. ``segment``: reset the conv every ``segment`` tokens
        (the parallel form of hard eviction); the delta rule itself always runs through.
        ``chunks``: context parallelism (``_chunk_rule``): x is this rank's chunk of the
        window; S out and the conv state are the whole window's (the same on every rank).
        One token without gradients (decoding) with the chains compiled runs the rule as
        ``fused.gdn_token_step`` (compiled on CUDA), else the configured backend.
        """
        y = column(self.in_proj, x, sp)
        b, t = x.shape[:2]
        y = y.view(b, t, self.h_local, self.group_width)
        if chunks is not None:
            if segment is not None:
                raise ValueError("context parallelism splits windows; it has no segment form")
            z, o, s_new, new_conv = self._chunk_rule(y, state, conv_state, chunks)
        else:
            q, k, v, g, beta, z, new_conv = self._inputs(y, conv_state, segment)
            if t == 1 and self.compiled and not torch.is_grad_enabled():  # decoding
                o, s_new = fused.gdn_token_step(q, k, v, g, beta, state, compiled=True)
            else:
                o, s_new = gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                            backend=self.backend, chunk_size=self.chunk_size,
                                            fla_chunk_size=self.fla_chunk_size)
        of = fused.gated_rms_norm(o, z, self.out_norm_weight, self.norm_eps, x.dtype,
                                  compiled=self.compiled)
        return row(self.out_proj, of.reshape(b, t, -1), sp), s_new, new_conv
