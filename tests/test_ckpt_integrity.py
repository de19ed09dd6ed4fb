"""Checkpoint integrity and trust (issue #27): digests of every file, verification before
unpickling, fallback to the previous checkpoint, no code execution from ``shards/.metadata``.

Also a torchrun worker (``python -m tests.test_ckpt_integrity WORKDIR``, 2 gloo ranks at TP=2)
for the multi-rank fallback test.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sleeptrain.train import checkpoint as ck
from sleeptrain.train.checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    UntrustedCheckpointError,
)
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def _model_opt(*extra: str) -> tuple[Any, torch.nn.Module, Any]:
    """A tiny model and its optimizer with state (one step on seeded random gradients)."""
    from sleeptrain.train.optim import optimizer_for
    from tests.conftest import tiny_model

    cfg, model = tiny_model(*extra)
    opt = optimizer_for(cfg, model)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return cfg, model, opt


def _save(run: Path, step: int, cfg: Any, model: torch.nn.Module, opt: Any,
          keep_last: int = 5) -> Path:
    """A training checkpoint of ``step`` as the trainer writes it; the weights are moved first
    so that every step's checkpoint holds other values."""
    from sleeptrain.config import to_yaml
    from sleeptrain.train.dist_ckpt import save_sharded_checkpoint

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.125)
    (run / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    save_sharded_checkpoint(run, step, model, opt, {"step": step, "rng": ck.capture_rng_state()},
                            keep_last, extra_files={"config.yaml": to_yaml(cfg)})
    return run / "checkpoints" / f"step_{step:08d}"


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _flip(file: Path) -> None:
    """Corrupt ``file`` without changing its size: invert a byte in the middle."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def _rewrite_meta(ckpt: Path, fn: Any) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    fn(meta)
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _record_file(ckpt: Path, name: str) -> None:
    """Make meta.json's size and digest of ``name`` match its (replaced) content, as an
    attacker who can write the checkpoint could: only the unpickler can refuse it then."""
    def fix(meta: dict) -> None:
        meta["sizes"][name] = (ckpt / name).stat().st_size
        rec = meta["digests"]
        rec["files"][name] = ck.digest_files(ckpt, [name], algo=rec["algo"],
                                             chunk_bytes=rec["chunk_bytes"])[name]
    _rewrite_meta(ckpt, fix)


def _to_format1(ckpt: Path) -> None:
    """meta.json as sleeptrain wrote it before digests: sha256 of state.pt and extra files,
    sizes of the shards, format 1."""
    def fix(meta: dict) -> None:
        del meta["digests"]
        meta["format"] = 1
        meta["files"] = {n: hashlib.sha256((ckpt / n).read_bytes()).hexdigest()
                         for n in ("state.pt", "config.yaml")}
    _rewrite_meta(ckpt, fix)


def _resume(run: Path, model: torch.nn.Module, opt: Any, **kw: Any) -> tuple[Any, list[str]]:
    from sleeptrain.train.trainer import load_train_state

    lines: list[str] = []
    res = ck.resume_checkpoint(run, lambda p, s: load_train_state(p, s, model, opt),
                               log=lines.append, **kw)
    return res, lines


class _RunsCommand:
    """Pickles to a call of ``os.system(command)``: what a crafted ``.metadata`` holds."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


# ----------------------------------------------------------------------------- digests


def test_digests_cover_every_file(tmp_path: Path) -> None:
    cfg, model, opt = _model_opt()
    ckpt = _save(tmp_path, 1, cfg, model, opt)
    meta = json.loads((ckpt / "meta.json").read_text())
    on_disk = {str(f.relative_to(ckpt)) for f in ckpt.rglob("*") if f.is_file()} - {"meta.json"}
    assert {"state.pt", "config.yaml", "shards/.metadata", "shards/__0_0.distcp"} <= on_disk
    rec = meta["digests"]
    assert meta["format"] == 2 and rec["algo"] == "sha256"
    assert set(rec["files"]) == set(meta["sizes"]) == on_disk
    assert ck.digest_files(ckpt, sorted(on_disk)) == rec["files"]


def test_chunked_digest_is_the_documented_tree(tmp_path: Path) -> None:
    """digest = H(H(c_0) || H(c_1) || ...) over chunk_bytes chunks, one empty chunk if empty."""
    data = os.urandom(3 * 4096 + 17)
    (tmp_path / "f").write_bytes(data)
    (tmp_path / "e").write_bytes(b"")
    parts = [hashlib.sha256(data[o:o + 4096]).digest() for o in range(0, len(data), 4096)]
    got = ck.digest_files(tmp_path, ["f", "e"], chunk_bytes=4096, threads=3)
    assert got["f"] == hashlib.sha256(b"".join(parts)).hexdigest()
    assert got["e"] == hashlib.sha256(hashlib.sha256(b"").digest()).hexdigest()
    with pytest.raises(CheckpointError, match=r"missing\.bin"):
        ck.digest_files(tmp_path, ["missing.bin"])


@pytest.mark.parametrize("longest", [5000, 20000])
@pytest.mark.parametrize("size", [0, 1, 4096, 3 * 4096, 3 * 4096 + 17, 40000])
def test_streamed_digest_equals_the_file_digest(tmp_path: Path, size: int, longest: int) -> None:
    """StreamDigest over writes of random lengths (chunks split between writes, whole chunks
    hashed from the writer's buffer in SPREAD tasks, writes of at most COPY bytes copied and
    hashed later) gives digest_files' digest of the same bytes; each write's buffer is
    overwritten once update's futures are done, as a writer reusing it would."""
    from concurrent.futures import ThreadPoolExecutor

    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    gen = torch.Generator().manual_seed(size)
    with ThreadPoolExecutor(2) as pool:
        sd = ck.StreamDigest(pool, chunk_bytes=4096)
        sd.COPY, sd.SPREAD = 2000, 2  # both kinds of write; tasks of one and of several chunks
        i = 0
        while i < size:
            n = int(torch.randint(1, longest, (1,), generator=gen))
            buf = bytearray(data[i:i + n])
            sd.wait(sd.update(buf))
            buf[:] = bytes(len(buf))  # reused by the writer
            i += n
        got = sd.hexdigest()
    assert sd.size == size
    assert got == ck.digest_files(tmp_path, ["f"], chunk_bytes=4096)["f"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_read_digest_equals_the_file_digest(tmp_path: Path, seed: int) -> None:
    """ReadDigest over a loader's reads (mostly in file order with small gaps, small reads
    ahead, re-reads behind, a large skip ahead, a part never read) gives digest_files' digest;
    each read's buffer is overwritten once read()'s futures are done, as a loader reusing it
    would."""
    from concurrent.futures import ThreadPoolExecutor

    size = 200_000
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    gen = torch.Generator().manual_seed(seed)

    def rand(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=gen))

    with ThreadPoolExecutor(2) as pool:
        rd = ck.ReadDigest(tmp_path / "f", size, pool, algo="sha256", chunk_bytes=4096)
        rd.stream.COPY, rd.stream.SPREAD = 3000, 2  # reads copied and hashed from the buffer
        pos = 0
        while pos < size - 30_000:
            kind = rand(0, 10)
            if kind == 0:  # a small read ahead (a zip directory)
                at, n = min(size - 10, pos + rand(100, 9000)), rand(1, 10)
            elif kind == 1:  # a re-read behind
                at, n = rand(0, pos + 1), rand(1, 5000)
            elif kind == 2:  # a large skip ahead
                at, n = pos + rand(5000, 20_000), rand(4097, 12_000)
            else:  # the next item, after a small gap
                at, n = pos + rand(0, 200), rand(1, 12_000)
            n = min(n, size - at)
            buf = bytearray(data[at:at + n])
            ck.StreamDigest.wait(rd.read(at, buf))
            buf[:] = bytes(n)  # reused by the loader
            if kind != 1:
                pos = max(pos, at + n)
        got = rd.hexdigest()  # the rest never read
    assert got == ck.digest_files(tmp_path, ["f"], chunk_bytes=4096)["f"]


@pytest.mark.parametrize("piece,by_size", [(None, False), (12_293, False), (None, True)],
                         ids=["piece-default", "piece-12293", "cuda-layout"])
def test_verified_load_hashes_the_shards_from_its_reads(tmp_path: Path, monkeypatch: Any,
                                                        piece: int | None,
                                                        by_size: bool) -> None:
    """A verified load hashes the shard files from the bytes DCP reads (a large read in
    pieces, each hashed while the next is read): it reads back from the file only the gaps
    between tensors (zip headers, tensors of at most 4 KiB), here under 2% of the shard; a
    byte flipped inside a large tensor is still named. ``cuda-layout``: the shard written as
    DCP writes GPU tensors (its overlapping loader orders them by size, so model and optimizer
    tensors alternate in the file): a resume that loaded the model and the optimizer in two
    passes re-read 40% of the 7B checkpoint (docs/benchmarks.md)."""
    from torch.distributed.checkpoint import filesystem

    from sleeptrain.train import dist_ckpt
    from sleeptrain.train.dist_ckpt import save_sharded_checkpoint
    from sleeptrain.train.trainer import load_train_state

    if piece is not None:
        monkeypatch.setattr(dist_ckpt._DigestingReader, "PIECE", piece)
    if by_size:  # what DCP's _OverlappingCpuLoader (CUDA) does before writing
        monkeypatch.setattr(filesystem._SerialCpuLoader, "start_loading",
                            lambda self: self.items.sort(key=lambda item: item[0]))

    cfg, model, opt = _model_opt("model.d_model=128", "model.vocab_size=4096")
    info = save_sharded_checkpoint(tmp_path / "run", 1, model, opt, {"step": 1}, keep_last=1)
    shard = info.path / "shards" / "__0_0.distcp"
    reread = {"bytes": 0}
    pread = ck._pread_exact

    def counting(path: Path, offset: int, view: memoryview) -> None:
        if path.suffix == ".distcp":
            reread["bytes"] += len(view)
        pread(path, offset, view)

    monkeypatch.setattr(ck, "_pread_exact", counting)

    def load(path: Path, state: dict[str, Any]) -> None:
        for o in opt.optimizers:
            o.state.clear()
        load_train_state(path, state, model, opt)

    ck.load_verified(info.path, load)
    assert 0 < reread["bytes"] < 0.02 * shard.stat().st_size
    with shard.open("r+b") as f:  # the middle of the file: inside the embedding's moments
        f.seek(shard.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(CorruptCheckpointError, match=r"shards/__0_0\.distcp does not match"):
        ck.load_verified(info.path, load)


def test_shard_digests_are_taken_while_writing(tmp_path: Path, monkeypatch: Any) -> None:
    """The shard files are hashed from the bytes DCP writes, never read back (reading them
    back is the digest step's whole cost when the page cache cannot hold them); the recorded
    digests are those of the files on disk."""
    from sleeptrain.train.dist_ckpt import save_sharded_checkpoint

    cfg, model, opt = _model_opt()
    reread = ck.digest_files

    def no_shard_rereads(root: Any, names: Any, **kw: Any) -> dict[str, str]:
        assert not [n for n in names if n.endswith(".distcp")], names
        return reread(root, names, **kw)

    monkeypatch.setattr(ck, "digest_files", no_shard_rereads)
    info = save_sharded_checkpoint(tmp_path / "run", 1, model, opt, {"step": 1}, keep_last=1)
    monkeypatch.undo()
    files = json.loads((info.path / "meta.json").read_text())["digests"]["files"]
    shards = sorted(n for n in files if n.endswith(".distcp"))
    assert shards == ["shards/__0_0.distcp"]
    assert {n: files[n] for n in shards} == ck.digest_files(info.path, shards)


# ----------------------------------------------------------------------------- no unpickling


def test_crafted_payload_runs_under_plain_pickle(tmp_path: Path) -> None:
    """The payload of the tests below is live: plain ``pickle.loads`` (what DCP's reader does)
    runs the command."""
    marker = tmp_path / "PLAIN"
    pickle.loads(pickle.dumps(_RunsCommand(f"touch {marker}")))
    assert marker.exists()


@pytest.mark.parametrize("trust", [False, True], ids=["digests-updated", "trusted-format1"])
@pytest.mark.parametrize("path", ["resume", "load_model_weights", "load_run", "load_optimizer"])
def test_crafted_metadata_is_refused(tmp_path: Path, path: str, trust: bool) -> None:
    """A ``.metadata`` whose pickle would run a command: refused before the command runs, by
    the resume and the eval paths, whether its digest was updated to match (no trust) or the
    checkpoint is a trusted one without digests; ``load_optimizer`` alone (DCP's own metadata
    read, through the restricted reader) too."""
    from sleeptrain.api import load_run
    from sleeptrain.train.dist_ckpt import load_model_weights, load_optimizer

    cfg, model, opt = _model_opt()
    run = tmp_path / "run"
    ckpt = _save(run, 1, cfg, model, opt)
    marker = tmp_path / "MARKER"
    (ckpt / "shards" / ".metadata").write_bytes(pickle.dumps(_RunsCommand(f"touch {marker}")))
    if trust:
        _to_format1(ckpt)
        _rewrite_meta(ckpt, lambda m: m["sizes"].update(
            {"shards/.metadata": (ckpt / "shards" / ".metadata").stat().st_size}))
    else:
        _record_file(ckpt, "shards/.metadata")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle posix\.system from .*"
                                              r"step_00000001/shards/\.metadata") as ei:
        if path == "resume":
            _resume(run, model, opt, trust=trust)
        elif path == "load_model_weights":
            load_model_weights(ckpt, model, trust=trust)
        elif path == "load_run":
            load_run(run, device="cpu", trust=trust)
        else:
            layout = ck.load_checkpoint(ckpt, trust=trust)["optim_layout"]
            load_optimizer(ckpt, opt, layout)
    assert not marker.exists()
    if path == "resume":  # its digests match (or there are none): a refusal, nothing renamed
        assert "not renamed" in str(ei.value)
        assert (run / "checkpoints" / "step_00000001").is_dir()


def test_non_tensor_entries_are_refused(tmp_path: Path) -> None:
    """A ``.metadata`` (digest updated) that declares a tensor's entry as bytes, pointing at a
    shard file holding a pickle: DCP would ``torch.load(weights_only=False)`` it; refused, and
    the load planner refuses byte entries as well."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    from sleeptrain.train.dist_ckpt import (
        _TensorLoadPlanner,
        load_model_weights,
        read_dcp_metadata,
    )

    cfg, model, opt = _model_opt()
    ckpt = _save(tmp_path / "run", 1, cfg, model, opt)
    marker = tmp_path / "MARKER"
    payload = pickle.dumps(_RunsCommand(f"touch {marker}"))
    (ckpt / "shards" / "__0_1.distcp").write_bytes(payload)
    md = read_dcp_metadata(ckpt / "shards" / ".metadata")  # our own, intact file
    key = next(k for k in md.state_dict_metadata if k.startswith("model."))
    md.state_dict_metadata[key] = BytesStorageMetadata()
    md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != key}
    md.storage_data[MetadataIndex(key)] = _StorageInfo("__0_1.distcp", 0, len(payload))
    (ckpt / "shards" / ".metadata").write_bytes(pickle.dumps(md))
    _rewrite_meta(ckpt, lambda m: m["sizes"].update({"shards/__0_1.distcp": len(payload)}))
    _record_file(ckpt, "shards/__0_1.distcp")
    _record_file(ckpt, "shards/.metadata")
    # refused by the unpickler (not an allowed class) and, were it allowed, by the entry check
    with pytest.raises(CheckpointError, match=r"step_00000001.*BytesStorageMetadata"):
        load_model_weights(ckpt, model)
    assert not marker.exists()

    class _Item:
        class dest_index:  # noqa: N801 - the attribute layout of DCP's ReadItem
            fqn = key

    with pytest.raises(CheckpointError, match="refusing to unpickle the non-tensor entry"):
        _TensorLoadPlanner().load_bytes(_Item(), None)


# ----------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("name", ["shards/__0_0.distcp", "state.pt", "shards/.metadata"])
def test_corrupt_file_is_named_and_resume_falls_back(tmp_path: Path, name: str) -> None:
    from sleeptrain.train.dist_ckpt import load_model_weights

    cfg, model, opt = _model_opt()
    run = tmp_path / "run"
    _save(run, 1, cfg, model, opt)
    step1 = _weights(model)
    bad = _save(run, 2, cfg, model, opt)
    cdir = run / "checkpoints"
    _flip(bad / name)
    with pytest.raises(CheckpointError, match=rf"step_00000002.*{name}"):
        load_model_weights(bad, model)  # the eval path: a clear error, no fallback
    (cdir / "corrupt-step_00000002").mkdir()  # taken: the renamed one gets a suffix

    res, lines = _resume(run, model, opt)
    assert res is not None and res[0] == cdir / "step_00000001" and res[1]["step"] == 1
    assert _same(_weights(model), step1)
    assert len(lines) == 1 and "skipping checkpoint step_00000002" in lines[0]
    assert f"{name} does not match its sha256 digest" in lines[0]  # not a later load error
    assert "corrupt-step_00000002-1" in lines[0]
    kept = cdir / "corrupt-step_00000002-1"
    assert not bad.exists() and (kept / name).is_file()
    assert (cdir / "latest").read_text().strip() == "step_00000001"
    snapshot = {f.name: f.read_bytes() for f in kept.rglob("*") if f.is_file()}

    for step in (2, 3, 4):  # the run goes on; the kept one is neither overwritten nor pruned
        _save(run, step, cfg, model, opt, keep_last=1)
    assert sorted(p.name for p in cdir.iterdir()) == [
        "corrupt-step_00000002", "corrupt-step_00000002-1", "latest", "step_00000004"]
    assert {f.name: f.read_bytes() for f in kept.rglob("*") if f.is_file()} == snapshot
    res, lines = _resume(run, model, opt)
    assert res is not None and res[0] == cdir / "step_00000004" and not lines


def test_intact_but_incompatible_is_not_quarantined(tmp_path: Path) -> None:
    """Resuming into a model of another config (same tensor names, other shapes: DCP fails
    inside its collective) raises at once, naming the checkpoint; nothing is renamed."""
    cfg, model, opt = _model_opt()
    run = tmp_path / "run"
    _save(run, 1, cfg, model, opt)
    _save(run, 2, cfg, model, opt)
    _, other, other_opt = _model_opt("model.ffn_hidden=32")
    with pytest.raises(CheckpointError, match=r"step_00000002: .*cannot load.*not renamed"):
        _resume(run, other, other_opt)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest", "step_00000001", "step_00000002"]


def test_all_corrupt_raises_naming_them(tmp_path: Path) -> None:
    cfg, model, opt = _model_opt()
    run = tmp_path / "run"
    for step, name in ((1, "state.pt"), (2, "shards/__0_0.distcp")):
        _flip(_save(run, step, cfg, model, opt) / name)
    with pytest.raises(CheckpointError, match=r"refusing to start from step 0") as ei:
        _resume(run, model, opt)
    msg = str(ei.value)
    assert "step_00000002: " in msg and "__0_0.distcp" in msg
    assert "step_00000001: " in msg and "state.pt" in msg
    cdir = run / "checkpoints"
    assert sorted(p.name for p in cdir.iterdir()) == [
        "corrupt-step_00000001", "corrupt-step_00000002", "latest"]
    with pytest.raises(CheckpointError, match=r"corrupt-step_00000001.*refusing to start"):
        _resume(run, model, opt)  # a second start does not begin from step 0 either
    assert ck.resume_checkpoint(tmp_path / "fresh", lambda p, s: None) is None


def test_format1_checkpoint_needs_trust(tmp_path: Path) -> None:
    from sleeptrain.api import load_run
    from sleeptrain.train.dist_ckpt import load_model_weights

    cfg, model, opt = _model_opt()
    run = tmp_path / "run"
    ckpt = _save(run, 1, cfg, model, opt)
    saved = _weights(model)
    _to_format1(ckpt)
    with pytest.raises(UntrustedCheckpointError, match=r"step_00000001.*no valid digest"):
        _resume(run, model, opt)
    assert ckpt.is_dir()  # refused, not quarantined: a trusted start can still use it
    for load in (lambda: load_model_weights(ckpt, model), lambda: ck.load_checkpoint(ckpt),
                 lambda: load_run(run, device="cpu")):
        with pytest.raises(UntrustedCheckpointError, match="trust=True"):
            load()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    res, lines = _resume(run, model, opt, trust=True)
    assert res is not None and res[0] == ckpt and not lines and _same(_weights(model), saved)
    _, loaded, _ = load_run(run, device="cpu", trust=True)
    assert _same(_weights(loaded), saved)
    _rewrite_meta(ckpt, lambda m: m["files"].update({"state.pt": "0" * 64}))
    with pytest.raises(CheckpointError, match=r"state\.pt fails its sha256"):
        ck.load_checkpoint(ckpt, trust=True)  # what format 1 records is still checked


def test_load_run_falls_back_without_renaming(tmp_path: Path, capsys: Any) -> None:
    from sleeptrain.api import load_run

    cfg, model, opt = _model_opt()
    run = tmp_path / "run"
    _save(run, 1, cfg, model, opt)
    step1 = _weights(model)
    _flip(_save(run, 2, cfg, model, opt) / "shards" / "__0_0.distcp")
    _, loaded, path = load_run(run, device="cpu")
    assert path == run / "checkpoints" / "step_00000001" and _same(_weights(loaded), step1)
    assert "skipping checkpoint step_00000002" in capsys.readouterr().err
    assert (run / "checkpoints" / "step_00000002").is_dir()  # eval renames nothing


# ----------------------------------------------------------------------------- bench tool


def _written_dir(root: Path) -> Path:
    """A directory as another library writes it (files at two depths), with its record."""
    (root / "sub").mkdir(parents=True)
    (root / "model_states.pt").write_bytes(os.urandom(5000))
    (root / "sub" / "optim_0.pt").write_bytes(os.urandom(300))
    (root / "empty").write_bytes(b"")
    assert ck.record_dir_digests(root) == 5300
    return root


def test_directory_record_names_every_change(tmp_path: Path) -> None:
    # the digest record of DeepSpeed's checkpoint directories: every kind of change to the
    # files is named, before anything is read as a pickle
    from sleeptrain.train.checkpoint import CorruptCheckpointError

    root = _written_dir(tmp_path / "d")
    ck.verify_dir_digests(root)
    record = json.loads((root / ck.DIR_DIGESTS_FILE).read_text())
    assert sorted(record["sizes"]) == ["empty", "model_states.pt", "sub/optim_0.pt"]
    data = bytearray((root / "sub" / "optim_0.pt").read_bytes())
    data[7] ^= 0x20
    (root / "sub" / "optim_0.pt").write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"sub/optim_0.pt does not match its "
                       rf"sha256 digest in {ck.DIR_DIGESTS_FILE}"):
        ck.verify_dir_digests(root, trust=True)  # trust never waives a mismatch
    cases = {"added": lambda r: (r / "sub" / "optim_1.pt").write_bytes(b"x"),
             "removed": lambda r: (r / "empty").unlink(),
             "resized": lambda r: (r / "model_states.pt").write_bytes(b"short")}
    want = {"added": r"sub/optim_1.pt is not in", "removed": r"empty is missing",
            "resized": r"model_states.pt has 5 bytes, \S+ records 5000"}
    for name, change in cases.items():
        root = _written_dir(tmp_path / name)
        change(root)
        with pytest.raises(CorruptCheckpointError, match=want[name]):
            ck.verify_dir_digests(root)
    root = _written_dir(tmp_path / "garbled")
    (root / ck.DIR_DIGESTS_FILE).write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="is unreadable"):
        ck.verify_dir_digests(root)


def test_directory_without_record_needs_trust(tmp_path: Path) -> None:
    root = _written_dir(tmp_path / "d")
    (root / ck.DIR_DIGESTS_FILE).unlink()
    with pytest.raises(UntrustedCheckpointError, match=rf"no {ck.DIR_DIGESTS_FILE} in it.*"
                       "--trust-checkpoint"):
        ck.verify_dir_digests(root)
    ck.verify_dir_digests(root, trust=True)
    for bad in ({"sizes": {}, "digests": "none"},
                {"sizes": {"empty": "0"}, "digests": {"algo": "sha256", "chunk_bytes": 4096,
                                                      "files": {"empty": "0" * 64}}}):
        (root / ck.DIR_DIGESTS_FILE).write_text(json.dumps(bad))
        with pytest.raises(UntrustedCheckpointError, match="holds no valid digest record"):
            ck.verify_dir_digests(root)


@pytest.mark.parametrize("warmup", [["--no-hash", "--repeat", "2", "--load-pairs", "0"],
                                    ["--no-warmup", "--digests-first", "--cold",
                                     "--load-pairs", "2"]])
def test_bench_tool_runs_on_cpu(tmp_path: Path, warmup: list[str]) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "tools/bench_ckpt.py", str(out), "--device", "cpu",
                           *TINY, *warmup], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    cold = "--cold" in warmup
    assert ("untimed first save" in proc.stdout) != cold
    # --cold: the cache is dropped before the four loads (two pairs) and the hash pass
    assert proc.stdout.count("after dropping") == (5 if cold else 0)
    if Path("/proc/self/io").exists():  # each load's bytes read, as multiples of its size
        assert proc.stdout.count("read calls returned") == (4 if cold else 0)
    kinds = [line.split()[1:3] for line in proc.stdout.splitlines() if line.startswith("repeat ")]
    assert kinds == ([["0:", k] for k in ("save_digests", "load_plain", "load_verified",
                                           "load_verified", "load_plain", "hash_only",
                                           "save_plain")]
                     if cold else  # --no-hash, saves only, both orders
                     [["0:", "save_plain"], ["0:", "save_digests"],
                      ["1:", "save_digests"], ["1:", "save_plain"]])
    assert proc.stdout.count("the writer waited") == (1 if cold else 2)  # each digest save
    res = json.loads((out / "bench_ckpt.json").read_text())
    assert res["bytes"] > 0 and res["algo"] == "sha256"
    assert len(res["seconds"]["save_hash_wait"]) == len(res["seconds"]["save_digests"])
    assert set(res["ratio"]) == ({"save", "load"} if cold else {"save"})
    assert all(v > 0 for v in res["ratio"].values())
    assert "| save |" in proc.stdout and ("| load |" in proc.stdout) == cold
    assert sorted(p.name for p in out.iterdir()) == ["bench_ckpt.json"]  # checkpoints removed


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_ckpt", ROOT / "tools" / "bench_ckpt.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux-only")
def test_bench_tool_drops_the_page_cache(tmp_path: Path) -> None:
    """--cold's measurement and eviction: a file just read is wholly cached (mincore), and
    after the drop none of it is, except on a memory file system (where the file is the
    cache and DONTNEED keeps it)."""
    bench = _bench_module()
    f = tmp_path / "d" / "x.bin"
    f.parent.mkdir()
    f.write_bytes(os.urandom(1 << 20))
    f.read_bytes()
    assert bench.cached_fraction(f.parent) == 1.0
    after = bench.drop_page_cache(f.parent)
    assert after == (1.0 if bench._on_tmpfs(f) else 0.0)
    assert f.stat().st_size == 1 << 20


def test_bench_tool_builds_the_state_of_one_step_in_chunks() -> None:
    """bench_ckpt's optimizer state, built over parameter groups (so a 7B model's gradients
    never all exist), is that of one step over every parameter: each parameter stepped once
    (weight decay applied once, AdamW's step count 1), none left without state."""
    from sleeptrain.train.optim import optimizer_for
    from tests.conftest import tiny_model

    bench = _bench_module()
    runs = []
    for chunk in (2**40, 1):  # all at once; one parameter per group
        cfg, model = tiny_model("optim.weight_decay=0.1")
        opt = optimizer_for(cfg, model)
        groups = bench.fill_optimizer_state(model, opt, chunk)
        runs.append((groups, _weights(model), opt.state_dict()))
    (one, w1, sd1), (many, w2, sd2) = runs
    assert one == 1 and many == len(w1) > 1
    assert _same(w1, w2)
    assert sum(len(sd1[part]["state"]) for part in ("muon", "adamw")) == len(w1)
    for part in ("muon", "adamw"):
        s1, s2 = sd1[part]["state"], sd2[part]["state"]
        assert s1.keys() == s2.keys()
        for i in s1:
            assert s1[i].keys() == s2[i].keys()
            for k in s1[i]:
                assert torch.equal(torch.as_tensor(s1[i][k]), torch.as_tensor(s2[i][k])), (i, k)
        if part == "adamw":
            assert all(float(v["step"]) == 1.0 for v in s2.values())


# ----------------------------------------------------------------------------- two ranks


@pytest.mark.slow
def test_two_ranks_fall_back_together(tmp_path: Path) -> None:
    """TP=2 over 2 gloo ranks: rank 1's shard file of the newest checkpoint is corrupted; rank
    1 verifies it (the file its writer rank wrote), and both ranks fall back to the previous
    checkpoint with that checkpoint's weights."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "tests.test_ckpt_integrity",
                           str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in res:
        assert r["path"].endswith("checkpoints/step_00000001") and r["step"] == 1
        assert r["weights_are_step1"]
    assert len(res[0]["lines"]) == 1 and not res[1]["lines"]
    assert "shards/__1_0.distcp does not match" in res[0]["lines"][0]
    cdir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in cdir.iterdir()) == ["corrupt-step_00000002", "latest",
                                                      "step_00000001"]
    ckpt = cdir / "step_00000001"  # both ranks' shard files have digests
    on_disk = {str(f.relative_to(ckpt)) for f in ckpt.rglob("*") if f.is_file()} - {"meta.json"}
    assert {"shards/__0_0.distcp", "shards/__1_0.distcp"} <= on_disk
    assert set(json.loads((ckpt / "meta.json").read_text())["digests"]["files"]) == on_disk


def _worker(work: Path) -> None:
    import torch.distributed as dist

    from sleeptrain.parallel import init_parallel

    init_parallel(tp=2, backend="gloo", device="cpu")
    rank = dist.get_rank()
    cfg, model, opt = _model_opt("parallel.tp=2")
    run = work / "run"
    _save(run, 1, cfg, model, opt)
    step1 = _weights(model)
    bad = _save(run, 2, cfg, model, opt)
    dist.barrier()
    if rank == 0:
        _flip(bad / "shards" / "__1_0.distcp")
    dist.barrier()
    res, lines = _resume(run, model, opt)
    assert res is not None
    (work / f"rank{rank}.json").write_text(json.dumps({
        "path": str(res[0]), "step": res[1]["step"], "lines": lines,
        "weights_are_step1": _same(_weights(model), step1)}))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
