"""BABILong qa1-qa5: generator (lengths, determinism, answers re-derived by an independent
simulation of the facts parsed back out of the prompt text), scorer edge cases, file reader."""

from __future__ import annotations

import json
import math
import re

import pytest

from sleeptrain.data.tokenizers import ByteTokenizer
from sleeptrain.eval.babilong import (
    BABILONG_TASKS,
    PROMPTS,
    generate_babilong,
    load_background,
    read_babilong_file,
    score_babilong,
)

TOK = ByteTokenizer()

# --- an independent reading of the facts ---------------------------------------------------------
PERSON = r"(Mary|John|Daniel|Sandra|Bill|Fred|Jeff)"
ROOM = r"(bathroom|bedroom|garden|hallway|kitchen|office)"
THING = r"(apple|football|milk)"
PATTERNS = {
    "move": re.compile(rf"{PERSON} (?:moved|went back|went|journeyed|travelled) to the {ROOM}\."),
    "get": re.compile(rf"{PERSON} (?:got|took|grabbed|picked up) the {THING}(?: there)?\."),
    "drop": re.compile(rf"{PERSON} (?:dropped|discarded|put down|left) the {THING}(?: there)?\."),
    "give": re.compile(rf"{PERSON} (?:gave|handed|passed) the {THING} to {PERSON}\."),
    "rel": re.compile(rf"The {ROOM} is (north|south|east|west) of the {ROOM}\."),
}
FLIP = {"north": "south", "south": "north", "east": "west", "west": "east"}


def parse_events(prompt: str) -> list[tuple[str, tuple[str, ...], str]]:
    """(kind, groups, sentence) of every fact in the <context> block, in text order."""
    context = prompt.split("<context>\n", 1)[1].split("\n</context>", 1)[0]
    found = []
    for kind, pat in PATTERNS.items():
        for m in pat.finditer(context):
            found.append((m.start(), kind, m.groups(), m.group(0)))
    found.sort()
    return [(k, g, s) for _, k, g, s in found]


def solve(task: str, prompt: str) -> str:
    """The answer re-derived from the text alone (no generator state)."""
    question = prompt.rsplit("Question: ", 1)[1]
    where: dict[str, str] = {}
    holder: dict[str, str | None] = {}
    at: dict[str, str] = {}
    trail: dict[str, list[str]] = {}
    gives: list[tuple[str, str, str]] = []
    rel: set[tuple[str, str, str]] = set()

    def put(thing: str, room: str) -> None:
        at[thing] = room
        t = trail.setdefault(thing, [])
        if not t or t[-1] != room:
            t.append(room)

    for kind, g, _ in parse_events(prompt):
        if kind == "move":
            person, room = g
            where[person] = room
            for thing, h in holder.items():
                if h == person:
                    put(thing, room)
        elif kind == "get":
            person, thing = g
            holder[thing] = person
            put(thing, where[person])
        elif kind == "drop":
            holder[g[1]] = None
        elif kind == "give":
            giver, thing, taker = g
            assert holder[thing] == giver and where[giver] == where[taker]
            holder[thing] = taker
            gives.append((giver, thing, taker))
        else:
            a, d, b = g
            rel |= {(a, d, b), (b, FLIP[d], a)}

    def one(values: set[str]) -> str:
        assert len(values) == 1, values
        return values.pop()

    if task == "qa1":
        return where[re.fullmatch(r"Where is (\w+)\?", question).group(1)]
    if task == "qa2":
        return at[re.fullmatch(r"Where is the (\w+)\?", question).group(1)]
    if task == "qa3":
        thing, room = re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question).groups()
        t = trail[thing]
        assert t.count(room) == 1 and t.index(room) > 0
        return t[t.index(room) - 1]
    if task == "qa4":
        m = re.fullmatch(r"What is (\w+) of the (\w+)\?", question)
        if m:
            return one({a for a, d, b in rel if d == m.group(1) and b == m.group(2)})
        x, d = re.fullmatch(r"What is the (\w+) (\w+) of\?", question).groups()
        return one({b for a, dd, b in rel if a == x and dd == d})
    forms = [
        (r"Who gave the (\w+) to (\w+)\?", lambda m: {g for g, t, r in gives
                                                      if (t, r) == m.groups()}),
        (r"Who gave the (\w+)\?", lambda m: {g for g, t, _ in gives if t == m.group(1)}),
        (r"Who received the (\w+)\?", lambda m: {r for _, t, r in gives if t == m.group(1)}),
        (r"Who did (\w+) give the (\w+) to\?", lambda m: {r for g, t, r in gives
                                                          if (g, t) == m.groups()}),
        (r"What did (\w+) give to (\w+)\?", lambda m: {t for g, t, r in gives
                                                       if (g, r) == m.groups()}),
    ]
    for pat, answers in forms:
        m = re.fullmatch(pat, question)
        if m:
            return one(answers(m))
    raise AssertionError(f"unknown question {question!r}")


# --- generator -----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", BABILONG_TASKS)
def test_answers_match_independent_simulation(task):
    for target in (1024, 4096):
        samples = generate_babilong(task, target, TOK, 12, seed=1)
        for s in samples:
            events = parse_events(s.input)
            assert [e[2] for e in events] == s.meta["facts"]  # every fact found, nothing else
            assert len(events) == s.meta["n_facts"] >= (2 if task != "qa1" else 1)
            assert solve(task, s.input) == s.outputs[0], (task, s.index, s.meta["question"])
            assert s.meta["question"] == s.input.rsplit("Question: ", 1)[1]
            for off, fact in zip(s.meta["fact_offsets"], s.meta["facts"], strict=True):
                assert s.input[off:off + len(fact)] == fact


@pytest.mark.parametrize("task", BABILONG_TASKS)
def test_lengths_within_two_percent(task):
    for target in (1024, 2048, 8192):
        for s in generate_babilong(task, target, TOK, 4, seed=2):
            n = len(TOK.encode(s.input + s.answer_prefix))
            assert s.n_tokens == n
            assert math.ceil(0.98 * target) <= n <= target, (task, target, n)
            assert s.target_len == target and s.task == f"babilong_{task}"


def test_deterministic_and_seeded():
    a = generate_babilong("qa2", 2048, TOK, 3, seed=5)
    b = generate_babilong("qa2", 2048, TOK, 3, seed=5)
    c = generate_babilong("qa2", 2048, TOK, 3, seed=6)
    assert a == b
    assert [s.input for s in a] != [s.input for s in c]
    # sample i does not depend on n, and its story not on the length (as in BABILong) as long as
    # the facts fit in half the context
    assert generate_babilong("qa2", 2048, TOK, 1, seed=5)[0] == a[0]
    mid = generate_babilong("qa2", 4096, TOK, 3, seed=5)
    long = generate_babilong("qa2", 8192, TOK, 3, seed=5)
    assert [s.meta["facts"] for s in long] == [s.meta["facts"] for s in mid]
    assert [s.input for s in long] != [s.input for s in mid]


def test_prompt_layout_and_options():
    s = generate_babilong("qa1", 2048, TOK, 1)[0]
    p = PROMPTS["qa1"]
    head = f"{p['instruction']}\n\n\n\n{p['post_prompt']}\n\n<context>\n"
    assert s.input.startswith(head)
    assert s.input.endswith(f"\n</context>\n\nQuestion: {s.meta['question']}")
    assert s.answer_prefix == "\nAnswer:" and s.max_new_tokens >= 15
    ex = generate_babilong("qa1", 2048, TOK, 1, use_examples=True)[0]
    assert "<example>" in ex.input and ex.n_tokens <= 2048
    bare = generate_babilong("qa1", 2048, TOK, 1, use_instruction=False, use_post_prompt=False)[0]
    assert bare.input.startswith("<context>\n")
    with pytest.raises(ValueError, match="too small"):
        generate_babilong("qa3", 300, TOK, 1)
    with pytest.raises(ValueError, match="unknown BABILong task"):
        generate_babilong("qa9", 2048, TOK, 1)


def test_background_packaged_and_user_file(tmp_path):
    sents = load_background()
    assert len(sents) > 1000 and any("Alice" in s for s in sents)
    bg = tmp_path / "bg.txt"
    bg.write_text("Zebras graze quietly on the open plain today. Mary went to the kitchen.\n"
                  "The wind blows softly over the long grass.\n\nJohn took the milk there.\n"
                  "Clouds drift slowly across the pale morning sky.\n", encoding="utf-8")
    assert load_background(bg) == ["Zebras graze quietly on the open plain today.",
                                   "The wind blows softly over the long grass.",
                                   "Clouds drift slowly across the pale morning sky."]
    for s in generate_babilong("qa2", 2048, TOK, 3, background=bg):
        assert "Zebras graze" in s.input and "Alice" not in s.input
        assert [e[2] for e in parse_events(s.input)] == s.meta["facts"]
        assert solve("qa2", s.input) == s.outputs[0]


# --- scorer --------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,question,target,prediction,ok", [
    ("qa1", "Where is Mary?", "kitchen", "The most recent location of Mary is kitchen.", True),
    ("qa1", "Where is Mary?", "kitchen", " KITCHEN", True),
    ("qa1", "Where is Mary?", "kitchen", "kitchen. Before that she was in the garden.", True),
    ("qa1", "Where is Mary?", "kitchen", " kitchen\nQuestion: Where is John? garden", True),
    ("qa1", "Where is Mary?", "kitchen", "\n\nkitchen\n\nThe garden", True),
    ("qa1", "Where is Mary?", "kitchen", "kitchen <example> garden", True),
    ("qa1", "Where is Mary?", "kitchen", "kitchen question: where is John? garden", True),
    ("qa1", "Where is Mary?", "kitchen", "the kitchens", True),  # substring rule, as BABILong
    ("qa1", "Where is Mary?", "kitchen", "kitchen or garden", False),
    ("qa1", "Where is Mary?", "kitchen", "Mary went from the garden to the kitchen", False),
    ("qa1", "Where is Mary?", "kitchen", "garden", False),
    ("qa1", "Where is Mary?", "kitchen", "", False),
    ("qa2", "Where is the milk?", "office", "The milk is in the office.", True),
    ("qa3", "Where was the apple before the kitchen?", "bathroom",
     "Before the kitchen the apple was in the bathroom.", True),
    ("qa3", "Where was the apple before the kitchen?", "bathroom", "kitchen", False),
    ("qa3", "Where was the apple before the kitchen?", "bathroom",
     "Before the kitchen the apple was in the garden.", False),
    ("qa4", "What is north of the garden?", "kitchen", "kitchen", True),
    ("qa4", "What is north of the garden?", "kitchen", "The kitchen is north of the garden.", True),
    ("qa4", "What is the kitchen north of?", "garden", "office", False),
    ("qa5", "Who gave the football to Mary?", "Fred", "Fred", True),
    ("qa5", "Who gave the football to Mary?", "Fred", "fred gave the football to mary", True),
    ("qa5", "Who gave the football to Mary?", "Fred", "Fred or Jeff", False),
    ("qa5", "What did Fred give to Jeff?", "milk", "The milk.", True),
    ("qa5", "What did Fred give to Jeff?", "milk", "apple", False),
    ("qa5", "Who received the milk?", "Bill", "Bill received the milk from Jeff", False),
])
def test_scorer_edge_cases(task, question, target, prediction, ok):
    assert score_babilong(task, [prediction], [target], [question]) == (100.0 if ok else 0.0)


def test_score_aggregates_and_validates():
    qs = ["Where is Mary?"] * 4
    preds = ["kitchen", "garden", "The most recent location of Mary is kitchen.", "office"]
    assert score_babilong("qa1", preds, [["kitchen"]] * 4, qs) == 50.0
    assert score_babilong("babilong_qa1", preds[:1], ["kitchen"], qs[:1]) == 100.0
    assert score_babilong("qa1", [], [], []) == 0.0
    with pytest.raises(ValueError):
        score_babilong("qa1", preds, ["kitchen"], qs)
    with pytest.raises(ValueError):
        score_babilong("qa7", preds, ["kitchen"] * 4, qs)


def test_perfect_predictions_score_100():
    for task in BABILONG_TASKS:
        ss = generate_babilong(task, 1024, TOK, 5, seed=3)
        preds = [" " + s.outputs[0] + ".\nQuestion:" for s in ss]
        qs = [s.meta["question"] for s in ss]
        assert score_babilong(task, preds, [s.outputs for s in ss], qs) == 100.0


# --- official files ------------------------------------------------------------------------------
def _context(prompt: str) -> str:
    return prompt.split("<context>\n", 1)[1].split("\n</context>", 1)[0]


def test_read_file_round_trip(tmp_path):
    made = generate_babilong("qa2", 2048, TOK, 3, seed=4)
    recs = [{"input": _context(s.input), "question": s.meta["question"], "target": s.outputs[0]}
            for s in made]
    (tmp_path / "qa2").mkdir()
    path = tmp_path / "qa2" / "2k.json"
    path.write_text(json.dumps(recs), encoding="utf-8")  # as BABILong's create_tasks.py writes
    got = read_babilong_file(path, tokenizer=TOK)
    assert [g.input for g in got] == [s.input for s in made]
    assert [g.outputs for g in got] == [s.outputs for s in made]
    assert [g.n_tokens for g in got] == [s.n_tokens for s in made]
    assert all(g.task == "babilong_qa2" and g.target_len == 2000 for g in got)
    assert [g.meta["question"] for g in got] == [s.meta["question"] for s in made]
    jl = tmp_path / "my_qa4_split.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in recs) + "\n", encoding="utf-8")
    got = read_babilong_file(jl, task="qa2")
    assert [g.input for g in got] == [s.input for s in made] and got[0].n_tokens == -1
    assert read_babilong_file(jl)[0].task == "babilong_qa4"  # task from the file name
    pretty = tmp_path / "qa1_0k.json"
    pretty.write_text(json.dumps(recs, indent=2), encoding="utf-8")
    assert len(read_babilong_file(pretty)) == 3


def test_read_file_errors_name_file_and_line(tmp_path):
    good = {"input": "Mary went to the kitchen.", "question": "Where is Mary?", "target": "kitchen"}
    p = tmp_path / "qa1.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n"
                 + json.dumps({"input": "x", "question": "Where is Mary?"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{p}:3: record 2: field 'target'")):
        read_babilong_file(p)
    p.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=re.escape(f"{p}:2: invalid JSON")):
        read_babilong_file(p)
    q = tmp_path / "qa1.json"
    q.write_text("[\n" + json.dumps(good) + ",\n" + json.dumps({**good, "target": 3}) + "\n]")
    with pytest.raises(ValueError, match=re.escape(f"{q}:3: record 1: field 'target'")):
        read_babilong_file(q)
    r = tmp_path / "data.json"
    r.write_text(json.dumps([good]))
    with pytest.raises(ValueError, match="cannot tell the task"):
        read_babilong_file(r)
    assert read_babilong_file(r, task="qa1")[0].outputs == ["kitchen"]
    r.write_text(json.dumps({"qa1": [good]}))
    with pytest.raises(ValueError, match=re.escape(f"{r}:1: expected a JSON array")):
        read_babilong_file(r, task="qa1")
