"""GSM-Infinite-style problems: answers re-derived by parsing the statements back and evaluating the
graph independently, distractors never matter, lengths, determinism, and the scorer."""

from __future__ import annotations

import math
import re

import pytest

from sleeptrain.data.tokenizers import ByteTokenizer
from sleeptrain.eval.gsm import generate_gsm, parse_gsm_answer, score_gsm

TOK = ByteTokenizer()

# --- an independent reading of the problem -------------------------------------------------------
Q = r"(?:adult|newborn) [a-z][a-z -]*? in [A-Z][a-z]+ [A-Z][a-z]+"
STATEMENT = re.compile(rf"The number of ({Q}) equals ([^.]+)\.")
RHS = [
    (re.compile(r"(\d+)"), lambda g, v: int(g[0])),
    (re.compile(rf"the sum of the number of ({Q}) and the number of ({Q})"),
     lambda g, v: v(g[0]) + v(g[1])),
    (re.compile(rf"the difference between the number of ({Q}) and the number of ({Q})"),
     lambda g, v: v(g[0]) - v(g[1])),
    (re.compile(rf"(\d+) times the number of ({Q})"), lambda g, v: int(g[0]) * v(g[1])),
    (re.compile(rf"(\d+) more than the number of ({Q})"), lambda g, v: int(g[0]) + v(g[1])),
]


def parse_problem(prompt: str) -> tuple[str, dict[str, str]]:
    """(questioned quantity, {quantity: right-hand side}) read from the prompt text."""
    head, body = prompt.split("\n\nProblem: ", 1)
    m = re.search(r"Question: How many ((?:adult|newborn) [a-z -]+?) does ([A-Z][a-z]+ "
                  r"[A-Z][a-z]+) have\?", head)
    assert m, head
    defs: dict[str, str] = {}
    pos = 0
    for st in STATEMENT.finditer(body):
        assert body[pos:st.start()].strip() == "", body[pos:st.start()]  # nothing unparsed
        pos = st.end()
        assert st.group(1) not in defs, f"{st.group(1)} defined twice"
        defs[st.group(1)] = st.group(2)
    assert body[pos:].strip() == ""
    return f"{m.group(1)} in {m.group(2)}", defs


def refs(rhs: str) -> list[str]:
    for pat, _ in RHS:
        m = pat.fullmatch(rhs)
        if m:
            return [g for g in m.groups() if not g.isdigit()]
    raise AssertionError(f"unparsed right-hand side {rhs!r}")


def evaluate(defs: dict[str, str], name: str, strict: bool = True) -> int:
    """Value of ``name``; ``strict``: also check every quantity is defined and non-negative."""
    memo: dict[str, int] = {}
    active: set[str] = set()

    def v(q: str) -> int:
        if q in memo:
            return memo[q]
        assert q not in active, f"cycle through {q}"
        assert q in defs, f"{q} is used but never defined"
        active.add(q)
        for pat, fn in RHS:
            m = pat.fullmatch(defs[q])
            if m:
                memo[q] = fn(m.groups(), v)
                break
        active.discard(q)
        assert memo[q] >= 0 or not strict, f"{q} is negative"
        return memo[q]

    if strict:
        for q in defs:  # every quantity, distractors included, is well defined
            v(q)
    return v(name)


def closure(defs: dict[str, str], name: str) -> set[str]:
    seen: set[str] = set()
    stack = [name]
    while stack:
        q = stack.pop()
        if q not in seen:
            seen.add(q)
            stack += refs(defs[q])
    return seen


# --- generator -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ops", range(1, 9))
def test_answer_by_independent_evaluation(ops):
    for s in generate_gsm(ops, 4096, TOK, 8, seed=ops):
        target, defs = parse_problem(s.input)
        answer = evaluate(defs, target)
        assert str(answer) == s.outputs[0] == str(s.meta["answer"])
        need = closure(defs, target)
        n_ops = sum(not defs[q].isdigit() for q in need)
        assert n_ops == ops
        assert len(defs) == s.meta["n_statements"] == len(need) + s.meta["n_distractors"]
        assert {f"The number of {q} equals {defs[q]}." for q in need} == set(s.meta["core"])
        # distractors never change the answer: drop them, or change all their numbers
        assert evaluate({q: defs[q] for q in need}, target) == answer
        bumped = {q: (str(int(r) + 7) if r.isdigit() and q not in need else r)
                  for q, r in defs.items()}
        assert evaluate(bumped, target, strict=False) == answer
        assert s.input.index("Question:") < s.input.index("Problem:")
        for off, st in zip(s.meta["core_offsets"], s.meta["core"], strict=True):
            assert s.input[off:off + len(st)] == st


def test_distractors_are_not_only_numbers():
    kinds = set()
    for s in generate_gsm(2, 8192, TOK, 3):
        _, defs = parse_problem(s.input)
        kinds |= {r.split(" the number")[0].split()[-1] if not r.isdigit() else "n"
                  for r in defs.values()}
        assert s.meta["n_distractors"] > 40
    assert {"n", "of", "between", "times", "than"} <= kinds


@pytest.mark.parametrize("ops,target", [(1, 1024), (3, 2048), (5, 4096), (8, 4096), (8, 8192)])
def test_lengths_within_two_percent(ops, target):
    for s in generate_gsm(ops, target, TOK, 5, seed=11):
        n = len(TOK.encode(s.input + s.answer_prefix))
        assert s.n_tokens == n
        assert math.ceil(0.98 * target) <= n <= target, (ops, target, n)
        assert s.task == f"gsm_ops{ops}" and s.target_len == target


def test_deterministic_and_seeded():
    a = generate_gsm(4, 2048, TOK, 3, seed=0)
    assert a == generate_gsm(4, 2048, TOK, 3, seed=0)
    assert [s.input for s in a] != [s.input for s in generate_gsm(4, 2048, TOK, 3, seed=1)]
    assert generate_gsm(4, 2048, TOK, 1, seed=0)[0] == a[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="ops must be"):
        generate_gsm(0, 2048, TOK, 1)
    with pytest.raises(ValueError, match="ops must be"):
        generate_gsm(9, 2048, TOK, 1)
    with pytest.raises(ValueError, match="too small"):
        generate_gsm(8, 600, TOK, 1)


# --- scorer --------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction,ref,ok", [
    ("Answer: 12", "12", True),
    (" 12", "12", True),  # the continuation of a prompt that ends in "Answer:"
    (" 12\n\nQuestion: How many", "12", True),
    ("answer: 12.", 12, True),
    ("The sum is 5, so Answer: 7\nAnswer: 12", "12", True),  # the last "Answer:" counts
    ("Answer: 12\nAnswer: 7", "12", False),
    ("**Answer:** 1,234", "1234", True),
    ("I think it is 12", "12", False),
    (" 12.5", "12", False),
    (" 120", "12", False),
    ("", "12", False),
    ("Answer: -3", "-3", True),
])
def test_scorer(prediction, ref, ok):
    assert score_gsm([prediction], [ref]) == (100.0 if ok else 0.0)


def test_score_aggregates_and_validates():
    assert parse_gsm_answer("no number") is None
    assert score_gsm(["Answer: 1", "Answer: 2", " 3", "x"], [["1"], [2], "4", "5"]) == 50.0
    assert score_gsm([], []) == 0.0
    with pytest.raises(ValueError):
        score_gsm(["1"], [])
    ss = generate_gsm(3, 1024, TOK, 4)
    assert score_gsm([f" {s.outputs[0]}\n" for s in ss], [s.outputs for s in ss]) == 100.0
