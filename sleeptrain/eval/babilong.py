"""BABILong qa1-qa5: bAbI-style facts hidden in a long background text, and their scorer.

Re-implemented from the public description of BABILong (Kuratov et al. 2024, "BABILong: Testing
the Limits of LLMs with Long Context Reasoning-in-a-Haystack") and of the bAbI tasks (Weston et al.
2015). The stories are simulated here (no bAbI files needed):

* qa1 single supporting fact: people move between rooms; "Where is Mary?"
* qa2 two supporting facts: people also pick up and drop objects; "Where is the football?"
* qa3 three supporting facts: "Where was the football before the kitchen?"
* qa4 two-argument relations: "The kitchen is north of the garden." / "What is north of the
  garden?" or "What is the kitchen north of?"
* qa5 three-argument relations: people also give objects to each other; "Who gave the football to
  Mary?", "Who gave the football?", "Who received the milk?", "Who did Fred give the apple to?",
  "What did Mary give to Jeff?"

The facts are inserted, in order, at random sentence boundaries of a background text (by default the
packaged public-domain ``data/background.txt``; BABILong uses PG-19 books) sized so that the prompt
(``input + answer_prefix``) has between 98% and 100% of ``target_len`` tokens. The prompt follows
BABILong's default template and per-task instruction / examples / post-prompt; the scorer follows
its ``compare_answers`` rule (see ``babilong_correct``).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from sleeptrain.eval.textdata import EvalSample

__all__ = [
    "BABILONG_TASKS",
    "DEFAULT_ANSWER_PREFIX",
    "PROMPTS",
    "TASK_LABELS",
    "TEMPLATE",
    "babilong_correct",
    "format_babilong_prompt",
    "generate_babilong",
    "load_background",
    "read_babilong_file",
    "score_babilong",
]

BABILONG_TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
DEFAULT_ANSWER_PREFIX = "\nAnswer:"

# --- the bAbI world ------------------------------------------------------------------------------
ACTORS = ("Mary", "John", "Daniel", "Sandra")  # qa1-qa3
QA5_ACTORS = ("Bill", "Fred", "Jeff", "Mary")  # qa5
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
MOVE_VERBS = ("moved", "went", "journeyed", "travelled", "went back")
GET_VERBS = ("got", "took", "grabbed", "picked up")
DROP_VERBS = ("dropped", "discarded", "put down", "left")
GIVE_VERBS = ("gave", "handed", "passed")

# Labels of BABILong's scorer (babilong/metrics.py TASK_LABELS for qa1-qa5).
TASK_LABELS: dict[str, frozenset[str]] = {
    "qa1": frozenset(LOCATIONS),
    "qa2": frozenset(LOCATIONS),
    "qa3": frozenset(LOCATIONS),
    "qa4": frozenset(LOCATIONS),
    "qa5": frozenset(QA5_ACTORS + OBJECTS),
}

# --- BABILong's prompts (babilong/prompts.py DEFAULT_TEMPLATE and DEFAULT_PROMPTS) ----------------
TEMPLATE = ("{instruction}\n\n{examples}\n\n{post_prompt}\n\n"
            "<context>\n{context}\n</context>\n\nQuestion: {question}")

PROMPTS: dict[str, dict[str, str]] = {
    "qa1": {
        "instruction":
            "I will give you context with the facts about positions of different persons hidden in "
            "some random text and a question. You need to answer the question based only on the "
            "information from the facts. If a person was in different locations, use the latest "
            "location to answer the question.",
        "examples":
            "<example>\n"
            "Charlie went to the hallway. Judith come back to the kitchen. Charlie travelled to "
            "balcony. Where is Charlie?\n"
            "Answer: The most recent location of Charlie is balcony.\n"
            "</example>\n\n"
            "<example>\n"
            "Alan moved to the garage. Charlie went to the beach. Alan went to the shop. Rouse "
            "travelled to balcony. Where is Alan?\n"
            "Answer: The most recent location of Alan is shop.\n"
            "</example>",
        "post_prompt":
            "Always return your answer in the following format: The most recent location of "
            "\u2019person\u2019 is \u2019location\u2019. Do not write anything else after that.",
    },
    "qa2": {
        "instruction":
            "I give you context with the facts about locations and actions of different persons "
            "hidden in some random text and a question.You need to answer the question based only "
            "on the information from the facts.\n"
            "If a person got an item in the first location and travelled to the second location "
            "the item is also in the second location. If a person dropped an item in the first "
            "location and moved to the second location the item remains in the first location.",
        "examples":
            "<example>\n"
            "Charlie went to the kitchen. Charlie got a bottle. Charlie moved to the balcony. "
            "Where is the bottle?\n"
            "Answer: The bottle is in the balcony.\n"
            "</example>\n"
            "<example>\n"
            "Alan moved to the garage. Alan got a screw driver. Alan moved to the kitchen. Where "
            "is the screw driver?\n"
            "Answer: The screw driver is in the kitchen.\n"
            "</example>",
        "post_prompt":
            "Always return your answer in the following format: The \u2019item\u2019 is in "
            "\u2019location\u2019. Do not write anything else after that.",
    },
    "qa3": {
        "instruction":
            "I give you context with the facts about locations and actions of different persons "
            "hidden in some random text and a question. You need to answer the question based only "
            "on the information from the facts.\n"
            "If a person got an item in the first location and travelled to the second location "
            "the item is also in the second location. If a person dropped an item in the first "
            "location and moved to the second location the item remains in the first location.",
        "examples":
            "<example>\n"
            "John journeyed to the bedroom. Mary grabbed the apple. Mary went back to the "
            "bathroom. Daniel journeyed to the bedroom. Daniel moved to the garden. Mary travelled "
            "to the kitchen. Where was the apple before the kitchen?\n"
            "Answer: Before the kitchen the apple was in the bathroom.\n"
            "</example>\n"
            "<example>\n"
            "John went back to the bedroom. John went back to the garden. John went back to the "
            "kitchen. Sandra took the football. Sandra travelled to the garden. Sandra journeyed "
            "to the bedroom. Where was the football before the bedroom?\n"
            "Answer: Before the bedroom the football was in the garden.\n"
            "</example>",
        "post_prompt":
            "Always return your answer in the following format: Before the $location_1$ the "
            "$item$ was in the $location_2$. Do not write anything else after that.",
    },
    "qa4": {
        "instruction":
            "I will give you context with the facts about different people, their location and "
            "actions, hidden in some random text and a question. You need to answer the question "
            "based only on the information from the facts.",
        "examples":
            "<example>\n"
            "The hallway is south of the kitchen. The bedroom is north of the kitchen. What is the "
            "kitchen south of?\n"
            "Answer: bedroom\n"
            "</example>\n"
            "<example>\n"
            "The garden is west of the bedroom. The bedroom is west of the kitchen. What is west "
            "of the bedroom?\n"
            "Answer: garden\n"
            "</example>",
        "post_prompt":
            "Your answer should contain only one word - location. Do not write anything else "
            "after that.",
    },
    "qa5": {
        "instruction":
            "I will give you context with the facts about locations and their relations hidden in "
            "some random text and a question. You need to answer the question based only on the "
            "information from the facts.",
        "examples":
            "<example>\n"
            "Mary picked up the apple there. Mary gave the apple to Fred. Mary moved to the "
            "bedroom. Bill took the milk there. Who did Mary give the apple to?\n"
            "Answer: Fred\n"
            "</example>\n"
            "<example>\n"
            "Jeff took the football there. Jeff passed the football to Fred. Jeff got the milk "
            "there. Bill travelled to the bedroom. Who gave the football?\n"
            "Answer: Jeff\n"
            "</example>\n"
            "<example>\n"
            "Fred picked up the apple there. Fred handed the apple to Bill. Bill journeyed to the "
            "bedroom. Jeff went back to the garden. What did Fred give to Bill?\n"
            "Answer: apple\n"
            "</example>",
        "post_prompt":
            "Your answer should contain only one word. Do not write anything else after that. "
            "Do not explain your answer.",
    },
}

# Default number of facts per story (drawn uniformly, then shrunk to fit half the context).
N_FACTS: dict[str, tuple[int, int]] = {
    "qa1": (2, 10), "qa2": (4, 30), "qa3": (6, 50), "qa4": (2, 2), "qa5": (4, 30),
}
MIN_SENTENCE_CHARS = 15
# The longest answer in each post-prompt's format (sets max_new_tokens; BABILong generates 15 BPE
# tokens, too few for byte-level tokenizers).
LONGEST_ANSWER = {
    "qa1": "The most recent location of Sandra is bathroom.",
    "qa2": "The football is in the bathroom.",
    "qa3": "Before the bathroom the football was in the bathroom.",
    "qa4": "bathroom",
    "qa5": "football",
}


def _max_new_tokens(tokenizer: Any, task: str) -> int:
    return max(15, len(tokenizer.encode(" " + LONGEST_ANSWER[task])) + 5)


def _task_key(task: str) -> str:
    key = task.removeprefix("babilong_")
    if key not in BABILONG_TASKS:
        raise ValueError(f"unknown BABILong task {task!r}; expected one of {BABILONG_TASKS}")
    return key


def format_babilong_prompt(task: str, context: str, question: str, *, instruction: bool = True,
                           examples: bool = False, post_prompt: bool = True) -> str:
    """BABILong's prompt: ``TEMPLATE`` filled with the task's parts (a disabled part is empty) and
    stripped, exactly as ``babilong.prompts.get_formatted_input`` builds it."""
    p = PROMPTS[_task_key(task)]
    return TEMPLATE.format(instruction=p["instruction"] if instruction else "",
                           examples=p["examples"] if examples else "",
                           post_prompt=p["post_prompt"] if post_prompt else "",
                           context=context.strip(), question=question).strip()


# --- background text -----------------------------------------------------------------------------
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?]['\")\]]))\s+(?=['\"(\[]?[A-Z0-9])")
_FACT_LIKE = re.compile(
    r"\b(?:" + "|".join(ACTORS + QA5_ACTORS) + r") (?:" + "|".join(
        MOVE_VERBS + GET_VERBS + DROP_VERBS + GIVE_VERBS) + r")\b"
    r"|\bThe (?:" + "|".join(LOCATIONS) + r") is (?:north|south|east|west) of\b")


def _split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


@lru_cache(maxsize=8)
def _load_sentences(path: str | None) -> tuple[str, ...]:
    if path is None:
        raw = resources.files("sleeptrain.eval").joinpath("data/background.txt").read_text(
            encoding="utf-8")
        raw = "\n".join(line for line in raw.splitlines() if not line.startswith("#"))
    else:
        raw = Path(path).read_text(encoding="utf-8")
    paragraphs = re.split(r"\n\s*\n", raw)  # blank lines end paragraphs; line wraps do not
    out: list[str] = []
    for para in paragraphs:
        para = re.sub(r"\s+", " ", para).strip()
        for s in _split_sentences(para):
            # Sentences that read like a fact of the tasks would corrupt the story: leave them out.
            if len(s) >= MIN_SENTENCE_CHARS and not _FACT_LIKE.search(s):
                out.append(s)
    if not out:
        raise ValueError(f"background {path or 'data/background.txt'}: no usable sentences")
    return tuple(out)


def load_background(background: str | Path | None = None) -> list[str]:
    """Sentences of the background text: the packaged ``data/background.txt`` (Lewis Carroll,
    "Alice's Adventures in Wonderland", public domain) when ``background`` is None, else the UTF-8
    text file at that path. Sentences shorter than 15 characters or that look like task facts are
    left out."""
    return list(_load_sentences(None if background is None else str(background)))


# --- story simulation ----------------------------------------------------------------------------
@dataclass
class _Story:
    facts: list[str]
    question: str
    answer: str
    supporting: list[int]


@dataclass
class _World:
    """bAbI world state: where people are, who holds what, where objects have been."""

    rng: random.Random
    actors: tuple[str, ...]
    facts: list[str] = field(default_factory=list)
    loc: dict[str, str | None] = field(default_factory=dict)
    last_move: dict[str, int] = field(default_factory=dict)
    holder: dict[str, str | None] = field(default_factory=dict)
    holder_get: dict[str, int] = field(default_factory=dict)  # fact index of the holder's pick-up
    obj_loc: dict[str, str | None] = field(default_factory=dict)
    # per object: (location, fact that put it there, pick-up fact of the carrier that brought it)
    history: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    gives: list[tuple[str, str, str, int]] = field(default_factory=list)  # giver, obj, receiver, i

    def __post_init__(self) -> None:
        self.loc = {a: None for a in self.actors}
        self.holder = {o: None for o in OBJECTS}
        self.obj_loc = {o: None for o in OBJECTS}
        self.history = {o: [] for o in OBJECTS}

    def held(self, actor: str) -> list[str]:
        return [o for o in OBJECTS if self.holder[o] == actor]

    def move(self, actor: str, dest: str) -> None:
        i = len(self.facts)
        self.facts.append(f"{actor} {self.rng.choice(MOVE_VERBS)} to the {dest}.")
        self.loc[actor] = dest
        self.last_move[actor] = i
        for o in self.held(actor):
            self.obj_loc[o] = dest
            self.history[o].append((dest, i, self.holder_get[o]))

    def get(self, actor: str, obj: str) -> None:
        i = len(self.facts)
        there = " there" if self.rng.random() < 0.5 else ""
        self.facts.append(f"{actor} {self.rng.choice(GET_VERBS)} the {obj}{there}.")
        self.holder[obj] = actor
        self.holder_get[obj] = i
        here = self.loc[actor]
        assert here is not None
        if self.obj_loc[obj] != here:
            self.obj_loc[obj] = here
            self.history[obj].append((here, i, i))

    def drop(self, actor: str, obj: str) -> None:
        there = " there" if self.rng.random() < 0.5 else ""
        self.facts.append(f"{actor} {self.rng.choice(DROP_VERBS)} the {obj}{there}.")
        self.holder[obj] = None

    def give(self, actor: str, obj: str, other: str) -> None:
        i = len(self.facts)
        self.facts.append(f"{actor} {self.rng.choice(GIVE_VERBS)} the {obj} to {other}.")
        self.holder[obj] = other
        self.holder_get[obj] = i
        self.gives.append((actor, obj, other, i))

    def step(self, weights: dict[str, float]) -> None:
        """One random valid event, drawn by kind with ``weights`` (move/get/drop/give)."""
        rng = self.rng
        options: list[tuple[float, Callable[[], None]]] = []
        placed = [a for a in self.actors if self.loc[a] is not None]
        for a in self.actors:
            here = self.loc[a]
            others = [self.loc[b] for b in placed if b != a and self.loc[b] != here]
            if others and rng.random() < weights.get("meet", 0.0):
                dest = rng.choice(others)  # go where someone else is (so that gives can happen)
            else:
                dest = rng.choice([x for x in LOCATIONS if x != here])
            options.append((weights["move"], lambda a=a, d=dest: self.move(a, d)))
        for a in placed:
            for o in OBJECTS:
                if self.holder[o] is None and self.obj_loc[o] in (None, self.loc[a]):
                    options.append((weights.get("get", 0.0), lambda a=a, o=o: self.get(a, o)))
            for o in self.held(a):
                options.append((weights.get("drop", 0.0), lambda a=a, o=o: self.drop(a, o)))
                for b in placed:
                    if b != a and self.loc[b] == self.loc[a]:
                        options.append((weights.get("give", 0.0),
                                        lambda a=a, o=o, b=b: self.give(a, o, b)))
        options = [(w, f) for w, f in options if w > 0]
        total = sum(w for w, _ in options)
        r = rng.random() * total
        for w, f in options:
            r -= w
            if r <= 0:
                f()
                return
        options[-1][1]()


def _story_qa1(rng: random.Random, n: int) -> _Story | None:
    w = _World(rng, ACTORS)
    for _ in range(n):
        w.step({"move": 1.0})
    actor = rng.choice([a for a in ACTORS if w.loc[a] is not None])
    answer = w.loc[actor]
    assert answer is not None
    return _Story(w.facts, f"Where is {actor}?", answer, [w.last_move[actor]])


_CARRY = {"move": 0.55, "get": 0.3, "drop": 0.15}


def _story_qa2(rng: random.Random, n: int) -> _Story | None:
    w = _World(rng, ACTORS)
    for _ in range(n):
        w.step(_CARRY)
    objs = [o for o in OBJECTS if len(w.history[o]) >= 2]  # carried to another room at least once
    if not objs:
        return None
    obj = rng.choice(objs)
    loc, fact, got = w.history[obj][-1]
    return _Story(w.facts, f"Where is the {obj}?", loc, sorted({got, fact}))


def _story_qa3(rng: random.Random, n: int) -> _Story | None:
    w = _World(rng, ACTORS)
    for _ in range(n):
        w.step(_CARRY)
    cands = []
    for o in OBJECTS:
        h = w.history[o]
        names = [x[0] for x in h]
        for i in range(1, len(h)):
            if names.count(names[i]) == 1:  # "before the X" is unambiguous only if X occurs once
                cands.append((i, o))
    if not cands:
        return None
    best = max(i for i, _ in cands)  # bAbI asks about the latest move
    obj = rng.choice([o for i, o in cands if i == best])
    h = w.history[obj]
    (prev, f_prev, _), (cur, f_cur, got) = h[best - 1], h[best]
    return _Story(w.facts, f"Where was the {obj} before the {cur}?", prev,
                  sorted({f_prev, got, f_cur}))


def _story_qa4(rng: random.Random, n: int) -> _Story | None:
    center, a, b = rng.sample(LOCATIONS, 3)
    d1, d2 = rng.sample(sorted(OPPOSITE), 2)  # a is d1 of center, b is d2 of center, d1 != d2
    rel = [(a, d1, center), (b, d2, center)]  # (x, d, y): the x is d of the y
    facts = []
    for x, d, y in rel:  # either way round
        facts.append(f"The {x} is {d} of the {y}." if rng.random() < 0.5
                     else f"The {y} is {OPPOSITE[d]} of the {x}.")
    k = rng.randrange(2)
    x, d, y = rel[k]
    if rng.random() < 0.5:
        x, d, y = y, OPPOSITE[d], x
    if rng.random() < 0.5:
        question, answer = f"What is {d} of the {y}?", x
    else:
        question, answer = f"What is the {x} {d} of?", y
    return _Story(facts, question, answer, [k])


def _story_qa5(rng: random.Random, n: int) -> _Story | None:
    w = _World(rng, QA5_ACTORS)
    for _ in range(n):
        w.step({"move": 0.45, "get": 0.25, "drop": 0.1, "give": 0.6, "meet": 0.6})
    if not w.gives:
        return None
    g = w.gives

    def unique(pred: Callable[[tuple[str, str, str, int]], bool], k: int) -> bool:
        return len({e[k] for e in g if pred(e)}) == 1

    cands: dict[tuple[str, str], int] = {}  # (question, answer) -> last give it is about
    for x, o, y, i in g:
        if unique(lambda e, o=o, y=y: e[1] == o and e[2] == y, 0):
            cands[(f"Who gave the {o} to {y}?", x)] = i
        if unique(lambda e, o=o: e[1] == o, 0):
            cands[(f"Who gave the {o}?", x)] = i
        if unique(lambda e, o=o: e[1] == o, 2):
            cands[(f"Who received the {o}?", y)] = i
        if unique(lambda e, x=x, o=o: e[0] == x and e[1] == o, 2):
            cands[(f"Who did {x} give the {o} to?", y)] = i
        if unique(lambda e, x=x, y=y: e[0] == x and e[2] == y, 1):
            cands[(f"What did {x} give to {y}?", o)] = i
    if not cands:
        return None
    question, answer = rng.choice(sorted(cands))
    return _Story(w.facts, question, answer, [cands[(question, answer)]])


_STORIES: dict[str, Callable[[random.Random, int], _Story | None]] = {
    "qa1": _story_qa1, "qa2": _story_qa2, "qa3": _story_qa3, "qa4": _story_qa4,
    "qa5": _story_qa5,
}


def _make_story(task: str, rng: random.Random, n_facts: int) -> _Story:
    for attempt in range(1000):
        story = _STORIES[task](rng, n_facts + attempt // 50)
        if story is not None:
            return story
    raise RuntimeError(f"{task}: could not simulate a story with {n_facts} facts")


# --- haystack assembly ---------------------------------------------------------------------------
def _assemble(pieces: list[str], facts: list[str], slots: list[int]) -> tuple[str, list[int]]:
    """Join background pieces with the facts put before piece ``slots[j]`` (len(pieces) = end).
    Returns the context and the character offset of each fact."""
    out: list[str] = []
    offsets: list[int] = []
    pos = 0
    j = 0
    for p in range(len(pieces) + 1):
        while j < len(facts) and slots[j] == p:
            if out:
                pos += 1
            offsets.append(pos)
            out.append(facts[j])
            pos += len(facts[j])
            j += 1
        if p < len(pieces) and pieces[p]:
            if out:
                pos += 1
            out.append(pieces[p])
            pos += len(pieces[p])
    return " ".join(out), offsets


def _fit_haystack(tokenizer: Any, render: Callable[[str], str], facts: list[str],
                  sentences: Sequence[str], sentence_tokens: dict[int, int], rng: random.Random,
                  target_len: int) -> tuple[str, list[int], int]:
    """Context (background sentences + facts) such that ``len(encode(render(context)))`` is the
    largest value <= target_len reachable by whole words. ``sentence_tokens`` caches the token
    count of each background sentence. Returns (context, fact offsets, n)."""
    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    def count_sentence(j: int) -> int:
        if j not in sentence_tokens:
            sentence_tokens[j] = count(" " + sentences[j])
        return sentence_tokens[j]

    n_fixed = count(render(""))
    budget = target_len - n_fixed - sum(count(" " + f) for f in facts)
    if budget < 0:
        raise ValueError(f"target_len {target_len} is too small: the prompt without background "
                         f"already has {target_len - budget} tokens")
    start = rng.randrange(len(sentences))
    bg: list[str] = []
    used = 0
    j = start
    while True:
        t = count_sentence(j % len(sentences))
        if used + t > budget:
            break
        bg.append(sentences[j % len(sentences)])
        used += t
        j += 1
    # Words of the next sentences fill the rest (BABILong also cuts its last background sentence).
    words = " ".join(sentences[(j + k) % len(sentences)] for k in range(3)).split()
    slots = sorted(rng.choices(range(len(bg) + 2), k=len(facts)))

    def build(k: int) -> tuple[str, list[int], int]:
        ctx, offs = _assemble(bg + [" ".join(words[:k])], facts, slots)
        return ctx, offs, count(render(ctx))

    while True:
        best = build(0)
        if best[2] <= target_len or not bg:
            break
        bg.pop()  # token counts were not additive: make room
        slots = [min(s, len(bg) + 1) for s in slots]
    if best[2] > target_len:
        raise ValueError(f"target_len {target_len} is too small for {len(facts)} facts")
    # The most filler words whose own tokens fit the room left, then corrected on the full prompt
    # (a few full encodes instead of a binary search over them).
    room = target_len - best[2]
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(" " + " ".join(words[:mid])) <= room:
            lo = mid
        else:
            hi = mid - 1
    k = lo
    while k > 0:
        cand = build(k)
        if cand[2] <= target_len:
            best = cand
            break
        k -= 1
    while k < len(words):
        cand = build(k + 1)
        if cand[2] > target_len:
            break
        best, k = cand, k + 1
    return best


def _n_facts_range(task: str, n_facts: int | tuple[int, int] | None) -> tuple[int, int]:
    if n_facts is None:
        return N_FACTS[task]
    if isinstance(n_facts, int):
        return (n_facts, n_facts)
    lo, hi = n_facts
    if not 1 <= lo <= hi:
        raise ValueError(f"n_facts range {n_facts!r} is not 1 <= lo <= hi")
    return (lo, hi)


def generate_babilong(task: str, target_len: int, tokenizer: Any, n: int, seed: int = 0,
                      background: str | Path | None = None, *, use_instruction: bool = True,
                      use_examples: bool = False, use_post_prompt: bool = True,
                      answer_prefix: str = DEFAULT_ANSWER_PREFIX,
                      n_facts: int | tuple[int, int] | None = None) -> list[EvalSample]:
    """``n`` BABILong-style samples of ``task`` (qa1..qa5) whose prompt ``input + answer_prefix``
    has ``ceil(0.98 * target_len) .. target_len`` tokens of ``tokenizer`` (the upper bound always;
    the lower bound whenever one background word is under 2% of ``target_len``).

    Sample ``i`` draws its story from ``(seed, task, i)`` only, so the same stories come back at
    every ``target_len`` (as in BABILong) unless the facts had to be cut to fit; the background
    window and fact positions also depend on ``target_len``. ``n_facts`` (a count or a (lo, hi)
    range; default ``N_FACTS[task]``) is shrunk so that the facts take at most half the context.
    ``outputs`` is ``[answer word]``; ``meta`` has the question, facts, supporting fact indices,
    each fact's character offset in ``input`` and its relative depth in the context, and the
    scorer's labels.
    """
    key = _task_key(task)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    sentences = _load_sentences(None if background is None else str(background))
    lo, hi = _n_facts_range(key, n_facts)

    def render(ctx: str, question: str) -> str:
        return format_babilong_prompt(key, ctx, question, instruction=use_instruction,
                                      examples=use_examples, post_prompt=use_post_prompt)

    sentence_tokens: dict[int, int] = {}
    samples = []
    for i in range(n):
        rng = random.Random(f"babilong:{key}:{seed}:{i}")
        want = rng.randint(lo, hi)
        fixed = len(tokenizer.encode(render("", "Where is the football?") + answer_prefix))
        room = (target_len - fixed) // 2
        while True:
            story = _make_story(key, random.Random(f"babilong:{key}:{seed}:{i}:{want}"), want)
            fact_tokens = sum(len(tokenizer.encode(" " + f)) for f in story.facts)
            if fact_tokens <= room or want <= lo:
                break
            want = max(lo, min(want - 1, int(want * room / fact_tokens)))
        bg_rng = random.Random(f"babilong-bg:{key}:{seed}:{i}:{target_len}")
        context, offsets, n_tok = _fit_haystack(
            tokenizer, lambda c, q=story.question: render(c, q) + answer_prefix, story.facts,
            sentences, sentence_tokens, bg_rng, target_len)
        prompt = render(context, story.question)
        ctx_at = prompt.index("<context>\n") + len("<context>\n")
        samples.append(EvalSample(
            task=f"babilong_{key}", index=i, target_len=target_len, input=prompt,
            answer_prefix=answer_prefix, outputs=[story.answer], n_tokens=n_tok,
            max_new_tokens=_max_new_tokens(tokenizer, key),
            meta={
                "question": story.question,
                "facts": story.facts,
                "supporting": story.supporting,
                "fact_offsets": [ctx_at + o for o in offsets],
                "fact_depths": [o / max(1, len(context)) for o in offsets],
                "labels": sorted(TASK_LABELS[key]),
                "n_facts": len(story.facts),
                "background": "data/background.txt" if background is None else str(background),
            }))
    return samples


# --- scoring -------------------------------------------------------------------------------------
def _first_sentence(output: str) -> str:
    """BABILong's ``preprocess_output``: lowercase, keep the first sentence and drop what follows
    '<context>', '<example>' or 'question'. Also cut at the first line break (after leading
    whitespace), since a base model's continuation runs on past the answer line."""
    out = output.lower().lstrip()
    out = out.split(".")[0]
    out = out.split("\n")[0]
    for stop in ("<context>", "<example>", "question"):
        out = out.split(stop)[0]
    return out


def babilong_correct(target: str, output: str, question: str, labels: Sequence[str]) -> bool:
    """BABILong's ``compare_answers``: the (lowercased) target is the only task label found, by
    substring, in the first sentence of ``output``, not counting labels named in the question."""
    out = _first_sentence(output)
    target = target.lower()
    lab = {x.lower() for x in labels}
    in_question = {x for x in lab if x in question.lower()}
    found = {x for x in lab if x in out} - in_question
    return found == {target}


def score_babilong(task: str, predictions: Sequence[str], references: Sequence[Any],
                   questions: Sequence[str]) -> float:
    """Accuracy in percent (0..100) of ``predictions`` by ``babilong_correct``. ``references[i]``
    is the target word or a list of them (an ``EvalSample.outputs``; any may match); ``questions``
    are the questions (``meta['question']``), whose labels never count. Empty input scores 0."""
    labels = TASK_LABELS[_task_key(task)]
    if not len(predictions) == len(references) == len(questions):
        raise ValueError(f"score_babilong: {len(predictions)} predictions, {len(references)} "
                         f"references and {len(questions)} questions")
    if not predictions:
        return 0.0
    right = 0
    for pred, ref, q in zip(predictions, references, questions, strict=True):
        targets = [ref] if isinstance(ref, str) else list(ref)
        right += any(babilong_correct(t, pred, q, labels) for t in targets)
    return 100.0 * right / len(predictions)


# --- official BABILong files ---------------------------------------------------------------------
def _json_records(path: Path, text: str) -> list[tuple[Any, int]]:
    """(record, line) of a JSON array or of JSON Lines; errors name the file and line."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        dec = json.JSONDecoder()
        pos = len(text) - len(stripped) + 1
        out = []
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos < len(text) and text[pos] == "]":
                return out
            line = text.count("\n", 0, pos) + 1
            if pos >= len(text):
                raise ValueError(f"{path}:{line}: unterminated JSON array")
            try:
                obj, pos = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
            out.append((obj, line))
    if stripped.startswith("{") and path.suffix != ".jsonl":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None  # probably JSON Lines
        if isinstance(obj, dict):
            raise ValueError(f"{path}:1: expected a JSON array of records or JSON Lines, "
                             f"got one JSON object")
    out = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), line_no))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from e
    return out


def _length_from_name(stem: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmM])", stem)
    if not m:
        return -1
    return int(m.group(1)) * (1000 if m.group(2) in "kK" else 1_000_000)


def read_babilong_file(path: str | Path, *, tokenizer: Any = None, task: str | None = None,
                       target_len: int | None = None, use_instruction: bool = True,
                       use_examples: bool = False, use_post_prompt: bool = True,
                       answer_prefix: str = DEFAULT_ANSWER_PREFIX) -> list[EvalSample]:
    """Samples of an official BABILong file: a JSON array (``qa1/4k.json`` as BABILong's
    ``create_tasks.py`` writes it) or JSON Lines of records with string fields ``input`` (the
    context), ``question`` and ``target``. The prompt is built as by ``generate_babilong``.

    The task is ``task``, else the record's ``task`` field, else the last ``qaN`` in the path.
    ``target_len`` defaults to the file name's length (``4k`` -> 4000, ``1M`` -> 1000000, as
    BABILong names its splits), else -1. ``n_tokens`` is -1 without a ``tokenizer``. Errors name
    the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    path_task = re.findall(r"qa\d+", str(path))
    tlen = target_len if target_len is not None else _length_from_name(path.stem)
    samples = []
    for idx, (rec, line) in enumerate(_json_records(path, text)):
        where = f"{path}:{line}: record {idx}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for k in ("input", "question", "target"):
            if not isinstance(rec.get(k), str):
                raise ValueError(f"{where}: field {k!r} is missing or not a string")
        name = task or rec.get("task") or (path_task[-1] if path_task else None)
        if not isinstance(name, str) or name.removeprefix("babilong_") not in BABILONG_TASKS:
            raise ValueError(f"{where}: cannot tell the task ({name!r}); pass task= one of "
                             f"{BABILONG_TASKS}")
        key = _task_key(name)
        prompt = format_babilong_prompt(key, rec["input"], rec["question"],
                                        instruction=use_instruction, examples=use_examples,
                                        post_prompt=use_post_prompt)
        n_tok = len(tokenizer.encode(prompt + answer_prefix)) if tokenizer is not None else -1
        new = _max_new_tokens(tokenizer, key) if tokenizer is not None else 15
        samples.append(EvalSample(
            task=f"babilong_{key}", index=idx, target_len=tlen, input=prompt,
            answer_prefix=answer_prefix, outputs=[rec["target"]], n_tokens=n_tok,
            max_new_tokens=new,
            meta={"question": rec["question"], "labels": sorted(TASK_LABELS[key]),
                  "source": str(path), "line": line}))
    return samples
