"""Rule 110 task: predict the first cell of several cellular-automaton states after ``t`` steps.

Token layout (``W = width``, ``S = n_states``, ``D = t_digits``; window length = ``W``)::

    position   0 ..  W-1   state 0 bits   ('0'/'1', cell 0 = leftmost)   -> window 0
               W .. 2W-1   state 1 bits                                  -> window 1
               ...
    (S-1)W .. SW-1         state S-1 bits                                -> window S-1
    SW                     't'
    SW+1 .. SW+D           decimal digits of t, zero-padded to D digits
    SW+D+1                 '='
    SW+D+2 .. SW+D+1+S     answers: cell 0 of state i after t steps of Rule 110   (loss_mask = 1)

``seq_len = S*W + D + 2 + S``; each state fills exactly one window, so with eviction every ``W``
tokens the model must carry every state through a memory update. ``D = max(2, digits of the
largest t)``. Default (W=24, S=4, t=4): ``seq_len = 96 + 4 + 4 = 104``, e.g.
``<96 bits>t04=1001``.

Vocabulary (id = index): ``'0' '1' 't' '2' .. '9' '=' '<pad>'`` (13 tokens); the digits 0 and 1
of ``t`` reuse the bit tokens. ``'<pad>'`` never occurs in generated samples; it is there for
batch padding.

Rule 110: ``new[i] = (110 >> (left << 2 | center << 1 | right)) & 1``. Boundary ``'periodic'``
wraps around; ``'zero'`` treats cells outside the state as 0.

Caveat of ``'zero'``: cell 0 then has a constant-0 left neighbour and updates as ``C | R``, so
once it is 1 it stays 1; the answer is then nearly always 1 (97% at t=4, 100% at t=32 for
width 24). Use ``'periodic'`` (the default; answers ~53-56% ones) for a balanced task.

Canonical key (split assignment): the state bit strings and ``t``.

Counter sampler (``sampler='counter'``, see ``base``): with ``nw = ceil(W / 64)`` words per
state, a try has ``n_slots = S * nw + 1`` words ``u[slot]``. Cell ``i`` of state ``s`` is bit
``i % 64`` of ``u[s * nw + i // 64]`` (bit 0 = least significant); ``t = ts[below(u[S * nw],
len(ts))]`` with ``ts`` the split's t list (train: ``t_min .. t_max``; test: ``test_t`` in its
given order). The content hash covers, at position ``s * nw + c``, word ``c`` of state ``s``
(its bits as drawn, the unused high bits of a state's last word cleared) and ``t`` at
position ``S * nw``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from .base import Draws, Example, Task, check_int, check_int_list, check_sampler
from .counter import below

BOUNDARIES = ("periodic", "zero")
MAX_T = 9999
RULE110_VOCAB = ["0", "1", "t", "2", "3", "4", "5", "6", "7", "8", "9", "=", "<pad>"]


@dataclass(frozen=True)
class Rule110Config:
    """Configuration of the Rule 110 task (validated on construction)."""

    width: int = 24  # cells per state; also the window length
    n_states: int = 4  # independent states (= answers) per sample
    t_min: int = 4  # train t is uniform in [t_min, t_max]
    t_max: int = 4  # (paper's hard setting: t = 32)
    test_t: tuple[int, ...] | None = None  # test t uniform over these values; None: [t_min, t_max]
    boundary: str = "periodic"  # 'periodic' or 'zero'
    test_permille: int = 100  # samples whose key bucket < this (of 1000) form the test split
    sampler: str = "numpy"  # 'numpy' (per-sample numpy Generator) | 'counter' (hash RNG, GPU)

    def __post_init__(self) -> None:
        owner = "Rule110Config"
        set_ = partial(object.__setattr__, self)  # the dataclass is frozen
        set_("width", check_int(owner, "width", self.width, 3, 4096))
        set_("n_states", check_int(owner, "n_states", self.n_states, 1, 64))
        set_("t_min", check_int(owner, "t_min", self.t_min, 0, MAX_T))
        set_("t_max", check_int(owner, "t_max", self.t_max, 0, MAX_T))
        if self.t_min > self.t_max:
            raise ValueError(f"{owner}.t_min ({self.t_min}) must be <= t_max ({self.t_max})")
        if self.test_t is not None:
            test_t = check_int_list(owner, "test_t", self.test_t, 0, MAX_T)
            if not test_t:
                raise ValueError(f"{owner}.test_t must be non-empty (or None)")
            set_("test_t", test_t)
        if self.boundary not in BOUNDARIES:
            raise ValueError(f"{owner}.boundary must be one of {BOUNDARIES}, got {self.boundary!r}")
        set_("test_permille", check_int(owner, "test_permille", self.test_permille, 0, 1000))
        set_("sampler", check_sampler(owner, self.sampler))


def rule110_evolve(state: str | Sequence[int], steps: int, boundary: str = "periodic") -> list[int]:
    """Return the cells (ints, cell 0 leftmost) of ``state`` after ``steps`` Rule 110 updates.

    The state is packed into an int with cell 0 as the most significant bit; the neighbour words
    are shifts, and Rule 110 is evaluated bitwise as ``(C | R) & ~(L & C & R)``.
    """
    cells = [int(c) for c in state]
    width = len(cells)
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
    mask = (1 << width) - 1
    x = int("".join(map(str, cells)), 2) if width else 0
    top = width - 1
    for _ in range(steps):
        left = x >> 1  # bit of cell i-1 moved to cell i's position
        right = (x << 1) & mask  # bit of cell i+1 moved to cell i's position
        if boundary == "periodic":
            left |= (x & 1) << top  # cell 0's left neighbour is cell W-1
            right |= x >> top  # cell W-1's right neighbour is cell 0
        x = (x | right) & ~(left & x & right) & mask
    return [(x >> (top - i)) & 1 for i in range(width)]


class Rule110Task(Task):
    """Procedural Rule 110 task (see the module docstring for the token layout)."""

    name = "rule110"
    sep = ""

    def __init__(self, config: Rule110Config | None = None) -> None:
        self.config = config if config is not None else Rule110Config()
        c = self.config
        self._init_vocab(RULE110_VOCAB)
        self.window_len = c.width
        self.test_permille = c.test_permille
        self.train_t = tuple(range(c.t_min, c.t_max + 1))
        self.test_t = c.test_t if c.test_t is not None else self.train_t
        self.t_digits = max(2, len(str(max(self.train_t + self.test_t))))
        self.query_start = c.n_states * c.width
        self.seq_len = self.query_start + self.t_digits + 2 + c.n_states
        self.answer_positions = list(range(self.seq_len - c.n_states, self.seq_len))
        self._digit_ids = [self.token_to_id[str(d)] for d in range(10)]
        self.sampler = c.sampler
        self.words_per_state = -(-c.width // 64)
        self.counter_slots = c.n_states * self.words_per_state + 1

    def split_ts(self, split: str) -> tuple[int, ...]:
        """The t values (in draw order, repeats allowed) of ``split``."""
        return self.train_t if split == "train" else self.test_t

    def depth_values(self, split: str) -> tuple[int, ...]:
        return tuple(sorted(set(self.split_ts(split))))

    def _draw(self, rng: np.random.Generator, split: str) -> tuple[list[str], int]:
        """Draw the state bit strings and t."""
        c = self.config
        bits = rng.integers(0, 2, size=c.n_states * c.width, dtype=np.uint8)
        flat = (bits + ord("0")).tobytes().decode("ascii")
        states = [flat[i : i + c.width] for i in range(0, len(flat), c.width)]
        ts = self.split_ts(split)
        t = int(ts[int(rng.integers(len(ts)))])
        return states, t

    @staticmethod
    def _key(states: Sequence[str], t: int) -> str:
        """Return the canonical key of (states, t)."""
        return f"rule110|{','.join(states)}|t={int(t)}"

    def _content_key(self, content: tuple[list[str], int]) -> str:
        return self._key(*content)

    def canonical_key(self, example: Example) -> str:
        return self._key(example.fields["states"], example.fields["t"])

    def _render(self, content: tuple[list[str], int], rng: np.random.Generator) -> Example:
        del rng  # the layout draws nothing more
        return self._build(content)

    # -- counter sampler --------------------------------------------------------------------------

    def _counter_draw(self, draws: Draws, split: str) -> tuple[list[str], int]:
        """The states (bit strings) and t of one candidate try (layout: module docstring)."""
        c, nw = self.config, self.words_per_state
        states = []
        for s in range(c.n_states):
            parts = []
            for w in range(nw):
                nbits = min(64, c.width - 64 * w)
                word = draws(s * nw + w) & ((1 << nbits) - 1)
                parts.append(format(word, f"0{nbits}b")[::-1])  # bit b at string index b
            states.append("".join(parts))
        ts = self.split_ts(split)
        return states, int(ts[below(draws(c.n_states * nw), len(ts))])

    def _counter_words(self, content: tuple[list[str], int]) -> list[tuple[int, int]]:
        states, t = content
        nw = self.words_per_state
        words = [
            (s * nw + w, int(state[64 * w : 64 * w + 64][::-1], 2))
            for s, state in enumerate(states)
            for w in range(nw)
        ]
        return [*words, (len(states) * nw, int(t))]

    def _counter_render(self, content: tuple[list[str], int], draws: Draws) -> Example:
        del draws
        return self._build(content)

    def _counter_content_of(self, example: Example) -> tuple[list[str], int]:
        return list(example.fields["states"]), int(example.fields["t"])

    def _build(self, content: tuple[list[str], int]) -> Example:
        """Build the token sequence, loss mask and fields of (states, t)."""
        c = self.config
        states, t = content
        answers = [rule110_evolve(s, t, c.boundary)[0] for s in states]
        tokens = [int(ch) for s in states for ch in s]  # '0'/'1' have ids 0/1
        tokens.append(self.token_to_id["t"])
        tokens.extend(self._digit_ids[int(d)] for d in str(t).zfill(self.t_digits))
        tokens.append(self.token_to_id["="])
        tokens.extend(answers)
        loss_mask = [0] * (self.seq_len - c.n_states) + [1] * c.n_states
        fields_: dict[str, Any] = {
            "states": list(states),
            "t": t,
            "boundary": c.boundary,
            "answers": answers,
        }
        return Example(
            tokens=tokens,
            loss_mask=loss_mask,
            text=self.decode(tokens),
            fields=fields_,
            depth=t,
            answer_depths=[t] * c.n_states,
        )
