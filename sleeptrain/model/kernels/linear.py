"""The training step's linears: low-precision weight copies made once per micro-batch, weight
gradients accumulated by the GEMM into the fp32 ``.grad``.

Under bf16 autocast a megatron-core linear with fp32 weights casts its weight to bf16 at every
call -- forward, and again for the input gradient in backward (``weight.t()`` is a view, so
autocast's weight cache does not hold it) -- and returns a bf16 weight gradient that autograd
casts to fp32 and adds into ``.grad``: four weight-sized elementwise passes per call. A
window-sequential step calls every linear once per window and pass, so at short windows these
passes dominate the step (docs/benchmarks.md). megatron-core avoids the last two with its
``gradient_accumulation_fusion`` (APEX's ``wgrad_gemm_accum_fp32``) on top of bf16 parameters
with fp32 main gradients; sleeptrain keeps fp32 parameters and does the equivalent itself:

- ``FusedLinears(model, dtype)``, entered around one micro-batch's forward and backward, copies
  every matrix weight of the model's megatron-core linears (and the tied output head) to a
  persistent ``dtype`` buffer once (``torch._foreach_copy_``; the same rounding as autocast's
  cast), so the casts happen once per micro-batch, not once per window, pass and direction;
- ``linear(x, weight)`` multiplies by that copy, and its backward accumulates
  ``grad_out^T @ x`` straight into ``weight.grad`` (fp32) with one GEMM
  (``addmm(..., out_dtype=float32)`` on CUDA, ``addmm_`` when dtypes agree), returning no
  weight gradient to autograd. The fp32 accumulation is at least as exact as the bf16 weight
  gradient it replaces.

Megatron-core's layers still own the parameters and their tensor-parallel attributes; their
region mappings (``copy_to_tensor_model_parallel_region`` and
``reduce_from_tensor_model_parallel_region``) do the TP communication, see
``sleeptrain.model.layers.column`` / ``row``.

On CUDA the weight-gradient GEMMs can run on a second stream (``set_wgrad_stream``, the
trainer's ``train.wgrad_stream``): nothing later in the backward reads a weight gradient, so
the GEMM that adds it into ``.grad`` need not delay the input gradients, which carry the
backward on to the layer below. At short windows every kernel of the step is small and leaves
SMs idle; the wgrad GEMMs fill them. ``_SideStream`` keeps the tensors each queued GEMM reads
alive until the main stream has waited for it, at most ``WGRAD_QUEUE`` GEMMs in flight, and
the main stream waits for all of them when the micro-batch's context is left (inside a CUDA
graph's capture too: the side stream forks from and joins the capture stream). The tied
output head's weight stays on the main stream: the embedding's own gradient is added into
the same ``.grad`` there.

Accumulating into ``.grad`` inside backward is right for ``loss.backward()``, not for
``torch.autograd.grad`` (which must return gradients, not store them): code that takes
gradients with ``torch.autograd.grad`` through these linears records its graph under
``plain_weight_grads()`` (the implicit-gradient sleep's Neumann backward does).

The process-wide switch (``set_enabled``) is off until set; the trainer sets it from
``train.grad_accum_fusion`` (default auto: on for CUDA), and
``sleeptrain.sleep.graphs.forward_backward`` enters the context when it is on. Tests:
tests/test_linear_fusion.py (CPU, exact in fp64 against megatron-core's path),
tests/test_parallel.py (TP=2), tests/test_graphs_gpu.py (bf16 on GPU).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import Any

import torch

_STATE: dict[str, object] = {"enabled": False, "active": None, "accumulate": True,
                             "wgrad_stream": False}
WGRAD_QUEUE = 4  # weight-gradient GEMMs in flight on the side stream before the main waits


def set_enabled(flag: bool) -> None:
    """Process-wide switch read by ``forward_backward`` (the trainer sets it)."""
    _STATE["enabled"] = bool(flag)


def enabled() -> bool:
    return bool(_STATE["enabled"])


def set_wgrad_stream(flag: bool) -> None:
    """Process-wide switch: CUDA weight-gradient GEMMs on a side stream (the trainer sets it
    from ``train.wgrad_stream``)."""
    _STATE["wgrad_stream"] = bool(flag)


def wgrad_stream_enabled() -> bool:
    return bool(_STATE["wgrad_stream"])


def active() -> FusedLinears | None:
    """The context of the micro-batch being run, or None (megatron-core's own path)."""
    return _STATE["active"]  # type: ignore[return-value]


@contextlib.contextmanager
def plain_weight_grads() -> Iterator[None]:
    """Linears recorded inside return their weight gradient to autograd (for
    ``torch.autograd.grad``) instead of adding it into ``.grad``."""
    old = _STATE["accumulate"]
    _STATE["accumulate"] = False
    try:
        yield
    finally:
        _STATE["accumulate"] = old


def tied_head_weight(model: torch.nn.Module) -> torch.nn.Parameter | None:
    """The embedding's weight if the output head is tied to it (the head's weight then)."""
    head, embed = getattr(model, "head", None), getattr(model, "embed", None)
    if head is not None and head.weight is None and embed is not None:
        return embed.weight
    return None


def matrix_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of the model's megatron-core linears, and the embedding if the head is
    tied to it (it is the head's weight then), each once."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    out: dict[int, torch.nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and m.weight is not None:
            out[id(m.weight)] = m.weight
    tied = tied_head_weight(model)
    if tied is not None:
        out[id(tied)] = tied
    return list(out.values())


class _SideStream:
    """A CUDA stream for weight-gradient GEMMs: ``accumulate`` queues ``grad += a @ b`` on it
    after everything the current stream has issued; ``join`` makes the current stream wait
    for all of it. Each queued GEMM's inputs are referenced here until the current stream has
    waited for that GEMM, so the caching allocator cannot hand their memory to later work of
    the current stream while the side stream still reads it."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device=device)
        self.pending: collections.deque[tuple[torch.cuda.Event, tuple[torch.Tensor, ...]]] = (
            collections.deque())

    def accumulate(self, grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        main = torch.cuda.current_stream(grad.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            _accumulate(grad, a, b)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.pending.append((done, (a, b)))
        while len(self.pending) > WGRAD_QUEUE:
            main.wait_event(self.pending.popleft()[0])

    def join(self) -> None:
        if self.pending:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            self.pending.clear()


class FusedLinears:
    """Per-model low-precision weight copies; ``with`` it around a micro-batch's forward and
    backward. ``dtype`` None (or the weights' own dtype): no copies, only the fused weight
    gradient accumulation."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None):
        self.weights = matrix_weights(model)
        tied = tied_head_weight(model)
        self.tied = None if tied is None else id(tied)
        self.dtype = dtype
        self.copies: dict[int, torch.Tensor] = {}
        self.side: _SideStream | None = None

    def low_precision(self, weight: torch.Tensor) -> torch.Tensor:
        if self.dtype is None or weight.dtype == self.dtype:
            return weight.detach()
        c = self.copies.get(id(weight))
        if c is None:
            raise KeyError("linear fusion: a weight that is not one of the model's "
                           "megatron-core linears (or the tied head) reached linear()")
        return c

    def side_stream(self, weight: torch.Tensor) -> _SideStream | None:
        """Where ``weight``'s gradient GEMM runs: the side stream (switch on, CUDA, not the
        tied head), else None (the current stream)."""
        if not (_STATE["wgrad_stream"] and weight.is_cuda) or id(weight) == self.tied:
            return None
        if self.side is None or self.side.stream.device != weight.device:
            self.side = _SideStream(weight.device)
        return self.side

    def refresh(self) -> None:
        """Copies the current weights into the low-precision buffers (once per micro-batch)."""
        lp = [w for w in self.weights if self.dtype is not None and w.dtype != self.dtype]
        with torch.no_grad():
            for w in lp:
                if id(w) not in self.copies or self.copies[id(w)].device != w.device:
                    self.copies[id(w)] = torch.empty_like(w, dtype=self.dtype)
            if lp:
                torch._foreach_copy_([self.copies[id(w)] for w in lp], lp)

    def __enter__(self) -> FusedLinears:
        if _STATE["active"] is not None:
            raise RuntimeError("linear fusion: FusedLinears contexts do not nest")
        self.refresh()
        for w in self.weights:  # the backward accumulates into these in place
            if w.requires_grad and w.grad is None:
                w.grad = torch.zeros_like(w)
        _STATE["active"] = self
        return self

    def __exit__(self, *exc: object) -> None:
        _STATE["active"] = None
        if self.side is not None:  # every weight gradient is in .grad once the context is left
            self.side.join()


def for_model(model: torch.nn.Module, dtype: torch.dtype | None) -> FusedLinears:
    """The model's FusedLinears for ``dtype``, kept on the model (the copies are reused)."""
    per_dtype = getattr(model, "_sleeptrain_fused_linears", None)
    if per_dtype is None:
        per_dtype = {}
        # a plain attribute (not a submodule or buffer): outside state_dict. One context per
        # dtype, never replaced: captured CUDA graphs keep reading its buffers.
        object.__setattr__(model, "_sleeptrain_fused_linears", per_dtype)
    if dtype not in per_dtype:
        per_dtype[dtype] = FusedLinears(model, dtype)
    return per_dtype[dtype]


def micro_batch(model: torch.nn.Module,
                dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """What a micro-batch's forward and backward run inside: the model's ``FusedLinears``
    for ``dtype`` while the switch is on, else nothing (megatron-core's own linears)."""
    return for_model(model, dtype) if enabled() else contextlib.nullcontext()


def _accumulate(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """grad += a @ b, in one GEMM where the dtypes allow it."""
    if a.dtype == grad.dtype:
        grad.addmm_(a, b)
    elif grad.is_cuda:
        torch.ops.aten.addmm.dtype_out(grad, a, b, grad.dtype, out=grad)
    else:  # CPU has no mixed-dtype GEMM
        grad.add_(torch.mm(a, b).to(grad.dtype))


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, w_lp, accumulate, side):  # type: ignore[override]
        ctx.save_for_backward(x, w_lp)
        ctx.weight = weight
        ctx.accumulate = accumulate
        ctx.side = side
        return torch.matmul(x, w_lp.t())

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, w = ctx.saved_tensors
        dw = None
        if ctx.needs_input_grad[1]:
            g2 = g.reshape(-1, g.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            weight = ctx.weight
            if ctx.accumulate and weight.grad is not None:
                if ctx.side is not None:  # queued first: it runs beside the input gradient
                    ctx.side.accumulate(weight.grad, g2.t(), x2)
                else:
                    _accumulate(weight.grad, g2.t(), x2)
            else:
                dw = torch.matmul(g2.t(), x2)
        dx = torch.matmul(g, w) if ctx.needs_input_grad[0] else None
        return dx, dw, None, None, None


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T through the active context (its low-precision copy; fused accumulation)."""
    ctx = active()
    if ctx is None:
        raise RuntimeError("linear fusion: linear() called outside a FusedLinears context")
    w_lp = ctx.low_precision(weight)
    if x.dtype != w_lp.dtype:
        x = x.to(w_lp.dtype)
    accumulate = bool(_STATE["accumulate"]) and torch.is_grad_enabled()
    side = ctx.side_stream(weight) if accumulate else None
    return _Linear.apply(x, weight, w_lp, accumulate, side)
