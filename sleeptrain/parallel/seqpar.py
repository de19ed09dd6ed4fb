"""Sequence parallelism: the residual stream split over the TP group between mixers and MLPs.

With ``parallel.sequence_parallel`` each TP rank keeps 1/tp of a window's tokens of the
residual stream (norms, residual adds), flattened over (batch, time) and padded to a multiple
of tp: ``[ceil(B*T / tp), d]``. Before a column-parallel linear the tokens are all-gathered
(its input gradient is then reduce-scattered instead of all-reduced); a row-parallel linear's
partial sums are reduce-scattered back to the local tokens instead of all-reduced. This is
megatron-core's sequence parallelism, with the same communication volume as plain TP, written
with ``torch.distributed`` collectives so that it runs with gloo on CPUs too (megatron-core's
own sequence-parallel mappings allocate on the current CUDA device). Mixers always see whole
windows: the recurrence, the conv and attention are per head, split by TP as before.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_AG = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_RS = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather(x: torch.Tensor, group: Any, tp: int) -> torch.Tensor:
    out = x.new_empty((x.shape[0] * tp, *x.shape[1:]))
    _AG(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group: Any, tp: int) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // tp, *x.shape[1:]))
    _RS(out, x.contiguous(), group=group)
    return out


def _local(x: torch.Tensor, group: Any, tp: int) -> torch.Tensor:
    n = x.shape[0] // tp
    rank = dist.get_rank(group)
    return x[rank * n : (rank + 1) * n].contiguous()


class _Split(torch.autograd.Function):
    """Full (replicated) -> local chunk; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group, tp):  # type: ignore[override]
        ctx.group, ctx.tp = group, tp
        return _local(x, group, tp)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _all_gather(g, ctx.group, ctx.tp), None, None


class _Gather(torch.autograd.Function):
    """Local chunks -> full; backward reduce-scatters (the consumers' partial gradients)."""

    @staticmethod
    def forward(ctx, x, group, tp):  # type: ignore[override]
        ctx.group, ctx.tp = group, tp
        return _all_gather(x, group, tp)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _reduce_scatter(g, ctx.group, ctx.tp), None, None


class _Scatter(torch.autograd.Function):
    """Partial sums (full) -> reduced local chunk; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group, tp):  # type: ignore[override]
        ctx.group, ctx.tp = group, tp
        return _reduce_scatter(x, group, tp)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _all_gather(g, ctx.group, ctx.tp), None, None


def _flat_padded(x: torch.Tensor, tp: int) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    pad = (-flat.shape[0]) % tp
    return torch.nn.functional.pad(flat, (0, 0, 0, pad)) if pad else flat


def split(x: torch.Tensor, group: Any, tp: int) -> torch.Tensor:
    """[B, T, d] replicated on every rank of ``group`` (``tp`` ranks) -> this rank's
    [ceil(B*T/tp), d] tokens."""
    return _Split.apply(_flat_padded(x, tp), group, tp)


def gather(x: torch.Tensor, shape: tuple[int, int], group: Any, tp: int) -> torch.Tensor:
    """Local tokens -> the window's [B, T, d] (the inverse of :func:`split`)."""
    b, t = shape
    return _Gather.apply(x, group, tp)[: b * t].reshape(b, t, x.shape[-1])


def scatter(y: torch.Tensor, group: Any, tp: int) -> torch.Tensor:
    """Row-parallel partial sums [B, T, d] -> this rank's reduced local tokens."""
    return _Scatter.apply(_flat_padded(y, tp), group, tp)


__all__ = ["gather", "scatter", "split"]
