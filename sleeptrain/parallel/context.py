"""Context parallelism: every training window's tokens split over the CP group.

With N > 1 windows are strictly sequential, so CP splits the l tokens of each window (each
pass) into ``size`` contiguous chunks, rank r holding tokens [bounds[r], bounds[r + 1])
(sizes differ by at most one). Norms, MLPs, projections, the head and the loss stay local to
a rank's tokens; the mixers exchange what crosses chunk boundaries (docs/design.md, "Context
parallelism"): attention all-gathers the window's keys/values, GDN all-gathers each chunk's
affine state map (M_r, E_r) and its last K-1 conv inputs.

This module holds the communication only: the split of a window (:class:`WindowChunks`) and
differentiable all-gathers over a group given as an argument (their backward reduce-scatters,
summing every rank's gradient of a gathered value into the rank that owns it). The math that
uses them lives in the model (``sleeptrain.model.layers``, ``kernels.gated_delta``). The
collectives are ``torch.distributed`` ones (gloo on CPU, NCCL on GPU), called in the same order
on every rank of the group, in forward, in recomputation and in backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

_AG = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_RS = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def chunk_bounds(length: int, size: int) -> tuple[int, ...]:
    """The ``size + 1`` chunk offsets of a window of ``length`` tokens: chunk r is
    [b[r], b[r + 1]), the first ``length % size`` chunks one token longer."""
    base, extra = divmod(length, size)
    out = [0]
    for r in range(size):
        out.append(out[-1] + base + (1 if r < extra else 0))
    return tuple(out)


@dataclass(frozen=True)
class WindowChunks:
    """One window split over the CP group: chunk r = tokens [bounds[r], bounds[r + 1])."""

    group: Any
    rank: int
    size: int
    bounds: tuple[int, ...]

    @property
    def start(self) -> int:
        """This rank's first token (window-relative)."""
        return self.bounds[self.rank]

    @property
    def end(self) -> int:
        """One past this rank's last token (window-relative)."""
        return self.bounds[self.rank + 1]

    @property
    def lengths(self) -> list[int]:
        """Tokens of every rank's chunk."""
        return [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True)]


@dataclass(frozen=True)
class ContextParallel:
    """The CP group a model splits its training windows over (rank and size in it)."""

    group: Any
    rank: int
    size: int

    def split(self, length: int) -> WindowChunks | None:
        """The split of a window of ``length`` tokens, or None when it cannot give every
        rank a token (a window shorter than the group; the runner then runs it whole)."""
        if self.size == 1 or length < self.size:
            return None
        return WindowChunks(self.group, self.rank, self.size, chunk_bounds(length, self.size))


class _GatherStacked(torch.autograd.Function):
    """x [*s] on every rank -> [size, *s]; backward: the sum over ranks of the gradient of
    this rank's entry (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, size):  # type: ignore[override]
        ctx.group, ctx.size = group, size
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        _AG(out, x.contiguous(), group=group)
        return out.view(size, *x.shape)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        g = g.contiguous()
        out = g.new_empty(g.shape[1:])
        _RS(out, g.view(-1, *g.shape[2:]), group=ctx.group)
        return out, None, None


def all_gather_stacked(x: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """Every rank's ``x`` (same shape on every rank), stacked: [size, *x.shape];
    differentiable (gradients of every copy are summed into the owning rank)."""
    if x.dim() == 0:
        return _GatherStacked.apply(x[None], group, size)[:, 0]
    return _GatherStacked.apply(x, group, size)


def gather_window(x: torch.Tensor, chunks: WindowChunks, dim: int = 1) -> torch.Tensor:
    """The window's tensor along ``dim`` from every rank's chunk ``x`` (differentiable):
    chunks are padded to the longest, gathered and trimmed back to their lengths."""
    lengths = chunks.lengths
    longest = max(lengths)
    pad = longest - x.shape[dim]
    if pad:
        widths = [0, 0] * (x.dim() - 1 - dim) + [0, pad]
        x = F.pad(x, widths)
    every = all_gather_stacked(x, chunks.group, chunks.size)
    parts = [every[r].narrow(dim, 0, n) for r, n in enumerate(lengths)]
    return torch.cat(parts, dim=dim)


def gather_tails(x: torch.Tensor, chunks: WindowChunks, width: int) -> torch.Tensor:
    """Every rank's last ``width`` entries along dim 1 of its chunk ``x`` [B, n, ...],
    left-padded with zeros where the chunk is shorter: [size, B, width, ...]
    (differentiable). ``chunks.lengths`` says how many of each are real."""
    tail = x[:, max(x.shape[1] - width, 0):]
    if tail.shape[1] < width:
        widths = [0, 0] * (x.dim() - 2) + [width - tail.shape[1], 0]
        tail = F.pad(tail, widths)
    return all_gather_stacked(tail, chunks.group, chunks.size)


__all__ = ["ContextParallel", "WindowChunks", "all_gather_stacked", "chunk_bounds",
           "gather_tails", "gather_window"]
