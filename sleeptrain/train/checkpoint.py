"""Atomic, resumable training checkpoints.

Layout under ``RUN_DIR/checkpoints/``::

    step_00000123/state.pt     torch.save of the state dict
    step_00000123/meta.json    {'step', 'time', 'files': {name: sha256}, 'sizes': {name: bytes},
                                'complete': true, 'format': 1}   (written last)
    step_00000123/<extra>      optional extra files (e.g. config.yaml)
    step_00000123/shards/      sharded model/optimizer tensors written by every rank
                               (sleeptrain.train.dist_ckpt); meta.json records their sizes
    latest                     text file holding the name of the newest saved directory

A checkpoint is written into ``.tmp-step_00000123-<pid>/`` (every file fsynced, meta.json last),
renamed to its final name (atomic on POSIX) and the parent directory fsynced; only then is
``latest`` replaced (write to a temporary file + ``os.replace``) and are old checkpoints pruned.
A crash at any point therefore leaves either the previous checkpoint set or the new one, plus
at most a ``.tmp-*`` directory that readers ignore and :func:`cleanup_stale_tmp` removes.

Saving is meant to be done by one process per run directory; concurrent writers (e.g. on two
hosts sharing a file system) are not supported.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "SaveInfo",
    "capture_rng_state",
    "checkpoint_step",
    "cleanup_stale_tmp",
    "find_latest_checkpoint",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "tmp_dir_for",
    "validate_checkpoint",
]

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 1
STALE_TMP_AGE_S = 3600.0

_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_RE = re.compile(r"^\.tmp-.*-(\d+)(?:-old)?$")
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, found, validated or loaded; the message names the path
    and the cause."""


@dataclass(frozen=True)
class SaveInfo:
    """Result of :func:`save_checkpoint`: final directory, bytes written, wall seconds taken."""

    path: Path
    bytes: int
    seconds: float


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """Return the step encoded in a checkpoint directory name (``step_00000123`` -> 123)."""
    m = _STEP_RE.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path}: not a checkpoint directory name (expected step_NNNNNNNN)")
    return int(m.group(1))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_bytes_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    state: dict[str, Any],
    keep_last: int,
    extra_files: dict[str, bytes | str] | None = None,
    prepared: Path | None = None,
) -> SaveInfo:
    """Atomically write ``state`` (and ``extra_files``) as the checkpoint for ``step``.

    After the new checkpoint is complete and ``latest`` points to it, checkpoints with a smaller
    step are deleted except the ``keep_last - 1`` newest complete ones (complete checkpoints
    with a larger step, left by an abandoned run branch, are not touched). An existing
    checkpoint for the same step is replaced. Returns a :class:`SaveInfo`.

    ``prepared``: a temporary directory (from :func:`tmp_dir_for`) that other processes have
    already filled (the ``shards/`` of a sharded checkpoint); it is finalized with the rest,
    its files' sizes recorded in meta.json (not their sha256: they can be many GB).
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{run_dir}: step must be an int >= 0, got {step!r}")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise CheckpointError(f"{run_dir}: keep_last must be an int >= 1, got {keep_last!r}")
    if not isinstance(state, dict):
        raise CheckpointError(f"{run_dir}: state must be a dict, got {type(state).__name__}")
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if (
            name in (STATE_FILE, META_FILE)
            or not name
            or name.startswith(".")
            or "/" in name
            or os.sep in name
        ):
            raise CheckpointError(f"{run_dir}: invalid extra file name {name!r}")

    ckpt_dir = run_dir / CHECKPOINTS_DIR
    name = _step_name(step)
    final = ckpt_dir / name
    tmp = prepared if prepared is not None else tmp_dir_for(run_dir, step)
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if prepared is None:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        elif not prepared.is_dir():
            raise CheckpointError(f"{prepared}: prepared checkpoint directory is missing")
        sized = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
        for f in sized:
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        for d in {(tmp / f).parent for f in sized}:
            _fsync_dir(d)
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        for fname, content in extra_files.items():
            data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
            _write_bytes_synced(tmp / fname, data)
        files = [STATE_FILE, *extra_files]
        meta = {
            "step": step,
            "time": time.time(),
            "files": {f: _sha256(tmp / f) for f in files},
            "sizes": {f: (tmp / f).stat().st_size for f in [*sized, *files]},
            "complete": True,
            "format": FORMAT_VERSION,
        }
        _write_bytes_synced(tmp / META_FILE, json.dumps(meta, indent=1, sort_keys=True).encode())
        _fsync_dir(tmp)

        old = None
        if final.exists():
            old = ckpt_dir / f".tmp-{name}-{os.getpid()}-old"
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(ckpt_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

        latest_tmp = ckpt_dir / f".tmp-latest-{os.getpid()}"
        _write_bytes_synced(latest_tmp, (name + "\n").encode())
        os.replace(latest_tmp, ckpt_dir / LATEST_FILE)
        _fsync_dir(ckpt_dir)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{final}: saving failed: {type(e).__name__}: {e}") from e

    _prune(ckpt_dir, step, keep_last)
    return SaveInfo(path=final, bytes=checkpoint_bytes(final), seconds=time.perf_counter() - t0)


def checkpoint_bytes(path: str | os.PathLike[str]) -> int:
    """Size of a complete checkpoint directory: the files its meta.json lists (state.pt,
    extra files, every rank's shards) plus meta.json itself."""
    meta_file = Path(path) / META_FILE
    meta = json.loads(meta_file.read_text())
    return sum(meta["sizes"].values()) + meta_file.stat().st_size


def tmp_dir_for(run_dir: str | os.PathLike[str], step: int) -> Path:
    """The temporary directory this process writes checkpoint ``step`` into."""
    return Path(run_dir) / CHECKPOINTS_DIR / f".tmp-{_step_name(step)}-{os.getpid()}"


def _step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """All ``step_*`` directories, newest step first."""
    out = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m is not None and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out, key=lambda t: t[0], reverse=True)


def _prune(ckpt_dir: Path, new_step: int, keep_last: int) -> None:
    """Delete checkpoints older than ``new_step`` beyond the ``keep_last`` newest complete ones
    (incomplete older directories are deleted too); never the one ``latest`` names."""
    protected = _read_latest_name(ckpt_dir)
    kept = 1  # the new checkpoint
    for step, path in _step_dirs(ckpt_dir):
        if step >= new_step or path.name == protected:
            continue
        complete = _problem(path, verify=False) is None
        if complete and kept < keep_last:
            kept += 1
            continue
        shutil.rmtree(path, ignore_errors=True)


def _read_latest_name(ckpt_dir: Path) -> str | None:
    try:
        return (ckpt_dir / LATEST_FILE).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _problem(path: Path, verify: bool) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None if it is."""
    if _STEP_RE.match(path.name) is None:
        return "directory name is not step_NNNNNNNN"
    if not path.is_dir():
        return "not a directory"
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        return f"{META_FILE} is missing"
    except (OSError, ValueError) as e:
        return f"{META_FILE} is unreadable: {e}"
    if not isinstance(meta, dict) or meta.get("complete") is not True:
        return f"{META_FILE} does not mark the checkpoint complete"
    if meta.get("step") != checkpoint_step(path):
        return f"{META_FILE} step {meta.get('step')!r} does not match the directory name"
    files, sizes = meta.get("files"), meta.get("sizes", {})
    if not isinstance(files, dict) or STATE_FILE not in files or not isinstance(sizes, dict):
        return f"{META_FILE} does not list {STATE_FILE}"
    for fname in [*files, *(f for f in sizes if f not in files)]:
        fpath = path / fname
        if not fpath.is_file():
            return f"{fname} is missing"
        if fname in sizes and fpath.stat().st_size != sizes[fname]:
            return f"{fname} has {fpath.stat().st_size} bytes, expected {sizes[fname]}"
        if verify and fname in files and _sha256(fpath) != files[fname]:
            return f"{fname} fails its sha256 check"
    return None


def validate_checkpoint(path: str | os.PathLike[str], *, verify: bool = True) -> None:
    """Raise CheckpointError (naming ``path`` and the reason) unless ``path`` is a complete
    checkpoint: meta.json marks it complete, every listed file exists with the recorded size,
    and (``verify=True``) its sha256 matches."""
    reason = _problem(Path(path), verify)
    if reason is not None:
        raise CheckpointError(f"{path}: incomplete or corrupt checkpoint: {reason}")


def find_latest_checkpoint(run_dir: str | os.PathLike[str], *, verify: bool = True) -> Path | None:
    """Return the checkpoint to resume from, or None if there is no complete one.

    The directory named by ``checkpoints/latest`` is used if it is complete (see
    :func:`validate_checkpoint`); otherwise ``step_*`` directories are tried by descending step
    and the first complete one is returned. ``.tmp-*`` directories are never considered.
    """
    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
    if not ckpt_dir.is_dir():
        return None
    latest = _read_latest_name(ckpt_dir)
    if latest is not None and _STEP_RE.match(latest):
        if _problem(ckpt_dir / latest, verify) is None:
            return ckpt_dir / latest
    for _, path in _step_dirs(ckpt_dir):
        if path.name != latest and _problem(path, verify) is None:
            return path
    return None


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load the state dict of a checkpoint (directory or its ``state.pt``) with
    ``torch.load(weights_only=True)``; any failure raises CheckpointError naming the file."""
    p = Path(path)
    file = p / STATE_FILE if p.is_dir() else p
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot load checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: checkpoint holds a {type(state).__name__}, not a dict")
    return state


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale_tmp(
    run_dir: str | os.PathLike[str], max_age_s: float = STALE_TMP_AGE_S
) -> list[Path]:
    """Remove ``checkpoints/.tmp-*`` leftovers whose writer pid is not alive on this host or
    that are older than ``max_age_s``; return the removed paths."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
    if not ckpt_dir.is_dir():
        return []
    removed = []
    now = time.time()
    for p in ckpt_dir.iterdir():
        m = _TMP_RE.match(p.name)
        if m is None:
            continue
        try:
            age = now - p.lstat().st_mtime
        except FileNotFoundError:
            continue
        if _pid_alive(int(m.group(1))) and age <= max_age_s:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the python ``random``, numpy global, torch CPU and (if available) every CUDA
    device's generator state, using only types ``torch.load(weights_only=True)`` accepts."""
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": [int(k) for k in np_state["state"]["key"]],
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": [],
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generators from :func:`capture_rng_state` output (tensors may be on any device,
    e.g. after ``load_checkpoint(map_location='cuda')``). CUDA states are restored for the
    devices present in both the snapshot and this process (extra entries are ignored)."""
    try:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        npd = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": npd["bit_generator"],
                "state": {
                    "key": np.asarray(npd["key"], dtype=np.uint32),
                    "pos": int(npd["pos"]),
                },
                "has_gauss": int(npd["has_gauss"]),
                "gauss": float(npd["gauss"]),
            }
        )
        torch.set_rng_state(state["torch_cpu"].cpu())
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"invalid RNG state: {type(e).__name__}: {e}") from e
    cuda_states = state.get("torch_cuda") or []
    if cuda_states and torch.cuda.is_available():
        for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), device=i)
