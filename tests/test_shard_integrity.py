"""Shard integrity and trust: per-sample and per-shard digests, visible skips, manifest
confinement, the ``pipe:`` opt-in and loader workers that die with a SIGKILLed trainer."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sleeptrain.config import load_config
from sleeptrain.config.validate import ConfigError
from sleeptrain.data.format import ShardError, read_manifest
from sleeptrain.data.shards import ShardLoader, resolve_shards
from sleeptrain.data.writer import write_shards

ROOT = Path(__file__).resolve().parents[1]


def _dataset(path: Path, n_docs: int, per_shard: int, vocab: int = 1_000_000) -> Path:
    """Documents i = 1..n_docs of lengths 2..29, token j of document i = i * 1000 + j (mod
    vocab), written by the current writer (per-sample digests)."""
    lengths = np.random.default_rng(0).integers(2, 30, size=n_docs).tolist()
    docs = [(((i + 1) * 1000 + np.arange(n)) % vocab).astype(np.uint32) for i, n in
            enumerate(lengths)]
    write_shards([(d, None) for d in docs], path, "shard",
                 {"kind": "test", "vocab_size": vocab, "eos_id": None, "pad_id": 0}, per_shard,
                 1 << 30, {"kind": "test"}, progress=False)
    return path


def _loader(path, **kw) -> ShardLoader:
    args = dict(seq_len=24, window_len=8, batch_size=1, workers=0, seed=0, shuffle_buffer=2)
    args.update(kw)
    return ShardLoader([str(path)], **args)


def _doc_ids(batch) -> set[int]:
    t = batch.tokens[batch.tokens > 0]
    return set((t // 1000).tolist())


def _same(a, b) -> bool:
    return all(torch.equal(x.tokens, y.tokens) and torch.equal(x.mask, y.mask)
               and torch.equal(x.doc_starts, y.doc_starts) for x, y in zip(a, b, strict=True))


def _member(shard: Path, name: str) -> tarfile.TarInfo:
    with tarfile.open(shard) as tf:
        return tf.getmember(name)


def _flip(path: Path, offset: int) -> None:
    """XORs one byte of ``path`` in place (same size, nothing recomputed)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_token(shard: Path, key: str, j: int = 1) -> None:
    """Flips the low byte of token j of sample ``key``'s tokens.npy."""
    m = _member(shard, f"{key}.tokens.npy")
    with open(shard, "rb") as f:
        f.seek(m.offset_data)
        head = f.read(10)
    header_len = 10 + int.from_bytes(head[8:10], "little")
    _flip(shard, m.offset_data + header_len + 4 * j)


def _drain(loader) -> list:
    """Batches until the loader ends or raises; (batches, the ShardError or None)."""
    got = []
    try:
        for b in loader:
            got.append(b)
    except ShardError as e:
        return [got, e]
    return [got, None]


# ---------------------------------------------------------------------------------------------
# Digests
# ---------------------------------------------------------------------------------------------


def test_flipped_token_byte_is_named_and_nothing_of_the_sample_is_yielded(tmp_path):
    ds = _dataset(tmp_path / "d", n_docs=30, per_shard=10)
    bad = ds / "shard-000001.tar"
    key = "000000000010"  # the first sample of shard 1: document 11
    _flip_token(bad, key)
    got, err = _drain(_loader(ds, epochs=1))
    assert err is not None, "a flipped token byte was trained on silently"
    assert f"{bad}: sample {key} (index 0 in the shard)" in str(err)
    assert "does not match its contents" in str(err)
    seen = set().union(*map(_doc_ids, got))
    assert 11 not in seen  # nothing of the corrupt sample
    # The per-sample check fires at once: with a 2-sample shuffle buffer the corrupt sample
    # would otherwise have been yielded long before the shard's end (and its sha256 check).
    assert len(seen & set(range(12, 21))) == 0


@pytest.mark.parametrize("where", ["tar header", "archive padding"])
def test_shard_level_mismatch_with_intact_sample_digests_is_caught(tmp_path, where):
    ds = _dataset(tmp_path / "d", n_docs=20, per_shard=10)
    bad = ds / "shard-000000.tar"
    data = bytearray(bad.read_bytes())
    if where == "tar header":
        # swap two bytes of the 3rd member's uname ("bigdata" -> "ibgdata"): the header
        # checksum (a byte sum) still holds and no sample digest covers it
        off = _member(bad, "000000000001.sha256").offset + 265
        data[off], data[off + 1] = data[off + 1], data[off]
    else:  # the last byte of the zero padding after the end-of-archive marker
        data[-1] = 1
    bad.write_bytes(bytes(data))
    got, err = _drain(_loader(ds, epochs=1))
    assert err is not None
    assert f"shard {bad}: sha256 of the file is" in str(err) and "manifest lists" in str(err)


def test_a_sample_without_digest_in_a_digest_manifest_is_refused(tmp_path):
    ds = _dataset(tmp_path / "d", n_docs=10, per_shard=10)
    shard = ds / "shard-000000.tar"
    _rewrite(shard, drop=lambda name: name == "000000000003.sha256")
    got, err = _drain(_loader(ds, epochs=1))
    assert err is not None
    assert f"{shard}: sample 000000000003 (index 3 in the shard) has no sha256 member" \
        in str(err)


def _rewrite(shard: Path, drop) -> None:
    """Rewrites a tar without the members for which ``drop(name)`` is true."""
    buf = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src.getmembers():
            if not drop(m.name):
                dst.addfile(m, src.extractfile(m))
    shard.write_bytes(buf.getvalue())


def _to_old_format(ds: Path) -> None:
    """Turns a dataset into what the writer before per-sample digests wrote: no sha256
    members, no ``sample_digest`` in the manifest (shard sizes and sha256 recomputed)."""
    man_path = ds / "manifest.json"
    man = json.loads(man_path.read_text())
    del man["sample_digest"]
    for sh in man["shards"]:
        shard = ds / sh["name"]
        _rewrite(shard, drop=lambda name: name.endswith(".sha256"))
        sh["bytes"] = shard.stat().st_size
        sh["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    man_path.write_text(json.dumps(man))


def test_old_format_shards_still_load_with_the_shard_level_check(tmp_path):
    new = _dataset(tmp_path / "new", n_docs=30, per_shard=10)
    old = _dataset(tmp_path / "old", n_docs=30, per_shard=10)
    _to_old_format(old)
    with tarfile.open(old / "shard-000000.tar") as tf:
        assert not any(n.endswith(".sha256") for n in tf.getnames())
    ref = list(_loader(new, epochs=1))
    assert _same(ref, list(_loader(old, epochs=1)))
    # a flipped token byte in an old shard: only the shard's sha256 can catch it (at its end)
    _flip_token(old / "shard-000002.tar", "000000000025")
    got, err = _drain(_loader(old, epochs=1))
    assert err is not None and f"shard {old / 'shard-000002.tar'}: sha256 of the file" \
        in str(err)


# ---------------------------------------------------------------------------------------------
# on_corrupt: skip
# ---------------------------------------------------------------------------------------------


def test_skip_is_printed_counted_and_survives_resume(tmp_path, capsys):
    ds = _dataset(tmp_path / "d", n_docs=40, per_shard=10)  # 4 shards, docs 10k+1..10k+10
    bad = ds / "shard-000002.tar"
    _flip_token(bad, "000000000024")
    n = 150  # > 2 epochs of batches: the reader comes back to the bad shard
    ref_loader = _loader(ds, on_corrupt="skip")
    ref = list(itertools.islice(ref_loader, n))
    err = capsys.readouterr().err
    assert err.count("skipping shard") == 1  # once, although two epochs met it
    assert f"skipping shard {bad}" in err and "000000000024" in err
    assert "does not match its contents" in err
    assert ref_loader.skipped == [str(bad)]
    assert 25 not in set().union(*map(_doc_ids, ref))

    first = _loader(ds, on_corrupt="skip")
    head = []
    for b in first:  # up to a few batches after the skip
        head.append(b)
        if first.skipped and len(head) >= 20:
            break
    capsys.readouterr()
    path = tmp_path / "pos.pt"
    torch.save(first.state_dict(), path)
    second = _loader(ds, on_corrupt="skip")
    second.load_state_dict(torch.load(path, weights_only=True))
    assert second.skipped == [str(bad)]  # recorded across the resume
    tail = list(itertools.islice(second, n - len(head)))
    assert _same(ref, head + tail)  # and still exact
    assert "skipping shard" not in capsys.readouterr().err  # known: passed over, not re-read
    assert second.skipped == [str(bad)]


def test_a_skip_with_no_batch_after_it_is_counted(tmp_path, capfd):
    # Two shards, one per reader, the second corrupt at its first sample: its reader yields
    # no batch at all, so only its final position can bring the skip to the loader.
    ds = _dataset(tmp_path / "d", n_docs=20, per_shard=10)
    bad = ds / "shard-000001.tar"
    _flip_token(bad, "000000000010")
    ld = _loader(ds, epochs=1, on_corrupt="skip", workers=2)  # two worker processes
    assert len(list(ld)) > 0
    assert ld.skipped == [str(bad)]
    assert f"skipping shard {bad}" in capfd.readouterr().err  # printed by the worker
    counts = []
    for rank in range(2):  # in-process readers, one per data-parallel rank
        ld = _loader(ds, epochs=1, on_corrupt="skip", dp_rank=rank, dp_size=2)
        counts.append((len(list(ld)), ld.skipped))
    assert sorted(counts, key=lambda c: c[0])[0] == (0, [str(bad)])


def test_trainer_data_counts_skipped_shards(tmp_path):
    from sleeptrain.train.data import ShardData

    ds = _dataset(tmp_path / "d", n_docs=30, per_shard=10, vocab=64)
    _flip_token(ds / "shard-000000.tar", "000000000000")
    cfg = load_config(None, [f"data.shards=[{ds}]", "data.source=shards", "data.workers=0",
                             "data.seq_len=16", "data.batch_size=1", "sleep.window_len=8",
                             "data.on_corrupt=skip", "model.vocab_size=64",
                             f"train.run_dir={tmp_path / 'run'}"])
    info = SimpleNamespace(dp_rank=0, dp_size=1, device=torch.device("cpu"))
    data = ShardData(cfg, info)
    for step in range(40):
        data.step_batches(step, 1)
    assert data.skipped == [str(ds / "shard-000000.tar")]


# ---------------------------------------------------------------------------------------------
# Manifest confinement and pipe: URLs
# ---------------------------------------------------------------------------------------------


def _set_name(ds: Path, name: str) -> Path:
    man = json.loads((ds / "manifest.json").read_text())
    man["shards"][1]["name"] = name
    (ds / "manifest.json").write_text(json.dumps(man))
    return ds / "manifest.json"


@pytest.mark.parametrize("name, why", [
    ("../outside.tar", "'..' component"),
    ("sub/../../outside.tar", "'..' component"),
    ("/etc/passwd", "absolute path"),
    ("pipe:cat /etc/passwd", "is a URL"),
    ("s3://bucket/shard.tar", "is a URL"),
])
def test_manifest_names_must_stay_inside_the_dataset(tmp_path, name, why):
    ds = _dataset(tmp_path / "d", n_docs=20, per_shard=10)
    (tmp_path / "outside.tar").write_bytes((ds / "shard-000001.tar").read_bytes())
    man = _set_name(ds, name)
    with pytest.raises(ShardError, match=why) as e:
        resolve_shards([str(ds)])
    assert f"{man}: shards[1] name {name!r}" in str(e.value)


def test_manifest_symlink_leading_out_is_refused(tmp_path):
    ds = _dataset(tmp_path / "d", n_docs=20, per_shard=10)
    (tmp_path / "outside.tar").write_bytes((ds / "shard-000001.tar").read_bytes())
    (ds / "inside.tar").symlink_to(ds / "shard-000001.tar")  # a link inside is fine
    _set_name(ds, "inside.tar")
    assert resolve_shards([str(ds)]).urls[1] == str((ds / "shard-000001.tar").resolve())
    (ds / "escape.tar").symlink_to(tmp_path / "outside.tar")
    man = _set_name(ds, "escape.tar")
    with pytest.raises(ShardError, match="outside the dataset directory") as e:
        read_manifest(ds)
    assert f"{man}: shards[1] name 'escape.tar'" in str(e.value)


def test_pipe_urls_need_the_opt_in(tmp_path):
    ds = _dataset(tmp_path / "d", n_docs=10, per_shard=10)
    marker = tmp_path / "ran"
    for spec in (f"pipe:cat {ds}/shard-000000.tar", f"PIPE:touch {marker}",
                 f"  pipe:touch {marker}"):
        with pytest.raises(ShardError, match=r"runs a shell command.*data\.allow_pipe=true"):
            ShardLoader([spec], seq_len=24, window_len=8, batch_size=1, workers=0)
    assert not marker.exists()
    direct = list(_loader(ds, epochs=1))
    piped = list(ShardLoader([f"pipe:cat {ds}/shard-000000.tar"], seq_len=24, window_len=8,
                             batch_size=1, workers=0, seed=0, shuffle_buffer=2, epochs=1,
                             allow_pipe=True))
    assert _same(direct, piped)


def test_config_allow_pipe_reaches_the_loader_and_preflight(tmp_path):
    from sleeptrain.plan import preflight
    from sleeptrain.train.data import ShardData

    ds = _dataset(tmp_path / "d", n_docs=10, per_shard=10, vocab=64)
    base = [f"data.shards=[pipe:cat {ds}/shard-000000.tar]", "data.source=shards",
            "data.workers=0", "data.seq_len=16", "data.batch_size=1", "sleep.window_len=8",
            "model.vocab_size=64", f"train.run_dir={tmp_path / 'run'}"]
    info = SimpleNamespace(dp_rank=0, dp_size=1, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="data.allow_pipe=true"):
        ShardData(load_config(None, base), info)
    with pytest.raises(ConfigError, match="data.allow_pipe=true"):
        preflight(load_config(None, base), 1)
    cfg = load_config(None, [*base, "data.allow_pipe=true"])
    assert ShardData(cfg, info).step_batches(0, 1) is not None
    assert any("1 shards" in line for line in preflight(cfg, 1))


# ---------------------------------------------------------------------------------------------
# The tar reader
# ---------------------------------------------------------------------------------------------


def test_tar_reader_matches_webdataset_on_unusual_tars(tmp_path):
    from webdataset.tariterators import tarfile_samples

    from sleeptrain.data.shards import _ShardStream

    def add(tf, name, data, kind=tarfile.REGTYPE):
        ti = tarfile.TarInfo(name)
        ti.type, ti.size = kind, len(data)
        tf.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    long = "d" * 120 + "/k" + "e" * 90
    cases = {}
    for fmt, label in ((tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu"),
                       (tarfile.USTAR_FORMAT, "ustar")):
        path = tmp_path / f"{label}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            add(tf, "a.txt", b"x" * 700)
            add(tf, "dir", b"", tarfile.DIRTYPE)
            add(tf, "a.json", b"{}")
            if fmt != tarfile.USTAR_FORMAT:
                add(tf, "b\u00e9.txt", b"")  # empty member, non-ASCII name
            add(tf, "sub/" * 30 + "c.txt", b"y" * 512)  # ustar prefix / long name
            if fmt != tarfile.USTAR_FORMAT:
                add(tf, long + ".txt", b"z")
            add(tf, "__meta__", b"skipped")
        cases[label] = path
    gz = tmp_path / "pax.tar.gz"
    with tarfile.open(gz, "w:gz") as tf:
        add(tf, "a.txt", b"q" * 10)
    cases["gz"] = gz
    for label, path in cases.items():
        def strip(s):
            return {k: v for k, v in s.items() if k != "__url__"}

        want = [strip(s) for s in tarfile_samples([{"url": str(path)}])]
        stream = _ShardStream(str(path), local=True)
        got = [strip(s) for s in stream.samples()]
        assert got == want, label
        assert stream.finish() == hashlib.sha256(path.read_bytes()).hexdigest(), label
    bad = bytearray(cases["pax"].read_bytes())
    bad[0] ^= 1  # the first header's name: the checksum no longer holds
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    with pytest.raises(tarfile.TarError, match="checksum"):
        list(_ShardStream(str(tmp_path / "bad.tar"), local=True).samples())


# ---------------------------------------------------------------------------------------------
# Loader workers die with the trainer
# ---------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is ``pid``, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_worker_whose_parent_is_already_gone_exits_at_once():
    # The race prctl cannot cover: the parent died before the worker asked for its signal.
    for platform in ("linux", "darwin"):  # prctl, and the watchdog fallback
        r = _python(f"""
            import os, sys
            from sleeptrain.data.shards import _exit_with_parent
            sys.platform = {platform!r}
            _exit_with_parent(os.getppid() + 100000)  # not our parent: "it died already"
            print("still alive")
        """)
        assert r.returncode == 1 and r.stdout == r.stderr == "", (platform, r.stderr)


def test_watchdog_fallback_exits_when_the_parent_dies(tmp_path):
    # Without prctl (sys.platform faked): the child polls its parent pid. The parent starts it,
    # prints its pid and dies; the child must exit within a few polls.
    child = textwrap.dedent("""
        import os, sys, time
        from sleeptrain.data.shards import _exit_with_parent
        sys.platform = "darwin"
        _exit_with_parent(os.getppid(), watch_interval=0.05)
        print("ready", flush=True)
        time.sleep(60)
    """)
    r = _python(f"""
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
        assert p.stdout.readline().strip() == "ready"
        print(p.pid, flush=True)
    """)
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout.split()[0])
    t0 = time.time()
    while _alive(pid) and time.time() - t0 < 5:
        time.sleep(0.02)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the watchdog did not end the orphaned child in 5 s")


def test_loader_workers_die_with_a_sigkilled_trainer(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    data = _dataset(tmp_path / "data", n_docs=40, per_shard=5, vocab=258)
    run = tmp_path / "run"
    log = open(tmp_path / "train.log", "wb")  # noqa: SIM115 (closed below)
    args = [sys.executable, "-m", "sleeptrain.cli", "train", str(ROOT / "configs" /
            "lm_tiny_shards.yaml"), f"data.shards=[{data}]", f"train.run_dir={run}",
            "data.workers=2", "data.seq_len=32", "data.batch_size=2", "sleep.window_len=16",
            "model.d_model=32", "model.ffn_hidden=64", "model.gdn_head_dim=16",
            "train.steps=100000", "train.ckpt_every=100000", "train.eval_every=100000",
            "train.device=cpu", "log.every=1", "log.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 120
        workers: list[int] = []
        metrics = run / "metrics.jsonl"
        # Training steps are running (the workers are serving batches) and both workers exist.
        while not (len(workers) >= 2 and metrics.exists()
                   and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, (tmp_path / "train.log").read_text()
            assert time.time() < deadline, "the trainer did not start its workers in 120 s"
            time.sleep(0.05)
            workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        t0 = time.time()
        while any(_alive(w) for w in workers) and time.time() - t0 < 2.0:
            time.sleep(0.02)
        alive = [w for w in workers if _alive(w)]
        assert not alive, f"loader workers {alive} outlived the SIGKILLed trainer by 2 s"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for w in _children(proc.pid) + [w for w in workers if _alive(w)]:
            try:
                os.kill(w, signal.SIGKILL)
            except OSError:
                pass
        log.close()
