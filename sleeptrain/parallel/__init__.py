"""Process groups and parallel layouts (megatron-core)."""

from sleeptrain.parallel.state import (
    ParallelInfo,
    destroy_parallel,
    init_parallel,
    resolve_device,
    tp_size,
)

__all__ = ["ParallelInfo", "destroy_parallel", "init_parallel", "resolve_device", "tp_size"]
