"""The pipeline schedule of the sleep loop: visit chains, the stage partition and a simulator.

Pure Python (no torch): every rank computes the same schedule from the same integers.

A micro-batch's forward is a chain of stage **visits** (docs/design.md, "Pipeline
parallelism"): per window w, the wake pass visits every stage in order (``wake``); then, if
the window sleeps, each of its n sleep passes visits the stages that own the loop range [a, b)
(``sleep``: blocks [max(a, lo), min(b, hi)) of the stage), the hidden states travelling from
the stage of block b-1 back to the stage of block a between passes. When the whole loop range
lies on one stage, the window's n passes are one visit (``sleeps``), which runs the
single-process sleep code and so every gradient mode. Hidden states are the only values that
travel: a visit names where its input comes from (``h_src``: producing visit and output slot,
``out`` = the visit's last hidden state, ``loop`` = the wake pass's hidden state after block
b-1, whose two consumers are the rest of the wake pass and the first sleep pass) and where
the gradient of that input goes (``h_grad_dst``). Per-layer state stays on its stage: a
stage's visits of one micro-batch run in chain order, their backwards in the reverse order.

The simulator (:func:`simulate`) list-schedules the forward and backward visits of M
micro-batches on P stages with integer costs: a stage runs one operation at a time, an
operation starts once its inputs exist (the forward of the hidden-state producer and of the
previous visit on the stage; for a backward: its own forward, the backwards that send it
gradients and the next backward on the stage), and an idle stage takes the ready operation
first by (backward before forward, older micro-batch, later visit for backwards / earlier for
forwards). ``in_flight`` caps the micro-batches begun and not yet finished (1F1B-like memory
bound). The runtime (``sleeptrain.parallel.pipeline``) executes each stage's operations in
the simulated order; because that order is consistent with the simulated start times, which
respect every dependency with durations >= 1, a stage waiting for a message always waits for
an operation that started earlier in simulated time, so no set of ranks can wait on each
other in a cycle whatever their real speeds.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

WAKE, SLEEP, SLEEPS = "wake", "sleep", "sleeps"


@dataclass(frozen=True)
class Visit:
    """One stage visit of a micro-batch's forward.

    kind: ``wake`` | ``sleep`` (pass ``pass_`` over this stage's part of the loop range) |
    ``sleeps`` (all ``n_sleep`` passes, the loop range on one stage); blocks [lo, hi) run;
    ``grad``: the visit is differentiated (has a backward); ``n_sleep``: the window's sleep
    passes; ``h_src``/``h_grad_dst``: (visit index, slot) of the hidden input's producer and
    of where its gradient goes (None: the embedding / no gradient).
    """

    index: int
    stage: int
    kind: str
    window: int
    pass_: int
    lo: int
    hi: int
    grad: bool
    n_sleep: int
    h_src: tuple[int, str] | None
    h_grad_dst: tuple[int, str] | None


def stage_of(bounds: Sequence[int], block: int) -> int:
    """The stage owning ``block`` for stage boundaries [0, b1, ..., depth]."""
    for s in range(len(bounds) - 1):
        if bounds[s] <= block < bounds[s + 1]:
            return s
    raise ValueError(f"block {block} outside the stages {list(bounds)}")


def _sleep_visits(out: list[Visit], bounds: Sequence[int], loop: tuple[int, int], w: int,
                  n: int, free: int, phantom: bool, train: bool, wake_end: int) -> None:
    """Appends window w's sleep visits; ``wake_end``: the index of the wake visit at the stage
    of block b-1 (the producer of the ``loop`` slot)."""
    a, b = loop
    sa, se = stage_of(bounds, a), stage_of(bounds, b - 1)
    if sa == se:
        out.append(Visit(len(out), sa, SLEEPS, w, n, a, b, train, n, (wake_end, "loop"),
                         (wake_end, "loop") if train else None))
        return
    last_of_pass = wake_end
    for p in range(1, n + 1):
        grad = train and p > free
        prev = last_of_pass
        for s in range(sa, se + 1):
            if s == sa:
                src = (prev, "loop" if p == 1 else "out")
                if not grad:
                    gdst = None
                elif p == 1 or (p == free + 1 and phantom):
                    gdst = (wake_end, "loop")  # phantom: the no-grad passes are the identity
                else:
                    gdst = (prev, "out") if p - 1 > free else None
            else:
                src = (len(out) - 1, "out")
                gdst = src if grad else None
            out.append(Visit(len(out), s, SLEEP, w, p, max(a, bounds[s]),
                             min(b, bounds[s + 1]), grad, n, src, gdst))
        last_of_pass = len(out) - 1


def visit_chain(bounds: Sequence[int], loop: tuple[int, int], sleeps: Sequence[int],
                free: Sequence[int] | None = None, phantom: bool = False,
                train: bool = True) -> list[Visit]:
    """The visits of one micro-batch, in chain order.

    ``bounds``: stage boundaries [0, b1, ..., depth]; ``loop``: [a, b); ``sleeps[w]``: sleep
    passes of window w; ``free[w]``: its leading passes run without gradient (truncated and
    implicit/phantom modes; only for a loop range over several stages), whose gradient is
    dropped (truncated) or handed to the wake pass unchanged (``phantom``). ``train`` False:
    a forward-only chain.
    """
    P = len(bounds) - 1
    a, b = loop
    se = stage_of(bounds, b - 1)
    out: list[Visit] = []
    for w, n in enumerate(sleeps):
        wake_end = -1
        for s in range(P):
            src = None if s == 0 else (len(out) - 1, "out")
            out.append(Visit(len(out), s, WAKE, w, 0, bounds[s], bounds[s + 1], train, n, src,
                             src if train else None))
            if s == se:
                wake_end = len(out) - 1
        if n > 0:
            f = 0 if free is None else int(free[w])
            if not 0 <= f < n:
                raise ValueError(f"window {w}: {f} no-grad passes of {n} (need 0 <= free < n)")
            _sleep_visits(out, bounds, (a, b), w, n, f, phantom, train, wake_end)
    return out


def consumers(chain: Sequence[Visit]) -> dict[tuple[int, str], list[int]]:
    """(visit, slot) -> the visits reading that hidden state, in chain order."""
    out: dict[tuple[int, str], list[int]] = {}
    for v in chain:
        if v.h_src is not None:
            out.setdefault(v.h_src, []).append(v.index)
    return out


def partition(costs: Sequence[int], stages: int, first_extra: int = 0,
              last_extra: int = 0) -> list[int]:
    """Stage boundaries [0, b1, ..., D] of D blocks with ``costs`` over ``stages`` contiguous
    stages (each at least one block) minimizing the largest stage cost; ``first_extra`` and
    ``last_extra`` are added to the first and last stage (embedding, head). Ties: the
    earliest boundaries."""
    D = len(costs)
    if not 1 <= stages <= D:
        raise ValueError(f"{stages} pipeline stages for {D} blocks (need 1 <= stages <= D)")
    pre = [0]
    for c in costs:
        pre.append(pre[-1] + int(c))
    inf = float("inf")
    # best[k][j]: the smallest max cost of blocks [0, j) over k stages; cut[k][j]: last start
    best = [[inf] * (D + 1) for _ in range(stages + 1)]
    cut = [[0] * (D + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for j in range(k, D - (stages - k) + 1):
            for i in range(k - 1, j):
                c = pre[j] - pre[i] + (first_extra if k == 1 else 0) + (
                    last_extra if k == stages else 0)
                m = max(best[k - 1][i], c)
                if m < best[k][j]:
                    best[k][j], cut[k][j] = m, i
    bounds = [D]
    for k in range(stages, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]


@dataclass(frozen=True)
class Op:
    """One operation of a stage: the forward or backward of visit ``visit`` of micro-batch
    ``micro``, simulated over [start, end)."""

    micro: int
    visit: int
    backward: bool
    stage: int
    start: int
    end: int


@dataclass(frozen=True)
class Message:
    """A hidden state (``grad`` False, from the producer's forward to the consumer's) or its
    gradient (from the consumer's backward to the producer's) crossing stages ``src`` ->
    ``dst``; ``visit`` is the consumer visit; ``tag`` unique in the step."""

    tag: int
    micro: int
    visit: int
    grad: bool
    src: int
    dst: int
    slot: str
    window: int


@dataclass
class Schedule:
    """Per-stage operation orders and their messages.

    ``ops[s]``: stage s's operations in execution order; ``recvs``/``sends``: the message
    tags an operation (micro, visit, backward) waits for before it runs / sends after it;
    ``order[(src, dst)]``: the tags sent from src to dst in the sender's order (the receiver
    posts its receives in this order, as NCCL matches point-to-point messages by order);
    ``makespan``, ``busy[s]``: simulated time (cost units); ``policy``: the priority rule.
    """

    stages: int
    ops: list[list[Op]]
    messages: dict[int, Message]
    recvs: dict[tuple[int, int, bool], list[int]]
    sends: dict[tuple[int, int, bool], list[int]]
    order: dict[tuple[int, int], list[int]]
    makespan: int
    busy: list[int]
    chains: list[list[Visit]] = field(default_factory=list)
    policy: str = "backward"

    @property
    def bubble(self) -> float:
        """Idle share of the stages' time: 1 - sum(busy) / (stages x makespan)."""
        if self.makespan == 0:
            return 0.0
        return 1.0 - sum(self.busy) / (self.stages * self.makespan)

    def digest(self) -> str:
        """A short fingerprint of the operation orders (equal on every rank, checked)."""
        import hashlib

        text = repr([[(o.micro, o.visit, o.backward) for o in ops] for ops in self.ops])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _messages(chains: Sequence[Sequence[Visit]]) -> tuple[dict[int, Message],
                                                          dict[tuple[int, int, bool], list[int]],
                                                          dict[tuple[int, int, bool], list[int]]]:
    """Every cross-stage message of the step, with the operations receiving / sending it."""
    msgs: dict[int, Message] = {}
    recvs: dict[tuple[int, int, bool], list[int]] = {}
    sends: dict[tuple[int, int, bool], list[int]] = {}
    for m, chain in enumerate(chains):
        for v in chain:
            if v.h_src is not None and chain[v.h_src[0]].stage != v.stage:
                u = chain[v.h_src[0]]
                t = len(msgs)
                msgs[t] = Message(t, m, v.index, False, u.stage, v.stage, v.h_src[1], v.window)
                sends.setdefault((m, u.index, False), []).append(t)
                recvs.setdefault((m, v.index, False), []).append(t)
            if v.grad and v.h_grad_dst is not None and chain[v.h_grad_dst[0]].stage != v.stage:
                u = chain[v.h_grad_dst[0]]
                t = len(msgs)
                msgs[t] = Message(t, m, v.index, True, v.stage, u.stage, v.h_grad_dst[1],
                                  v.window)
                sends.setdefault((m, v.index, True), []).append(t)
                recvs.setdefault((m, u.index, True), []).append(t)
    return msgs, recvs, sends


def _dependencies(chain: Sequence[Visit], train: bool) -> dict[tuple[int, bool], list]:
    """(visit, backward) -> the (visit, backward) operations it waits for, within one
    micro-batch."""
    deps: dict[tuple[int, bool], list[tuple[int, bool]]] = {}
    last_on: dict[int, int] = {}
    for v in chain:
        d = []
        if v.h_src is not None:
            d.append((v.h_src[0], False))
        if v.stage in last_on:
            d.append((last_on[v.stage], False))
        last_on[v.stage] = v.index
        deps[(v.index, False)] = d
    if not train:
        return deps
    next_grad_on: dict[int, int] = {}
    for v in reversed(chain):
        if not v.grad:
            continue
        d = [(v.index, False)]
        if v.stage in next_grad_on:
            d.append((next_grad_on[v.stage], True))
        next_grad_on[v.stage] = v.index
        deps[(v.index, True)] = d
    for v in chain:
        if v.grad and v.h_grad_dst is not None:
            dst = chain[v.h_grad_dst[0]]
            if not dst.grad:
                raise ValueError(f"visit {v.index} hands its gradient to visit {dst.index}, "
                                 "which has no backward")
            deps[(dst.index, True)].append((v.index, True))
    return deps


def simulate(chains: Sequence[Sequence[Visit]], costs: Callable[[int, Visit, bool], int],
             stages: int, in_flight: int = 0, train: bool = True,
             policy: str = "best") -> Schedule:
    """List-schedules the forward (and, with ``train``, backward) visits of every micro-batch
    (``chains[m]``) on ``stages`` stages; ``costs(m, visit, backward)`` gives integer
    durations (at least 1 is used). ``in_flight`` > 0 caps the micro-batches begun and not
    finished. ``policy``: which ready operation an idle stage takes first, ``backward`` (a
    backward before a forward, 1F1B-like), ``forward`` (a forward before a backward), or
    ``best``: both simulated, the shorter kept (ties: ``backward``). Within a kind the older
    micro-batch goes first (then the earlier visit for forwards, the later for backwards).
    Returns the per-stage orders, messages, makespan and busy times."""
    if policy == "best":
        a = simulate(chains, costs, stages, in_flight, train, "backward")
        b = simulate(chains, costs, stages, in_flight, train, "forward")
        return b if b.makespan < a.makespan else a
    if policy not in ("backward", "forward"):
        raise ValueError(f"policy must be best, backward or forward, got {policy!r}")
    sim = _Simulation(chains, stages, in_flight, train, policy == "backward")
    order, busy, now = sim.run(costs)
    msgs, recvs, sends = _messages(chains)
    pair: dict[tuple[int, int], list[int]] = {}
    for s in range(stages):
        for o in order[s]:
            for t in sends.get((o.micro, o.visit, o.backward), []):
                pair.setdefault((msgs[t].src, msgs[t].dst), []).append(t)
    return Schedule(stages, order, msgs, recvs, sends, pair, now, busy,
                    [list(c) for c in chains], policy)


OpKey = tuple[int, int, bool]  # (micro-batch, visit, backward)


class _Simulation:
    """The event loop of :func:`simulate` (integer time, one operation per stage at once)."""

    def __init__(self, chains: Sequence[Sequence[Visit]], stages: int, in_flight: int,
                 train: bool, backward_first: bool):
        self.chains, self.stages, self.backward_first = chains, stages, backward_first
        self.ops: list[OpKey] = []
        deps: dict[OpKey, list[OpKey]] = {}
        for m, chain in enumerate(chains):
            for (vi, bw), d in _dependencies(chain, train).items():
                deps[(m, vi, bw)] = [(m, u, ub) for u, ub in d]
                self.ops.append((m, vi, bw))
        self.waiting = {op: len(d) for op, d in deps.items()}
        self.after: dict[OpKey, list[OpKey]] = {op: [] for op in deps}
        for op, d in deps.items():
            for u in d:
                self.after[u].append(op)
        self.left = [0] * len(chains)
        for op in self.ops:
            self.left[op[0]] += 1
        self.cap = in_flight if in_flight > 0 else len(chains)
        self.gated = list(range(len(chains)))  # micro-batches not begun, oldest first
        self.open: set[int] = set()
        self.ready: list[list[tuple[tuple[int, int, int], OpKey]]] = [[] for _ in range(stages)]

    def push(self, op: OpKey) -> None:
        m, vi, bw = op
        first = 0 if bw == self.backward_first else 1
        key = (first, m, -vi if bw else vi)
        heapq.heappush(self.ready[self.chains[m][vi].stage], (key, op))

    def release(self) -> None:
        """Begins the oldest waiting micro-batches while fewer than ``cap`` are open."""
        while self.gated and len(self.open) < self.cap:
            m = self.gated.pop(0)
            self.open.add(m)
            for op in self.ops:
                if op[0] == m and self.waiting[op] == 0:
                    self.push(op)

    def finish(self, op: OpKey) -> None:
        self.left[op[0]] -= 1
        for nxt in self.after[op]:
            self.waiting[nxt] -= 1
            if self.waiting[nxt] == 0 and nxt[0] in self.open:
                self.push(nxt)
        if self.left[op[0]] == 0:
            self.open.discard(op[0])
            self.release()

    def run(self, costs: Callable[[int, Visit, bool], int]
            ) -> tuple[list[list[Op]], list[int], int]:
        """(per-stage operations in start order, busy time per stage, makespan)."""
        self.release()
        now, busy = 0, [0] * self.stages
        running: list[tuple[int, int, OpKey]] = []
        idle = [True] * self.stages
        order: list[list[Op]] = [[] for _ in range(self.stages)]
        done = 0
        while done < len(self.ops):
            for s in range(self.stages):
                if idle[s] and self.ready[s]:
                    _, op = heapq.heappop(self.ready[s])
                    m, vi, bw = op
                    dur = max(1, int(costs(m, self.chains[m][vi], bw)))
                    order[s].append(Op(m, vi, bw, s, now, now + dur))
                    busy[s] += dur
                    idle[s] = False
                    heapq.heappush(running, (now + dur, s, op))
            if not running:
                raise RuntimeError("pipeline simulation stalled: a dependency is never met")
            now = running[0][0]
            while running and running[0][0] == now:
                _, s, op = heapq.heappop(running)
                idle[s] = True
                done += 1
                self.finish(op)
        return order, busy, now


__all__ = ["SLEEP", "SLEEPS", "WAKE", "Message", "Op", "Schedule", "Visit", "consumers",
           "partition", "simulate", "stage_of", "visit_chain"]
