"""The trainer's two data sources behind one interface.

``step_batches(step, accum)`` returns the step's micro-batches for this rank as
(tokens, loss_mask, doc_starts or None) on the device, or None when a finite stream has ended
(on every rank at the same step). ``state_dict`` is what a checkpoint must hold to continue the
stream exactly; the task source needs nothing (its order is a pure function of the step).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from sleeptrain.config.validate import ConfigError
from sleeptrain.data.format import ShardError
from sleeptrain.eval.tasks import batch_examples

Micro = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def task_example_indices(step: int, accum: int, batch_size: int, global_batch: int,
                         dp_size: int, dp_rank: int, device: torch.device | str
                         ) -> torch.Tensor:
    """The train-stream indices [accum * batch_size] (int64, on ``device``) of one step's
    micro-batches on this rank, micro-batch after micro-batch: row ``micro * batch_size + j``
    holds example ``step * global_batch + (micro * dp_size + dp_rank) * batch_size + j``."""
    micro = torch.arange(accum, dtype=torch.int64, device=device)[:, None] * (dp_size *
                                                                              batch_size)
    j = torch.arange(batch_size, dtype=torch.int64, device=device)
    return (micro + (j + (step * global_batch + dp_rank * batch_size))).view(-1)


class TaskData:
    """Example i of the task's train stream, i = step * global_batch + (micro * dp_size +
    dp_rank) * batch_size + j.

    A task with ``sampler: counter`` is generated on ``info.device`` by
    ``sleeptrain.data.tasks.device`` (all micro-batches of a step in one call, one host sync);
    otherwise examples are built on the host with ``example_at`` and copied.
    """

    def __init__(self, task: Any, cfg: DictConfig, info: Any):
        self.task, self.seed, self.info = task, cfg.train.seed, info
        self.bs = cfg.data.batch_size
        self.global_batch = self.bs * cfg.train.grad_accum * info.dp_size
        self.on_device = getattr(task, "sampler", "numpy") == "counter"

    def step_batches(self, step: int, accum: int) -> list[Micro] | None:
        if self.on_device:
            return self._device_batches(step, accum)
        out = []
        for micro in range(accum):
            base = step * self.global_batch + (micro * self.info.dp_size + self.info.dp_rank) \
                * self.bs
            exs = [self.task.example_at("train", self.seed, base + j) for j in range(self.bs)]
            tokens, mask = batch_examples(exs, self.info.device)
            out.append((tokens, mask, None))
        return out

    def _device_batches(self, step: int, accum: int) -> list[Micro]:
        """The step's micro-batches generated on the device (rows sliced from one batch)."""
        from sleeptrain.data.tasks.device import device_batch_at

        info, bs = self.info, self.bs
        index = task_example_indices(step, accum, bs, self.global_batch, info.dp_size,
                                     info.dp_rank, info.device)
        batch = device_batch_at(self.task, "train", self.seed, index)
        return [(batch.tokens[m * bs:(m + 1) * bs], batch.loss_mask[m * bs:(m + 1) * bs], None)
                for m in range(accum)]

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any) -> None:
        del state


class ShardData:
    """Packed rows from a ``ShardLoader``; its position is gathered from every data-parallel
    rank into the checkpoint (rank 0 writes it) and each rank takes its own back on resume."""

    def __init__(self, cfg: DictConfig, info: Any):
        from sleeptrain.data.shards import ShardLoader

        self.info = info
        try:
            self.loader = ShardLoader(
                list(cfg.data.shards), seq_len=cfg.data.seq_len,
                window_len=cfg.sleep.window_len, batch_size=cfg.data.batch_size,
                dp_rank=info.dp_rank, dp_size=info.dp_size, workers=cfg.data.workers,
                seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                epochs=cfg.data.epochs, on_corrupt=cfg.data.on_corrupt,
                agree_device=info.device if dist.is_initialized() and
                dist.get_backend() == "nccl" else "cpu", allow_pipe=cfg.data.allow_pipe)
        except ShardError as e:
            raise ConfigError(str(e)) from e
        if self.loader.vocab_size is not None and self.loader.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                              f"shards' tokenizer vocabulary ({self.loader.vocab_size})")
        self._it = None

    def step_batches(self, step: int, accum: int) -> list[Micro] | None:
        del step
        if self._it is None:
            self._it = iter(self.loader)
        out = []
        for _ in range(accum):
            b = next(self._it, None)
            if b is None:
                return None
            dev = self.info.device
            out.append((b.tokens.to(dev, non_blocking=True), b.mask.to(dev, non_blocking=True),
                        b.doc_starts))
        return out

    def state_dict(self) -> dict[str, Any]:
        mine = self.loader.state_dict()
        if dist.is_initialized() and dist.get_world_size() > 1:
            every: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(every, (self.info.dp_rank, mine))
        else:
            every = [(0, mine)]
        ranks = dict(every)  # tensor-parallel peers of a data-parallel rank hold the same
        return {"dp_size": self.info.dp_size, "ranks": [ranks[r] for r in range(len(ranks))]}

    def load_state_dict(self, state: Any) -> None:
        if state is None:
            raise ShardError("the checkpoint holds no data position (it was written by a run "
                             "with data.source=task); start a new run directory")
        if state["dp_size"] != self.info.dp_size:
            raise ShardError(f"the checkpoint's data position is for {state['dp_size']} "
                             f"data-parallel ranks, this run has {self.info.dp_size}; the "
                             "sample stream cannot continue exactly with another layout")
        self.loader.load_state_dict(state["ranks"][self.info.dp_rank])
        self._it = None

    @property
    def skipped(self) -> list[str]:
        return self.loader.skipped


def build_train_data(cfg: DictConfig, info: Any, task: Any) -> TaskData | ShardData:
    return ShardData(cfg, info) if cfg.data.source == "shards" else TaskData(task, cfg, info)


__all__ = ["ShardData", "TaskData", "build_train_data", "task_example_indices"]
