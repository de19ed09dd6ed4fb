"""``train.deterministic``: bitwise-repeatable GPU training, at some speed.

Two runs of one config on one GPU are not bitwise equal by default: kernels that accumulate
with atomics (attention's backward in cuDNN and flash SDPA among them) add in an order that
changes from run to run. Measured on an H100, 2026-12-06: the same 8-step config (compile off,
and compile on with a shared kernel cache) run twice differs from step 2 on, by ~1e-5 in the
loss. Exact resume across processes therefore needs deterministic kernels as well as the
static-shape, deterministic-inductor compilation (docs/design.md, "Exact resume on a GPU").

On: ``torch.use_deterministic_algorithms(True, warn_only=True)`` (torch's ops without a
deterministic implementation warn, naming themselves), cuBLAS's fixed workspace
(``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when unset, before the first GEMM), cuDNN's deterministic
algorithms without autotuning, and scaled-dot-product attention without its flash and cuDNN
backends (it then takes the memory-efficient or the math backend). Triton kernels (FLA's GDN
kernels, inductor's) are outside torch's flag: inductor's deterministic mode covers the
compiled chains; FLA's kernels are as deterministic as they are written. Measured with the
PyTorch GDN kernel (H100, 2026-12-06): two runs of one 8-step config were identical, compiled
and not. Everything is restored when the run ends (tests run several trainers in one process).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["deterministic_algorithms"]


@contextmanager
def deterministic_algorithms(on: bool) -> Iterator[None]:
    """Deterministic kernels inside the block when ``on`` (module docstring); off: nothing."""
    if not on:
        yield
        return
    cuda = torch.backends.cuda
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             cuda.flash_sdp_enabled(), cuda.cudnn_sdp_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    cuda.enable_flash_sdp(False)
    cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:4]
        cuda.enable_flash_sdp(saved[4])
        cuda.enable_cudnn_sdp(saved[5])
        if saved[6] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
