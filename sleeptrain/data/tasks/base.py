"""Common interface of the procedural synthetic tasks.

Every task is a seeded, infinite, deterministic generator of fixed-length token sequences.

* ``Task.example(rng, split)`` draws one sample of ``'train'`` or ``'test'`` from a numpy
  ``Generator``.
* ``Task.stream(split, seed, start)`` yields the samples ``start, start + 1, ...`` of an infinite
  stream. Sample ``i`` is drawn from its own generator
  ``np.random.default_rng([seed, split_id, i])`` (``split_id``: train 0, test 1), so random access
  (resume) costs O(1) per sample and ``stream(start=i)`` begins with exactly the ``i``-th sample
  of ``stream(start=0)``.
* Train/test disjointness: every sample has a canonical content key (a string, see each task).
  Its bucket ``blake2b(key) % 1000`` is stable across processes and machines; the sample belongs
  to ``'test'`` iff ``bucket < test_permille``. Each split rejects (and redraws) samples of the
  other split, so the two streams never share a sample.

Sampler ``'counter'`` (task option ``sampler``; the default ``'numpy'`` is the above): sample
``i`` comes from the counter-based hash RNG of ``counter.py`` instead: candidate try ``r`` of
sample ``i`` reads the words ``draw(stream_key(tag, seed, split_id, i), r * n_slots + slot)``
for the task's fixed slot layout, and the split bucket is ``bucket(content_hash(...))`` of the
canonical content (not blake2b). Tries ``0, 1, 2, ...`` are taken in order until one lands in
the requested split. The scalar pure-Python implementation here is the reference that
``device.device_batch`` (vectorized torch, any device) reproduces sample for sample.
"""

from __future__ import annotations

import hashlib
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import counter

SPLITS: dict[str, int] = {"train": 0, "test": 1}
"""Split name -> split id used in the per-sample seed."""

MAX_TRIES = 100_000
"""Rejection-loop cap per sample; reaching it means the split is (nearly) empty for the config."""

SAMPLERS = ("numpy", "counter")
"""Values of the task option ``sampler``."""

Draws = Callable[[int], int]
"""The counter words of one candidate try: slot -> unsigned 64-bit word."""


@dataclass
class Example:
    """One generated sample.

    ``tokens`` and ``loss_mask`` have the task's ``seq_len``; ``loss_mask[j] == 1`` iff token ``j``
    is an answer token (a prediction target). ``answer_depths`` holds, for each answer token in
    order, its reasoning depth (rule110: ``t``; depo: the query's ``k``). ``depth`` is the
    sample-level depth (rule110: ``t``; depo: ``-1`` because queries have different ``k``).
    """

    tokens: list[int]
    loss_mask: list[int]
    text: str
    fields: dict[str, Any]
    depth: int
    answer_depths: list[int] = field(default_factory=list)


def split_bucket(key: str) -> int:
    """Return the stable bucket in ``[0, 1000)`` of a canonical content key (blake2b based)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 1000


def split_of_key(key: str, test_permille: int) -> str:
    """Return ``'test'`` iff the key's bucket is below ``test_permille``, else ``'train'``."""
    return "test" if split_bucket(key) < test_permille else "train"


def check_split(split: str) -> int:
    """Return the id of a split name; ``ValueError`` for anything but ``'train'``/``'test'``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]


# ----------------------------------------------------------------------------------------------
# Config validation helpers (shared by the task configs). Each raises ValueError naming the field.
# ----------------------------------------------------------------------------------------------


def check_int(
    owner: str, name: str, value: Any, lo: int | None = None, hi: int | None = None
) -> int:
    """Return ``value`` as a Python int after checking its type (no bools) and range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{owner}.{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else str(lo)
        hi_s = "inf" if hi is None else str(hi)
        raise ValueError(f"{owner}.{name} must be in [{lo_s}, {hi_s}], got {value}")
    return value


def check_int_list(
    owner: str, name: str, value: Any, lo: int | None = None, hi: int | None = None
) -> tuple[int, ...]:
    """Return a non-string iterable of ints as a tuple, each element range-checked."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(f"{owner}.{name} must be a list of ints, got {value!r}")
    return tuple(check_int(owner, f"{name}[{i}]", v, lo, hi) for i, v in enumerate(value))


def check_token(owner: str, name: str, value: Any, allow_empty: bool = False) -> str:
    """Return ``value`` after checking it is a string without whitespace (and non-empty)."""
    if not isinstance(value, str):
        raise ValueError(f"{owner}.{name} must be a str, got {type(value).__name__} {value!r}")
    if (not value and not allow_empty) or any(ch.isspace() for ch in value):
        raise ValueError(
            f"{owner}.{name} must be a non-empty string without whitespace, got {value!r}"
        )
    return value


def check_sampler(owner: str, value: Any) -> str:
    """Return the sampler name after checking it is one of ``SAMPLERS``."""
    if value not in SAMPLERS:
        raise ValueError(f"{owner}.sampler must be one of {SAMPLERS}, got {value!r}")
    return str(value)


def no_sample_error(name: str, split: str, test_permille: int) -> RuntimeError:
    """The error of a rejection loop that found no sample of ``split`` in ``MAX_TRIES`` tries."""
    return RuntimeError(
        f"{name}: no {split!r} sample found in {MAX_TRIES} draws; the sample space of "
        f"this config is too small for test_permille={test_permille}"
    )


# ----------------------------------------------------------------------------------------------
# Task base class
# ----------------------------------------------------------------------------------------------


class Task(ABC):
    """Base class of a procedural task: vocabulary, fixed sequence layout, seeded sampling.

    Subclasses set ``name``, ``vocab``, ``seq_len``, ``window_len``, ``test_permille``,
    ``sampler``, ``answer_positions`` and ``sep`` (the separator used by ``text``/``decode``) and
    implement ``_draw`` (sample the content cheaply), ``_content_key`` (its canonical key),
    ``_render`` (build the ``Example``) and ``canonical_key`` (the key recomputed from an
    ``Example``'s fields); for the counter sampler also ``counter_slots``, ``_counter_draw``,
    ``_counter_words``, ``_counter_render`` and ``_counter_content_of``.
    """

    name: str
    vocab: list[str]
    seq_len: int
    window_len: int
    test_permille: int
    sampler: str = "numpy"
    answer_positions: list[int]
    sep: str = ""

    def _init_vocab(self, vocab: Sequence[str]) -> None:
        """Store the vocabulary and its string -> id map; tokens must be unique."""
        self.vocab = list(vocab)
        self.token_to_id = {tok: i for i, tok in enumerate(self.vocab)}
        if len(self.token_to_id) != len(self.vocab):
            raise ValueError(f"{self.name}: vocabulary has duplicate tokens")
        self._token_lens = sorted({len(tok) for tok in self.vocab}, reverse=True)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (ids are ``0 .. vocab_size - 1``)."""
        return len(self.vocab)

    # -- tokenization ---------------------------------------------------------------------------

    def encode(self, s: str) -> list[int]:
        """Return the token ids of ``s``: whitespace is skipped, tokens matched longest-first."""
        ids: list[int] = []
        lookup = self.token_to_id
        for chunk in s.split():
            if chunk in lookup:  # fast path: whitespace-separated tokens
                ids.append(lookup[chunk])
                continue
            pos = 0
            while pos < len(chunk):
                for length in self._token_lens:  # longest match first
                    tok = chunk[pos : pos + length]
                    if len(tok) == length and tok in lookup:
                        ids.append(lookup[tok])
                        pos += length
                        break
                else:
                    raise ValueError(f"{self.name}: cannot tokenize {chunk[pos:]!r}")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Return the token strings of ``ids`` joined by the task's separator."""
        vocab = self.vocab
        return self.sep.join([vocab[i] for i in ids])

    # -- splits -----------------------------------------------------------------------------------

    @abstractmethod
    def canonical_key(self, example: Example) -> str:
        """Return the canonical content key of an example (from its fields)."""

    def split_of(self, example: Example) -> str:
        """Return the split (``'train'`` or ``'test'``) that the example belongs to (by the
        blake2b bucket of its canonical key, or the counter bucket for a counter task)."""
        if self.sampler == "counter":
            bucket = self.counter_bucket(self._counter_content_of(example))
            return "test" if bucket < self.test_permille else "train"
        return split_of_key(self.canonical_key(example), self.test_permille)

    def depth_values(self, split: str) -> tuple[int, ...]:
        """The sorted answer depths that samples of ``split`` can have."""
        raise NotImplementedError

    # -- sampling ---------------------------------------------------------------------------------

    @abstractmethod
    def _draw(self, rng: np.random.Generator, split: str) -> Any:
        """Draw the content of one candidate sample (before split rejection)."""

    @abstractmethod
    def _content_key(self, content: Any) -> str:
        """Return the canonical key of drawn content (equal to ``canonical_key`` of its render)."""

    @abstractmethod
    def _render(self, content: Any, rng: np.random.Generator) -> Example:
        """Turn accepted content into an ``Example`` (may draw more randomness, e.g. shuffles)."""

    def check_nonempty(self, split: str) -> int:
        """Return the split id; ``ValueError`` for an unknown or an empty split."""
        split_id = check_split(split)
        if split == "test" and self.test_permille == 0:
            raise ValueError(f"{self.name}: test split is empty (test_permille=0)")
        if split == "train" and self.test_permille >= 1000:
            raise ValueError(f"{self.name}: train split is empty (test_permille=1000)")
        return split_id

    def example(self, rng: np.random.Generator, split: str) -> Example:
        """Draw one sample of ``split``, redrawing candidates that belong to the other split.

        A counter task draws a seed and an index in ``[0, 2**63)`` from ``rng`` and returns
        ``example_at(split, seed, index)``.
        """
        self.check_nonempty(split)
        if self.sampler == "counter":
            seed, index = (int(v) for v in rng.integers(0, 1 << 63, size=2))
            return self.example_at(split, seed, index)
        for _ in range(MAX_TRIES):
            content = self._draw(rng, split)
            if split_of_key(self._content_key(content), self.test_permille) == split:
                return self._render(content, rng)
        raise no_sample_error(self.name, split, self.test_permille)

    def example_at(self, split: str, seed: int, index: int) -> Example:
        """Return sample ``index`` of the stream ``(split, seed)`` (random access, O(1))."""
        split_id = check_split(split)
        if self.sampler == "counter":
            seed = check_int(self.name, "seed", seed, 0, counter.MAX_INDEX)
            index = check_int(self.name, "index", index, 0, counter.MAX_INDEX)
            return self._counter_example(split, split_id, seed, index)
        seed = check_int(self.name, "seed", seed, 0)
        index = check_int(self.name, "index", index, 0)
        return self.example(np.random.default_rng([seed, split_id, index]), split)

    # -- counter sampler (scalar reference) ------------------------------------------------------

    counter_slots: int
    """Counter words per candidate try (the task's fixed slot layout)."""

    @property
    def counter_tag(self) -> int:
        """The stream tag of this task's counter streams (``counter.task_tag(name)``)."""
        return counter.task_tag(self.name)

    def _counter_draw(self, draws: Draws, split: str) -> Any:
        """Counter sampler: the content of one candidate try from its words."""
        raise NotImplementedError

    def _counter_words(self, content: Any) -> list[tuple[int, int]]:
        """Counter sampler: the (position, word) pairs that the content hash covers."""
        raise NotImplementedError

    def _counter_render(self, content: Any, draws: Draws) -> Example:
        """Counter sampler: the ``Example`` of accepted content (may read more slots)."""
        raise NotImplementedError

    def _counter_content_of(self, example: Example) -> Any:
        """Counter sampler: the canonical content recomputed from an example's fields."""
        raise NotImplementedError

    def counter_bucket(self, content: Any) -> int:
        """The counter split bucket in ``[0, 1000)`` of content (test iff < test_permille)."""
        return counter.bucket(counter.content_hash(self._counter_words(content)))

    def _counter_example(self, split: str, split_id: int, seed: int, index: int) -> Example:
        """The scalar reference of the counter sampler: sample ``index`` of ``(split, seed)``."""
        self.check_nonempty(split)
        key = counter.stream_key(self.counter_tag, seed, split_id, index)
        n_slots = self.counter_slots
        want_test = split == "test"
        for attempt in range(MAX_TRIES):
            base = attempt * n_slots

            def draws(slot: int, base: int = base) -> int:
                return counter.draw(key, base + slot)

            content = self._counter_draw(draws, split)
            if (self.counter_bucket(content) < self.test_permille) == want_test:
                return self._counter_render(content, draws)
        raise no_sample_error(self.name, split, self.test_permille)

    def stream(self, split: str, seed: int, start: int = 0) -> Iterator[Example]:
        """Yield samples ``start, start + 1, ...`` of the infinite deterministic stream."""
        split_id = check_split(split)
        hi = counter.MAX_INDEX if self.sampler == "counter" else None
        seed = check_int(self.name, "seed", seed, 0, hi)
        start = check_int(self.name, "start", start, 0, hi)
        return self._stream(split, split_id, seed, start)

    def _stream(self, split: str, split_id: int, seed: int, start: int) -> Iterator[Example]:
        """Generator body of ``stream`` (kept separate so argument errors raise eagerly)."""
        index = start
        while True:
            if self.sampler == "counter":
                yield self._counter_example(split, split_id, seed, index)
            else:
                yield self.example(np.random.default_rng([seed, split_id, index]), split)
            index += 1

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
            f"seq_len={self.seq_len}, window_len={self.window_len})"
        )
