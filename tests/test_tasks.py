"""Tests of the procedural task generators (sleeptrain.data.tasks).

Answers are recomputed independently from the token sequence alone: the Rule 110 reference
simulator below is numpy roll/pad based with the rule-number lookup (the package's simulator is
bit-packed), and depo answers come from walking the successor map parsed from the edge tokens.
No numerical tolerances are involved: every comparison is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from functools import cache
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from sleeptrain.data.tasks import (
    DepoConfig,
    DepoTask,
    Example,
    Rule110Config,
    Rule110Task,
    build_task,
    rule110_evolve,
    split_bucket,
    split_of_key,
)

N_SAMPLES = 2000  # per split and config for the full re-verification

# ----------------------------------------------------------------------------------------------
# Independent reference implementations
# ----------------------------------------------------------------------------------------------


def ref_rule110(states: np.ndarray, steps: int, boundary: str) -> np.ndarray:
    """Evolve a (batch, width) 0/1 array ``steps`` times with Rule 110 (lookup formulation)."""
    x = states.astype(np.int64)
    for _ in range(steps):
        if boundary == "periodic":
            left, right = np.roll(x, 1, axis=1), np.roll(x, -1, axis=1)
        else:
            padded = np.pad(x, ((0, 0), (1, 1)))
            left, right = padded[:, :-2], padded[:, 2:]
        x = (110 >> (left * 4 + x * 2 + right)) & 1
    return x


def ref_rule110_first_cells(states: np.ndarray, ts: np.ndarray, boundary: str) -> np.ndarray:
    """Return cell 0 of each row of ``states`` after ``ts[row]`` steps (one pass to max t)."""
    out = np.full(len(states), -1, dtype=np.int64)
    x = states.astype(np.int64)
    for step in range(int(ts.max()) + 1):
        hit = ts == step
        out[hit] = x[hit, 0]
        x = ref_rule110(x, 1, boundary)
    return out


def parse_rule110(task: Rule110Task, ex: Example) -> tuple[list[str], int, list[int], list[int]]:
    """Parse (states, t, answers, answer positions) from the token strings of a rule110 sample."""
    toks = [task.vocab[i] for i in ex.tokens]
    w, s = task.config.width, task.config.n_states
    assert all(tok in ("0", "1") for tok in toks[: s * w])
    states = ["".join(toks[i * w : (i + 1) * w]) for i in range(s)]
    rest = toks[s * w :]
    assert rest[0] == "t"
    eq = rest.index("=")
    digits = rest[1:eq]
    assert len(digits) >= 2 and all(d.isdigit() and len(d) == 1 for d in digits)
    answers = rest[eq + 1 :]
    assert len(answers) == s and all(a in ("0", "1") for a in answers)
    positions = list(range(s * w + eq + 1, s * w + eq + 1 + s))
    return states, int("".join(digits)), [int(a) for a in answers], positions


def parse_depo(task: DepoTask, ex: Example):
    """Parse edges (in order), queries (start, k, answer) and answer positions from the tokens."""
    toks = [task.vocab[i] for i in ex.tokens]
    pad = task.config.pad_token
    nq = task.config.n_queries
    qstart = len(toks) - 5 * nq
    context, qtoks = toks[:qstart], toks[qstart:]
    # Context: pads, then the edge tokens (no pads inside), then pads.
    body = [i for i, tok in enumerate(context) if tok != pad]
    assert body == list(range(body[0], body[-1] + 1)), "pads inside the edge list"
    flat = [context[i] for i in body]
    assert len(flat) % 2 == 0
    edges = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    queries, positions = [], []
    for j in range(nq):
        q, x, ktok, eq, ans = qtoks[5 * j : 5 * j + 5]
        assert q == "?" and eq == "=" and ktok[0] == "k"
        queries.append((x, int(ktok[1:]), ans))
        positions.append(qstart + 5 * j + 4)
    return edges, queries, positions, body[0], body[-1] + 1, qstart


def depo_walk(edges: list[tuple[str, str]], start: str, k: int) -> str:
    """Walk ``k`` hops from ``start`` along the successor map given by ``edges``."""
    succ = dict(edges)
    node = start
    for _ in range(k):
        node = succ[node]
    return node


def depo_key(ex_tokens: list[str], nq: int) -> tuple:
    """Test-side canonical identity: (edge set, query (start, k) sequence)."""
    qstart = len(ex_tokens) - 5 * nq
    flat = [t for t in ex_tokens[:qstart] if not t.startswith("<")]
    edges = frozenset((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
    queries = tuple(
        (ex_tokens[qstart + 5 * j + 1], ex_tokens[qstart + 5 * j + 2]) for j in range(nq)
    )
    return edges, queries


def samples(name: str, split: str, n: int, seed: int = 1, **kw) -> tuple:
    """Return (task, first ``n`` samples of the stream), cached across tests."""
    return _samples(name, split, n, seed, json.dumps(kw, sort_keys=True))


@cache
def _samples(name: str, split: str, n: int, seed: int, kw_json: str) -> tuple:
    """Cached body of ``samples`` (kwargs passed as JSON so they are hashable)."""
    task = build_task(name, **json.loads(kw_json))
    return task, tuple(islice(task.stream(split, seed), n))


def check_common(task, exs) -> None:
    """Checks shared by both tasks: fixed length, vocab range, text round trip, JSON fields."""
    for ex in exs:
        assert len(ex.tokens) == task.seq_len
        assert len(ex.loss_mask) == task.seq_len
        assert set(ex.loss_mask) <= {0, 1}
        assert 0 <= min(ex.tokens) and max(ex.tokens) < task.vocab_size
        assert len(ex.answer_depths) == sum(ex.loss_mask)
        assert task.decode(ex.tokens) == ex.text
        assert task.encode(ex.text) == ex.tokens
        assert json.loads(json.dumps(ex.fields)) == ex.fields


# ----------------------------------------------------------------------------------------------
# Rule 110
# ----------------------------------------------------------------------------------------------

# Single 1 at the right end of 8 periodic cells: the classic triangle growing to the left.
TRIANGLE = [
    "00000001",
    "00000011",
    "00000111",
    "00001101",
    "00011111",
    "00110001",
    "01110011",
    "11010111",
]


@pytest.mark.parametrize("sim", ["package", "reference"])
def test_rule110_known_answers(sim: str) -> None:
    """Both simulators reproduce hand-worked Rule 110 evolutions (both boundary conditions)."""

    def evolve(state: str, steps: int, boundary: str) -> str:
        if sim == "package":
            cells = rule110_evolve(state, steps, boundary)
        else:
            arr = np.array([[int(c) for c in state]])
            cells = ref_rule110(arr, steps, boundary)[0].tolist()
        return "".join(map(str, cells))

    for steps, row in enumerate(TRIANGLE):
        assert evolve(TRIANGLE[0], steps, "periodic") == row
        assert evolve(TRIANGLE[0], steps, "zero") == row  # the wrap never matters here
    # A case where the boundary matters: "100" -> periodic "101", zero "100".
    assert evolve("100", 1, "periodic") == "101"
    assert evolve("100", 1, "zero") == "100"
    # Each of the 8 neighbourhoods (left, center, right) maps to bit (4l + 2c + r) of 110.
    for nbhd in range(8):
        s = f"{nbhd:03b}"
        expected = (110 >> nbhd) & 1
        assert evolve(s, 1, "zero")[1] == str(expected)


RULE110_CONFIGS = [
    {},  # defaults: width 24, 4 states, t = 4, periodic
    {"t_min": 32, "t_max": 32},  # the paper's hard setting
    {"t_min": 0, "t_max": 40, "test_t": [50, 64, 7], "boundary": "zero", "width": 16},
    {"t_min": 1, "t_max": 12, "width": 5, "n_states": 3},
]


@pytest.mark.parametrize("kw", RULE110_CONFIGS, ids=lambda kw: json.dumps(kw))
@pytest.mark.parametrize("split", ["train", "test"])
def test_rule110_answers_recomputed(kw: dict, split: str) -> None:
    """Every answer token equals cell 0 after t steps, re-simulated from the tokens alone."""
    task, exs = samples("rule110", split, N_SAMPLES, **kw)
    cfg = task.config
    check_common(task, exs)
    assert task.window_len == cfg.width
    parsed = [parse_rule110(task, ex) for ex in exs]
    states = np.array([[[int(c) for c in s] for s in p[0]] for p in parsed])  # (N, S, W)
    ts = np.array([p[1] for p in parsed])
    got = np.array([p[2] for p in parsed])
    expected = ref_rule110_first_cells(
        states.reshape(-1, cfg.width), np.repeat(ts, cfg.n_states), cfg.boundary
    ).reshape(len(exs), cfg.n_states)
    np.testing.assert_array_equal(got, expected)
    allowed_t = (
        set(range(cfg.t_min, cfg.t_max + 1))
        if split == "train" or cfg.test_t is None
        else set(cfg.test_t)
    )
    assert set(ts.tolist()) == allowed_t  # every allowed t occurs, nothing else
    if cfg.boundary == "periodic" and cfg.width >= 16:
        assert 0.4 < got.mean() < 0.65  # both answer values are common (measured ~0.53-0.56)
    for ex, (st, t, answers, positions) in zip(exs, parsed, strict=True):
        assert [i for i, m in enumerate(ex.loss_mask) if m] == positions
        assert positions[0] == task.seq_len - cfg.n_states
        assert ex.fields == {"states": st, "t": t, "boundary": cfg.boundary, "answers": answers}
        assert ex.depth == t and ex.answer_depths == [t] * cfg.n_states
        assert task.split_of(ex) == split


def test_rule110_zero_boundary_is_absorbing() -> None:
    """With the 'zero' boundary cell 0 updates as C | R, so once 1 it stays 1 (documented)."""
    task, exs = samples("rule110", "train", 300, t_min=32, t_max=32, boundary="zero")
    assert all(ex.fields["answers"] == [1] * 4 for ex in exs)
    for ex in exs[:50]:
        for state in ex.fields["states"]:
            cells = [int(c) for c in state]
            firsts = [rule110_evolve(cells, t, "zero")[0] for t in range(33)]
            assert firsts == sorted(firsts)  # 0 ... 0 1 ... 1


def test_rule110_layout_default() -> None:
    """Default layout: 4 states of 24 bits fill windows 0..3, then 't04=' and 4 answers."""
    task = build_task("rule110")
    assert (task.seq_len, task.window_len, task.vocab_size) == (104, 24, 13)
    ex = task.example_at("train", 0, 0)
    assert ex.text[:96] == "".join(ex.fields["states"])
    assert ex.text[96:100] == "t04="
    assert ex.text[100:] == "".join(map(str, ex.fields["answers"]))
    assert task.vocab[:2] == ["0", "1"] and len(set(task.vocab)) == len(task.vocab)
    wide = build_task("rule110", t_min=5, t_max=120)
    assert wide.seq_len == 96 + 1 + 3 + 1 + 4
    assert wide.example_at("train", 0, 3).text[97:100].isdigit()


# ----------------------------------------------------------------------------------------------
# Depo
# ----------------------------------------------------------------------------------------------

DEPO_CONFIGS = [
    {},  # defaults: n in [8, 16], window 75, 10 queries, K = 4, test_k = 1,2,4,8,16
    {"window_len": 16, "n_min": 2, "n_max": 16, "K": 6, "test_k": [0, 3, 20, 33]},
    {
        "n_min": 75,
        "n_max": 75,
        "n_names": 80,
        "name_prefix": "v",
        "pad_token": "_",
        "context_len": 160,
        "window_len": 75,
        "n_queries": 4,
    },
]


@pytest.mark.parametrize("kw", DEPO_CONFIGS, ids=lambda kw: json.dumps(kw))
@pytest.mark.parametrize("split", ["train", "test"])
def test_depo_answers_recomputed(kw: dict, split: str) -> None:
    """Every answer equals the k-hop walk on the successor map parsed from the edge tokens."""
    n = N_SAMPLES if kw.get("n_max", 16) <= 16 else 300
    task, exs = samples("depo", split, n, **kw)
    cfg = task.config
    check_common(task, exs)
    assert task.query_start % cfg.window_len == 0
    assert task.seq_len == task.query_start + 5 * cfg.n_queries
    names = set(task.names)
    ns, ks = set(), set()
    for ex in exs:
        edges, queries, positions, lo, hi, qstart = parse_depo(task, ex)
        assert qstart == task.query_start
        assert hi == cfg.context_len and lo == cfg.context_len - 2 * len(edges)  # left padded
        # The edges form one directed cycle over distinct names.
        nodes = [a for a, _ in edges]
        assert len(set(nodes)) == len(nodes) and set(nodes) <= names
        assert sorted(b for _, b in edges) == sorted(nodes)
        succ = dict(edges)
        cycle_len, node = 0, nodes[0]
        while True:
            node, cycle_len = succ[node], cycle_len + 1
            if node == nodes[0]:
                break
        assert cycle_len == len(nodes)
        assert cfg.n_min <= len(nodes) <= cfg.n_max
        for x, k, ans in queries:
            assert x in nodes
            assert ans == depo_walk(edges, x, k)
        assert [i for i, m in enumerate(ex.loss_mask) if m] == positions
        assert ex.answer_depths == [k for _, k, _ in queries] and ex.depth == -1
        assert ex.fields["edges"] == [list(e) for e in edges]
        assert ex.fields["queries"] == [list(q) for q in queries]
        assert ex.fields["n"] == len(edges)
        assert task.split_of(ex) == split
        ns.add(len(nodes))
        ks.update(k for _, k, _ in queries)
    assert ks == (set(range(1, cfg.K + 1)) if split == "train" else set(cfg.test_k))
    assert ns == set(range(cfg.n_min, cfg.n_max + 1))


def test_depo_layout() -> None:
    """Default and tiny-window layouts, test_k filtering, and end padding to a window boundary."""
    task = build_task("depo")
    assert (task.context_len, task.query_start, task.seq_len) == (75, 75, 125)
    assert task.vocab_size == 3 + 100 + 16
    assert task.names[0] == "n00" and task.names[-1] == "n99"
    ex = task.example_at("test", 0, 5)
    toks = ex.text.split(" ")
    assert len(toks) == 125 and toks[75] == "?" and toks[-2] == "="
    tiny = build_task("depo", window_len=16)
    assert (tiny.context_len, tiny.query_start) == (32, 32)  # 2 * n_max fills two windows
    odd = build_task("depo", window_len=16, context_len=40)
    assert (odd.context_len, odd.query_start, odd.seq_len) == (40, 48, 98)
    ex = odd.example_at("train", 3, 0)
    assert [odd.vocab[i] for i in ex.tokens[40:48]] == ["<pad>"] * 8
    assert build_task("depo", test_k=[0, -2, 8, 2, 8]).config.test_k == (2, 8)
    assert build_task("depo", K=3, test_k=[20]).k_max == 20


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def test_split_bucket_known_answers() -> None:
    """The split hash is blake2b (8-byte digest, big endian) mod 1000, not Python's hash()."""
    for key in ["", "rule110|0101|t=4", "depo|a>b;b>a|a:1"]:
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        assert split_bucket(key) == int.from_bytes(digest, "big") % 1000
    assert split_bucket("abc") == 721  # pinned: blake2b is a fixed standard
    assert split_of_key("abc", 722) == "test" and split_of_key("abc", 721) == "train"


@pytest.mark.parametrize("name", ["rule110", "depo"])
def test_split_disjoint_default(name: str) -> None:
    """Thousands of train and test samples share no content; split_of agrees with the stream."""
    task, train = samples(name, "train", N_SAMPLES)
    _, test = samples(name, "test", N_SAMPLES)

    def key(ex):
        toks = [task.vocab[i] for i in ex.tokens]
        if name == "rule110":
            return tuple(toks[: task.query_start + 1 + task.t_digits])  # states and t
        return depo_key(toks, task.config.n_queries)

    train_keys, test_keys = {key(ex) for ex in train}, {key(ex) for ex in test}
    assert not train_keys & test_keys
    assert {task.split_of(ex) for ex in train} == {"train"}
    assert {task.split_of(ex) for ex in test} == {"test"}


@pytest.mark.parametrize(
    ("name", "kw", "space"),
    [
        # 2 states x 3 bits x t in {0..3}: 2^6 * 4 = 256 distinct samples.
        ("rule110", {"width": 3, "n_states": 2, "t_min": 0, "t_max": 3}, 256),
        # 3-cycles on 4 names (8) x 2 queries of (3 starts x 2 k) each: 8 * 36 = 288 samples.
        (
            "depo",
            {"n_min": 3, "n_max": 3, "n_names": 4, "n_queries": 2, "K": 2, "test_k": [1, 2]},
            288,
        ),
    ],
)
def test_split_disjoint_tiny_space(name: str, kw: dict, space: int) -> None:
    """In a tiny sample space (where unsplit streams would collide) the splits stay disjoint."""
    task = build_task(name, **kw)
    keys = {}
    for split in ("train", "test"):
        exs = list(islice(task.stream(split, 0), 2000))
        keys[split] = {task.canonical_key(ex) for ex in exs}
        assert {task.split_of(ex) for ex in exs} == {split}
    assert not keys["train"] & keys["test"]
    # The draws cover (nearly) the whole space, so overlap would have shown up.
    assert len(keys["train"] | keys["test"]) > 0.9 * space
    assert 0.03 < len(keys["test"]) / space < 0.2  # about test_permille = 10 %


def test_split_extremes() -> None:
    """test_permille=0 has no test split, 1000 no train split; both are reported clearly."""
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="test split is empty"):
        build_task("rule110", test_permille=0).example(rng, "test")
    with pytest.raises(ValueError, match="train split is empty"):
        build_task("depo", test_permille=1000).example(rng, "train")
    assert build_task("rule110", test_permille=1000).example(rng, "test").tokens
    with pytest.raises(ValueError, match="valid"):
        build_task("rule110").stream("valid", 0)


# ----------------------------------------------------------------------------------------------
# Determinism and resume
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rule110", "depo"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_stream_determinism_and_resume(name: str, split: str) -> None:
    """Same seed -> same stream; other seed/split -> different; stream(start=i) == item i."""
    task = build_task(name)
    first = list(islice(task.stream(split, 7), 60))
    again = list(islice(build_task(name).stream(split, 7), 60))
    assert first == again
    other = list(islice(task.stream(split, 8), 60))
    assert all(a.tokens != b.tokens for a, b in zip(first, other, strict=True))
    other_split = list(islice(task.stream("test" if split == "train" else "train", 7), 60))
    assert all(a.tokens != b.tokens for a, b in zip(first, other_split, strict=True))
    for i in (0, 1, 17, 59):
        assert next(task.stream(split, 7, start=i)) == first[i]
        assert task.example_at(split, 7, i) == first[i]
    assert list(islice(task.stream(split, 7, start=17), 10)) == first[17:27]
    assert len({tuple(ex.tokens) for ex in first}) == 60


def test_stream_stable_across_processes() -> None:
    """A fresh interpreter with another PYTHONHASHSEED generates identical streams."""
    tasks_dir = Path(__import__("sleeptrain.data.tasks", fromlist=["x"]).__file__).parent
    code = (
        "import hashlib, importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location(\n"
        f"    'tasks_iso', {str(tasks_dir / '__init__.py')!r},\n"
        f"    submodule_search_locations=[{str(tasks_dir)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['tasks_iso'] = m\n"
        "spec.loader.exec_module(m)\n"
        "h = hashlib.sha256()\n"
        "for name in ('rule110', 'depo'):\n"
        "    t = m.build_task(name)\n"
        "    for split in ('train', 'test'):\n"
        "        for i in range(20):\n"
        "            h.update(repr(t.example_at(split, 3, i).tokens).encode())\n"
        "print(h.hexdigest())\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    h = hashlib.sha256()
    for name in ("rule110", "depo"):
        task = build_task(name)
        for split in ("train", "test"):
            for i in range(20):
                h.update(repr(task.example_at(split, 3, i).tokens).encode())
    assert out == h.hexdigest()


def test_stream_argument_errors() -> None:
    """Negative seeds/starts and non-int seeds are rejected eagerly."""
    task = build_task("rule110")
    for bad in ({"seed": -1}, {"seed": 0, "start": -3}, {"seed": 1.5}):
        with pytest.raises(ValueError):
            task.stream("train", **bad)


# ----------------------------------------------------------------------------------------------
# build_task validation
# ----------------------------------------------------------------------------------------------


def test_build_task_types() -> None:
    """build_task returns configured task instances; configs can also be built directly."""
    assert isinstance(build_task("rule110"), Rule110Task)
    assert isinstance(build_task("depo"), DepoTask)
    assert build_task("rule110", width=8).config == Rule110Config(width=8)
    assert DepoTask(DepoConfig(K=2)).config.K == 2
    assert build_task("rule110", test_t=np.array([3, 4])).config.test_t == (3, 4)


@pytest.mark.parametrize(
    ("name", "kw", "patterns"),
    [
        ("rule111", {}, ["rule111", "rule110"]),
        ("dep0", {}, ["dep0", "depo"]),
        ("rule110", {"widht": 8}, ["widht", "'width'"]),
        ("rule110", {"boundry": "zero"}, ["boundry", "'boundary'"]),
        ("depo", {"n_querys": 3}, ["n_querys", "'n_queries'"]),
        ("depo", {"test_K": [1]}, ["test_K", "'test_k'"]),
        ("depo", {"n_max": 76}, ["n_max"]),
        ("depo", {"n_min": 10, "n_max": 9}, ["n_min"]),
        ("depo", {"n_min": 1}, ["n_min"]),
        ("depo", {"n_names": 10}, ["n_names"]),
        ("depo", {"context_len": 20}, ["context_len"]),
        ("depo", {"window_len": 0}, ["window_len"]),
        ("depo", {"K": 0}, ["K"]),
        ("depo", {"test_k": [0, -1]}, ["test_k"]),
        ("depo", {"test_k": "1,2"}, ["test_k"]),
        ("depo", {"n_queries": 0}, ["n_queries"]),
        ("depo", {"pad_token": "a b"}, ["pad_token"]),
        ("depo", {"pad_token": "?"}, ["pad_token"]),
        ("depo", {"name_prefix": "k", "n_names": 20}, ["name_prefix"]),
        ("depo", {"test_permille": -1}, ["test_permille"]),
        ("rule110", {"width": 2}, ["width"]),
        ("rule110", {"width": True}, ["width"]),
        ("rule110", {"width": 8.0}, ["width"]),
        ("rule110", {"t_min": 5, "t_max": 4}, ["t_min"]),
        ("rule110", {"test_t": []}, ["test_t"]),
        ("rule110", {"test_t": [1, -1]}, ["test_t"]),
        ("rule110", {"boundary": "reflect"}, ["boundary"]),
        ("rule110", {"test_permille": 1001}, ["test_permille"]),
    ],
)
def test_build_task_errors(name: str, kw: dict, patterns: list[str]) -> None:
    """Unknown names/keys and invalid values raise ValueError naming the culprit (and a fix)."""
    with pytest.raises(ValueError) as err:
        build_task(name, **kw)
    for pattern in patterns:
        assert pattern in str(err.value)
