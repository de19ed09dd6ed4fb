"""The GPU's bf16 matmul peak, from a datasheet table and measured, for MFU."""

from __future__ import annotations

import time

import torch

#: Dense bf16 tensor-core peaks (FLOP/s) by device-name substring, first match wins.
PEAK_BF16 = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200", 989e12), ("H100", 989e12),
    ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
)


#: Memory of one GPU (GiB, as torch.cuda reports it) by device-name substring, first match wins.
MEMORY_GIB = (
    ("H100 NVL", 93.1), ("H100", 79.6), ("H800", 79.6), ("GH200", 94.5), ("H200", 140.4),
    ("B200", 178.4), ("A100", 79.2), ("A800", 79.2), ("L40S", 44.4),
)


def device_memory_gib(device_name: str) -> float | None:
    """Memory of one GPU named ``device_name`` in GiB (None when unknown; the A100's 80 GB
    model is assumed)."""
    for key, val in MEMORY_GIB:
        if key.lower() in device_name.lower():
            return val
    return None


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``device_name`` (None when unknown)."""
    for key, val in PEAK_BF16:
        if key.lower() in device_name.lower():
            return val
    return None


def measure_bf16_peak(device: torch.device | str = "cuda", n: int = 8192,
                      iters: int = 20) -> float:
    """This GPU's bf16 matmul throughput (FLOP/s): n x n x n GEMMs, timed after warm-up.

    The denominator of the "measured" MFU (train and tools/bench_window.py), next to the
    datasheet peak of ``peak_flops``: a kernel can beat neither.
    """
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b, out=c)
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b, out=c)
    torch.cuda.synchronize(dev)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


__all__ = ["MEMORY_GIB", "PEAK_BF16", "device_memory_gib", "measure_bf16_peak", "peak_flops"]
