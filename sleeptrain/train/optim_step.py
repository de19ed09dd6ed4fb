"""The optimizer step on CUDA: learning rates read from device tensors, the step replayed as
one CUDA graph.

A small model's optimizer step is hundreds of tiny kernels (Muon: a momentum update and five
Newton-Schulz iterations per matrix; AdamW's fused kernel) whose launches take far longer
than their GPU time (docs/benchmarks.md: 13.5 ms of host time for 1.4 ms of GPU work on the
Rule 110 model). The launches are the same every step except for the learning rates, which
the schedule changes: ``DeviceLrStep`` keeps one device scalar per param group, copies the
groups' current ``lr`` values into them before each step and hands the tensors to the
optimizers (Muon's step and torch's fused AdamW both take a tensor learning rate), so the
recorded kernels read the rate from memory. After ``warmup`` eager steps (which create the
optimizer state) the step is captured once and replayed. Param groups keep their float
``lr`` between steps, so checkpoints and logging see plain numbers.

Eager and replayed steps run the same kernels, so a run with graphs equals one without on the
same GPU. A capture that fails turns the graph off (a message says why); the eager tensor-lr
step continues.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch


class DeviceLrStep:
    """``opt.step()`` of a :class:`~sleeptrain.train.optim.HybridOptimizer` with device
    learning rates, captured as a CUDA graph after ``warmup`` steps when ``graph`` is set."""

    def __init__(self, opt: Any, device: torch.device, graph: bool, warmup: int = 2,
                 verbose: bool = True) -> None:
        self.opt = opt
        self.groups = list(opt.param_groups)
        self.lr = torch.zeros(len(self.groups), dtype=torch.float32, device=device)
        self._views = [self.lr[i] for i in range(len(self.groups))]
        self.use_graph = graph
        self.warmup = warmup
        self.verbose = verbose
        self.graph: torch.cuda.CUDAGraph | None = None
        self._ptrs: list[int] = []
        self.disabled: str | None = None
        self.eager_steps = 0
        self.replays = 0

    def reset(self) -> None:
        """Drops the captured step (the set of parameters with gradients changed, or their
        buffers moved); it is captured again after ``warmup`` eager steps."""
        self.graph = None
        self.eager_steps = 0

    def _run(self) -> None:
        floats = [g["lr"] for g in self.groups]
        for g, t in zip(self.groups, self._views, strict=True):
            g["lr"] = t
        try:
            self.opt.step()
        finally:
            for g, f in zip(self.groups, floats, strict=True):
                g["lr"] = f

    def step(self) -> None:
        """One optimizer step at the groups' current learning rates."""
        # from pageable memory: the copy is staged before copy_ returns, so the values can
        # never be overwritten while an earlier copy is still queued
        values = torch.tensor([float(g["lr"]) for g in self.groups], dtype=torch.float32)
        self.lr.copy_(values, non_blocking=True)
        if self.graph is not None and self._grad_ptrs() != self._ptrs:
            self.reset()  # gradients were reallocated: the graph would read freed memory
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
            return
        if not self.use_graph or self.disabled or self.eager_steps < self.warmup:
            self._run()
            self.eager_steps += 1
            return
        try:
            self._capture()
        except Exception as e:  # noqa: BLE001 - any capture failure: stay eager
            self.graph = None
            self.disabled = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            try:
                torch.cuda.synchronize()
            except RuntimeError:
                pass
            msg = f"optimizer CUDA graph turned off, steps stay eager: {self.disabled}"
            warnings.warn(msg, stacklevel=2)
            if self.verbose:
                print(msg, flush=True)
            self._run()  # this step, eagerly
            return
        self.graph.replay()  # capture recorded the step without running it
        self.replays += 1

    def _grad_ptrs(self) -> list[int]:
        return [0 if p.grad is None else p.grad.data_ptr()
                for g in self.groups for p in g["params"]]

    def _capture(self) -> None:
        torch.cuda.synchronize()
        ptrs = self._grad_ptrs()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._run()
        self.graph, self._ptrs = graph, ptrs
        if self.verbose:
            print("CUDA graphs: captured the optimizer step", flush=True)


__all__ = ["DeviceLrStep"]
