"""The streaming shard loader: packing, rank/worker split, exact resume, corrupt shards."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sleeptrain.data.format import ShardError
from sleeptrain.data.shards import RowPacker, ShardLoader
from sleeptrain.data.writer import write_shards

ROOT = Path(__file__).resolve().parents[1]


def _doc(doc_id: int, n: int) -> np.ndarray:
    """Tokens of document ``doc_id``: doc_id * 1000 + position (so every token names its doc)."""
    return (doc_id * 1000 + np.arange(n)).astype(np.uint32)


def _lengths(n_docs: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(2, 30, size=n_docs).tolist()


def _dataset(path: Path, n_docs: int, per_shard: int, seed: int = 0) -> Path:
    docs = [(_doc(i + 1, n), None) for i, n in enumerate(_lengths(n_docs, seed))]
    write_shards(docs, path, "shard", {"kind": "test", "vocab_size": 1_000_000, "eos_id": None,
                                       "pad_id": 0}, per_shard, 1 << 30, {"kind": "test"},
                 progress=False)
    return path


def _loader(path, **kw) -> ShardLoader:
    args = dict(seq_len=24, window_len=8, batch_size=2, workers=0, seed=0, shuffle_buffer=4)
    args.update(kw)
    return ShardLoader([str(path)], **args)


def _doc_ids(batch) -> set[int]:
    t = batch.tokens[batch.tokens > 0]
    return set((t // 1000).tolist())


def _same(a, b) -> bool:
    return all(torch.equal(x.tokens, y.tokens) and torch.equal(x.mask, y.mask)
               and torch.equal(x.doc_starts, y.doc_starts) for x, y in zip(a, b, strict=True))


def test_packer_window_alignment_and_continuation():
    docs = iter([(np.arange(1, 6), np.ones(5, np.uint8)),     # 5 tokens
                 (np.arange(11, 14), np.ones(3, np.uint8)),   # 3 tokens
                 (np.arange(21, 35), np.ones(14, np.uint8))])  # 14 tokens
    p = RowPacker(seq_len=12, window_len=4, pad_id=0)
    nxt = lambda: next(docs, None)  # noqa: E731
    t, m, s = p.row(nxt)
    # doc 1 at 0..4, pad to 8; doc 2 at 8..10, pad; the row holds 13 tokens (12 inputs + 1).
    assert t.tolist() == [1, 2, 3, 4, 5, 0, 0, 0, 11, 12, 13, 0, 0]
    assert m.tolist() == [0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0]
    assert s.tolist() == [True, False, True]
    t, m, s = p.row(nxt)
    # doc 3 fills the next row (13 tokens) and continues in a third, repeating token 33.
    assert t.tolist() == list(range(21, 34))
    assert m.tolist() == [0] + [1] * 12
    t, m, s = p.row(nxt)
    assert t[:2].tolist() == [33, 34] and m[:2].tolist() == [0, 1] and m[2:].sum() == 0
    assert p.row(nxt) is None


def test_every_target_is_trained_once(tmp_path):
    # Every (token -> next token) pair of every document is a target exactly once per epoch.
    ds = _dataset(tmp_path / "d", n_docs=40, per_shard=10)
    pairs = []
    for b in _loader(ds, epochs=1, batch_size=1):
        t, m = b.tokens[0], b.mask[0]
        for j in torch.nonzero(m).flatten().tolist():
            assert t[j] == t[j - 1] + 1  # the target follows its own document's context
            pairs.append(int(t[j]))
    expect = [int(x) for i, n in enumerate(_lengths(40)) for x in _doc(i + 1, n)[1:]]
    assert sorted(pairs) == sorted(expect)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_exact(tmp_path, workers):
    ds = _dataset(tmp_path / "d", n_docs=60, per_shard=7)
    ref = list(_take(_loader(ds, workers=workers), 15))
    first = _loader(ds, workers=workers)
    head = list(_take(first, 6))
    path = tmp_path / "pos.pt"
    torch.save(first.state_dict(), path)
    second = _loader(ds, workers=workers)
    second.load_state_dict(torch.load(path, weights_only=True))
    tail = list(_take(second, 9))
    assert _same(ref, head + tail)
    # and the stream really moves on (not a constant batch)
    assert not torch.equal(ref[0].tokens, ref[1].tokens)


def _take(loader, n):
    return itertools.islice(loader, n)  # stops without drawing batch n + 1


def test_ranks_read_disjoint_shards_covering_all(tmp_path):
    ds = _dataset(tmp_path / "d", n_docs=35, per_shard=7)  # 5 shards, odd
    seen = []
    for rank in range(2):
        ids = set()
        for b in _loader(ds, dp_rank=rank, dp_size=2, epochs=1, batch_size=1):
            ids |= _doc_ids(b)
        seen.append(ids)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(1, 36))


def test_equal_steps_with_odd_shards_on_two_ranks(tmp_path):
    # Two real processes (gloo): 3 shards of different sizes, one epoch. Rank 0 reads two
    # shards, rank 1 one; both must stop after the same number of batches.
    ds = _dataset(tmp_path / "d", n_docs=27, per_shard=12)  # 12 + 12 + 3 documents
    script = textwrap.dedent(f"""
        import os, sys, torch.distributed as dist
        sys.path.insert(0, {str(ROOT)!r})
        from sleeptrain.data.shards import ShardLoader
        rank = int(sys.argv[1])
        make = lambda: ShardLoader([{str(ds)!r}], seq_len=24, window_len=8, batch_size=1,
                                   workers=0, dp_rank=rank, dp_size=2, epochs=1)
        alone = sum(1 for _ in make())  # no process group yet: this rank's own count
        dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=rank,
                                world_size=2)
        print(sum(1 for _ in make()), alone)
        dist.destroy_process_group()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    (n0, alone0), (n1, alone1) = [tuple(map(int, o.split())) for o, _ in outs]
    assert n0 == n1 == min(alone0, alone1)
    assert alone0 != alone1  # the ranks really had uneven data


def test_fewer_shards_than_readers(tmp_path):
    ds = _dataset(tmp_path / "d", n_docs=9, per_shard=3)  # 3 shards
    with pytest.raises(ShardError, match=r"3 shards for 2 data-parallel ranks x 2 workers"):
        _loader(ds, dp_size=2, workers=2)


def _truncate(path: Path, member: int, into: int) -> None:
    """Cuts the tar file ``into`` bytes after the start of member ``member``'s header."""
    import tarfile

    with tarfile.open(path) as tf:
        cut = tf.getmembers()[member].offset + into
    path.write_bytes(path.read_bytes()[:cut])


def test_truncated_shard_error_names_it(tmp_path):
    ds = _dataset(tmp_path / "d", n_docs=30, per_shard=10)
    bad = ds / "shard-000001.tar"
    _truncate(bad, 7, 600)  # 88 bytes into the 8th sample's tokens.npy
    with pytest.raises(ShardError, match="shard-000001.tar"):
        for _ in _loader(ds, epochs=1):
            pass


def test_truncated_shard_skipped_and_counted(tmp_path):
    ds = _dataset(tmp_path / "d", n_docs=30, per_shard=10)
    _truncate(ds / "shard-000002.tar", 7, 600)
    ld = _loader(ds, epochs=1, on_corrupt="skip", batch_size=1)
    ids = set()
    for b in ld:
        ids |= _doc_ids(b)
    assert [Path(u).name for u in ld.skipped] == ["shard-000002.tar"]
    assert set(range(1, 21)) <= ids  # the intact shards were all read


def test_shard_cut_at_a_member_boundary_is_caught_by_the_manifest(tmp_path):
    # A tar cut exactly between samples reads as a shorter tar; the manifest's count catches it.
    ds = _dataset(tmp_path / "d", n_docs=20, per_shard=10)
    bad = ds / "shard-000000.tar"
    _truncate(bad, 10, 0)  # the 6th sample's first header (members sha256, tokens.npy here)
    with pytest.raises(ShardError, match=r"shard-000000.tar: 5 samples read but the manifest"):
        for _ in _loader(ds, epochs=1):
            pass


def test_resume_rejects_a_different_layout(tmp_path):
    ds = _dataset(tmp_path / "d", n_docs=20, per_shard=5)
    a = _loader(ds)
    list(_take(a, 2))
    b = _loader(ds, seq_len=32)
    with pytest.raises(ShardError, match="seq_len: saved 24, now 32"):
        b.load_state_dict(a.state_dict())


def test_missing_shard_path_is_named(tmp_path):
    with pytest.raises(ShardError, match="nothing-here"):
        ShardLoader([str(tmp_path / "nothing-here-*.tar")], seq_len=8, window_len=4,
                    batch_size=1, workers=0)


def test_pipe_urls_are_read(tmp_path):
    ds = _dataset(tmp_path / "d", n_docs=10, per_shard=10)
    direct = list(_loader(ds, epochs=1, batch_size=1))
    piped = list(ShardLoader([f"pipe:cat {ds}/shard-000000.tar"], seq_len=24, window_len=8,
                             batch_size=1, workers=0, seed=0, shuffle_buffer=4, epochs=1,
                             allow_pipe=True))  # opt-in: a pipe: URL runs a shell command
    assert _same(direct, piped)
    assert os.path.exists(ds / "manifest.json")
