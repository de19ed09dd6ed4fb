"""Where sleeptrain's own Triton kernels run: CUDA tensors, or CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1``, how the CPU tests run them); fp32/bf16/fp16 inputs."""

from __future__ import annotations

import os

import torch


def require_triton_tensor(x: torch.Tensor, setting: str, cpu_choice: str,
                          fp64_choice: str) -> None:
    """RuntimeError naming ``setting`` (e.g. ``model.gdn_inputs='triton'``) and the choice to
    use instead where its kernels cannot take ``x``."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{setting} runs on CUDA tensors (or under TRITON_INTERPRET=1 for "
                           f"tests); use {cpu_choice} on CPU")
    if x.dtype == torch.float64:
        raise RuntimeError(f"{setting} computes in fp32: fp64 models use {fp64_choice}")
