"""The pipeline runtime: a stage executes its operations of a ``Schedule`` in order, with
point-to-point sends and receives of hidden states and their gradients.

``run_stage`` drives one stage: before an operation it receives the messages the schedule
says it needs, runs it (``execute(op, received) -> {tag: tensor to send}``, the caller's
forward or backward of that visit), and sends what it produced with ``isend``. Messages are
matched by order per directed pair of stages (NCCL ignores tags; gloo also gets the unique
tag): each directed pair has its own two-rank group, so the two directions never queue behind
each other, and the receiver posts its receives in the sender's order
(``Schedule.order``), lazily: when it needs message k from a stage it posts every earlier
message from that stage it has not posted yet. Sends are never waited for before the next
operation (completed ones are reaped, the rest waited at the end). Why no set of ranks can
deadlock whatever their speeds: ``sleeptrain.parallel.schedule``.

``run_local`` executes every stage's operations in one process in simulated time order
(messages handed over in memory): the tests' single-process reference for the visit
decomposition, and nothing distributed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sleeptrain.parallel.schedule import Message, Op, Schedule

Execute = Callable[[Op, dict[int, torch.Tensor]], dict[int, torch.Tensor]]
Spec = Callable[[Message], tuple[tuple[int, ...], torch.dtype, torch.device]]


@dataclass(frozen=True)
class PipelineGroups:
    """This rank's pipeline: its stage, the global rank of every stage, megatron-core's
    pipeline group and one two-rank group per directed pair of stages."""

    stage: int
    stages: int
    ranks: tuple[int, ...]
    group: Any
    pairs: dict[tuple[int, int], Any]


def make_pair_groups(pipelines: list[tuple[int, ...]], mine: tuple[int, ...],
                     ) -> dict[tuple[int, int], Any]:
    """Collective over the world: a new group for every ordered pair of stages of every
    pipeline (``pipelines``: each pipeline's global ranks by stage, the same list on every
    rank), created in one order everywhere; returns this pipeline's by (src, dst) stage, each
    warmed up by one message (NCCL creates a pair's communicator at its first use, which
    blocks until both ranks use it: done here in one global order, never mid-step)."""
    out: dict[tuple[int, int], Any] = {}
    for ranks in pipelines:
        for i in range(len(ranks)):
            for j in range(len(ranks)):
                if i != j:
                    g = dist.new_group([ranks[i], ranks[j]])
                    if ranks == mine:
                        out[(i, j)] = g
    me = dist.get_rank()
    if me not in mine:
        return out
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    s = mine.index(me)
    for (i, j), g in sorted(out.items()):
        if s not in (i, j):
            continue
        t = torch.zeros(1, device=dev)
        if s == i:
            dist.send(t, dst=mine[j], group=g)
        else:
            dist.recv(t, src=mine[i], group=g)
    return out


class _Receiver:
    """Receives of one stage, posted per source stage in the sender's order."""

    def __init__(self, schedule: Schedule, groups: PipelineGroups, spec: Spec):
        self.schedule, self.groups, self.spec = schedule, groups, spec
        self.posted: dict[int, tuple[Any, torch.Tensor]] = {}
        self.next: dict[int, int] = {}

    def get(self, tag: int) -> torch.Tensor:
        msg = self.schedule.messages[tag]
        src, me = msg.src, self.groups.stage
        order = self.schedule.order[(src, me)]
        while tag not in self.posted:
            k = self.next.get(src, 0)
            if k >= len(order):
                raise RuntimeError(f"pipeline: message {tag} from stage {src} is not in its "
                                   "send order")
            self.next[src] = k + 1
            t = order[k]
            shape, dtype, device = self.spec(self.schedule.messages[t])
            buf = torch.empty(shape, dtype=dtype, device=device)
            work = dist.irecv(buf, src=self.groups.ranks[src], group=self.groups.pairs[(src, me)],
                              tag=t)
            self.posted[t] = (work, buf)
        work, buf = self.posted.pop(tag)
        work.wait()
        return buf


def run_stage(schedule: Schedule, groups: PipelineGroups, execute: Execute,
              spec: Spec) -> None:
    """Runs this stage's operations of ``schedule`` in order with point-to-point messages
    (module docstring). ``spec(message)`` gives a message's (shape, dtype, device); a sent
    tensor of another shape or dtype raises RuntimeError naming it."""
    me = groups.stage
    recv = _Receiver(schedule, groups, spec)
    sending: list[tuple[Any, torch.Tensor]] = []
    for op in schedule.ops[me]:
        key = (op.micro, op.visit, op.backward)
        got = {t: recv.get(t) for t in schedule.recvs.get(key, [])}
        out = execute(op, got)
        for t in schedule.sends.get(key, []):
            msg = schedule.messages[t]
            x = out[t].contiguous()
            shape, dtype, _ = spec(msg)
            if tuple(x.shape) != tuple(shape) or x.dtype != dtype:
                raise RuntimeError(f"pipeline: message {msg} is {tuple(x.shape)} {x.dtype}, "
                                   f"the receiver expects {tuple(shape)} {dtype}")
            work = dist.isend(x, dst=groups.ranks[msg.dst], group=groups.pairs[(me, msg.dst)],
                              tag=t)
            sending.append((work, x))
        sending = [(w, x) for w, x in sending if not w.is_completed()]
    for w, _ in sending:
        w.wait()
    if recv.posted:
        raise RuntimeError(f"pipeline: {len(recv.posted)} received messages were never used")


def run_local(schedule: Schedule, executes: list[Execute]) -> None:
    """Runs every stage's operations in one process, in simulated start order (ties: stage
    order), ``executes[s]`` for stage s; messages are handed over in memory."""
    ops = sorted((o for s in range(schedule.stages) for o in schedule.ops[s]),
                 key=lambda o: (o.start, o.stage))
    box: dict[int, torch.Tensor] = {}
    for op in ops:
        key = (op.micro, op.visit, op.backward)
        got = {t: box.pop(t) for t in schedule.recvs.get(key, [])}
        out = executes[op.stage](op, got)
        for t in schedule.sends.get(key, []):
            box[t] = out[t]
    if box:
        raise RuntimeError(f"pipeline: {len(box)} messages were sent and never received")


__all__ = ["Execute", "PipelineGroups", "Spec", "make_pair_groups", "run_local", "run_stage"]
