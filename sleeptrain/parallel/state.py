"""Process groups: ``torch.distributed`` plus megatron-core's parallel state, set up by one helper.

``init_parallel(tp, cp=...)`` works in every setting the project runs in: a single process on a CPU
(gloo over a private file store), torchrun on CPUs (gloo) and torchrun on GPUs (NCCL). It is
idempotent: a second call with the same layout returns the existing one.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sleeptrain.parallel.context import ContextParallel


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits: global rank/world, TP rank/size, DP rank/size and CP
    rank/size. Data-parallel ranks read different data; the TP and CP peers of a rank read
    the same batch (world = TP x CP x DP)."""

    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    backend: str
    device: torch.device
    cp_rank: int = 0
    cp_size: int = 1


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


def init_parallel(tp: int = 1, backend: str = "auto", device: str = "auto",
                  cp: int = 1) -> ParallelInfo:
    """Initializes torch.distributed and megatron-core's model-parallel groups (TP, CP, DP;
    megatron-core's rank order tp-cp-dp: TP peers are adjacent ranks, then CP).

    Under torchrun the env:// rendezvous is used; otherwise a one-process group on a private
    file store. Raises ValueError naming the numbers when the world size is not divisible by
    tp x cp.
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
    if world % (tp * cp) != 0:
        raise ValueError(
            f"parallel.tp={tp} x parallel.cp={cp} does not divide the world size {world} "
            f"(world = tp x cp x dp must hold)"
        )
    if mpu.model_parallel_is_initialized():
        have = (mpu.get_tensor_model_parallel_world_size(),
                mpu.get_context_parallel_world_size())
        if have != (tp, cp):
            raise ValueError(
                f"parallel.tp={tp}, parallel.cp={cp} but megatron-core is already initialized "
                f"with TP={have[0]}, CP={have[1]}; call sleeptrain.parallel.destroy_parallel() "
                "first"
            )
    else:
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
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
        cp_rank=mpu.get_context_parallel_rank(),
        cp_size=mpu.get_context_parallel_world_size(),
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


def context_parallel() -> ContextParallel | None:
    """The context-parallel group, rank and size for the model
    (``sleeptrain.parallel.context.ContextParallel``); None without CP (size 1 or before
    ``init_parallel``)."""
    from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized() or mpu.get_context_parallel_world_size() == 1:
        return None
    return ContextParallel(mpu.get_context_parallel_group(), mpu.get_context_parallel_rank(),
                           mpu.get_context_parallel_world_size())


def grad_group() -> Any:
    """The group gradients of replicated parameters are summed over: megatron-core's
    data-parallel group with the context-parallel ranks (DP x CP)."""
    from megatron.core import parallel_state as mpu

    return mpu.get_data_parallel_group(with_context_parallel=True)


def tp_group():
    """megatron-core's tensor-parallel process group (None before ``init_parallel``)."""
    from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized():
        return None
    return mpu.get_tensor_model_parallel_group()
