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

Accumulating into ``.grad`` inside backward is right for ``loss.backward()``, not for
``torch.autograd.grad`` (which must return gradients, not store them): code that takes
gradients with ``torch.autograd.grad`` through these linears records its graph under
``plain_weight_grads()`` (the implicit-gradient sleep's Neumann backward does).

There is no process-wide switch: the training step (``sleeptrain.train.step``) enters a
model's context around each micro-batch when ``train.grad_accum_fusion`` is on (default auto:
on for CUDA); the context marks the model's linears (a plain attribute on each), which is how
``sleeptrain.model.layers.column`` / ``row`` find it. Tests:
tests/test_linear_fusion.py (CPU, exact in fp64 against megatron-core's path),
tests/test_parallel.py (TP=2), tests/test_graphs_gpu.py (bf16 on GPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def active(layer: torch.nn.Module) -> FusedLinears | None:
    """The FusedLinears context a linear layer is inside (None: megatron-core's own path)."""
    return getattr(layer, "_fused_linears", None)


@contextlib.contextmanager
def plain_weight_grads(model: torch.nn.Module) -> Iterator[None]:
    """Linears of ``model`` recorded inside return their weight gradient to autograd (for
    ``torch.autograd.grad``) instead of adding it into ``.grad`` (a no-op outside a
    FusedLinears context)."""
    ctx: FusedLinears | None = getattr(model, "_fused_linears_active", None)
    if ctx is None:
        yield
        return
    old = ctx.accumulate
    ctx.accumulate = False
    try:
        yield
    finally:
        ctx.accumulate = old


def _linear_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]


def matrix_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of the model's megatron-core linears, and the embedding if the head is
    tied to it (it is the head's weight then), each once."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    out: dict[int, torch.nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and m.weight is not None:
            out[id(m.weight)] = m.weight
    head, embed = getattr(model, "head", None), getattr(model, "embed", None)
    if head is not None and head.weight is None and embed is not None:
        out[id(embed.weight)] = embed.weight
    return list(out.values())


class FusedLinears:
    """Per-model low-precision weight copies; ``with`` it around a micro-batch's forward and
    backward. ``dtype`` None (or the weights' own dtype): no copies, only the fused weight
    gradient accumulation."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None):
        self.model = model
        self.weights = matrix_weights(model)
        self.layers = _linear_layers(model)
        self.dtype = dtype
        self.copies: dict[int, torch.Tensor] = {}
        self.accumulate = True  # False under plain_weight_grads

    def low_precision(self, weight: torch.Tensor) -> torch.Tensor:
        if self.dtype is None or weight.dtype == self.dtype:
            return weight.detach()
        c = self.copies.get(id(weight))
        if c is None:
            raise KeyError("linear fusion: a weight that is not one of the model's "
                           "megatron-core linears (or the tied head) reached linear()")
        return c

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
        if getattr(self.model, "_fused_linears_active", None) is not None:
            raise RuntimeError("linear fusion: FusedLinears contexts do not nest")
        self.refresh()
        for w in self.weights:  # the backward accumulates into these in place
            if w.requires_grad and w.grad is None:
                w.grad = torch.zeros_like(w)
        # plain attributes (not submodules): the layers find their context here
        object.__setattr__(self.model, "_fused_linears_active", self)
        for layer in self.layers:
            object.__setattr__(layer, "_fused_linears", self)
        return self

    def __exit__(self, *exc: object) -> None:
        object.__setattr__(self.model, "_fused_linears_active", None)
        for layer in self.layers:
            object.__setattr__(layer, "_fused_linears", None)


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


def micro_batch(model: torch.nn.Module, dtype: torch.dtype | None,
                fused: bool) -> contextlib.AbstractContextManager[Any]:
    """What a micro-batch's forward and backward run inside: the model's ``FusedLinears``
    for ``dtype`` when ``fused`` (``train.grad_accum_fusion``), else nothing
    (megatron-core's own linears)."""
    return for_model(model, dtype) if fused else contextlib.nullcontext()


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
    def forward(ctx, x, weight, w_lp, accumulate):  # type: ignore[override]
        ctx.save_for_backward(x, w_lp)
        ctx.weight = weight
        ctx.accumulate = accumulate
        return torch.matmul(x, w_lp.t())

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, w = ctx.saved_tensors
        dx = torch.matmul(g, w) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            g2 = g.reshape(-1, g.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            weight = ctx.weight
            if ctx.accumulate and weight.grad is not None:
                _accumulate(weight.grad, g2.t(), x2)
            else:
                dw = torch.matmul(g2.t(), x2)
        return dx, dw, None, None


def linear(ctx: FusedLinears, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T through context ``ctx`` (its low-precision copy; fused accumulation)."""
    w_lp = ctx.low_precision(weight)
    if x.dtype != w_lp.dtype:
        x = x.to(w_lp.dtype)
    accumulate = ctx.accumulate and torch.is_grad_enabled()
    return _Linear.apply(x, weight, w_lp, accumulate)
