"""The training step at ``parallel.pp > 1``: every micro-batch of the step through the visit
schedule of the sleep loop, on this rank's stage.

``PipelineStep`` builds the step's schedule (``sleeptrain.plan.pipeline.step_schedule``: the
same integers on every rank, checked by a digest over the pipeline group whenever a layout
is computed; the last few are cached), a ``sleeptrain.sleep.stage.StageRunner`` for the
stage's visits, and the ``execute`` callback the runtime (``sleeptrain.parallel.pipeline``)
calls per operation: a forward takes its hidden input from a message or, on the same stage,
from the producer's output; a backward sums the gradients of each output slot (messages and
same-stage consumers) and hands the gradient of its hidden input on. Gradient accumulation
is the micro-batches: gradients of all of them accumulate into ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from omegaconf import DictConfig

from sleeptrain.config import SleepConfig
from sleeptrain.model.kernels import linear as fused_linear
from sleeptrain.parallel.pipeline import PipelineGroups, run_local, run_stage
from sleeptrain.parallel.schedule import Message, Op, Schedule, consumers
from sleeptrain.plan.pipeline import step_schedule, window_lengths
from sleeptrain.sleep.stage import StageRunner

Micro = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]

#: schedules a stage keeps (one per layout: micro-batch lengths, rows, N, sleep settings)
SCHEDULES_KEPT = 8


def make_execute(runner: StageRunner, schedule: Schedule, stage: int, amp: bool = False
                 ) -> Callable[[Op, dict[int, torch.Tensor]], dict[int, torch.Tensor]]:
    """The runtime's callback for ``stage``: runs an operation on ``runner`` and returns the
    tensors its messages carry (by tag). ``amp``: forwards run under CUDA bf16 autocast;
    backwards never do (as at PP=1, where ``forward_backward`` calls ``backward()`` outside
    autocast: an op's backward follows the dtypes of its forward, and a checkpointed visit's
    recomputation restores the forward's autocast state itself)."""
    cons = [consumers(c) for c in schedule.chains]
    local: dict[tuple[int, int, str], torch.Tensor] = {}
    local_grads: dict[tuple[int, int, str], list[torch.Tensor]] = {}
    sends = schedule.sends

    def forward(op: Op, got: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        chain = schedule.chains[op.micro]
        v = chain[op.visit]
        h_in = None
        if v.h_src is not None:
            if chain[v.h_src[0]].stage == stage:
                h_in = local.pop((op.micro, *v.h_src))
            else:
                (h_in,) = got.values()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            outs = runner.forward(op.micro, v, h_in)
        by_consumer = {t: schedule.messages[t].visit for t in
                       sends.get((op.micro, op.visit, False), [])}
        result = {}
        for t, c in by_consumer.items():
            result[t] = outs[chain[c].h_src[1]]
        for slot, h in outs.items():
            for c in cons[op.micro].get((v.index, slot), []):
                if chain[c].stage == stage:
                    local[(op.micro, v.index, slot)] = h
        return result

    def backward(op: Op, got: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        chain = schedule.chains[op.micro]
        v = chain[op.visit]
        grads: dict[str, list[torch.Tensor]] = {}
        for t, g in got.items():
            grads.setdefault(schedule.messages[t].slot, []).append(g)
        for slot in ("out", "loop"):
            grads.setdefault(slot, []).extend(local_grads.pop((op.micro, v.index, slot), []))
        summed = {s: _sum(gs) for s, gs in grads.items() if gs}
        g_in = runner.backward(op.micro, v, summed)
        result = {}
        if v.h_grad_dst is not None:
            dst = chain[v.h_grad_dst[0]]
            if g_in is None:
                g_in = torch.zeros(runner.hidden_shape(op.micro, v.window),
                                   dtype=runner.net.dtype, device=runner.net.device)
            if dst.stage == stage:
                local_grads.setdefault((op.micro, *v.h_grad_dst), []).append(g_in)
            else:
                (t,) = sends[(op.micro, op.visit, True)]
                result[t] = g_in
        return result

    def execute(op: Op, got: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return backward(op, got) if op.backward else forward(op, got)

    return execute


def _sum(gs: list[torch.Tensor]) -> torch.Tensor:
    out = gs[0]
    for g in gs[1:]:
        out = out + g
    return out


def micro_lengths(batches: Sequence[Micro], window_len: int) -> list[list[int]]:
    """Per micro-batch, the tokens of each of its windows (inputs: T - 1 per row)."""
    return [window_lengths(b[0].shape[1] - 1, window_len) for b in batches]


class PipelineStep:
    """This rank's stage of the pipelined training step (module docstring).

    ``model``: the stage's model (``HybridModel(stage=...)``); ``bounds``: every stage's
    blocks; ``groups``: the pipeline's groups (None: not distributed, see ``local_step``).
    """

    def __init__(self, cfg: DictConfig, model: Any, bounds: Sequence[int],
                 groups: PipelineGroups | None):
        self.cfg, self.model, self.bounds, self.groups = cfg, model, list(bounds), groups
        self.stage = 0 if groups is None else groups.stage
        self._schedules: dict[Any, Schedule] = {}  # by layout, least recently used first

    def schedule(self, batches: Sequence[Micro], sleep_cfg: SleepConfig, passes: int,
                 train: bool = True) -> Schedule:
        """The step's schedule, cached by layout (the last ``SCHEDULES_KEPT``: random N and
        varying lengths come back); a new one's digest is checked over the pipeline."""
        lengths = micro_lengths(batches, int(sleep_cfg.window_len))
        rows = int(batches[0][0].shape[0])
        key = (tuple(map(tuple, lengths)), rows, passes, train, repr(sleep_cfg))
        if key not in self._schedules:
            sched = step_schedule(self.cfg, self.bounds, rows, lengths, passes, sleep_cfg,
                                  train)
            if self.groups is not None:
                _check_digest(sched, self.groups)
            if len(self._schedules) >= SCHEDULES_KEPT:
                self._schedules.pop(next(iter(self._schedules)))
        else:
            sched = self._schedules.pop(key)
        self._schedules[key] = sched  # most recently used last
        return sched

    def run(self, batches: Sequence[Micro], sleep_cfg: SleepConfig, denom: float,
            autocast: bool, heads: Sequence[Sequence[bool]], fused_linears: bool = False,
            passes: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Forward and backward of every micro-batch on this stage; returns the stage's
        (loss sum, correct count) over the step (None off the last stage)."""
        n_pass = int(sleep_cfg.passes if passes is None else passes)
        sched = self.schedule(batches, sleep_cfg, n_pass)
        runner = StageRunner(self.model, sleep_cfg, n_pass, denom)
        for m, ((tokens, mask, docs), hd) in enumerate(zip(batches, heads, strict=True)):
            runner.add(m, tokens, mask, docs, hd)
        amp = autocast and self.model.device.type == "cuda"
        execute = make_execute(runner, sched, self.stage, amp)
        with fused_linear.micro_batch(self.model, torch.bfloat16 if amp else None,
                                      fused_linears):
            run_stage(sched, self.groups, execute, _spec(runner))
        return runner.results()


def _spec(runner: StageRunner) -> Callable[[Message], tuple[tuple[int, ...], torch.dtype,
                                                            torch.device]]:
    def spec(msg: Message) -> tuple[tuple[int, ...], torch.dtype, torch.device]:
        return runner.hidden_shape(msg.micro, msg.window), runner.net.dtype, runner.net.device

    return spec


def _check_digest(sched: Schedule, groups: PipelineGroups) -> None:
    """RuntimeError unless every stage computed the same schedule."""
    import torch.distributed as dist

    every: list[Any] = [None] * groups.stages
    dist.all_gather_object(every, sched.digest(), group=groups.group)
    if len(set(every)) != 1:
        raise RuntimeError(f"pipeline stages computed different schedules: {every}")


def local_step(cfg: DictConfig, models: Sequence[Any], bounds: Sequence[int],
               batches: Sequence[Micro], sleep_cfg: SleepConfig, denom: float,
               passes: int | None = None, amp: bool = False) -> list[tuple[Any, Any]]:
    """Every stage of the pipelined step in one process (``run_local``): ``models[s]`` is
    stage s's model; ``amp``: forwards under CUDA bf16 autocast, as ``PipelineStep.run``.
    Returns each stage's (loss sum, correct count). For tests."""
    n_pass = int(sleep_cfg.passes if passes is None else passes)
    step = PipelineStep(cfg, models[0], bounds, None)
    sched = step.schedule(batches, sleep_cfg, n_pass)
    runners = []
    for model in models:
        r = StageRunner(model, sleep_cfg, n_pass, denom)
        for m, (tokens, mask, docs) in enumerate(batches):
            r.add(m, tokens, mask, docs)
        runners.append(r)
    run_local(sched, [make_execute(r, sched, s, amp) for s, r in enumerate(runners)])
    return [r.results() for r in runners]


__all__ = ["PipelineStep", "local_step", "make_execute", "micro_lengths"]
