"""GSM-Infinite-style arithmetic word problems over a dependency graph, padded with distractors.

Re-implemented from the public description of GSM-Infinite (Zhou et al. 2025, "GSM-Infinite: How Do
Your LLMs Behave over Infinitely Increasing Context Length and Reasoning Complexity?"): a problem is
a set of statements, each defining one quantity ("the number of adult owl in Maple Creek") either
as a number or from other quantities, listed in random order; the question asks for one quantity.

* The **core** graph has exactly ``ops`` operations (1..8): every derived quantity is one operation
  (sum of two quantities, difference of two, ``k`` times one, ``k`` more than one) and the
  questioned quantity depends on all of them; leaves are given numbers (some leaves are shared, so
  the graph is a DAG, not always a tree).
* **Distractors** define other quantities, as numbers or from earlier distractor quantities only, so
  they never change the answer; they pad the prompt to ``target_len`` tokens.
* The question comes **before** the statements, so a streaming model knows what to look for.
* Answers are exact non-negative integers (no modular arithmetic); the reference is ``"N"`` and the
  model answers ``Answer: N`` (``answer_prefix`` already holds ``Answer:``).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sleeptrain.eval.textdata import EvalSample

__all__ = [
    "DEFAULT_ANSWER_PREFIX",
    "GSM_INSTRUCTION",
    "GSM_MAX_OPS",
    "format_gsm_prompt",
    "generate_gsm",
    "parse_gsm_answer",
    "score_gsm",
]

GSM_MAX_OPS = 8
DEFAULT_ANSWER_PREFIX = "\nAnswer:"
GSM_INSTRUCTION = (
    "Solve the math problem below. It is a list of statements about the numbers of animals in "
    "different places, in no particular order; only some of them are needed to answer the "
    "question. Every number is a whole number. Give the final answer in the form 'Answer: N'.")

AGES = ("adult", "newborn")
ANIMALS = (
    "owl", "crow", "eagle", "parrot", "blue jay", "heron", "penguin", "flamingo", "pelican",
    "swan", "goose", "duck", "fox", "wolf", "bear", "deer", "racoon", "badger", "otter", "beaver",
    "lion", "tiger", "leopard", "cheetah", "zebra", "giraffe", "hippo", "rhino", "elephant",
    "camel", "llama", "alpaca", "kangaroo", "koala", "wombat", "lemur", "gorilla", "chimpanzee",
    "orangutan", "panda", "red panda", "sloth", "armadillo", "tapir", "bison", "moose", "elk",
    "seal", "walrus", "sea lion", "turtle", "tortoise", "iguana", "gecko", "python", "cobra",
    "crocodile", "alligator", "frog", "toad", "salamander", "lynx", "bobcat", "coyote", "hyena",
    "meerkat", "mongoose", "hedgehog", "porcupine", "skunk", "opossum", "squirrel", "chipmunk",
)
PLACE_FIRST = (
    "Maple", "Cedar", "Pine", "Oak", "Willow", "Birch", "Aspen", "Elm", "Silver", "Golden", "Stone",
    "River", "Lake", "Sunny", "Misty", "Shady", "Green", "Red", "Blue", "North", "South", "East",
    "West", "Eagle", "Fox", "Bear", "Clear", "Hidden", "Quiet", "Windy",
)
PLACE_SECOND = (
    "Creek", "Ridge", "Valley", "Forest", "Meadow", "Hollow", "Springs", "Park", "Grove", "Hill",
    "Bay", "Marsh", "Canyon", "Zoo", "Reserve",
)

_OPS = ("sum", "diff", "times", "more")
_OP_WEIGHTS = (0.35, 0.25, 0.2, 0.2)
_ARITY = {"sum": 2, "diff": 2, "times": 1, "more": 1}


@dataclass
class _Node:
    name: str
    op: str  # "value" or one of _OPS
    args: list[int] = field(default_factory=list)  # node ids
    k: int = 0  # the constant of "value", "times" and "more"
    value: int = 0


def _phrase(name: str) -> str:
    return f"the number of {name}"


def _statement(nodes: list[_Node], i: int) -> str:
    nd = nodes[i]
    head = f"The number of {nd.name} equals"
    a = [_phrase(nodes[j].name) for j in nd.args]
    if nd.op == "value":
        return f"{head} {nd.k}."
    if nd.op == "sum":
        return f"{head} the sum of {a[0]} and {a[1]}."
    if nd.op == "diff":
        return f"{head} the difference between {a[0]} and {a[1]}."
    if nd.op == "times":
        return f"{head} {nd.k} times {a[0]}."
    if nd.op == "more":
        return f"{head} {nd.k} more than {a[0]}."
    raise AssertionError(nd.op)


class _Names:
    """Distinct quantity names ("adult owl in Maple Creek") drawn at random."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()
        self.capacity = len(AGES) * len(ANIMALS) * len(PLACE_FIRST) * len(PLACE_SECOND)

    def take(self) -> str:
        if len(self.used) >= self.capacity // 2:
            raise ValueError(f"gsm: more than {self.capacity // 2} quantities needed; "
                             "target_len is too large for the name lists")
        while True:
            r = self.rng
            name = (f"{r.choice(AGES)} {r.choice(ANIMALS)} in "
                    f"{r.choice(PLACE_FIRST)} {r.choice(PLACE_SECOND)}")
            if name not in self.used:
                self.used.add(name)
                return name

    def release(self, name: str) -> None:
        self.used.discard(name)


def _apply(op: str, vals: list[int], k: int) -> int:
    if op == "sum":
        return vals[0] + vals[1]
    if op == "diff":
        return vals[0] - vals[1]
    if op == "times":
        return k * vals[0]
    if op == "more":
        return k + vals[0]
    raise AssertionError(op)


def _derive(nodes: list[_Node], i: int) -> None:
    """Value node i from its valued args; a difference's args are ordered so that it is >= 0."""
    nd = nodes[i]
    if nd.op == "diff" and nodes[nd.args[0]].value < nodes[nd.args[1]].value:
        nd.args.reverse()
    nd.value = _apply(nd.op, [nodes[j].value for j in nd.args], nd.k)


def _new_op(rng: random.Random, name: str) -> _Node:
    op = rng.choices(_OPS, _OP_WEIGHTS)[0]
    k = rng.randint(2, 3) if op == "times" else rng.randint(1, 9) if op == "more" else 0
    return _Node(name, op, [-1] * _ARITY[op], k)


def _core_graph(rng: random.Random, names: _Names, ops: int) -> tuple[list[_Node], int]:
    """Nodes of a graph of exactly ``ops`` operations, all used by the target (returned id)."""
    nodes = [_new_op(rng, names.take())]
    slots = [(0, s) for s in range(len(nodes[0].args))]  # (node, arg position) still open
    while sum(nd.op != "value" for nd in nodes) < ops:
        node, pos = slots.pop(rng.randrange(len(slots)))
        nodes.append(_new_op(rng, names.take()))
        nodes[node].args[pos] = len(nodes) - 1
        slots += [(len(nodes) - 1, s) for s in range(len(nodes[-1].args))]
    leaves: list[int] = []
    for node, pos in slots:
        sibling = [j for j in nodes[node].args if j >= 0]
        reuse = [j for j in leaves if j not in sibling]
        if reuse and rng.random() < 0.25:
            nodes[node].args[pos] = rng.choice(reuse)  # a shared leaf makes the graph a DAG
        else:
            nodes.append(_Node(names.take(), "value", [], rng.randint(1, 12)))
            nodes[-1].value = nodes[-1].k
            leaves.append(len(nodes) - 1)
            nodes[node].args[pos] = len(nodes) - 1

    def evaluate(i: int) -> None:
        for j in nodes[i].args:
            evaluate(j)
        if nodes[i].op != "value":
            _derive(nodes, i)

    evaluate(0)
    return nodes, 0


def _distractor(rng: random.Random, names: _Names, pool: list[_Node], alive: list[int]) -> _Node:
    """A new quantity given as a number or computed from the ``alive`` quantities of ``pool``."""
    nd = _new_op(rng, names.take())
    if rng.random() < 0.35 or len(alive) < len(nd.args):
        v = rng.randint(1, 12)
        return _Node(nd.name, "value", [], v, v)
    nd.args = rng.sample(alive, len(nd.args))
    tmp = pool + [nd]
    _derive(tmp, len(pool))
    return nd


def format_gsm_prompt(question: str, statements: Sequence[str]) -> str:
    """The prompt: instruction, then the question, then the problem's statements."""
    return f"{GSM_INSTRUCTION}\n\nQuestion: {question}\n\nProblem: {' '.join(statements)}"


def _question(name: str) -> str:
    age_animal, place = name.split(" in ", 1)
    return f"How many {age_animal} does {place} have?"


class _Distractors:
    """Distractor quantities: ``pool[j]`` is stated by ``text[j]`` while ``j`` is in ``alive``;
    new ones are computed from alive ones only, so removing an unreferenced one is safe."""

    def __init__(self, rng: random.Random, names: _Names, count: Callable[[str], int]) -> None:
        self.rng, self.names, self.count = rng, names, count
        self.pool: list[_Node] = []
        self.text: list[str] = []
        self.tokens: list[int] = []
        self.alive: list[int] = []
        self.shortest = 1 << 30  # fewest tokens of a candidate so far

    def candidate(self) -> tuple[_Node, str, int]:
        nd = _distractor(self.rng, self.names, self.pool, self.alive)
        text = _statement(self.pool + [nd], len(self.pool))
        return nd, text, self.count(" " + text)

    def add(self, nd: _Node, text: str, tok: int) -> str:
        self.alive.append(len(self.pool))
        self.pool.append(nd)
        self.text.append(text)
        self.tokens.append(tok)
        return text

    def top_up(self, room: int) -> list[str]:
        """Add the subset of new candidates whose tokens best fill ``room`` (exact subset sum)
        and return their texts. With under two distractors to build on, all candidates are plain
        numbers of similar length, so more are drawn."""
        if room <= 0:
            return []
        cands = [self.candidate() for _ in range(48 if len(self.alive) >= 2 else 256)]
        self.shortest = min([self.shortest] + [c[2] for c in cands])
        way: dict[int, tuple[int, int]] = {0: (-1, -1)}  # reachable sum -> (previous sum, item)
        for j, c in enumerate(cands):
            for total in list(way):
                if total + c[2] <= room and total + c[2] not in way:
                    way[total + c[2]] = (total, j)
        pick = []
        total = max(way)
        while total:
            total, j = way[total]
            pick.append(j)
        for j, cand in enumerate(cands):
            if j not in pick:
                self.names.release(cand[0].name)
        return [self.add(*cands[j]) for j in sorted(pick)]  # they only use older quantities

    def remove_one(self) -> tuple[str, int] | None:
        """Take out the shortest distractor that no other one uses: (text, tokens), or None."""
        needed = {a for j in self.alive for a in self.pool[j].args}
        free = [j for j in self.alive if j not in needed]
        if not free:
            return None
        j = min(free, key=lambda j: self.tokens[j])
        self.alive.remove(j)
        return self.text[j], self.tokens[j]


def _fit_length(order: list[str], dis: Any, n_tokens: Any, target_len: int,
                rng: random.Random) -> tuple[int, list[str]] | None:
    """Adds and removes distractors (``dis``) in ``order`` until the prompt's token count
    (``n_tokens(order)``) lies in [0.98 target_len, target_len], at most 24 rounds (token
    counts need not add up exactly: merges across statements); the best fit found, or None
    when none fits."""
    n_tok = n_tokens(order)
    lower = math.ceil(0.98 * target_len)
    best: tuple[int, list[str]] | None = None
    stuck = False  # the last top-up left a gap: make a bigger one before the next
    for _ in range(24):
        if n_tok <= target_len and (best is None or n_tok > best[0]):
            best = (n_tok, list(order))
        if lower <= n_tok <= target_len:
            break
        if n_tok < lower and not stuck:
            new = dis.top_up(target_len - n_tok)
            for text in new:
                order.insert(rng.randrange(len(order) + 1), text)
            stuck = True
        else:  # too long, or the gap is one no top-up fills: take some out to refill
            gap = target_len - n_tok
            want = rng.uniform(3.0, 5.0) * dis.shortest  # varied, so that retries differ
            while True:
                gone = dis.remove_one()
                if gone is None:
                    break
                order.remove(gone[0])
                gap += gone[1]
                if gap >= want:
                    break
            stuck = False
            if gone is None and gap < 0:
                break
        n_tok = n_tokens(order)
    return best


def _make_gsm(ops: int, index: int, seed: int, target_len: int, tokenizer: Any,
              answer_prefix: str, max_new_tokens: int) -> EvalSample:
    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    rng = random.Random(f"gsm:{ops}:{seed}:{index}")
    names = _Names(rng)
    core, target = _core_graph(rng, names, ops)
    question = _question(core[target].name)
    core_stmts = [_statement(core, j) for j in range(len(core))]
    core_set = set(core_stmts)

    def full(stmts: list[str]) -> str:
        return format_gsm_prompt(question, stmts) + answer_prefix

    fixed = count(full([]))
    core_tok = sum(count(" " + st) for st in core_stmts)
    budget = target_len - fixed - core_tok
    if budget < 0:
        raise ValueError(f"gsm_ops{ops}: target_len {target_len} is too small; the problem "
                         f"without distractors has {fixed + core_tok} tokens")
    dis = _Distractors(rng, names, count)
    used = 0
    longest = max(count(" " + st) for st in core_stmts)
    while budget - used > 2 * longest:  # whole distractors while two more surely fit
        dis.add(*dis.candidate())
        used += dis.tokens[-1]
        longest = max(longest, dis.tokens[-1])
    dis.top_up(budget - used)  # the subset of new candidates that best fills the rest
    order = core_stmts + [dis.text[j] for j in dis.alive]
    rng.shuffle(order)
    best = _fit_length(order, dis, lambda o: count(full(o)), target_len, rng)
    if best is None:
        raise ValueError(f"gsm_ops{ops}: target_len {target_len} is too small")
    n_tok, order = best
    prompt = format_gsm_prompt(question, order)
    body_at = prompt.index("\n\nProblem: ") + len("\n\nProblem: ")
    offsets = []
    pos = body_at
    for st in order:
        if st in core_set:
            offsets.append(pos)
        pos += len(st) + 1
    body_len = max(1, len(prompt) - body_at)
    return EvalSample(
        task=f"gsm_ops{ops}", index=index, target_len=target_len, input=prompt,
        answer_prefix=answer_prefix, outputs=[str(core[target].value)], n_tokens=n_tok,
        max_new_tokens=max_new_tokens,
        meta={
            "question": question,
            "answer": core[target].value,
            "ops": ops,
            "core": [st for st in order if st in core_set],
            "core_offsets": offsets,
            "core_depths": [(o - body_at) / body_len for o in offsets],
            "n_statements": len(order),
            "n_distractors": len(order) - len(core_stmts),
        })


def generate_gsm(ops: int, target_len: int, tokenizer: Any, n: int, seed: int = 0, *,
                 answer_prefix: str = DEFAULT_ANSWER_PREFIX, max_new_tokens: int = 16
                 ) -> list[EvalSample]:
    """``n`` problems with ``ops`` operations (1..8) whose prompt ``input + answer_prefix`` has
    ``ceil(0.98 * target_len) .. target_len`` tokens (the upper bound always; the lower one
    whenever the distractor statements can fill the gap, which they do for any target that holds
    the core problem with a few hundred bytes to spare). Task name ``gsm_ops{ops}``; ``outputs`` is
    ``[str(answer)]``; ``meta`` has the question, the answer, the core statements, each core
    statement's character offset in ``input`` and its relative depth in the problem text.
    Sample ``i`` depends only on ``(ops, seed, i)`` and ``target_len``.
    Raises ValueError when ``target_len`` cannot hold the core problem."""
    if not 1 <= ops <= GSM_MAX_OPS:
        raise ValueError(f"ops must be in 1..{GSM_MAX_OPS}, got {ops}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [_make_gsm(ops, i, seed, target_len, tokenizer, answer_prefix, max_new_tokens)
            for i in range(n)]


_ANSWER = re.compile(r"answer\s*:\s*\**\s*(-?\d[\d,]*)", re.IGNORECASE)
_LEADING = re.compile(r"\s*\**\s*(-?\d[\d,]*)(?![\d.]\d)")


def parse_gsm_answer(prediction: str) -> int | None:
    """The integer of the last ``Answer: N`` in ``prediction`` (case-insensitive; ``**``, commas
    allowed), else the integer the prediction starts with (a continuation of a prompt that ends in
    ``Answer:``), else None."""
    found = _ANSWER.findall(prediction)
    if found:
        return int(found[-1].replace(",", ""))
    m = _LEADING.match(prediction)
    return int(m.group(1).replace(",", "")) if m else None


def score_gsm(predictions: Sequence[str], references: Sequence[Any]) -> float:
    """Exact-integer accuracy in percent (0..100). ``references[i]`` is the answer (int or str) or a
    list of them (an ``EvalSample.outputs``). Empty input scores 0."""
    if len(predictions) != len(references):
        raise ValueError(f"score_gsm: {len(predictions)} predictions, {len(references)} references")
    if not predictions:
        return 0.0
    right = 0
    for pred, ref in zip(predictions, references, strict=True):
        refs = [ref] if isinstance(ref, (int, str)) else list(ref)
        got = parse_gsm_answer(pred)
        right += got is not None and any(got == int(str(r).strip()) for r in refs)
    return 100.0 * right / len(predictions)
