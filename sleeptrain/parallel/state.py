"""Process groups: ``torch.distributed`` plus megatron-core's parallel state, set up by one helper.

``init_parallel(tp, cp=...)`` works in every setting the project runs in: a single process on a CPU
(gloo over a private file store), torchrun on CPUs (gloo) and torchrun on GPUs (NCCL). It is
idempotent: a second call with the same layout returns the existing one.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sleeptrain.parallel.context import ContextParallel
from sleeptrain.parallel.pipeline import PipelineGroups, make_pair_groups

#: the pipeline groups of this process, made once per ``init_parallel`` (new_group is a
#: collective: they are created on first use, at the same point on every rank)
_PIPELINES: dict[str, PipelineGroups] = {}


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits: global rank/world, TP rank/size, DP rank/size, CP rank/size
    and its pipeline stage / stages. Data-parallel ranks read different data; the TP, CP and
    PP peers of a rank read the same batch (world = TP x CP x PP x DP)."""

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
    pp_rank: int = 0
    pp_size: int = 1


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
                  cp: int = 1, pp: int = 1) -> ParallelInfo:
    """Initializes torch.distributed and megatron-core's model-parallel groups (TP, CP, DP,
    PP; megatron-core's rank order tp-cp-dp-pp: TP peers are adjacent ranks, then CP, then
    DP; the pipeline stages of a model replica are the outermost).

    Under torchrun the env:// rendezvous is used; otherwise a one-process group on a private
    file store. Raises ValueError naming the numbers when the world size is not divisible by
    tp x cp x pp.
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
        _destroy_at_exit()
    world = dist.get_world_size()
    if world % (tp * cp * pp) != 0:
        what = f"parallel.tp={tp} x parallel.cp={cp}" + (f" x parallel.pp={pp}" if pp > 1
                                                           else "")
        raise ValueError(
            f"{what} does not divide the world size {world} "
            f"(world = tp x cp x {'pp x ' if pp > 1 else ''}dp must hold)"
        )
    if mpu.model_parallel_is_initialized():
        have = (mpu.get_tensor_model_parallel_world_size(),
                mpu.get_context_parallel_world_size(),
                mpu.get_pipeline_model_parallel_world_size())
        if have != (tp, cp, pp):
            raise ValueError(
                f"parallel.tp={tp}, parallel.cp={cp}, parallel.pp={pp} but megatron-core is "
                f"already initialized with TP={have[0]}, CP={have[1]}, PP={have[2]}; call "
                "sleeptrain.parallel.destroy_parallel() first"
            )
    else:
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                      pipeline_model_parallel_size=pp)
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
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        pp_size=mpu.get_pipeline_model_parallel_world_size(),
    )


_AT_EXIT = False


def _destroy_at_exit() -> None:
    """Registers (once) ``destroy_parallel`` to run at interpreter exit, for the group
    ``init_parallel`` created: a gloo group still alive when the interpreter finalizes can abort
    the process from its worker threads (SIGABRT, "terminate called without an active
    exception"), after a run that finished. The CLI destroys its groups itself before
    returning; this covers scripts that build models through the API under torchrun."""
    global _AT_EXIT
    if not _AT_EXIT:
        atexit.register(destroy_parallel)
        _AT_EXIT = True


def destroy_parallel() -> None:
    """Tears down megatron-core's groups and the default process group."""
    from megatron.core import parallel_state as mpu

    _PIPELINES.clear()
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


def pipeline_groups() -> PipelineGroups | None:
    """This rank's pipeline (stage, every stage's global rank, megatron-core's pipeline group
    and the point-to-point groups per directed pair of stages); None without pipeline
    parallelism. Collective the first time (every rank of the world calls it)."""
    from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized():
        return None
    P = mpu.get_pipeline_model_parallel_world_size()
    if P == 1:
        return None
    if "groups" not in _PIPELINES:
        group = mpu.get_pipeline_model_parallel_group()
        mine = tuple(dist.get_process_group_ranks(group))
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        pipelines = sorted(set(every))
        pairs = make_pair_groups(pipelines, mine)
        _PIPELINES["groups"] = PipelineGroups(mpu.get_pipeline_model_parallel_rank(), P, mine,
                                              group, pairs)
    return _PIPELINES["groups"]


def embedding_group() -> Any:
    """megatron-core's embedding group (the first and the last pipeline stage: the two
    copies of tied embeddings), or None for ranks outside it / without a pipeline."""
    from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized() or \
            mpu.get_pipeline_model_parallel_world_size() == 1 or \
            not mpu.is_rank_in_embedding_group():
        return None
    return mpu.get_embedding_group()
