"""Pipeline parallelism by cost: the stage assignment, per-visit costs and the bubble table.

The stage partition (``stage_bounds``) balances the training work per stage under the FLOP
model of :mod:`sleeptrain.plan.costs`: a block outside the loop range costs its wake pass
(forward + backward = 3 F, + F recomputed with ``sleep.checkpoint``), a loop-range block adds
its sleep passes in the share of windows that sleep ((N - 1) F forward + 2 g F backward for
the g differentiated passes, + g F recomputed), and the last stage also pays the output head
(2 d V per token). Per-visit costs (``visit_costs``) feed the schedule simulator
(:func:`sleeptrain.parallel.schedule.simulate`), in integer units (a thousandth of the
cheapest block's forward work over a full window).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig

from sleeptrain.config import SleepConfig, loop_range
from sleeptrain.parallel.schedule import (
    SLEEPS,
    WAKE,
    Schedule,
    Visit,
    partition,
    simulate,
    stage_of,
    visit_chain,
)
from sleeptrain.plan.costs import (
    activation_coefficients,
    backward_passes,
    block_activation_bytes,
    block_cost,
    param_bytes,
)
from sleeptrain.sleep.runner import sleep_passes
from sleeptrain.sleep.stage import free_passes


def block_flops(cfg: DictConfig, sleep: SleepConfig | None = None) -> list[float]:
    """Forward FLOPs per token of every block (``block_cost``) at the run's window."""
    s = cfg.sleep if sleep is None else sleep
    return [block_cost(cfg.model, sym, int(s.window_len), s.eviction == "sliding").flops
            for sym in cfg.model.pattern]


def _windows(cfg: DictConfig, seq_len: int | None = None) -> int:
    return max(1, math.ceil(int(seq_len or cfg.data.seq_len) / int(cfg.sleep.window_len)))


def block_weights(cfg: DictConfig, seq_len: int | None = None) -> tuple[list[int], int]:
    """(training work per block per token, the head's), as integers for the partition."""
    s = cfg.sleep
    n = int(s.passes)
    g = backward_passes(s, n)
    ck = 1 if s.checkpoint else 0
    w = _windows(cfg, seq_len)
    share = (w - 1) / w
    a, b = loop_range(cfg.model)
    wake = 3 + ck
    loop = wake + share * ((n - 1) + 2 * g + ck * g)
    flops = block_flops(cfg)
    out = [f * (loop if a <= i < b else wake) for i, f in enumerate(flops)]
    head = 2 * cfg.model.d_model * cfg.model.vocab_size * wake
    scale = 1000.0 / max(min(x for x in out if x > 0), 1e-9)
    return [round(x * scale) for x in out], round(head * scale)


def stage_bounds(cfg: DictConfig, pp: int | None = None,
                 seq_len: int | None = None) -> list[int]:
    """Stage boundaries [0, b1, ..., depth] for ``pp`` stages (default ``parallel.pp``):
    ``parallel.pp_split`` when given, else the partition minimizing the busiest stage's
    training work (module docstring)."""
    P = int(cfg.parallel.pp if pp is None else pp)
    depth = len(cfg.model.pattern)
    split = list(cfg.parallel.pp_split)
    if split and len(split) == P - 1:
        return [0, *[int(x) for x in split], depth]
    costs, head = block_weights(cfg, seq_len)
    return partition(costs, P, last_extra=head)


def loop_split(cfg: DictConfig, bounds: Sequence[int]) -> bool:
    """Whether the loop range spans more than one stage."""
    a, b = loop_range(cfg.model)
    return stage_of(bounds, a) != stage_of(bounds, b - 1)


def chain_for(cfg: DictConfig, bounds: Sequence[int], n_windows: int, passes: int,
              sleep: SleepConfig | None = None, train: bool = True) -> list[Visit]:
    """The visit chain of a micro-batch of ``n_windows`` windows at N = ``passes``."""
    s = cfg.sleep if sleep is None else sleep
    sleeps = [sleep_passes(passes, w == n_windows - 1) for w in range(n_windows)]
    split = loop_split(cfg, bounds)
    grad = [free_passes(s, n) if split else (0, False) for n in sleeps]
    return visit_chain(bounds, loop_range(cfg.model), sleeps, [f for f, _ in grad],
                       any(p for _, p in grad), train)


def visit_costs(cfg: DictConfig, rows: int, lengths: Sequence[Sequence[int]],
                sleep: SleepConfig | None = None) -> Callable[[int, Visit, bool], int]:
    """costs(m, visit, backward) for micro-batches of ``rows`` rows whose windows have
    ``lengths[m]`` tokens: forward FLOPs of the visit's blocks (the head on the last stage's
    wake), backward 2x the differentiated passes, plus one forward recomputed under
    ``sleep.checkpoint``; integer units."""
    s = cfg.sleep if sleep is None else sleep
    flops = block_flops(cfg, s)
    head = 2 * cfg.model.d_model * cfg.model.vocab_size
    depth = len(cfg.model.pattern)
    ck = 1 if s.checkpoint else 0
    unit = max(min(f for f in flops if f > 0) * rows * int(s.window_len) / 1000, 1e-9)

    def cost(m: int, v: Visit, backward: bool) -> int:
        tokens = rows * lengths[m][v.window]
        fwd = sum(flops[v.lo:v.hi]) * tokens
        if v.kind == WAKE and v.hi == depth:
            fwd += head * tokens
        if v.kind == SLEEPS:
            g = backward_passes(s, v.n_sleep + 1)
            work = fwd * ((2 + ck) * g if backward else v.n_sleep)
        else:
            work = fwd * (2 + ck) if backward else fwd
        return max(1, round(work / unit))

    return cost


def step_schedule(cfg: DictConfig, bounds: Sequence[int], rows: int,
                  lengths: Sequence[Sequence[int]], passes: int,
                  sleep: SleepConfig | None = None, train: bool = True) -> Schedule:
    """The simulated schedule of one step: micro-batch m has windows of ``lengths[m]``
    tokens (``rows`` rows each), N = ``passes``, ``parallel.pp_in_flight`` in flight."""
    chains = [chain_for(cfg, bounds, len(ls), passes, sleep, train) for ls in lengths]
    return simulate(chains, visit_costs(cfg, rows, lengths, sleep), len(bounds) - 1,
                    int(cfg.parallel.pp_in_flight), train)


def window_lengths(seq_len: int, window_len: int) -> list[int]:
    """Tokens of every window of a row of ``seq_len`` inputs."""
    return [min(window_len, seq_len - s) for s in range(0, seq_len, window_len)]


def bubble_table(cfg: DictConfig, pp: int | None = None, micro: Sequence[int] | None = None,
                 seq_len: int | None = None) -> list[dict[str, Any]]:
    """The simulated bubble of a training step for M micro-batches (default 1, P, 2P, 4P):
    per M, the makespan, the busy share of the stages and the bubble fraction."""
    P = int(cfg.parallel.pp if pp is None else pp)
    bounds = stage_bounds(cfg, P, seq_len)
    lengths = window_lengths(int(seq_len or cfg.data.seq_len), int(cfg.sleep.window_len))
    out = []
    for M in (micro or [1, P, 2 * P, 4 * P]):
        sched = step_schedule(cfg, bounds, int(cfg.data.batch_size), [lengths] * M,
                              int(cfg.sleep.passes))
        out.append({"micro": M, "makespan": sched.makespan, "bubble": sched.bubble,
                    "busy": [b / sched.makespan for b in sched.busy]})
    return out


def stage_params(cfg: DictConfig, bounds: Sequence[int]) -> list[int]:
    """Parameters each stage holds (full model, before TP): its blocks, the embedding on
    the first stage, the final norm and head on the last (the tied embedding's copy too)."""
    m = cfg.model
    blocks = [block_cost(m, sym, 1, False).params for sym in m.pattern]
    emb = m.vocab_size * m.d_model
    out = []
    P = len(bounds) - 1
    for s in range(P):
        n = sum(blocks[bounds[s]:bounds[s + 1]])
        if s == 0:
            n += emb
        if s == P - 1:
            n += m.d_model + (emb if (not m.tie_embeddings or P > 1) else 0)
        out.append(n)
    return out


def stage_memory(cfg: DictConfig, tp: int, seq_len: int | None = None,
                 dp: int = 1) -> list[dict[str, float]]:
    """``memory_estimate``'s bytes per GPU for every pipeline stage (key ``stage``): the
    stage's parameters, gradients and optimizer state (``stage_params``; the tied embedding's
    copy on the last stage), its blocks' share of a window's activations (``memory_estimate``'s
    per-block rule, logits not counted), and the boundary
    tensors of the micro-batches in flight (``parallel.pp_in_flight``, default all
    ``train.grad_accum``): with ``sleep.checkpoint`` two fp32 hidden states per token per
    visit of the stage (its wake visit and, in the loop range, each sleep pass): the visit's
    input and its output, which the stage keeps with its graph until the visit's backward
    (the receiving stage holds its own copy as its input; an upper bound when consecutive
    visits share a stage); without it every visit's activations."""
    from sleeptrain.config import autocast_on, switch_on

    m, s, t = cfg.model, cfg.sleep, cfg.train
    bounds = stage_bounds(cfg, seq_len=seq_len)
    P = len(bounds) - 1
    size = param_bytes(m)
    B, L, d = cfg.data.batch_size, int(s.window_len), m.d_model
    T = int(seq_len or cfg.data.seq_len)
    a, b = loop_range(m)
    n_sleep = sleep_passes(int(s.passes))
    share = (_windows(cfg, T) - 1) / _windows(cfg, T)
    fly = min(int(cfg.parallel.pp_in_flight) or int(t.grad_accum), int(t.grad_accum))
    fusion = switch_on(t.grad_accum_fusion, cuda=t.device != "cpu")
    amp = autocast_on(t, "cpu" if t.device == "cpu" else "cuda")
    recompute = activation_coefficients(cfg)["recompute"]
    per_block = [B * L * x for x in block_activation_bytes(cfg, tp)]
    costs = [block_cost(m, sym, 1, False) for sym in m.pattern]
    emb = m.vocab_size * m.d_model
    out = []
    for st, p in enumerate(stage_params(cfg, bounds)):
        lo, hi = bounds[st], bounds[st + 1]
        mats = sum(c.matrices for c in costs[lo:hi]) if cfg.optim.use_muon else 0
        lin = sum(c.linears for c in costs[lo:hi]) + (emb if st == P - 1 else 0)
        weights = grads = size * p / tp
        optimizer = size * (mats + 2 * (p - mats)) / tp / (dp if cfg.parallel.shard_optimizer
                                                           else 1)
        window = sum(per_block[lo:hi])
        loops = max(0, min(b, hi) - max(a, lo))
        visits = 1 + (n_sleep * share if loops else 0)
        if s.checkpoint:
            acts = recompute * window + 2 * fly * B * T * d * 4 * visits
        else:
            loop_part = sum(per_block[max(a, lo):min(b, hi)])
            acts = fly * _windows(cfg, T) * (window + n_sleep * share * loop_part)
        copies = 2 * lin / tp if fusion and amp and size != 2 else 0.0
        out.append({"stage": st, "weights": weights, "grads": grads, "optimizer": optimizer,
                    "activations": acts, "weight_copies": copies,
                    "total": weights + grads + optimizer + acts + copies})
    return out


__all__ = ["block_flops", "block_weights", "bubble_table", "chain_for", "loop_split",
           "stage_bounds", "stage_memory", "stage_params", "step_schedule", "visit_costs",
           "window_lengths"]
