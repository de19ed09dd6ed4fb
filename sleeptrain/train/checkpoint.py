"""Atomic, resumable, verified training checkpoints.

Layout under ``RUN_DIR/checkpoints/``::

    step_00000123/state.pt     torch.save of the state dict
    step_00000123/meta.json    {'step', 'time', 'complete': true, 'format': 2,
                                'sizes': {name: bytes},
                                'digests': {'algo': 'sha256', 'chunk_bytes': C,
                                            'files': {name: hex}}}   (written last)
    step_00000123/<extra>      optional extra files (e.g. config.yaml)
    step_00000123/shards/      sharded model/optimizer tensors written by every rank
                               (sleeptrain.train.dist_ckpt): ``__<rank>_<i>.distcp`` files and
                               DCP's ``.metadata``
    latest                     text file holding the name of the newest saved directory
    corrupt-step_00000123[-k]  a checkpoint that failed verification on resume, kept for
                               inspection; never loaded, pruned, overwritten or named by latest

Digests. ``meta.json`` records a digest of *every* file of the checkpoint (names relative to
the checkpoint directory, e.g. ``shards/__0_0.distcp``). A file's digest is
``H(H(c_0) || H(c_1) || ...)`` over its consecutive ``chunk_bytes`` chunks ``c_i`` (one, empty,
chunk for an empty file), ``H`` = ``algo`` (sha256: OpenSSL uses the CPU's SHA extensions);
the chunks are hashed in parallel threads, so one large shard file does not hash at one core's
speed. Every rank hashes the shard files it writes from the bytes as they are written
(:class:`StreamDigest`; no second read) and rank 0 gathers the digests into meta.json
(:mod:`sleeptrain.train.dist_ckpt`).

Verification. :func:`load_verified` (and :func:`resume_checkpoint`, which walks the run's
checkpoints newest first and falls back) checks, before anything is unpickled, that the
checkpoint is complete and that the small files (state.pt, ``shards/.metadata``, extra files)
match their digests; the ``.distcp`` shard files are hashed from the bytes the load reads
(:class:`ReadDigest`, fed by ``dist_ckpt.SafeFileSystemReader``; what the load does not read is
hashed from the files afterwards), split over the ranks (each rank the files its writer rank
wrote, the rest round-robin), and the verdict is gathered so every rank decides the same before
training continues. A checkpoint without a valid digest record (format 1, written before
digests existed, or a meta.json without them) is refused unless the caller passes
``trust=True``.

A checkpoint is written into ``.tmp-step_00000123-<pid>/`` (every file fsynced, meta.json last),
renamed to its final name (atomic on POSIX) and the parent directory fsynced; only then is
``latest`` replaced (write to a temporary file + ``os.replace``) and are old checkpoints pruned.
A crash at any point therefore leaves either the previous checkpoint set or the new one, plus
at most a ``.tmp-*`` directory that readers ignore and :func:`cleanup_stale_tmp` removes.

Saving is meant to be done by one process per run directory; concurrent writers (e.g. on two
hosts sharing a file system) are not supported.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DIR_DIGESTS_FILE",
    "CheckpointError",
    "CorruptCheckpointError",
    "DigestRecord",
    "ReadDigest",
    "SaveInfo",
    "StreamDigest",
    "UntrustedCheckpointError",
    "capture_rng_state",
    "checkpoint_step",
    "cleanup_stale_tmp",
    "digest_files",
    "find_latest_checkpoint",
    "hash_threads",
    "load_checkpoint",
    "load_verified",
    "publish",
    "quarantine_dir",
    "read_digest_for",
    "record_dir_digests",
    "restore_rng_state",
    "resume_checkpoint",
    "resume_in_order",
    "save_checkpoint",
    "step_dirs",
    "tmp_dir_for",
    "validate_checkpoint",
    "verify_dir_digests",
    "write_latest",
]

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 2
STALE_TMP_AGE_S = 3600.0
#: digest algorithm of new checkpoints (measured: docs/design.md, "Checkpoints")
DIGEST_ALGO = "sha256"
#: bytes per hashed chunk: the unit of parallelism (threads, ranks), and the most a write or a
#: read waits for one thread's hash of its buffer's last chunk (docs/design.md, "Digests")
DIGEST_CHUNK = 1 << 20
#: algorithms a digest record may name (collision-resistant ones only)
DIGEST_ALGOS = frozenset({"sha256", "sha512", "blake2b", "sha3_256"})
CORRUPT_PREFIX = "corrupt-"
DCP_METADATA = "shards/.metadata"

_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_RE = re.compile(r"^\.tmp-.*-(\d+)(?:-old)?$")
_SHARD_FILE_RE = re.compile(r"^shards/__(\d+)_\d+\.distcp$")
_CHUNK = 1 << 22
_tls = threading.local()


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, found, validated or loaded; the message names the path
    and the cause."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint is damaged: incomplete (a file missing or of the wrong size, meta.json
    unreadable) or a file does not match its digest. :func:`resume_checkpoint` falls back."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint has no valid digest record (format 1, or meta.json without digests): its
    files cannot be verified, so it is loaded only with ``trust=True``."""


@dataclass(frozen=True)
class SaveInfo:
    """Result of :func:`save_checkpoint`: final directory, bytes written, wall seconds taken."""

    path: Path
    bytes: int
    seconds: float


@dataclass(frozen=True)
class DigestRecord:
    """meta.json's ``digests``: algorithm, chunk size and one hex digest per file (names
    relative to the checkpoint directory)."""

    algo: str
    chunk_bytes: int
    files: dict[str, str]


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """Return the step encoded in a checkpoint directory name (``step_00000123`` -> 123)."""
    m = _STEP_RE.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path}: not a checkpoint directory name (expected step_NNNNNNNN)")
    return int(m.group(1))


def _fsync_path(path: Path) -> None:
    """fsync of a file or a directory (opened read-only: both sync that way)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    """Plain sha256 of a whole file (what format-1 meta.json records for state.pt)."""
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


# ----------------------------------------------------------------------------- digests


def hash_threads() -> int:
    """Threads one process hashes with: the CPU cores it may run on divided by the processes of
    this host (``LOCAL_WORLD_SIZE`` under torchrun), between 1 and 32."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(32, cores // local))


def _chunks(size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of the chunks a file of ``size`` bytes is hashed in."""
    if size == 0:
        return [(0, 0)]
    return [(o, min(chunk_bytes, size - o)) for o in range(0, size, chunk_bytes)]


def _bytes_digest(data: Any, algo: str) -> bytes:
    """``algo`` digest of the bytes-like ``data`` (hashlib releases the GIL while hashing)."""
    h = hashlib.new(algo)
    h.update(data)
    return h.digest()


def _chunk_digests(view: memoryview, chunk_bytes: int, algo: str) -> bytes:
    """The ``algo`` digests of ``view``'s consecutive ``chunk_bytes`` chunks, concatenated
    (:func:`_compose` hashes the parts' bytes in order, so one part may hold several)."""
    return b"".join(_bytes_digest(view[o:o + chunk_bytes], algo)
                    for o in range(0, len(view), chunk_bytes))


def _pread_exact(path: Path, offset: int, view: memoryview) -> None:
    """Fill ``view`` with the bytes of ``path`` from ``offset`` (preadv releases the GIL);
    CheckpointError if the file ends first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        got = 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise CheckpointError(f"{path}: ends at byte {offset + got}, "
                                      f"expected at least {offset + len(view)} bytes")
            got += n
    finally:
        os.close(fd)


def _chunk_digest(path: Path, offset: int, length: int, algo: str) -> bytes:
    """``algo`` digest of bytes [offset, offset + length) of ``path``, read into this thread's
    reused buffer (hashlib and preadv release the GIL, so threads hash in parallel)."""
    buf: bytearray | None = getattr(_tls, "buf", None)
    if buf is None or len(buf) < length:
        buf = _tls.buf = bytearray(length)
    view = memoryview(buf)[:length]
    _pread_exact(path, offset, view)
    return _bytes_digest(view, algo)


def _compose(algo: str, parts: Iterable[bytes]) -> str:
    h = hashlib.new(algo)
    for p in parts:
        h.update(p)
    return h.hexdigest()


def digest_files(root: str | os.PathLike[str], names: Sequence[str], *, algo: str = DIGEST_ALGO,
                 chunk_bytes: int = DIGEST_CHUNK, threads: int | None = None) -> dict[str, str]:
    """``{name: hex digest}`` of the files ``root / name`` (the chunked digest of the module
    docstring), computed in ``threads`` threads (default :func:`hash_threads`). A file that
    cannot be read raises CheckpointError naming it."""
    root = Path(root)
    sizes = {}
    for n in names:
        try:
            sizes[n] = (root / n).stat().st_size
        except OSError as e:
            raise CheckpointError(f"{root / n}: cannot hash: {e.strerror or e}") from e
    out = _Hashing(root, sizes, algo, chunk_bytes, threads).result()
    for name, d in out.items():
        if d.startswith("error: "):
            raise CheckpointError(f"{root / name}: cannot hash: {d.removeprefix('error: ')}")
    return out


class StreamDigest:
    """The chunked digest of :func:`digest_files` computed from the bytes as they are written
    (no second read of the file, no copy). :meth:`update` hashes the caller's buffer in
    ``pool`` straight from that buffer: its whole chunks in parallel, and the pieces of a chunk
    split between two buffers in order into that chunk's hash. It returns the futures that
    read the buffer; the caller waits for them (:meth:`wait`) before the buffer may change,
    typically while it writes the same buffer to the file. A buffer of at most :attr:`COPY`
    bytes is copied instead (``torch.save`` writes a few dozen zip headers of tens of bytes per
    tensor: handing each to a thread and waiting for it cost a thread round trip per header),
    the copies gathered and hashed together before the next larger buffer, with nothing to
    wait for. A large buffer's whole chunks go to the pool as at most :attr:`SPREAD` tasks of
    consecutive chunks (one task per 1 MiB chunk cost ~20 us of the writer's time each, ~1 s
    for a 7B checkpoint). Not thread-safe: one writer per instance."""

    COPY = 64 << 10
    SPREAD = 16  # two tasks for each of the 8 threads a save hashes in

    def __init__(self, pool: ThreadPoolExecutor, *, algo: str = DIGEST_ALGO,
                 chunk_bytes: int = DIGEST_CHUNK) -> None:
        self.pool, self.algo, self.chunk_bytes = pool, algo, chunk_bytes
        self.parts: list[Future[bytes]] = []
        self.fill = 0  # bytes of the chunk in progress
        self.hash: Any = None  # its hash object, fed by tasks in order
        self.last: Future[None] | None = None  # the latest of those tasks
        self.size = 0
        self.copied = bytearray()  # small buffers not yet handed to the pool, in order

    def update(self, data: Any) -> list[Future[Any]]:
        """Add ``data`` (bytes-like); returns the futures that still read ``data``."""
        view = memoryview(data).cast("B")
        self.size += len(view)
        if len(view) <= self.COPY:
            self.copied += view
            if len(self.copied) >= self.COPY:
                self._hand_over_copies()
            return []
        self._hand_over_copies()
        return self._hash(view)

    def _hand_over_copies(self) -> None:
        """The copied small buffers go to the pool (their tasks read an immutable copy that
        they keep alive: nothing to wait for)."""
        if self.copied:
            data, self.copied = bytes(self.copied), bytearray()
            self._hash(memoryview(data))

    def _hash(self, view: memoryview) -> list[Future[Any]]:
        """Hash ``view``'s bytes after everything before; the futures that read ``view``."""
        c = self.chunk_bytes
        reading: list[Future[Any]] = []
        if self.fill:  # the chunk an earlier buffer began
            take = min(c - self.fill, len(view))
            reading.append(self._feed(view[:take]))
            self.fill += take
            view = view[take:]
            if self.fill < c:
                return reading
            self._close()
        whole = len(view) // c
        if whole:
            tasks = min(whole, self.SPREAD)
            ends = [whole * t // tasks for t in range(tasks + 1)]  # chunk indices
            direct = [self.pool.submit(_chunk_digests, view[a * c:b * c], c, self.algo)
                      for a, b in itertools.pairwise(ends)]
            self.parts += direct
            reading += direct
        if rest := view[whole * c:]:
            reading.append(self._feed(rest))
            self.fill = len(rest)
        return reading

    @staticmethod
    def wait(futures: list[Future[Any]]) -> None:
        """Wait until ``futures`` (of :meth:`update`) no longer read their buffer."""
        for f in futures:
            f.exception()

    def _feed(self, piece: memoryview) -> Future[None]:
        """A task adding ``piece`` to the chunk in progress after the previous one (the tasks
        it waits for were submitted earlier, so a FIFO pool never deadlocks on them)."""
        if self.hash is None:
            self.hash = hashlib.new(self.algo)
        prev, h = self.last, self.hash

        def add() -> None:
            if prev is not None:
                prev.result()
            h.update(piece)

        self.last = self.pool.submit(add)
        return self.last

    def _close(self) -> None:
        """The chunk in progress is complete: its digest becomes the next part."""
        prev, h = self.last, self.hash or hashlib.new(self.algo)

        def digest() -> bytes:
            if prev is not None:
                prev.result()
            return h.digest()

        self.parts.append(self.pool.submit(digest))
        self.hash, self.last, self.fill = None, None, 0

    def update_from_file(self, path: Path, offset: int, length: int) -> None:
        """Add bytes [offset, offset + length) of the file ``path``: the whole chunks read and
        hashed by the pool (in parallel, nothing to wait for), the pieces of a chunk begun or
        left unfinished read here into buffers of their own."""
        self._hand_over_copies()
        c, end = self.chunk_bytes, offset + length
        while offset < end:
            if self.fill == 0 and end - offset >= c:
                self.parts.append(self.pool.submit(_chunk_digest, path, offset, c, self.algo))
                self.size += c
                offset += c
                continue
            piece = memoryview(bytearray(min(c - self.fill, end - offset)))
            _pread_exact(path, offset, piece)
            self.size += len(piece)
            self._hash(piece)  # its tasks keep the buffer alive
            offset += len(piece)

    def hexdigest(self) -> str:
        """The digest of everything written so far (call once, after the last write)."""
        self._hand_over_copies()
        if self.fill or not self.parts:  # the last, partial chunk; one empty chunk if empty
            self._close()
        return _compose(self.algo, [f.result() for f in self.parts])


class ReadDigest:
    """The chunked digest of one file taken from the reads of a loader (DCP reading a shard
    file), so that verifying a load reads nothing twice: bytes are hashed in file order from
    the loader's buffer as it reads them (:meth:`read` returns the futures still reading the
    buffer, as :meth:`StreamDigest.update` does). A read behind what is hashed is ignored; a
    small read ahead (a zip header or directory of ``torch.save``'s format, at most
    :attr:`SMALL` bytes) is left for later; a larger read ahead first reads the gap from the
    file (small, in the page cache, in a loader reading in file order). :meth:`hexdigest`
    reads what the loader never read."""

    SMALL = 4096

    def __init__(self, path: Path, size: int, pool: ThreadPoolExecutor, *, algo: str,
                 chunk_bytes: int) -> None:
        self.path, self.size = path, size
        self.stream = StreamDigest(pool, algo=algo, chunk_bytes=chunk_bytes)
        self.front = 0  # bytes [0, front) are hashed
        self.lock = threading.Lock()  # a loader reading one file in several threads

    def read(self, pos: int, data: Any) -> list[Future[Any]]:
        """The loader read ``data`` (bytes-like) at offset ``pos`` of the file; returns the
        futures that still read ``data`` (wait for them, :meth:`StreamDigest.wait`, before
        the buffer changes)."""
        view = memoryview(data).cast("B")
        end = pos + len(view)
        with self.lock:
            if end <= self.front:
                return []
            if pos > self.front:
                if len(view) <= self.SMALL:
                    return []
                self._from_file(pos)
            reading = self.stream.update(view[self.front - pos:])
            self.front = end
        return reading

    def finish(self) -> None:
        """After the loader's last read: hash what it never read (whole chunks in the pool)."""
        with self.lock:
            self._from_file(self.size)

    def _from_file(self, end: int) -> None:
        """Hash bytes [front, end) from the file (the lock held)."""
        if self.front < end:
            self.stream.update_from_file(self.path, self.front, end - self.front)
            self.front = end

    def hexdigest(self) -> str:
        """The file's digest (call once, after the loader's last read)."""
        self.finish()
        with self.lock:
            return self.stream.hexdigest()


#: the shard digests of the load_verified in progress in this context (read by the DCP reader)
_LOAD_DIGESTS: contextvars.ContextVar[_Hashing | None] = contextvars.ContextVar(
    "sleeptrain_load_digests", default=None)


class _Hashing:
    """The digests of the files ``root / name`` (``sizes``: name -> bytes), in threads: while
    :meth:`active`, the files a loader opens are hashed from its reads
    (:func:`read_digest_for`); :meth:`result` hashes the rest, and what the loader did not
    read, from the files."""

    def __init__(self, root: Path, sizes: dict[str, int], algo: str, chunk_bytes: int,
                 threads: int | None = None) -> None:
        self.root, self.sizes, self.algo, self.chunk_bytes = root, sizes, algo, chunk_bytes
        n_chunks = sum(len(_chunks(size, chunk_bytes)) for size in sizes.values())
        workers = max(1, min(threads or hash_threads(), n_chunks))
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="ckpt-hash")
        self.files: dict[str, ReadDigest] = {}

    def reader(self, path: Path) -> ReadDigest | None:
        """The digest fed by the reads of file ``path`` (None: not one of these files)."""
        try:
            name = Path(os.path.abspath(path)).relative_to(os.path.abspath(self.root)).as_posix()
        except ValueError:
            return None
        return self._file(name) if name in self.sizes else None

    def _file(self, name: str) -> ReadDigest:
        if name not in self.files:
            self.files[name] = ReadDigest(self.root / name, self.sizes[name], self.pool,
                                          algo=self.algo, chunk_bytes=self.chunk_bytes)
        return self.files[name]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        token = _LOAD_DIGESTS.set(self)
        try:
            yield
        finally:
            _LOAD_DIGESTS.reset(token)

    def result(self) -> dict[str, str]:
        """``{name: hex digest or 'error: ...'}`` of every file."""
        out: dict[str, str] = {}
        try:
            for name in self.sizes:  # every file's remaining chunks queued first
                try:
                    self._file(name).finish()
                except (OSError, CheckpointError) as e:
                    out[name] = f"error: {type(e).__name__}: {e}"
            for name in self.sizes:
                if name in out:
                    continue
                try:
                    out[name] = self._file(name).hexdigest()
                except (OSError, CheckpointError) as e:
                    out[name] = f"error: {type(e).__name__}: {e}"
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        return out

    def cancel(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def read_digest_for(path: str | os.PathLike[str]) -> ReadDigest | None:
    """The :class:`ReadDigest` the reads of file ``path`` feed, when a verified load
    (:func:`load_verified`) of its checkpoint is in progress in this context; else None."""
    digests = _LOAD_DIGESTS.get()
    return digests.reader(Path(path)) if digests is not None else None


def _digest_record(meta: dict[str, Any]) -> DigestRecord | None:
    """meta.json's digest record if it is valid (a known algorithm, a chunk size, a hex digest
    of the right length for every file meta.json lists), else None."""
    rec = meta.get("digests")
    sizes = meta.get("sizes")
    if not isinstance(rec, dict) or not isinstance(sizes, dict):
        return None
    algo, chunk, files = rec.get("algo"), rec.get("chunk_bytes"), rec.get("files")
    if algo not in DIGEST_ALGOS or isinstance(chunk, bool) or not isinstance(chunk, int):
        return None
    if chunk < 4096 or not isinstance(files, dict) or set(files) != set(sizes):
        return None
    width = 2 * hashlib.new(algo).digest_size
    for d in files.values():
        if not isinstance(d, str) or len(d) != width or d.strip("0123456789abcdef"):
            return None
    return DigestRecord(algo=algo, chunk_bytes=chunk, files=dict(files))


def _is_large(name: str) -> bool:
    """Whether ``name`` is a tensor shard file (verified from the reads of the load)
    rather than a small file verified before anything is unpickled."""
    return name.startswith("shards/") and name != DCP_METADATA


def _mismatches(record: DigestRecord, got: dict[str, str], where: str = META_FILE) -> list[str]:
    """Reasons, one per file of ``got`` that does not match ``record`` (read from ``where``),
    in name order."""
    out = []
    for name in sorted(got):
        d = got[name]
        if d.startswith("error: "):
            out.append(f"{name} cannot be read ({d.removeprefix('error: ')})")
        elif d != record.files[name]:
            out.append(f"{name} does not match its {record.algo} digest in {where} "
                       f"(recorded {record.files[name][:16]}..., found {d[:16]}...)")
    return out


# ----------------------------------------------------------------------------- collectives


def _dist() -> tuple[Any, int, int]:
    """(torch.distributed if several processes run else None, rank, world size)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def _all_gather(obj: Any) -> list[Any]:
    """Collective: every rank's ``obj`` (picklable, produced by this code), in rank order."""
    dist, _, world = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    """Collective: rank 0's ``obj`` on every rank."""
    dist, _, _ = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first(values: list[Any]) -> Any:
    return next((v for v in values if v), None)


# ----------------------------------------------------------------------------- saving


def _check_save_args(run_dir: Path, step: int, keep_last: int, state: Any,
                     extra_files: dict[str, bytes | str]) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{run_dir}: step must be an int >= 0, got {step!r}")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise CheckpointError(f"{run_dir}: keep_last must be an int >= 1, got {keep_last!r}")
    if not isinstance(state, dict):
        raise CheckpointError(f"{run_dir}: state must be a dict, got {type(state).__name__}")
    for name in extra_files:
        if (name in (STATE_FILE, META_FILE) or not name or name.startswith(".") or "/" in name
                or os.sep in name):
            raise CheckpointError(f"{run_dir}: invalid extra file name {name!r}")


def _fill_tmp(tmp: Path, step: int, state: dict[str, Any],
              extra_files: dict[str, bytes | str], digests: dict[str, str] | None,
              with_digests: bool) -> None:
    """Fsyncs what other processes wrote into ``tmp``, writes state.pt and the extra files,
    then meta.json (sizes and digests of every file) last."""
    sized = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
    for f in sized:
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())
    for d in {(tmp / f).parent for f in sized}:
        _fsync_path(d)
    with open(tmp / STATE_FILE, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    for fname, content in extra_files.items():
        data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        _write_bytes_synced(tmp / fname, data)
    files = [*sized, STATE_FILE, *extra_files]
    meta: dict[str, Any] = {
        "step": step,
        "time": time.time(),
        "sizes": {f: (tmp / f).stat().st_size for f in files},
        "complete": True,
        "format": FORMAT_VERSION,
    }
    if with_digests:
        given = {f: d for f, d in (digests or {}).items() if f in meta["sizes"]}
        todo = [f for f in files if f not in given]
        meta["digests"] = {"algo": DIGEST_ALGO, "chunk_bytes": DIGEST_CHUNK,
                           "files": {**given, **digest_files(tmp, todo)}}
    _write_bytes_synced(tmp / META_FILE, json.dumps(meta, indent=1, sort_keys=True).encode())
    _fsync_path(tmp)


def publish(tmp: Path, ckpt_dir: Path, name: str) -> None:
    """Renames the finished ``tmp`` to ``ckpt_dir/name`` (replacing a checkpoint of the same
    step) and points ``latest`` at it, each step fsynced."""
    final = ckpt_dir / name
    old = None
    if final.exists():
        old = ckpt_dir / f".tmp-{name}-{os.getpid()}-old"
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_path(ckpt_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    write_latest(ckpt_dir, name)


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    state: dict[str, Any],
    keep_last: int,
    extra_files: dict[str, bytes | str] | None = None,
    prepared: Path | None = None,
    digests: dict[str, str] | None = None,
    *,
    _digests: bool = True,
) -> SaveInfo:
    """Atomically write ``state`` (and ``extra_files``) as the checkpoint for ``step``.

    After the new checkpoint is complete and ``latest`` points to it, checkpoints with a smaller
    step are deleted except the ``keep_last - 1`` newest complete ones (complete checkpoints
    with a larger step, left by an abandoned run branch, and ``corrupt-*`` directories are not
    touched). An existing checkpoint for the same step is replaced. Returns a
    :class:`SaveInfo`.

    ``prepared``: a temporary directory (from :func:`tmp_dir_for`) that other processes have
    already filled (the ``shards/`` of a sharded checkpoint); it is finalized with the rest.
    ``digests``: the digests (:func:`digest_files`, names relative to ``prepared``) those
    processes computed of the files they wrote; every file not in it is hashed here. meta.json
    records the size and digest of every file. ``_digests=False`` (benchmarks and tests only)
    writes no digest record: such a checkpoint loads only with ``trust=True``.
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    extra_files = dict(extra_files or {})
    _check_save_args(run_dir, step, keep_last, state, extra_files)
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
        _fill_tmp(tmp, step, state, extra_files, digests, _digests)
        publish(tmp, ckpt_dir, name)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{final}: saving failed: {type(e).__name__}: {e}") from e

    _prune(ckpt_dir, step, keep_last)
    return SaveInfo(path=final, bytes=checkpoint_bytes(final), seconds=time.perf_counter() - t0)


def write_latest(ckpt_dir: Path, name: str) -> None:
    """Atomically (and durably) make ``ckpt_dir / latest`` name ``name``."""
    latest_tmp = ckpt_dir / f".tmp-latest-{os.getpid()}"
    _write_bytes_synced(latest_tmp, (name + "\n").encode())
    os.replace(latest_tmp, ckpt_dir / LATEST_FILE)
    _fsync_path(ckpt_dir)


def checkpoint_bytes(path: str | os.PathLike[str]) -> int:
    """Size of a complete checkpoint directory: the files its meta.json lists (state.pt,
    extra files, every rank's shards) plus meta.json itself."""
    meta_file = Path(path) / META_FILE
    meta = json.loads(meta_file.read_text())
    return sum(meta["sizes"].values()) + meta_file.stat().st_size


def tmp_dir_for(run_dir: str | os.PathLike[str], step: int) -> Path:
    """The temporary directory this process writes checkpoint ``step`` into."""
    return Path(run_dir) / CHECKPOINTS_DIR / f".tmp-{_step_name(step)}-{os.getpid()}"


def step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """All ``step_*`` directories, newest step first."""
    out = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m is not None and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out, key=lambda t: t[0], reverse=True)


def _prune(ckpt_dir: Path, new_step: int, keep_last: int) -> None:
    """Delete checkpoints older than ``new_step`` beyond the ``keep_last`` newest complete ones
    (incomplete older directories are deleted too); never the one ``latest`` names, never a
    ``corrupt-*`` directory (only ``step_*`` names are considered)."""
    protected = _read_latest_name(ckpt_dir)
    kept = 1  # the new checkpoint
    for step, path in step_dirs(ckpt_dir):
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


# ----------------------------------------------------------------------------- validation


def _complete(path: Path) -> tuple[dict[str, Any], None] | tuple[None, str]:
    """(meta.json's content, None) if ``path`` is a complete checkpoint -- meta.json marks it
    complete, names its step, lists state.pt, and every listed file exists with its recorded
    size -- else (None, why not)."""
    if _STEP_RE.match(path.name) is None:
        return None, "directory name is not step_NNNNNNNN"
    if not path.is_dir():
        return None, "not a directory"
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        return None, f"{META_FILE} is missing"
    except (OSError, ValueError) as e:
        return None, f"{META_FILE} is unreadable: {e}"
    if not isinstance(meta, dict) or meta.get("complete") is not True:
        return None, f"{META_FILE} does not mark the checkpoint complete"
    if meta.get("step") != checkpoint_step(path):
        return None, f"{META_FILE} step {meta.get('step')!r} does not match the directory name"
    files, sizes = meta.get("files", {}), meta.get("sizes", {})
    if not isinstance(files, dict) or not isinstance(sizes, dict):
        return None, f"{META_FILE} has malformed 'files'/'sizes' entries"
    if STATE_FILE not in files and STATE_FILE not in sizes:
        return None, f"{META_FILE} does not list {STATE_FILE}"
    for fname in [*files, *(f for f in sizes if f not in files)]:
        if not isinstance(fname, str) or fname.startswith("/") or ".." in fname.split("/"):
            return None, f"{META_FILE} lists an invalid file name {fname!r}"
        fpath = path / fname
        if not fpath.is_file():
            return None, f"{fname} is missing"
        if fname in sizes and fpath.stat().st_size != sizes[fname]:
            return None, f"{fname} has {fpath.stat().st_size} bytes, expected {sizes[fname]}"
    return meta, None


def _verify_local(path: Path, meta: dict[str, Any], large: bool) -> str | None:
    """Why the files of complete checkpoint ``path`` do not match meta.json, or None: with a
    digest record the small files (``large``: every file), else format 1's sha256 of state.pt
    and the extra files. Hashes in this process only."""
    record = _digest_record(meta)
    if record is not None:
        names = [n for n in sorted(record.files) if large or not _is_large(n)]
        got = _Hashing(path, {n: (path / n).stat().st_size for n in names}, record.algo,
                       record.chunk_bytes).result()
        bad = _mismatches(record, got)
        return "; ".join(bad) if bad else None
    for fname, want in meta.get("files", {}).items():
        if _sha256(path / fname) != want:
            return f"{fname} fails its sha256 check"
    return None


def _problem(path: Path, verify: bool, *, large: bool = False) -> str | None:
    """Why ``path`` is not a complete (``verify``: and intact) checkpoint, or None if it is."""
    meta, reason = _complete(path)
    if meta is None or not verify:
        return reason
    return _verify_local(path, meta, large)


def validate_checkpoint(path: str | os.PathLike[str], *, verify: bool = True,
                        shards: bool = True) -> None:
    """Raise CheckpointError (naming ``path`` and the reason) unless ``path`` is a complete
    checkpoint: meta.json marks it complete, every listed file exists with the recorded size,
    and (``verify=True``) its digests match -- of every file, or with ``shards=False`` of all
    but the ``.distcp`` shard files. Hashes in this process (threads), not collectively."""
    reason = _problem(Path(path), verify, large=shards)
    if reason is not None:
        raise CorruptCheckpointError(f"{path}: incomplete or corrupt checkpoint: {reason}")


def find_latest_checkpoint(run_dir: str | os.PathLike[str], *, verify: bool = True) -> Path | None:
    """Return the newest complete checkpoint, or None if there is none (no fallback on load
    errors, no renaming: :func:`resume_checkpoint` does that).

    The directory named by ``checkpoints/latest`` is used if it is complete (see
    :func:`validate_checkpoint`; ``verify`` checks the digests of its small files, not of the
    ``.distcp`` shards, which are verified when loaded); otherwise ``step_*`` directories are
    tried by descending step and the first complete one is returned. ``.tmp-*`` and
    ``corrupt-*`` directories are never considered.
    """
    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
    if not ckpt_dir.is_dir():
        return None
    latest = _read_latest_name(ckpt_dir)
    if latest is not None and _STEP_RE.match(latest):
        if _problem(ckpt_dir / latest, verify) is None:
            return ckpt_dir / latest
    for _, path in step_dirs(ckpt_dir):
        if path.name != latest and _problem(path, verify) is None:
            return path
    return None


# ----------------------------------------------------------------------------- loading


def _torch_load(file: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot load checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: checkpoint holds a {type(state).__name__}, not a dict")
    return state


def _untrusted(path: Path, meta: dict[str, Any] | None) -> UntrustedCheckpointError:
    what = (f"{META_FILE} (format {meta.get('format')!r}) has no valid digest record"
            if meta is not None else f"there is no {META_FILE} with digests next to it")
    return UntrustedCheckpointError(
        f"{path}: {what}, so its files cannot be verified before they are unpickled; refusing "
        f"to load it (pass trust=True, --trust-checkpoint, if you trust its source)")


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", *,
    trust: bool = False,
) -> dict[str, Any]:
    """Load the state dict of a checkpoint (directory or its ``state.pt``) with
    ``torch.load(weights_only=True)``, after checking the checkpoint is complete and its small
    files (state.pt, shard metadata, extra files) match meta.json's digests. A checkpoint
    without a valid digest record, or a ``.pt`` file outside a checkpoint directory, needs
    ``trust=True``. Any failure raises CheckpointError naming the file. Not collective; the
    ``.distcp`` shards are not read (see :func:`load_verified`)."""
    p = Path(path)
    ckpt = p if p.is_dir() else (p.parent if p.name == STATE_FILE
                                 and (p.parent / META_FILE).is_file() else None)
    file = p / STATE_FILE if p.is_dir() else p
    if ckpt is None:
        if not trust:
            raise _untrusted(file, None)
        return _torch_load(file, map_location)
    meta, reason = _complete(ckpt)
    if meta is not None:
        if _digest_record(meta) is None and not trust:
            raise _untrusted(ckpt, meta)
        reason = _verify_local(ckpt, meta, large=False)
    if reason is not None:
        raise CorruptCheckpointError(f"{ckpt}: incomplete or corrupt checkpoint: {reason}")
    return _torch_load(file, map_location)


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_verified(
    path: str | os.PathLike[str],
    load_fn: Callable[[Path, dict[str, Any]], None] | None = None,
    *,
    trust: bool = False,
    map_location: str | torch.device = "cpu",
    _verify: bool = True,
) -> dict[str, Any]:
    """Collective (every rank calls it): verify checkpoint directory ``path``, load its
    ``state.pt`` (weights_only) and call ``load_fn(path, state)`` (e.g. the collective model and
    optimizer load); return the state dict.

    Order: completeness and the digests of the small files (state.pt, ``shards/.metadata``,
    extra files) on every rank before anything is unpickled; then ``state.pt``; then the
    ``.distcp`` files (this rank's share) are hashed from the bytes ``load_fn``'s DCP loads
    read (:func:`read_digest_for`) and, after it, from the files where it read nothing;
    then every rank's digests and load errors are gathered, so all ranks raise the same
    error or none. Errors name the checkpoint and the file: CorruptCheckpointError when it is
    incomplete or a file does not match its digest; UntrustedCheckpointError when it has no
    valid digest record and not ``trust``; plain CheckpointError when its files are intact
    (or unverifiable) but it cannot be loaded (e.g. into a model of another config).
    ``_verify=False``: no digest checks (benchmarks only).
    """
    path = Path(path)
    _, rank, world = _dist()
    meta, reason = _complete(path)
    untrusted = False
    record = None
    if meta is not None:
        record = _digest_record(meta)
        if record is None and not trust:
            untrusted = True
            reason = str(_untrusted(path, meta))
        elif _verify:
            reason = _verify_local(path, meta, large=False)
    verdict = _first([(r, u) for r, u in _all_gather((reason, untrusted)) if r])
    if verdict is not None:
        if verdict[1]:
            raise UntrustedCheckpointError(verdict[0])
        raise CorruptCheckpointError(f"{path}: incomplete or corrupt checkpoint: {verdict[0]}")

    state: dict[str, Any] = {}
    err = None
    try:
        state = _torch_load(path / STATE_FILE, map_location)
    except CheckpointError as e:
        err = str(e)
    err = _first(_all_gather(err))
    if err is not None:
        raise CheckpointError(err)

    hashing = None
    if _verify and record is not None:
        large = [n for n in sorted(record.files) if _is_large(n)]
        mine = {n: (meta or {})["sizes"][n] for i, n in enumerate(large)
                if _owner(n, i, world) == rank}
        hashing = _Hashing(path, mine, record.algo, record.chunk_bytes)
    err = None
    try:
        if load_fn is not None:
            with hashing.active() if hashing is not None else contextlib.nullcontext():
                load_fn(path, state)
    except CheckpointError as e:
        err = _one_line(str(e))
    except BaseException:
        if hashing is not None:
            hashing.cancel()
        raise
    got = hashing.result() if hashing is not None else {}
    gathered = _all_gather((got, err))
    bad = _mismatches(record, {k: v for g, _ in gathered for k, v in g.items()}) if record else []
    errors = sorted({e for _, e in gathered if e})
    if bad:
        detail = "; ".join([*bad, *(f"(the load failed too: {e})" for e in errors)])
        raise CorruptCheckpointError(f"{path}: corrupt checkpoint: {detail}")
    if errors:
        raise CheckpointError(f"{path}: cannot load it: {'; '.join(errors)}")
    return state


def _owner(name: str, index: int, world: int) -> int:
    """The rank that verifies file ``name`` (``index``-th large file): the rank that wrote a
    ``shards/__<r>_<i>.distcp`` file (r modulo the world size: its load reads that file, so the
    pages are shared), any other file round-robin."""
    m = _SHARD_FILE_RE.match(name)
    return int(m.group(1)) % world if m else index % world


def _candidates(ckpt_dir: Path) -> tuple[list[str], list[str]]:
    """(checkpoint directory names to try, newest first: the one ``latest`` names, then every
    ``step_*`` by descending step; what shows the run had checkpoints: ``latest``, step and
    ``corrupt-*`` directories)."""
    if not ckpt_dir.is_dir():
        return [], []
    latest = _read_latest_name(ckpt_dir)
    steps = [p.name for _, p in step_dirs(ckpt_dir)]
    order = ([latest] if latest in steps else []) + [n for n in steps if n != latest]
    evidence = sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith(CORRUPT_PREFIX))
    if (ckpt_dir / LATEST_FILE).exists():
        evidence.insert(0, f"{LATEST_FILE} (naming {latest!r})")
    return order, [*steps, *evidence]


def quarantine_dir(path: Path) -> Path:
    """Rename checkpoint ``path`` to ``corrupt-<name>`` (``-1``, ``-2``, ... if taken): kept,
    never loaded, pruned or overwritten. Returns the new path."""
    base = path.parent / f"{CORRUPT_PREFIX}{path.name}"
    target, k = base, 0
    while target.exists():
        k += 1
        target = base.with_name(f"{base.name}-{k}")
    os.rename(path, target)
    _fsync_path(path.parent)
    return target


def resume_checkpoint(
    run_dir: str | os.PathLike[str],
    load_fn: Callable[[Path, dict[str, Any]], None],
    *,
    trust: bool = False,
    log: Callable[[str], Any] = print,
    map_location: str | torch.device = "cpu",
    quarantine: bool = True,
) -> tuple[Path, dict[str, Any]] | None:
    """Collective: load the newest intact checkpoint of ``run_dir`` (:func:`load_verified` with
    ``load_fn``); return (its path, its state dict), or None when the run has no checkpoint at
    all.

    Candidates are the directory ``latest`` names, then every ``step_*`` directory by descending
    step (rank 0 lists them, every rank tries the same ones). A damaged candidate (incomplete, or
    a file that does not match its digest: CorruptCheckpointError) is skipped with one line to
    ``log`` (rank 0) and, with ``quarantine``, renamed by rank 0 to ``corrupt-<name>`` so it is
    kept but never loaded, pruned or overwritten; ``latest`` is then rewritten to name the
    checkpoint used. If the run had checkpoints but none could be used, raises CheckpointError
    naming each and why (never a silent start from step 0).

    Raised at once, with nothing renamed (an older checkpoint would fail alike):
    UntrustedCheckpointError for a checkpoint without digests unless ``trust``; CheckpointError
    when an intact checkpoint cannot be loaded (``load_fn`` raised CheckpointError while every
    file matched its digest: e.g. a changed model config, or a ``.metadata`` refused by the
    restricted unpickler although its digest matches). ``load_fn`` must fully overwrite what it
    loads (a damaged candidate may have loaded part of its tensors first).
    ``quarantine=False`` (read-only users such as eval) renames nothing and keeps ``latest``.
    """
    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
    _, rank, _ = _dist()
    order, evidence = _broadcast(_candidates(ckpt_dir) if rank == 0 else None)
    path, state, failures = resume_in_order(
        ckpt_dir, order, lambda p: load_verified(p, load_fn, trust=trust,
                                                 map_location=map_location),
        log=log, quarantine=quarantine)
    if path is not None:
        return path, state
    if failures or evidence:
        listing = "; ".join(failures) if failures else "none is left to try"
        raise CheckpointError(
            f"{ckpt_dir}: the run has checkpoints ({', '.join(evidence)}) but none could be "
            f"used, refusing to start from step 0: {listing}")
    return None


def resume_in_order(
    ckpt_dir: Path,
    order: Sequence[str],
    attempt: Callable[[Path], Any],
    *,
    log: Callable[[str], Any] = print,
    quarantine: bool = True,
    what: str = "checkpoint",
) -> tuple[Path | None, Any, list[str]]:
    """Collective: ``attempt(ckpt_dir / name)`` for the names of ``order`` (the same list on
    every rank) until one returns; returns (its path, its result, the reasons of the ones
    skipped before it), or (None, None, reasons) when every one was damaged.

    A damaged candidate (``attempt`` raised CorruptCheckpointError) is skipped with one line
    to ``log`` (rank 0, naming it as ``what``) and, with ``quarantine``, renamed by rank 0 to
    ``corrupt-<name>``; ``latest`` is rewritten to name the one used. Raised at once, nothing
    renamed: UntrustedCheckpointError; any other CheckpointError (an intact or unverifiable
    checkpoint that cannot be loaded: an older one would fail alike)."""
    dist, rank, _ = _dist()
    failures: list[str] = []
    for name in order:
        path = ckpt_dir / name
        try:
            result = attempt(path)
        except CorruptCheckpointError as e:
            reason = _one_line(str(e))
            kept = ""
            if quarantine and rank == 0:
                try:
                    kept = f"; renamed to {quarantine_dir(path).name} (kept, never loaded again)"
                except OSError as oe:
                    kept = f"; could not rename it: {oe}"
            if rank == 0:
                log(f"skipping {what} {name}: {reason}{kept}")
            if dist is not None:
                dist.barrier()
            failures.append(f"{name}: {reason}")
            continue
        except UntrustedCheckpointError:
            raise
        except CheckpointError as e:
            earlier = f" (skipped before it: {'; '.join(failures)})" if failures else ""
            raise CheckpointError(
                f"{e}; not renamed and no older checkpoint tried: its files are intact or "
                f"unverifiable, so the cause is not corruption (a changed config?){earlier}"
            ) from e
        if quarantine and rank == 0 and _read_latest_name(ckpt_dir) != name:
            write_latest(ckpt_dir, name)
        if dist is not None:
            dist.barrier()
        return path, result, failures
    return None, None, failures


# ------------------------------------------------------- directories another library wrote


#: The digest record of a checkpoint directory whose files another library wrote (DeepSpeed's
#: checkpoints: sleeptrain.train.ds_engine); the same record as meta.json's, for every file
#: under the directory, written after all of them.
DIR_DIGESTS_FILE = "sleeptrain-digests.json"


def _dir_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.as_posix() != (root / DIR_DIGESTS_FILE).as_posix())


def _hash_round_robin(root: Path, names: list[str], algo: str, chunk_bytes: int,
                      sync: bool = False) -> dict[str, str]:
    """Collective: ``{name: hex digest or 'error: ...'}`` of every file in ``names`` (the
    same list on every rank), each rank hashing every world-th one (``sync``: and fsyncing
    it); every rank gets all of them."""
    _, rank, world = _dist()
    sizes: dict[str, int] = {}
    got: dict[str, str] = {}
    for name in names[rank::world]:
        try:
            sizes[name] = (root / name).stat().st_size
            if sync:
                _fsync_path(root / name)
        except OSError as e:
            got[name] = f"error: {e.strerror or e}"
    got.update(_Hashing(root, sizes, algo, chunk_bytes, None).result())
    out: dict[str, str] = {}
    for part in _all_gather(got):
        out.update(part)
    return out


def record_dir_digests(root: str | os.PathLike[str]) -> int:
    """Collective: fsyncs and hashes every file under ``root`` (split over the ranks) and
    writes their sizes and digests to ``root / DIR_DIGESTS_FILE`` (rank 0, fsynced with the
    directory; the directory's files must all be written and visible to rank 0). Returns the
    bytes recorded. Raises CheckpointError on every rank if a file cannot be read."""
    root = Path(root)
    _, rank, _ = _dist()
    names = _broadcast(_dir_files(root) if rank == 0 else None)
    got = _hash_round_robin(root, names, DIGEST_ALGO, DIGEST_CHUNK, sync=True)
    bad = [f"{n} ({d.removeprefix('error: ')})" for n, d in sorted(got.items())
           if d.startswith("error: ")]
    if bad:
        raise CheckpointError(f"{root}: cannot hash the checkpoint's files: {'; '.join(bad)}")
    total = 0
    if rank == 0:
        sizes = {n: (root / n).stat().st_size for n in names}
        total = sum(sizes.values())
        record = {"format": 1, "time": time.time(), "sizes": sizes,
                  "digests": {"algo": DIGEST_ALGO, "chunk_bytes": DIGEST_CHUNK, "files": got}}
        _write_bytes_synced(root / DIR_DIGESTS_FILE,
                            json.dumps(record, indent=1, sort_keys=True).encode())
        _fsync_path(root)
    return total


def _read_dir_record(root: Path) -> tuple[str | None, DigestRecord | None, dict[str, int]]:
    """(problem, record, sizes) of ``root``'s digest record: problem ``untrusted: ...`` (no
    file, or no valid record in it) or ``corrupt: ...`` (unreadable); else None."""
    file = root / DIR_DIGESTS_FILE
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        return f"untrusted: there is no {DIR_DIGESTS_FILE} in it", None, {}
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"corrupt: {DIR_DIGESTS_FILE} is unreadable ({type(e).__name__}: {e})", None, {}
    record = _digest_record(meta) if isinstance(meta, dict) else None
    sizes = meta.get("sizes") if record is not None else None
    if record is None or not all(isinstance(v, int) and not isinstance(v, bool)
                                 for v in sizes.values()):
        return f"untrusted: {DIR_DIGESTS_FILE} holds no valid digest record", None, {}
    return None, record, dict(sizes)


def verify_dir_digests(root: str | os.PathLike[str], *, trust: bool = False) -> None:
    """Collective: checks, before anything in ``root`` is unpickled, that its files are the
    ones :func:`record_dir_digests` recorded (none missing, none added, same sizes, same
    digests; hashed split over the ranks). Raises on every rank alike: CorruptCheckpointError
    naming each file that differs; UntrustedCheckpointError when there is no valid record,
    unless ``trust`` (then nothing is checked)."""
    root = Path(root)
    _, rank, _ = _dist()
    head = None
    if rank == 0:
        problem, record, sizes = _read_dir_record(root)
        if problem is None and record is not None:
            on_disk = {n: (root / n).stat().st_size for n in _dir_files(root)}
            wrong = [f"{n} is missing" for n in sorted(set(sizes) - set(on_disk))]
            wrong += [f"{n} is not in {DIR_DIGESTS_FILE} (added after the checkpoint was "
                      "written)" for n in sorted(set(on_disk) - set(sizes))]
            wrong += [f"{n} has {on_disk[n]} bytes, {DIR_DIGESTS_FILE} records {sizes[n]}"
                      for n in sorted(set(on_disk) & set(sizes)) if on_disk[n] != sizes[n]]
            if wrong:
                problem = "corrupt: " + "; ".join(wrong)
        head = (problem, record)
    problem, record = _broadcast(head)
    if problem is not None and problem.startswith("untrusted: "):
        if trust:
            return
        raise UntrustedCheckpointError(
            f"{root}: {problem.removeprefix('untrusted: ')}, so its files cannot be verified "
            "before they are unpickled; refusing to load it (pass --trust-checkpoint if you "
            "trust its source)")
    if problem is not None:
        raise CorruptCheckpointError(f"{root}: {problem.removeprefix('corrupt: ')}")
    got = _hash_round_robin(root, sorted(record.files), record.algo, record.chunk_bytes)
    bad = _mismatches(record, got, DIR_DIGESTS_FILE)
    if bad:
        raise CorruptCheckpointError(f"{root}: " + "; ".join(bad))


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
