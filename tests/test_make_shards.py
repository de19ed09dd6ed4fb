"""Tests of the shard writer, the tokenizers and ``tools/make_shards.py``.

Shards are read back with ``webdataset`` (and ``tarfile`` for the member names); manifests are
checked against the files (sha256, sizes, counts) and against what was written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from sleeptrain.data.format import FORMAT_NAME, FORMAT_VERSION, KEY_FORMAT, read_manifest
from sleeptrain.data.tasks import build_task
from sleeptrain.data.tokenizers import ByteTokenizer, HFTokenizer, build_tokenizer
from sleeptrain.data.writer import write_shards

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "make_shards.py"
BYTE_INFO = ByteTokenizer().describe()


def _load_cli():
    spec = importlib.util.spec_from_file_location("make_shards", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_shards = _load_cli()


def read_samples(out: Path) -> list[dict]:
    """Return the samples of the manifest's shards, in order, with arrays decoded."""
    man = read_manifest(out)
    paths = [sh["path"] for sh in man["shards"]]
    samples = []
    for s in wds.WebDataset(paths, shardshuffle=False):
        mask = s.get("mask.npy")
        samples.append({
            "key": s["__key__"],
            "tokens": np.load(io.BytesIO(s["tokens.npy"])),
            "mask": None if mask is None else np.load(io.BytesIO(mask)),
        })
    return samples


def check_manifest(out: Path) -> dict:
    """Check the manifest against its shard files and its totals; return it."""
    man = read_manifest(out)
    assert man["format"] == FORMAT_NAME and man["version"] == FORMAT_VERSION
    assert man["n_shards"] == len(man["shards"])
    for sh in man["shards"]:
        data = Path(sh["path"]).read_bytes()
        assert sh["bytes"] == len(data)
        assert sh["sha256"] == hashlib.sha256(data).hexdigest()
        with tarfile.open(sh["path"]) as tar:
            names = tar.getnames()
        assert sh["n_samples"] == sh["n_docs"] == len({n.split(".")[0] for n in names})
        assert all(n.endswith((".tokens.npy", ".mask.npy", ".sha256")) for n in names)
        assert sum(n.endswith(".sha256") for n in names) == sh["n_samples"]  # one per sample
    for key in ("n_samples", "n_docs", "n_tokens", "n_target_tokens"):
        assert man[key] == sum(sh[key] for sh in man["shards"])
    samples = read_samples(out)
    assert [s["key"] for s in samples] == [KEY_FORMAT.format(i) for i in range(len(samples))]
    assert man["n_tokens"] == sum(s["tokens"].size for s in samples)
    assert man["n_target_tokens"] == sum(
        s["tokens"].size - 1 if s["mask"] is None else int(s["mask"].sum()) for s in samples)
    for s in samples:
        assert s["tokens"].dtype == np.uint32
        assert s["mask"] is None or (s["mask"].dtype == np.uint8
                                     and s["mask"].shape == s["tokens"].shape)
    return man


def byte_doc(text: str) -> list[int]:
    return list(text.encode("utf-8")) + [256]


def docs_of(token_lists, masks=None):
    masks = masks or [None] * len(token_lists)
    return [(np.asarray(t, dtype=np.uint32), None if m is None else np.asarray(m, np.uint8))
            for t, m in zip(token_lists, masks, strict=True)]


def write(docs, out, **kw):
    args = {"prefix": "shard", "tokenizer_info": BYTE_INFO, "max_samples_per_shard": 3,
            "max_bytes_per_shard": 10**9, "source_info": {"mode": "test"}, "progress": False}
    return write_shards(docs, out, **(args | kw))


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = build_tokenizer("byte")
    text = "héllo, wörld ✓ 🙂\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # truncated UTF-8 is replaced
    assert tok.describe() == {"kind": "byte", "path": None, "vocab_size": 258, "eos_id": 256,
                              "pad_id": 257}
    json.dumps(tok.describe())


def _save_word_level(path: Path, eos_in_config: bool = True) -> None:
    tokenizers = pytest.importorskip("tokenizers", reason="needs the 'tokenizers' package")
    vocab = {"[UNK]": 0, "<eos>": 1, "hello": 2, "world": 3, "sleep": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<eos>"])
    tok.add_tokens(["<extra>"])  # an added token: id 5
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    if eos_in_config:
        (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))


def test_hf_tokenizer_from_local_dir(tmp_path):
    d = tmp_path / "tok"
    _save_word_level(d)
    tok = build_tokenizer(str(d))
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello sleep world <extra>") == [2, 4, 3, 5]
    assert tok.encode("hello nope") == [2, 0]
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (6, 1, 1)
    assert tok.decode([2, 3, 1]) == "hello world"
    assert tok.describe() == {"kind": "hf", "path": str(d.resolve()), "vocab_size": 6,
                              "eos_id": 1, "pad_id": 1}
    assert HFTokenizer(d, eos_token="world", pad_id=0).describe()["eos_id"] == 3

    # The CLI writes encode(doc) + [eos] with this tokenizer.
    f = tmp_path / "a.txt"
    f.write_text("hello world\nsleep\n")
    out = tmp_path / "out"
    assert make_shards.main(["--text", str(f), "--split-lines", "--tokenizer", str(d),
                             "--out", str(out), "--no-progress"]) == 0
    man = check_manifest(out)
    assert man["tokenizer"]["kind"] == "hf"
    assert [s["tokens"].tolist() for s in read_samples(out)] == [[2, 3, 1], [4, 1]]


def test_hf_tokenizer_errors(tmp_path):
    d = tmp_path / "tok"
    _save_word_level(d, eos_in_config=False)
    with pytest.raises(ValueError, match="no eos_token"):
        build_tokenizer(str(d))
    with pytest.raises(ValueError, match="'<nope>' is not in the vocabulary"):
        build_tokenizer(str(d), eos_token="<nope>")
    assert build_tokenizer(str(d), eos_token="<eos>").eos_id == 1
    with pytest.raises(FileNotFoundError, match="no-such-tok"):
        build_tokenizer(str(tmp_path / "no-such-tok"))


def _save_gpt2_files(path: Path, config: dict) -> None:
    """A tiny byte-level BPE as vocab.json + merges.txt (no tokenizer.json)."""
    vocab = {"<|endoftext|>": 0, "h": 1, "e": 2, "l": 3, "o": 4, "he": 5, "ll": 6, "hell": 7,
             "hello": 8, "Ġ": 9}
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\nh e\nl l\nhe ll\nhell o\n")
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def test_hf_tokenizer_without_tokenizer_json(tmp_path, monkeypatch):
    d = tmp_path / "tok"
    _save_gpt2_files(d, {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>",
                         "unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>"})
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "transformers", None)  # import fails
        with pytest.raises(ImportError, match="pip install transformers"):
            build_tokenizer(str(d))
    pytest.importorskip("transformers", reason="needs the 'transformers' package")
    tok = build_tokenizer(str(d))
    assert tok.encode("hello hello") == [8, 9, 8]
    assert tok.decode([8, 0]) == "hello"
    assert tok.describe() == {"kind": "hf", "path": str(d.resolve()), "vocab_size": 10,
                              "eos_id": 0, "pad_id": 0}


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------


def test_writer_rollover_counts_and_members(tmp_path):
    rng = np.random.default_rng(0)
    toks = [rng.integers(0, 258, size=n) for n in (5, 1, 9, 4, 7, 3, 2)]
    masks = [None, None, (rng.random(9) < 0.5), None, None, np.ones(3), None]
    docs = docs_of(toks, masks) + [(np.zeros(0, np.uint32), None)]  # one empty doc
    man = write(docs, tmp_path / "out")
    read = check_manifest(tmp_path / "out")
    assert {k: v for k, v in read.items() if k != "shards"} == {
        k: v for k, v in man.items() if k != "shards"}
    assert man["complete"] and man["skipped_empty"] == 1
    assert [sh["n_samples"] for sh in man["shards"]] == [3, 3, 1]
    assert [sh["name"] for sh in man["shards"]] == [f"shard-{i:06d}.tar" for i in range(3)]
    samples = read_samples(tmp_path / "out")
    for s, t, m in zip(samples, toks, masks, strict=True):
        assert s["tokens"].tolist() == t.tolist()
        assert (s["mask"] is None) == (m is None)
        if m is not None:
            assert s["mask"].tolist() == np.asarray(m, np.uint8).tolist()
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        assert tar.getnames() == ["000000000000.sha256", "000000000000.tokens.npy",
                                  "000000000001.sha256", "000000000001.tokens.npy",
                                  "000000000002.mask.npy", "000000000002.sha256",
                                  "000000000002.tokens.npy"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    again = write(docs, tmp_path / "again")  # shards are reproducible byte for byte
    assert [sh["sha256"] for sh in again["shards"]] == [sh["sha256"] for sh in man["shards"]]


def test_writer_rolls_over_by_bytes(tmp_path):
    docs = docs_of([np.arange(100)] * 5)  # 400 bytes of tokens + npy header per sample
    man = write(docs, tmp_path / "out", max_samples_per_shard=100, max_bytes_per_shard=1000)
    assert [sh["n_samples"] for sh in man["shards"]] == [2, 2, 1]
    check_manifest(tmp_path / "out")


def test_writer_crash_leaves_only_tmp_debris(tmp_path):
    def docs():
        for i in range(7):
            yield np.arange(i + 2, dtype=np.uint32), None
        raise RuntimeError("source died")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="source died"):
        write(docs(), out)
    man = check_manifest(out)
    assert man["complete"] is False
    assert [sh["name"] for sh in man["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert [s["tokens"].tolist() for s in read_samples(out)] == [
        list(range(i + 2)) for i in range(6)]
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar.tmp"]


def test_writer_refusals(tmp_path):
    out = tmp_path / "out"
    write(docs_of([[1, 2]] * 4), out)
    with pytest.raises(FileExistsError, match="already holds"):
        write(docs_of([[1, 2]]), out)
    # A stray shard of the prefix is refused too, even without a manifest.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "shard-000007.tar").write_bytes(b"")
    with pytest.raises(FileExistsError):
        write(docs_of([[1, 2]]), tmp_path / "other")
    write(docs_of([[1, 2]]), tmp_path / "other", prefix="val")  # another prefix is fine
    # overwrite replaces the dataset (old shards of the prefix are removed).
    man = write(docs_of([[3, 4]]), out, overwrite=True)
    assert man["n_shards"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]
    assert [s["tokens"].tolist() for s in read_samples(out)] == [[3, 4]]

    with pytest.raises(ValueError, match="document 2: token id 258 is outside the vocabulary"):
        write(docs_of([[1], [2], [5, 258, 300]]), tmp_path / "bad")
    with pytest.raises(ValueError, match="document 0: mask shape"):
        write(docs_of([[1, 2]], [[1]]), tmp_path / "bad", overwrite=True)
    with pytest.raises(ValueError, match="no documents to write \\(2 empty"):
        write(docs_of([[], []]), tmp_path / "empty")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def test_cli_text_modes(tmp_path):
    a, b, empty = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "empty.txt"
    a.write_text("first line\n\n  \nsecond ✓\nthird\n")
    b.write_text("\n\npara one\nstill one\n\n\npara two\n")
    empty.write_text("")
    cases = {
        "file": ([], ["first line\n\n  \nsecond ✓\nthird\n", b.read_text()], 1),
        "lines": (["--split-lines"], ["first line", "second ✓", "third", "para one",
                                      "still one", "para two"], 0),
        "blank": (["--split-blank"], ["first line", "second ✓\nthird", "para one\nstill one",
                                      "para two"], 0),
    }
    for name, (flags, texts, skipped) in cases.items():
        out = tmp_path / name
        argv = ["--text", str(a), str(b), str(empty), *flags, "--out", str(out),
                "--max-samples", "2", "--no-progress"]
        assert make_shards.main(argv) == 0
        man = check_manifest(out)
        assert man["complete"] and man["skipped_empty"] == skipped
        assert man["tokenizer"] == BYTE_INFO and man["source"]["split"] == name
        assert [s["tokens"].tolist() for s in read_samples(out)] == [byte_doc(t) for t in texts]


def test_cli_jsonl(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text('{"body": "alpha", "x": 1}\n\n{"body": "béta"}\n{"body": ""}\n')
    out = tmp_path / "out"
    assert make_shards.main(["--jsonl", str(f), "--field", "body", "--out", str(out),
                             "--no-progress"]) == 0
    man = check_manifest(out)
    assert man["skipped_empty"] == 1 and man["source"]["field"] == "body"
    assert [s["tokens"].tolist() for s in read_samples(out)] == [byte_doc("alpha"),
                                                                byte_doc("béta")]
    for bad, why in (('{"body": "ok"}\n{"body": "x"\n', "invalid JSON"),
                     ('{"body": "ok"}\n{"text": "x"}\n', "no field 'body'")):
        f.write_text(bad)
        argv = ["--jsonl", str(f), "--field", "body", "--out", str(out), "--overwrite",
                "--no-progress"]
        assert make_shards.main(argv) == 1
        assert f"{f}:2: {why}" in capsys.readouterr().err


def test_cli_task_mode_keeps_masks(tmp_path):
    out = tmp_path / "out"
    args = {"width": 8, "n_states": 2}
    assert make_shards.main(["--task", "rule110", "--task-arg", "width=8", "--task-arg",
                             "n_states=2", "--split", "test", "--n", "5", "--seed", "3",
                             "--max-samples", "2", "--out", str(out), "--no-progress"]) == 0
    man = check_manifest(out)
    task = build_task("rule110", **args)
    assert man["tokenizer"] == {"kind": "task", "task": "rule110", "task_args": args,
                                "vocab_size": task.vocab_size, "eos_id": None, "pad_id": 0}
    assert man["n_shards"] == 3
    samples = read_samples(out)
    assert len(samples) == 5
    for i, s in enumerate(samples):
        ex = task.example_at("test", 3, i)
        assert s["tokens"].tolist() == ex.tokens
        assert s["mask"].tolist() == ex.loss_mask


def test_cli_argument_errors(tmp_path, capsys):
    f = tmp_path / "a.txt"
    f.write_text("x")
    bad = {
        "--field": ["--text", str(f), "--field", "body"],
        "--n": ["--task", "rule110"],
        "widht": ["--task", "rule110", "--n", "2", "--task-arg", "widht=8"],
        "missing.txt": ["--text", str(tmp_path / "missing.txt")],
        "--max-samples": ["--text", str(f), "--max-samples", "0"],
        "no-such-tok": ["--text", str(f), "--tokenizer", str(tmp_path / "no-such-tok")],
    }
    for culprit, argv in bad.items():
        with pytest.raises(SystemExit) as e:
            make_shards.main([*argv, "--out", str(tmp_path / "out")])
        assert e.value.code == 2
        assert culprit in capsys.readouterr().err
    assert make_shards.main(["--text", str(f), "--out", str(tmp_path / "out"),
                             "--no-progress"]) == 0
    with pytest.raises(SystemExit) as e:  # a second run into the same directory
        make_shards.main(["--text", str(f), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_cli_subprocess(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one\ntwo\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--text", str(f), "--split-lines", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2 documents" in proc.stdout
    assert [s["tokens"].tolist() for s in read_samples(out)] == [byte_doc("one"),
                                                                byte_doc("two")]
