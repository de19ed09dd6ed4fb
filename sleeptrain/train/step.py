"""The training step of one micro-batch: forward and backward, eager or as one CUDA graph.

Window-sequential training launches every kernel of every block, window and pass from Python,
and at short windows the host cannot keep up with the GPU (docs/benchmarks.md). Once the batch
shape (B, T), the sleep settings, the autocast mode and the set of trainable parameters are
fixed, a micro-batch's whole forward and backward -- each window's wake pass, its sleep passes
(window x pass checkpointing included: the recomputation is part of the backward), eviction,
the short last window, the loss and the backward through all windows -- has static shapes and
no data-dependent host decisions. ``MicroBatchGraphs`` captures it once per such layout as one
CUDA graph and replays it for every later micro-batch of that layout.

What capture relies on, and where it is kept:

- no host syncs: ``windowed_loss`` gets the window heads from the caller (``window_heads``,
  computed once per optimizer step) and applies document resets at every window
  (``static_resets``: ``torch.where`` with an all-keep mask is the identity, so the values are
  the eager ones);
- checkpoint recomputation without RNG state (the model draws no random numbers);
- gradients accumulate in place: every trainable parameter has a ``.grad`` buffer before
  capture, the graph adds into it, and the caller zeroes it in place (``zero_grads``), never
  setting it to None while graphs are alive (a replay would write into freed memory);
- the first ``warmup`` micro-batches of a layout run eagerly (Triton autotuning, TileLang
  compilation and cuDNN plans happen there, outside capture);
- a failed capture (a backend that syncs with the host, an unsupported collective) turns
  graphs off with a message naming the cause; training continues eagerly and exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sleeptrain.config import SleepConfig
from sleeptrain.model.kernels import linear as fused_linear
from sleeptrain.sleep.runner import parallel_applies, parallel_loss, windowed_loss


def forward_backward(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    doc_starts: torch.Tensor | None,
    sleep_cfg: SleepConfig,
    denom: float | torch.Tensor,
    autocast: bool,
    heads: Sequence[bool] | None,
    static: bool = False,
    passes: int | None = None,
    parallel: bool = False,
    fused_linears: bool = False,
    context_parallel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch: ``windowed_loss``, then backward of ``loss_sum / denom`` into ``.grad``.

    Returns (loss_sum, n_correct), detached. ``autocast``: bf16 autocast on CUDA. ``static``:
    the capturable form (document resets at every window; needs ``heads``). With
    ``fused_linears`` (``train.grad_accum_fusion``) the linears use bf16 weight copies made
    once per micro-batch and accumulate weight gradients into ``.grad`` inside their GEMMs.
    ``parallel``: ``parallel_loss`` (one call per layer) where ``parallel_applies`` (N=1).
    ``context_parallel``: windows split over the model's CP group (``windowed_loss``); the
    returned sums and the gradients are then this rank's share (the caller sums them over CP).
    """
    amp = autocast and tokens.is_cuda
    one_call = parallel and parallel_applies(model, sleep_cfg, passes, doc_starts)
    with fused_linear.micro_batch(model, torch.bfloat16 if amp else None, fused_linears):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            if one_call:
                out = parallel_loss(model, tokens, mask, sleep_cfg)
            else:
                out = windowed_loss(model, tokens, mask, sleep_cfg, passes=passes,
                                    doc_starts=doc_starts, heads=heads, static_resets=static,
                                    context_parallel=context_parallel)
        if out.loss_sum.requires_grad:  # no target anywhere: nothing to differentiate
            (out.loss_sum / denom).backward()
    return out.loss_sum.detach(), out.n_correct


def graphs_unavailable(device: torch.device, tp: int, setting: str,
                       cp: int = 1, pp: int = 1) -> str | None:
    """Why CUDA graphs cannot be used (None: they can) for ``train.cuda_graphs=setting`` at
    tensor-parallel size ``tp``, context-parallel size ``cp`` and pipeline size ``pp``."""
    if setting == "off":
        return "train.cuda_graphs=off"
    if pp > 1:
        return ("pipeline parallelism: a stage's step interleaves micro-batches with "
                "point-to-point messages, not one capturable micro-batch")
    if device.type != "cuda":
        return f"training runs on {device.type}, CUDA graphs need a CUDA device"
    if tp > 1 and setting == "auto":
        return ("tensor parallelism: its collectives inside the graph are not tested; "
                "set train.cuda_graphs=on to try")
    if cp > 1 and setting == "auto":
        return ("context parallelism: its collectives inside the graph are not tested; "
                "set train.cuda_graphs=on to try")
    return None


def zero_grads(params: Sequence[torch.Tensor]) -> None:
    """Zeroes existing gradients in place (their buffers stay where captured graphs write)."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_zero_(grads)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor
    mask: torch.Tensor
    doc_starts: torch.Tensor | None
    denom: torch.Tensor
    loss_sum: torch.Tensor
    n_correct: torch.Tensor


class CaptureError(RuntimeError):
    """Capture produced a graph that would not be equivalent to the eager step."""


class MicroBatchGraphs:
    """Replays captured forward+backward graphs of micro-batches; eager until captured.

    ``step(...)`` has ``forward_backward``'s meaning. Layouts are keyed by everything that
    changes the captured work: token/mask/doc-start shapes and dtypes, window heads, the sleep
    settings, ``passes``, autocast and which parameters train. At most ``max_graphs`` layouts
    are kept; others run eagerly (with one message).
    """

    def __init__(self, model: torch.nn.Module, warmup: int = 2, max_graphs: int = 4,
                 verbose: bool = True, parallel: bool = False, fused_linears: bool = False,
                 context_parallel: bool = False):
        self.model = model
        self.context_parallel = context_parallel  # forward_backward's CP split of windows
        self.parallel = parallel  # forward_backward's one-call form at N=1
        self.fused_linears = fused_linears  # forward_backward's fused linears
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.verbose = verbose
        self.graphs: dict[Any, _Captured] = {}
        self.seen: dict[Any, int] = {}
        self.disabled: str | None = None
        self.captures = 0
        self.replays = 0
        self._pool = None
        self._stream: torch.cuda.Stream | None = None
        self._warned_full = False

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def reset(self) -> None:
        """Drops every captured graph (e.g. when the trainable set changes)."""
        self.graphs.clear()
        self.seen.clear()

    def _key(self, tokens, mask, doc_starts, sleep_cfg, autocast, heads, passes) -> Any:
        from omegaconf import OmegaConf

        sc = OmegaConf.to_container(sleep_cfg, resolve=True) if OmegaConf.is_config(
            sleep_cfg) else dict(vars(sleep_cfg))
        doc = None if doc_starts is None else (tuple(doc_starts.shape), doc_starts.dtype)
        return (tuple(tokens.shape), tokens.dtype, str(tokens.device), tuple(mask.shape),
                mask.dtype, doc, repr(sorted(sc.items())), passes, bool(autocast),
                self.parallel, tuple(bool(h) for h in heads),
                tuple(id(p) for p in self.trainable()))

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, doc_starts: torch.Tensor | None,
             sleep_cfg: SleepConfig, denom: float, autocast: bool, heads: Sequence[bool],
             passes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward of one micro-batch (graph replay once captured)."""
        if self.disabled is not None or not tokens.is_cuda:
            return forward_backward(self.model, tokens, mask, doc_starts, sleep_cfg, denom,
                                    autocast, heads, static=False, passes=passes,
                                    parallel=self.parallel,
                                    fused_linears=self.fused_linears,
                                    context_parallel=self.context_parallel)
        key = self._key(tokens, mask, doc_starts, sleep_cfg, autocast, heads, passes)
        cap = self.graphs.get(key)
        if cap is None:
            n = self.seen.get(key, 0)
            self.seen[key] = n + 1
            full = len(self.graphs) >= self.max_graphs
            if full and not self._warned_full and self.verbose:
                print(f"CUDA graphs: {self.max_graphs} micro-batch layouts captured already; "
                      "new layouts run eagerly", flush=True)
                self._warned_full = True
            if n < self.warmup or full:
                return forward_backward(self.model, tokens, mask, doc_starts, sleep_cfg,
                                        denom, autocast, heads, static=True, passes=passes,
                                        parallel=self.parallel,
                                        fused_linears=self.fused_linears,
                                        context_parallel=self.context_parallel)
            try:
                cap = self._capture(tokens, mask, doc_starts, sleep_cfg, autocast, heads, passes)
            except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
                self.disabled = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                self.graphs.clear()
                try:  # an invalidated capture may report its error here once more
                    torch.cuda.synchronize()
                except RuntimeError:
                    pass
                msg = (f"CUDA graphs turned off, training continues eagerly: capture failed "
                       f"({self.disabled})")
                warnings.warn(msg, stacklevel=2)
                if self.verbose:
                    print(msg, flush=True)
                return forward_backward(self.model, tokens, mask, doc_starts, sleep_cfg,
                                        denom, autocast, heads, static=False, passes=passes,
                                        parallel=self.parallel,
                                        fused_linears=self.fused_linears,
                                        context_parallel=self.context_parallel)
            self.graphs[key] = cap
        cap.tokens.copy_(tokens)
        cap.mask.copy_(mask)
        if cap.doc_starts is not None:
            cap.doc_starts.copy_(doc_starts)
        cap.denom.fill_(float(denom))
        cap.graph.replay()
        self.replays += 1
        return cap.loss_sum.clone(), cap.n_correct.clone()

    def _capture(self, tokens, mask, doc_starts, sleep_cfg, autocast, heads,
                 passes) -> _Captured:
        params = self.trainable()
        for p in params:  # the graph accumulates into these buffers in place
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        ptrs = [p.grad.data_ptr() for p in params]
        dev = tokens.device
        st_tokens, st_mask = tokens.clone(), mask.clone()
        st_doc = None if doc_starts is None else doc_starts.to(dev).clone()
        ldt = torch.float64 if self.model.dtype == torch.float64 else torch.float32
        st_denom = torch.ones((), dtype=ldt, device=dev)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device=dev)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()  # the eager warm-up's cached blocks: the graph has its pool
        graph = torch.cuda.CUDAGraph()
        # Capture records kernels without running them: gradients are untouched here.
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            loss_sum, n_correct = forward_backward(
                self.model, st_tokens, st_mask, st_doc, sleep_cfg, st_denom, autocast, heads,
                static=True, passes=passes, parallel=self.parallel,
                fused_linears=self.fused_linears, context_parallel=self.context_parallel)
        moved = [p for p, q in zip(params, ptrs, strict=True) if p.grad.data_ptr() != q]
        if moved:
            raise CaptureError(f"{len(moved)} gradient buffers were replaced during capture "
                               "instead of accumulated into")
        self.captures += 1
        if self.verbose:
            print(f"CUDA graphs: captured the micro-batch step for tokens "
                  f"{tuple(tokens.shape)} ({len(heads)} windows)", flush=True)
        return _Captured(graph, st_tokens, st_mask, st_doc, st_denom, loss_sum, n_correct)
