"""Depo task (k-hop retrieval on a directed cycle, after Allen-Zhu & Li) as used in the paper.

A sample is a directed cycle over ``n`` nodes (``n`` uniform in ``[n_min, n_max]``) whose names
are drawn without replacement from ``n_names`` single-token names (``name_prefix`` + zero-padded
index, e.g. ``'n00' .. 'n99'``). Its ``n`` edges ``a -> b`` are written in shuffled order, then
``n_queries`` queries ask for the node ``k`` hops after a start node (the walk wraps around the
cycle, so ``k`` may exceed ``n``).

Token layout (``C = context_len``, ``Q = query_start = C`` rounded up to a multiple of
``window_len``, ``P = pad_token``)::

    0 .. C-2n-1        P ... P                    left padding of the edge list
    C-2n .. C-1        a1 b1 a2 b2 ... an bn      the n edges, 2 tokens each, shuffled order
    C .. Q-1           P ... P                    end padding up to a window boundary
                                                  (empty when C is a multiple of window_len)
    Q + 5j .. Q+5j+4   '?' X_j k-token '=' A_j    query j = 0 .. n_queries-1; A_j is the node
                                                  k_j hops after X_j (loss_mask = 1 on A_j only)

``seq_len = Q + 5 * n_queries``; the default ``context_len`` is ``2 * n_max`` rounded up to a
multiple of ``window_len``, so the query segment starts on a window boundary and a long context
is fragmented over several windows. The k-token of ``k`` is ``'k' + str(k)`` (``'k4'``).

``k`` is uniform in ``[1, K]`` for train and uniform over ``test_k`` for test; start nodes are
uniform over the cycle's nodes. ``answer_depths`` lists each query's ``k``; ``depth`` is -1.

Vocabulary (id = index): ``pad_token, '?', '=', names (n_names), 'k1' .. 'k<k_max>'`` where
``k_max = max(K, max(test_k))``. Default: ``3 + 100 + 16 = 119`` tokens, ``seq_len = 75 + 50``.

Canonical key (split assignment): the edge set (order-free) and the list of (start, k) queries.

Counter sampler (``sampler='counter'``, see ``base``): with ``M = n_names``, ``Q = n_queries``,
``b = max(1, bit_length(M - 1))`` and ``b2 = max(1, bit_length(n_max - 1))``, a try has
``n_slots = 1 + M + 2Q + n_max`` words ``u[slot]``:

* ``n = n_min + below(u[0], n_max - n_min + 1)``;
* name ``v`` gets the key ``((u[1 + v] >> (2 + b)) << b) | v`` (unique, so sorting is exact);
  the cycle is the ``n`` names of the smallest keys, in ascending key order;
* query ``q``: start position ``below(u[1 + M + q], n)`` in the cycle, and ``k`` =
  ``1 + below(u[1 + M + Q + q], K)`` (train) or ``test_k[below(u[1 + M + Q + q], len(test_k))]``;
* edge order (read only for the accepted try): cycle edge ``i < n`` (``cycle[i] ->
  cycle[i + 1 mod n]``) gets the key ``((u[1 + M + 2Q + i] >> (2 + b2)) << b2) | i`` and the
  edges are written in ascending key order.

The content hash covers ``n`` at position 0, the cycle rotated to start at its smallest name id
at positions ``1 .. n`` (the edge set, order-free), and per query its start name id at
``1 + n_max + q`` and its ``k`` at ``1 + n_max + Q + q``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from .base import Draws, Example, Task, check_int, check_int_list, check_sampler, check_token
from .counter import below

MAX_NODES = 75
MAX_K = 10_000
QUERY_TOKENS = 5  # '?', start, k-token, '=', answer


def _round_up(x: int, m: int) -> int:
    """Return the smallest multiple of ``m`` that is >= ``x``."""
    return -(-x // m) * m


@dataclass(frozen=True)
class DepoConfig:
    """Configuration of the depo task (validated on construction)."""

    n_min: int = 8  # cycle length is uniform in [n_min, n_max]
    n_max: int = 16  # at most 75 (paper: up to 75)
    n_names: int = 100  # size of the node-name vocabulary
    name_prefix: str = "n"  # name tokens: prefix + zero-padded index
    window_len: int = 75  # window length (eviction period) the layout is aligned to
    context_len: int | None = None  # edge-list length; None: 2*n_max rounded up to window_len
    n_queries: int = 10  # queries per sample
    K: int = 4  # train k is uniform in [1, K]
    test_k: tuple[int, ...] = (1, 2, 4, 8, 16)  # test k uniform over these (values < 1 dropped)
    pad_token: str = "<pad>"
    test_permille: int = 100  # samples whose key bucket < this (of 1000) form the test split
    sampler: str = "numpy"  # 'numpy' (per-sample numpy Generator) | 'counter' (hash RNG, GPU)

    def __post_init__(self) -> None:
        owner = "DepoConfig"
        set_ = partial(object.__setattr__, self)  # the dataclass is frozen
        set_("n_min", check_int(owner, "n_min", self.n_min, 2, MAX_NODES))
        set_("n_max", check_int(owner, "n_max", self.n_max, 2, MAX_NODES))
        if self.n_min > self.n_max:
            raise ValueError(f"{owner}.n_min ({self.n_min}) must be <= n_max ({self.n_max})")
        set_("n_names", check_int(owner, "n_names", self.n_names, self.n_max, 100_000))
        set_("name_prefix", check_token(owner, "name_prefix", self.name_prefix, allow_empty=True))
        set_("window_len", check_int(owner, "window_len", self.window_len, 1, 1 << 20))
        if self.context_len is None:
            set_("context_len", _round_up(2 * self.n_max, self.window_len))
        else:
            set_(
                "context_len",
                check_int(owner, "context_len", self.context_len, 2 * self.n_max, 1 << 20),
            )
        set_("n_queries", check_int(owner, "n_queries", self.n_queries, 1, 10_000))
        set_("K", check_int(owner, "K", self.K, 1, MAX_K))
        test_k = tuple(
            sorted({k for k in check_int_list(owner, "test_k", self.test_k, None, MAX_K) if k >= 1})
        )
        if not test_k:
            raise ValueError(
                f"{owner}.test_k must contain at least one value >= 1, got {self.test_k!r}"
            )
        set_("test_k", test_k)
        set_("pad_token", check_token(owner, "pad_token", self.pad_token))
        set_("test_permille", check_int(owner, "test_permille", self.test_permille, 0, 1000))
        set_("sampler", check_sampler(owner, self.sampler))


class DepoTask(Task):
    """Procedural depo (k-hop on a cycle) task (see the module docstring for the token layout)."""

    name = "depo"
    sep = " "

    def __init__(self, config: DepoConfig | None = None) -> None:
        self.config = config if config is not None else DepoConfig()
        c = self.config
        width = len(str(c.n_names - 1))
        self.names = [f"{c.name_prefix}{i:0{width}d}" for i in range(c.n_names)]
        self.k_max = max(c.K, max(c.test_k))
        self.k_tokens = [f"k{k}" for k in range(1, self.k_max + 1)]
        vocab = [c.pad_token, "?", "=", *self.names, *self.k_tokens]
        if len(set(vocab)) != len(vocab):
            raise ValueError(
                f"DepoConfig: pad_token {c.pad_token!r} / name_prefix {c.name_prefix!r} make "
                "token strings collide (with each other, '?', '=' or the k-tokens 'k1'..)"
            )
        self._init_vocab(vocab)
        self.window_len = c.window_len
        self.test_permille = c.test_permille
        self.context_len = c.context_len
        self.query_start = _round_up(c.context_len, c.window_len)
        self.seq_len = self.query_start + QUERY_TOKENS * c.n_queries
        self.answer_positions = [
            self.query_start + QUERY_TOKENS * j + QUERY_TOKENS - 1 for j in range(c.n_queries)
        ]
        self._name0 = 3  # id of names[0]
        self._k0 = 3 + c.n_names - 1  # id of the k-token of k is _k0 + k
        self._test_k = np.asarray(c.test_k, dtype=np.int64)
        self.sampler = c.sampler
        self.name_bits = max(1, (c.n_names - 1).bit_length())
        self.order_bits = max(1, (c.n_max - 1).bit_length())
        q = c.n_queries
        # counter slot layout: n | name keys | starts | ks | edge-order keys
        self.slot_names = 1
        self.slot_starts = 1 + c.n_names
        self.slot_ks = self.slot_starts + q
        self.slot_order = self.slot_ks + q
        self.counter_slots = self.slot_order + c.n_max

    def depth_values(self, split: str) -> tuple[int, ...]:
        c = self.config
        return tuple(range(1, c.K + 1)) if split == "train" else tuple(c.test_k)

    def k_token(self, k: int) -> str:
        """Return the token string of hop count ``k``."""
        return self.k_tokens[k - 1]

    def _draw(self, rng: np.random.Generator, split: str) -> tuple[list[int], list[int], list[int]]:
        """Draw the cycle (name ids in cycle order), query start positions and hop counts."""
        c = self.config
        n = int(rng.integers(c.n_min, c.n_max + 1))
        cycle = rng.permutation(c.n_names)[:n].tolist()  # n distinct names, in cycle order
        starts = rng.integers(0, n, size=c.n_queries).tolist()
        if split == "train":
            ks = rng.integers(1, c.K + 1, size=c.n_queries).tolist()
        else:
            ks = self._test_k[rng.integers(0, len(self._test_k), size=c.n_queries)].tolist()
        return cycle, starts, ks

    @staticmethod
    def _key(edges: Sequence[Sequence[str]], queries: Sequence[Sequence[Any]]) -> str:
        """Return the canonical key of an edge set (any order) and (start, k, ...) queries."""
        edge_part = ";".join(sorted(f"{a}>{b}" for a, b in edges))
        query_part = ";".join(f"{q[0]}:{int(q[1])}" for q in queries)
        return f"depo|{edge_part}|{query_part}"

    def _content_key(self, content: tuple[list[int], list[int], list[int]]) -> str:
        cycle, starts, ks = content
        names = [self.names[i] for i in cycle]
        n = len(names)
        edges = [(names[i], names[(i + 1) % n]) for i in range(n)]
        return self._key(edges, [(names[s], k) for s, k in zip(starts, ks, strict=True)])

    def canonical_key(self, example: Example) -> str:
        return self._key(example.fields["edges"], example.fields["queries"])

    def _render(
        self, content: tuple[list[int], list[int], list[int]], rng: np.random.Generator
    ) -> Example:
        """Shuffle the edges and build the token sequence, loss mask and fields."""
        return self._build(content, rng.permutation(len(content[0])).tolist())

    # -- counter sampler --------------------------------------------------------------------------

    def _counter_draw(self, draws: Draws, split: str) -> tuple[list[int], list[int], list[int]]:
        """The cycle, query start positions and hop counts of one try (module docstring)."""
        c, b = self.config, self.name_bits
        n = c.n_min + below(draws(0), c.n_max - c.n_min + 1)
        keys = sorted(((draws(self.slot_names + v) >> (2 + b)) << b) | v
                      for v in range(c.n_names))
        cycle = [key & ((1 << b) - 1) for key in keys[:n]]
        q = c.n_queries
        starts = [below(draws(self.slot_starts + j), n) for j in range(q)]
        if split == "train":
            ks = [1 + below(draws(self.slot_ks + j), c.K) for j in range(q)]
        else:
            ks = [c.test_k[below(draws(self.slot_ks + j), len(c.test_k))] for j in range(q)]
        return cycle, starts, ks

    def _counter_words(self, content: tuple[list[int], list[int], list[int]]
                       ) -> list[tuple[int, int]]:
        cycle, starts, ks = content
        c, n = self.config, len(cycle)
        first = cycle.index(min(cycle))
        rotated = cycle[first:] + cycle[:first]
        q0 = 1 + c.n_max
        return [
            (0, n),
            *((1 + i, v) for i, v in enumerate(rotated)),
            *((q0 + j, cycle[s]) for j, s in enumerate(starts)),
            *((q0 + c.n_queries + j, int(k)) for j, k in enumerate(ks)),
        ]

    def _counter_render(self, content: tuple[list[int], list[int], list[int]], draws: Draws
                        ) -> Example:
        b2 = self.order_bits
        keys = sorted(((draws(self.slot_order + i) >> (2 + b2)) << b2) | i
                      for i in range(len(content[0])))
        return self._build(content, [key & ((1 << b2) - 1) for key in keys])

    def _counter_content_of(self, example: Example) -> tuple[list[int], list[int], list[int]]:
        """(cycle starting at its smallest name id, start positions in it, ks) of an example."""
        ids = {name: i for i, name in enumerate(self.names)}
        succ = {ids[a]: ids[b] for a, b in example.fields["edges"]}
        node = min(succ)
        cycle = []
        for _ in range(len(succ)):
            cycle.append(node)
            node = succ[node]
        where = {v: i for i, v in enumerate(cycle)}
        queries = example.fields["queries"]
        return cycle, [where[ids[x]] for x, _, _ in queries], [int(k) for _, k, _ in queries]

    def _build(self, content: tuple[list[int], list[int], list[int]], order: list[int]
               ) -> Example:
        """The example of content whose cycle edges are written in ``order`` (edge i is
        ``cycle[i] -> cycle[i + 1 mod n]``)."""
        c = self.config
        cycle, starts, ks = content
        n = len(cycle)
        edge_ids = [(cycle[i], cycle[(i + 1) % n]) for i in order]
        pad = self.token_to_id[c.pad_token]
        q_id, eq_id = self.token_to_id["?"], self.token_to_id["="]

        tokens = [pad] * (c.context_len - 2 * n)
        for a, b in edge_ids:
            tokens += [self._name0 + a, self._name0 + b]
        tokens += [pad] * (self.query_start - c.context_len)
        queries: list[list[Any]] = []
        for s, k in zip(starts, ks, strict=True):
            x, ans = cycle[s], cycle[(s + k) % n]
            tokens += [q_id, self._name0 + x, self._k0 + k, eq_id, self._name0 + ans]
            queries.append([self.names[x], int(k), self.names[ans]])
        loss_mask = [0] * self.seq_len
        for p in self.answer_positions:
            loss_mask[p] = 1
        fields_: dict[str, Any] = {
            "edges": [[self.names[a], self.names[b]] for a, b in edge_ids],
            "queries": queries,
            "n": n,
        }
        return Example(
            tokens=tokens,
            loss_mask=loss_mask,
            text=self.decode(tokens),
            fields=fields_,
            depth=-1,
            answer_depths=[int(k) for k in ks],
        )
