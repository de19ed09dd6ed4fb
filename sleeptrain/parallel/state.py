"""Process groups: ``torch.distributed`` plus megatron-core's parallel state, set up by one helper.

``init_parallel(tp)`` works in every setting the project runs in: a single process on a CPU
(gloo over a private file store), torchrun on CPUs (gloo) and torchrun on GPUs (NCCL). It is
idempotent: a second call with the same layout returns the existing one.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits: global rank/world, TP rank/size and DP rank/size."""

    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    backend: str
    device: torch.device


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("parallel.backend: 'nccl' needs CUDA devices; use 'gloo' on CPU")
    return backend


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for ``train.device`` (auto: this rank's CUDA device if any, else CPU)."""
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device: 'cuda' was asked for but no CUDA device is visible")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_parallel(tp: int = 1, backend: str = "auto", device: str = "auto") -> ParallelInfo:
    """Initializes torch.distributed and megatron-core's model-parallel groups (TP, DP).

    Under torchrun the env:// rendezvous is used; otherwise a one-process group on a private
    file store. Raises ValueError naming the numbers when the world size is not divisible by tp.
    """
    from megatron.core import parallel_state as mpu

    dev = resolve_device(device)
    be = _pick_backend(backend, dev)
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=be, init_method="env://")
        else:
            fd, path = tempfile.mkstemp(prefix="sleeptrain-pg-")
            os.close(fd)
            os.unlink(path)
            dist.init_process_group(backend=be, init_method=f"file://{path}", rank=0, world_size=1)
    world = dist.get_world_size()
    if world % tp != 0:
        raise ValueError(
            f"parallel.tp={tp} does not divide the world size {world} "
            f"(world = tp x dp must hold)"
        )
    if mpu.model_parallel_is_initialized():
        have = mpu.get_tensor_model_parallel_world_size()
        if have != tp:
            raise ValueError(
                f"parallel.tp={tp} but megatron-core is already initialized with TP={have}; "
                "call sleeptrain.parallel.destroy_parallel() first"
            )
    else:
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp)
    return ParallelInfo(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        tp_size=mpu.get_tensor_model_parallel_world_size(),
        dp_rank=mpu.get_data_parallel_rank(),
        dp_size=mpu.get_data_parallel_world_size(),
        backend=dist.get_backend(),
        device=dev,
    )


def destroy_parallel() -> None:
    """Tears down megatron-core's groups and the default process group."""
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_size() -> int:
    """Tensor-parallel world size (1 when megatron-core is not initialized)."""
    from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized():
        return 1
    return mpu.get_tensor_model_parallel_world_size()


def tp_group():
    """megatron-core's tensor-parallel process group (None before ``init_parallel``)."""
    from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized():
        return None
    return mpu.get_tensor_model_parallel_group()
