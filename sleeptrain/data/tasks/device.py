"""Vectorized generation of counter-sampler task batches in torch, on any device.

``device_batch(task, split, seed, start, count, device)`` returns samples ``start ..
start + count - 1`` of the stream ``(split, seed)`` of a task built with ``sampler='counter'``,
identical (tokens, loss mask, answer depths) to stacking ``task.example_at(split, seed, i)``,
which is the scalar pure-Python reference of the same definition (``base``, ``counter``, and
each task module's "Counter sampler" paragraph).

How: the per-sample keys are hashed from the indices; one round evaluates a fixed number of
candidate tries of every row at once (``tries_per_round``: a row misses all of them with
probability below 2**-30 for the split's acceptance rate), each try's words are
``mix64(key + (position + 1) G)`` for all its slots, the candidates' content and bucket are
computed for all tries, and each row takes its first accepted try. Rows that miss every try of
a round (rare) get the next round of tries, until ``MAX_TRIES``. Deciding that costs one host
sync per call (a single bool); everything else is queued without syncs. Rule 110 states are
rolled out with ``r``-step neighbourhood tables (the centre cell after ``j <= r`` steps as a
function of the ``2r + 1`` cells around it, ``r = 8`` for the periodic boundary, 1 for the
zero boundary), a handful of kernels per ``r`` steps; depo cycles are the ``n`` smallest of
unique per-name keys (``topk``), the edge order a sort of unique per-edge keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

from . import counter
from .base import MAX_TRIES, Task, check_int, no_sample_error
from .counter import below_t, bucket_t, content_hash_t, mix64_t, salts_t, srl_t, stream_key_t
from .depo import QUERY_TOKENS, DepoTask
from .rule110 import Rule110Task

MISS_LOG2 = 30
"""A row misses all tries of one round with probability below 2**-MISS_LOG2."""

MAX_ROUND_TRIES = 512
"""Cap on the tries evaluated per row in one round."""

ELEMENT_BUDGET = 1 << 24
"""Rows are processed in chunks of about this many int64 elements per temporary."""

ROLLOUT_RADIUS = 8
"""Steps per neighbourhood-table lookup of the periodic Rule 110 rollout."""


@dataclass(frozen=True)
class DeviceBatch:
    """Generated samples on one device (all int64).

    tokens, loss_mask [count, seq_len]; answer_depths [count, n_answers] (the depth of each
    answer token, in position order: rule110 ``t``, depo the query's ``k``).
    """

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    answer_depths: torch.Tensor


def tries_per_round(test_permille: int, split: str) -> int:
    """Tries evaluated per row and round: enough that a row misses them all with probability
    below 2**-MISS_LOG2 when a try is accepted with the split's share of the buckets."""
    share = test_permille / 1000
    accept = share if split == "test" else 1.0 - share
    if accept >= 1.0:
        return 1
    tries = math.ceil(MISS_LOG2 * math.log(2) / -math.log1p(-accept))
    return max(1, min(MAX_ROUND_TRIES, tries))


def check_counter_task(task: Any, split: str) -> int:
    """Return the split id after checking that ``task`` uses the counter sampler and that the
    split is non-empty; ``ValueError`` otherwise."""
    if getattr(task, "sampler", "numpy") != "counter":
        raise ValueError(
            f"device_batch needs a task with the counter sampler; this {task.name} task uses "
            f"sampler={getattr(task, 'sampler', 'numpy')!r}: set task_args.sampler=counter"
        )
    return task.check_nonempty(split)


def device_batch(task: Task, split: str, seed: int, start: int, count: int,
                 device: torch.device | str) -> DeviceBatch:
    """Samples ``start .. start + count - 1`` of the stream ``(split, seed)`` of a counter
    task, built on ``device``; equal to stacking ``task.example_at(split, seed, i)``."""
    check_counter_task(task, split)
    seed = check_int(task.name, "seed", seed, 0, counter.MAX_INDEX)
    start = check_int(task.name, "start", start, 0, counter.MAX_INDEX)
    count = check_int(task.name, "count", count, 0, counter.MAX_INDEX - start + 1)
    index = torch.arange(count, dtype=torch.int64, device=device) + start
    return device_batch_at(task, split, seed, index)


def device_batch_at(task: Task, split: str, seed: int, index: torch.Tensor) -> DeviceBatch:
    """The samples of the int64 indices ``index`` [count] (each in ``[0, 2**63)``, not checked:
    that would sync) of the stream ``(split, seed)``, on ``index``'s device."""
    split_id = check_counter_task(task, split)
    seed = check_int(task.name, "seed", seed, 0, counter.MAX_INDEX)
    if index.dim() != 1 or index.dtype != torch.int64:
        raise ValueError(f"index must be a 1-d int64 tensor, got {index.dtype} "
                         f"{tuple(index.shape)}")
    gen = _generator(task, index.device)
    keys = stream_key_t(task.counter_tag, seed, split_id, index)
    chosen = _select(gen, task, keys, split)
    return gen.render(chosen, split)


# ----------------------------------------------------------------------------------------------
# Rejection: first accepted try per row
# ----------------------------------------------------------------------------------------------

Fields = dict[str, torch.Tensor]


def _round(gen: Any, task: Task, keys: torch.Tensor, split: str, first: int, tries: int,
           offsets: torch.Tensor) -> tuple[Fields, torch.Tensor]:
    """Tries ``first .. first + tries - 1`` of rows ``keys`` [R]: the content of each row's
    first accepted try among them ([R, ...] fields) and a miss flag [R] (none accepted)."""
    rows, n_slots = keys.shape[0], gen.n_slots
    words = mix64_t(keys[:, None] + offsets).view(rows, tries, n_slots)
    cand, content_hash = gen.candidates(words, split)
    in_test = bucket_t(content_hash) < task.test_permille
    accepted = in_test if split == "test" else ~in_test
    first_ok = torch.where(accepted, gen.arange(tries), tries).amin(1)  # [R]; tries: none
    pick = first_ok.clamp(max=tries - 1)
    picked = {}
    for k, v in cand.items():  # v [R, T, ...] -> [R, ...] at each row's pick
        idx = pick.view(rows, 1, *([1] * (v.dim() - 2)))
        picked[k] = torch.take_along_dim(v, idx, dim=1).squeeze(1)
    return picked, first_ok == tries


def _rounds(gen: Any, task: Task, keys: torch.Tensor, split: str, first: int, tries: int
            ) -> tuple[Fields, torch.Tensor]:
    """``_round`` over row chunks that keep the temporaries within ``ELEMENT_BUDGET``."""
    offsets = gen.offsets(first, tries)
    chunk = max(1, ELEMENT_BUDGET // (tries * gen.try_elements))
    if keys.shape[0] <= chunk:
        return _round(gen, task, keys, split, first, tries, offsets)
    parts = [_round(gen, task, keys[i:i + chunk], split, first, tries, offsets)
             for i in range(0, keys.shape[0], chunk)]
    fields = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
    return fields, torch.cat([p[1] for p in parts])


def _select(gen: Any, task: Task, keys: torch.Tensor, split: str) -> Fields:
    """The content of every row's first accepted try (rounds of tries until all accepted)."""
    tries = tries_per_round(task.test_permille, split)
    chosen, miss = _rounds(gen, task, keys, split, 0, tries)
    first = tries
    while bool(miss.any()):  # the one host sync of a call (more only in the rare fallback)
        if first >= MAX_TRIES:
            raise no_sample_error(task.name, split, task.test_permille)
        rows = miss.nonzero().squeeze(1)
        n = min(tries, MAX_TRIES - first)
        sub, sub_miss = _rounds(gen, task, keys[rows], split, first, n)
        for k, v in sub.items():
            chosen[k][rows] = v
        miss = torch.zeros_like(miss)
        miss[rows] = sub_miss
        first += n
    return chosen


# ----------------------------------------------------------------------------------------------
# Per-task generators (constants cached per task and device)
# ----------------------------------------------------------------------------------------------


def _generator(task: Task, device: torch.device) -> Any:
    """The cached device generator of ``task`` on ``device``."""
    cache_ = task.__dict__.setdefault("_device_generators", {})
    key = str(device)
    if key not in cache_:
        if isinstance(task, Rule110Task):
            cache_[key] = _Rule110Gen(task, device)
        elif isinstance(task, DepoTask):
            cache_[key] = _DepoGen(task, device)
        else:
            raise ValueError(f"device_batch does not know the task {task.name!r}")
    return cache_[key]


class _GenBase:
    """Shared pieces: slot offsets per round, cached aranges."""

    n_slots: int
    try_elements: int
    device: torch.device

    def arange(self, n: int) -> torch.Tensor:
        """``torch.arange(n)`` (int64) on the device, cached."""
        cache_ = self.__dict__.setdefault("_aranges", {})
        if n not in cache_:
            cache_[n] = torch.arange(n, dtype=torch.int64, device=self.device)
        return cache_[n]

    def offsets(self, first: int, tries: int) -> torch.Tensor:
        """``(position + 1) G`` for the positions of tries ``first .. first + tries - 1``
        (cached for the first round)."""
        cache_ = self.__dict__.setdefault("_offsets", {})
        if first == 0 and tries in cache_:
            return cache_[tries]
        out = counter.position_offsets_t(first * self.n_slots, tries * self.n_slots,
                                         self.device)
        if first == 0:
            cache_[tries] = out
        return out


@cache
def rule110_tables(radius: int) -> np.ndarray:
    """[radius + 1, 2**(2 radius + 1)] uint8: entry (j, code) is the centre cell after j Rule
    110 steps of the 2 radius + 1 cells whose offset d in [-radius, radius] is bit d + radius
    of ``code`` (free evolution; the centre after j <= radius steps depends on these only)."""
    width = 2 * radius + 1
    codes = np.arange(1 << width, dtype=np.int64)
    strip = ((codes[:, None] >> np.arange(width)) & 1).astype(np.uint8)
    out = np.empty((radius + 1, 1 << width), dtype=np.uint8)
    out[0] = strip[:, radius]
    for j in range(1, radius + 1):
        left, centre, right = strip[:, :-2], strip[:, 1:-1], strip[:, 2:]
        strip = (centre | right) & (1 - (left & centre & right))
        out[j] = strip[:, radius - j]
    return out


class _Rule110Gen(_GenBase):
    """Rule 110 on one device (layout: ``rule110`` module docstring)."""

    def __init__(self, task: Rule110Task, device: torch.device):
        c = task.config
        self.task, self.device = task, device
        S, W, nw = c.n_states, c.width, task.words_per_state
        self.S, self.W, self.nw = S, W, nw
        self.n_slots = task.counter_slots
        self.try_elements = 3 * self.n_slots
        dev = dict(dtype=torch.int64, device=device)
        masks = [counter.signed64((1 << min(64, W - 64 * w)) - 1) for w in range(nw)] * S
        self.word_mask = torch.tensor(masks, **dev)
        self.ts = {s: torch.tensor(task.split_ts(s), **dev) for s in ("train", "test")}
        self.max_t = {s: max(task.split_ts(s)) for s in ("train", "test")}
        self.salts = salts_t(range(S * nw + 1), device)
        cells = torch.arange(W, **dev)
        self.word_of_cell = torch.arange(S, **dev)[:, None] * nw + cells // 64  # [S, W]
        self.bit_of_cell = (cells % 64).expand(S, W)
        self.pow10 = torch.tensor([10 ** p for p in range(task.t_digits - 1, -1, -1)], **dev)
        self.digit_ids = torch.tensor(task._digit_ids, **dev)
        self.t_id = torch.tensor([[task.token_to_id["t"]]], **dev)
        self.eq_id = torch.tensor([[task.token_to_id["="]]], **dev)
        mask = torch.zeros(task.seq_len, **dev)
        mask[task.answer_positions] = 1
        self.mask_row = mask
        periodic = c.boundary == "periodic"
        self.periodic = periodic
        r = ROLLOUT_RADIUS if periodic else 1
        self.radius = r
        self.table = torch.from_numpy(rule110_tables(r).astype(np.int64)).to(device)
        d = torch.arange(-r, r + 1, **dev)
        pos = cells[:, None] + d  # [W, 2r+1]
        # zero boundary: outside cells read the extra zero column W
        self.nbr = pos % W if periodic else torch.where((pos >= 0) & (pos < W), pos, W)
        self.shifts = d + r

    def candidates(self, words: torch.Tensor, split: str) -> tuple[Fields, torch.Tensor]:
        """words [R, T, n_slots] -> ({'words': [R, T, S nw], 't': [R, T]}, hash [R, T])."""
        n = self.S * self.nw
        state_words = words[..., :n] & self.word_mask
        ts = self.ts[split]
        t = ts[below_t(words[..., n], ts.shape[0])]
        h = content_hash_t(torch.cat([state_words, t[..., None]], -1), self.salts)
        return {"words": state_words, "t": t}, h

    def rollout(self, bits: torch.Tensor, t: torch.Tensor, max_t: int) -> torch.Tensor:
        """Cell 0 [R, S] after t[r] Rule 110 steps of the states bits [R, S, W]."""
        if max_t == 0 or bits.shape[0] == 0:
            return bits[..., 0]
        r = self.radius
        blocks = -(-max_t // r)
        starts = torch.arange(blocks, dtype=torch.int64, device=bits.device) * r
        steps = (t[:, None] - starts).clamp(0, r)  # [R, blocks]: steps of each block
        rows = bits.shape[0]
        chunk = max(1, ELEMENT_BUDGET // (self.S * self.W * (2 * r + 1)))
        out = []
        for lo in range(0, rows, chunk):
            x = bits[lo:lo + chunk]
            for b in range(blocks):
                src = x if self.periodic else torch.nn.functional.pad(x, (0, 1))
                nbr = self.nbr if b < blocks - 1 else self.nbr[:1]  # last: cell 0 only
                code = (src[..., nbr] << self.shifts).sum(-1)
                x = self.table[steps[lo:lo + chunk, b, None, None], code]
            out.append(x[..., 0])
        return out[0] if len(out) == 1 else torch.cat(out)

    def render(self, chosen: Fields, split: str) -> DeviceBatch:
        words, t = chosen["words"], chosen["t"]
        rows = t.shape[0]
        bits = (words[:, self.word_of_cell] >> self.bit_of_cell) & 1  # [R, S, W]
        answers = self.rollout(bits, t, self.max_t[split])
        digits = self.digit_ids[(t[:, None] // self.pow10) % 10]
        tokens = torch.cat([bits.view(rows, self.S * self.W), self.t_id.expand(rows, 1), digits,
                            self.eq_id.expand(rows, 1), answers], 1)
        return DeviceBatch(tokens, self.mask_row.expand(rows, -1).clone(),
                           t[:, None].expand(rows, self.S).clone())


class _DepoGen(_GenBase):
    """Depo on one device (layout: ``depo`` module docstring)."""

    def __init__(self, task: DepoTask, device: torch.device):
        c = task.config
        self.task, self.device = task, device
        self.c = c
        self.n_slots = task.counter_slots
        self.try_elements = 2 * self.n_slots + 2 * c.n_names
        dev = dict(dtype=torch.int64, device=device)
        self.name_ids = torch.arange(c.n_names, **dev)
        self.name_mask = (1 << task.name_bits) - 1
        self.order_mask = (1 << task.order_bits) - 1
        self.ar_nodes = torch.arange(c.n_max, **dev)
        self.test_k = torch.tensor(c.test_k, **dev)
        q = c.n_queries
        self.salts = salts_t(range(1 + c.n_max + 2 * q), device)
        self.ones = torch.ones(1, dtype=torch.bool, device=device)
        self.ones_q = torch.ones(2 * q, dtype=torch.bool, device=device)
        self.ctx_pos = torch.arange(c.context_len, **dev)
        pad = task.token_to_id[c.pad_token]
        self.pad = pad
        self.end_pad = torch.full((1, task.query_start - c.context_len), pad, **dev)
        self.q_id, self.eq_id = task.token_to_id["?"], task.token_to_id["="]
        self.name0, self.k0 = task._name0, task._k0
        mask = torch.zeros(task.seq_len, **dev)
        mask[task.answer_positions] = 1
        self.mask_row = mask

    def candidates(self, words: torch.Tensor, split: str) -> tuple[Fields, torch.Tensor]:
        """words [R, T, n_slots] -> (cycle [R, T, n_max] (valid < n), n, starts, ks [R, T, Q],
        edge-order words [R, T, n_max]; hash [R, T])."""
        c, t = self.c, self.task
        n = c.n_min + below_t(words[..., 0], c.n_max - c.n_min + 1)  # [R, T]
        b = t.name_bits
        names = words[..., t.slot_names:t.slot_names + c.n_names]
        keys = (srl_t(names, 2 + b) << b) | self.name_ids
        cycle = torch.topk(keys, c.n_max, dim=-1, largest=False, sorted=True).values
        cycle = cycle & self.name_mask
        starts = below_t(words[..., t.slot_starts:t.slot_starts + c.n_queries], n[..., None])
        kw = words[..., t.slot_ks:t.slot_ks + c.n_queries]
        if split == "train":
            ks = 1 + below_t(kw, c.K)
        else:
            ks = self.test_k[below_t(kw, self.test_k.shape[0])]
        valid = self.ar_nodes < n[..., None]
        lowest = torch.where(valid, cycle, c.n_names).argmin(-1, keepdim=True)
        rotated = cycle.gather(-1, (lowest + self.ar_nodes) % n[..., None])
        start_names = cycle.gather(-1, starts)
        content = torch.cat([n[..., None], rotated, start_names, ks], -1)
        keep = torch.cat([self.ones.expand(*n.shape, 1), valid,
                          self.ones_q.expand(*n.shape, -1)], -1)
        h = content_hash_t(content, self.salts, keep)
        order = words[..., t.slot_order:t.slot_order + c.n_max]
        return {"n": n, "cycle": cycle, "starts": starts, "ks": ks, "order": order}, h

    def render(self, chosen: Fields, split: str) -> DeviceBatch:
        c, t = self.c, self.task
        n, cycle, starts, ks = chosen["n"], chosen["cycle"], chosen["starts"], chosen["ks"]
        rows = n.shape[0]
        n_col = n[:, None]
        b2 = t.order_bits
        valid = self.ar_nodes < n_col
        okeys = torch.where(valid, (srl_t(chosen["order"], 2 + b2) << b2) | self.ar_nodes,
                            (1 << 62) | self.ar_nodes)
        order = torch.sort(okeys, -1).values & self.order_mask  # [R, n_max]
        heads = cycle.gather(1, order)
        tails = cycle.gather(1, (order + 1) % n_col)
        edges = torch.stack([heads, tails], -1).view(rows, 2 * c.n_max) + self.name0
        e = self.ctx_pos - (c.context_len - 2 * n_col)  # edge-token index of each position
        context = torch.where(e >= 0, edges.gather(1, e.clamp(min=0)), self.pad)
        start_names = cycle.gather(1, starts)
        answers = cycle.gather(1, (starts + ks) % n_col)
        queries = torch.stack([torch.full_like(ks, self.q_id), start_names + self.name0,
                               ks + self.k0, torch.full_like(ks, self.eq_id),
                               answers + self.name0], -1).view(rows, QUERY_TOKENS * c.n_queries)
        tokens = torch.cat([context, self.end_pad.expand(rows, -1), queries], 1)
        return DeviceBatch(tokens, self.mask_row.expand(rows, -1).clone(), ks.clone())


__all__ = [
    "DeviceBatch",
    "check_counter_task",
    "device_batch",
    "device_batch_at",
    "rule110_tables",
    "tries_per_round",
]
