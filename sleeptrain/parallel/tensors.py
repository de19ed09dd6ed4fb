"""Tensor-parallel parameters: which dimension is split, full tensors, gradient sync and norms.

A parameter split over the TP group carries megatron-core's attributes
``tensor_model_parallel=True`` and ``partition_dim``; TP rank r holds the contiguous slice r
of the full tensor along that dimension (the model's layouts are TP-size independent, see
:mod:`sleeptrain.model.layers`). Every other parameter is replicated. A replicated parameter
used by only this rank's heads (the GDN output-norm gain, shared by all heads) gets a partial
gradient on each rank; it is marked ``tp_partial_grad=True`` and summed over the TP group by
:func:`sync_tp_grads` before the optimizer step, as megatron-core does for its layer-norm
weights under sequence parallelism.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist


def partition_dim(p: torch.Tensor) -> int | None:
    """The dimension ``p`` is split along over the TP group, or None when replicated."""
    if getattr(p, "tensor_model_parallel", False):
        return int(p.partition_dim)
    return None


def tp_group_and_size() -> tuple[Any, int, int]:
    """(megatron-core's TP group, its size, this rank's TP rank); (None, 1, 0) without it."""
    from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized():
        return None, 1, 0
    return (mpu.get_tensor_model_parallel_group(), mpu.get_tensor_model_parallel_world_size(),
            mpu.get_tensor_model_parallel_rank())


def gather_tp(t: torch.Tensor, dim: int | None, group: Any = None,
              size: int | None = None) -> torch.Tensor:
    """The full tensor of a TP shard ``t`` split along ``dim`` (``t`` itself if dim is None)."""
    if dim is None:
        return t
    if group is None:
        group, size, _ = tp_group_and_size()
    size = size if size is not None else dist.get_world_size(group)
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim over a TP group; backward keeps this rank's slice.
    (megatron-core's equivalent allocates on the current CUDA device: no CPU/gloo.)"""

    @staticmethod
    def forward(ctx, t, group, size, rank):  # type: ignore[override]
        ctx.slice = (rank * t.shape[-1], (rank + 1) * t.shape[-1])
        return gather_tp(t, t.dim() - 1, group, size)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        a, b = ctx.slice
        return g[..., a:b].contiguous(), None, None, None


def gather_last_dim(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The full tensor of TP shards split along the last dim (vocabulary-parallel logits),
    differentiable, on any device and backend."""
    if group is None:
        group, size, rank = tp_group_and_size()
    else:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
    if size == 1:
        return t
    return _GatherLastDim.apply(t, group, size, rank)


def vocab_parallel_argmax(logits: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """argmax over the full vocabulary of logits split over the TP group [..., V / size]
    (ties: the lowest token id, as ``argmax`` over the gathered logits)."""
    if size == 1:
        return logits.argmax(-1)
    local_max, local_idx = logits.float().max(-1)
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    offset = dist.get_rank(group) * logits.shape[-1]
    big = torch.iinfo(torch.int64).max
    cand = torch.where(local_max == global_max, local_idx + offset,
                       torch.full_like(local_idx, big))
    dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=group)
    return cand


def vocab_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor,
                        size: int) -> torch.Tensor:
    """Per-token cross-entropy [B, l] from vocab-parallel logits [B, l, V / size].

    megatron-core's vocab-parallel cross-entropy (fp32 math, over megatron-core's TP group)
    when the vocabulary is split; otherwise torch's fused cross-entropy in fp32 (fp64 for
    fp64 logits, so float64 gradient checks stay exact), which issues no collective calls
    and no per-window temporaries of the vocabulary's size.
    """
    if size == 1:
        dt = torch.float64 if local_logits.dtype == torch.float64 else torch.float32
        return torch.nn.functional.cross_entropy(
            local_logits.flatten(0, -2).to(dt), targets.flatten(), reduction="none"
        ).view(targets.shape)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(local_logits.float(), targets)


def shard_tp(full: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    """TP rank ``rank``'s slice of ``full`` along ``dim`` (``full`` when dim is None)."""
    if dim is None or size == 1:
        return full
    if full.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not split over "
                         f"{size} tensor-parallel ranks")
    n = full.shape[dim] // size
    return full.narrow(dim, rank * n, n)


def full_shape(p: torch.Tensor, size: int) -> tuple[int, ...]:
    """The shape of the full tensor of TP shard ``p``."""
    shape = list(p.shape)
    d = partition_dim(p)
    if d is not None:
        shape[d] *= size
    return tuple(shape)


def sync_tp_grads(params: Iterable[torch.Tensor]) -> None:
    """Sums the partial gradients of parameters marked ``tp_partial_grad`` over the TP group."""
    group, size, _ = tp_group_and_size()
    if size == 1:
        return
    for p in params:
        if getattr(p, "tp_partial_grad", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float,
                    pp_group: Any = None, counted_elsewhere: Iterable[torch.Tensor] = ()
                    ) -> torch.Tensor:
    """Clips gradients by their global L2 norm over the full (unsharded) model; returns it.

    Split parameters contribute their slices' squares summed over the TP group, replicated ones
    once. Data-parallel ranks hold the same (already reduced) gradients, so the norm is the
    same on every rank. ``max_norm=inf`` only measures. With pipeline parallelism
    (``pp_group``) every stage holds its own parameters: the squares are summed over the
    group too; ``counted_elsewhere`` (a tied embedding's second copy, on the last stage) is
    clipped but left out of this rank's squares.
    """
    params = [p for p in params if p.grad is not None]
    if pp_group is None and not params:
        return torch.zeros(())
    group, size, _ = tp_group_and_size()
    dev = params[0].grad.device if params else torch.device("cpu")
    if pp_group is not None and dist.get_backend(pp_group) == "nccl" and dev.type != "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())  # a stage without gradients
    skip = {id(p) for p in counted_elsewhere}
    counted = [p for p in params if id(p) not in skip]
    split = _grad_squares([p for p in counted if partition_dim(p) is not None], dev)
    rep = _grad_squares([p for p in counted if partition_dim(p) is None], dev)
    if size > 1:
        split = split.clone()
        dist.all_reduce(split, group=group)
    total_sq = split + rep
    if pp_group is not None:  # every stage holds its own parameters
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    if math.isfinite(max_norm) and params:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad.detach())
        for dt, grads in by_dtype.items():
            torch._foreach_mul_(grads, coef.to(dt))
    return total


def _grad_squares(ps: list[torch.Tensor], dev: torch.device) -> torch.Tensor:
    """The sum of the squared gradient entries of ``ps`` (float32, on ``dev``): one
    multi-tensor norm kernel per dtype instead of three kernels per parameter."""
    if not ps:
        return torch.zeros((), dtype=torch.float32, device=dev)
    norms = torch._foreach_norm([p.grad.detach() for p in ps])
    return torch.stack([n.float() for n in norms]).pow(2).sum()


__all__ = ["clip_grad_norm_", "full_shape", "gather_last_dim", "gather_tp", "partition_dim",
           "shard_tp", "sync_tp_grads", "tp_group_and_size", "vocab_cross_entropy",
           "vocab_parallel_argmax"]
