"""Streaming, resumable, window-aligned loader over tokenized WebDataset shards.

Order of the data (deterministic given ``seed``; the same on every rank):

* Shards: epoch e visits all S shards in the order ``permutation(seed, e)``; the epochs are laid
  end to end and dealt round-robin to the ``dp_size x workers`` *slots* (slot = dp_rank x workers
  + worker). Within one epoch the slots read disjoint shards that together cover all of them;
  every slot gets the same number of shards over time, so with ``epochs: 0`` (repeat forever)
  every rank can always take a step. With ``epochs: E > 0`` the stream ends, and when ranks run
  out at different times all ranks stop together (``agree`` below) instead of hanging.
* Documents: a shuffle buffer of ``shuffle_buffer`` samples *within* each shard, seeded by
  (seed, epoch, shard position), so any point of the stream can be rebuilt by re-reading at
  most one shard.
* Rows: documents are packed into rows of ``seq_len + 1`` tokens (``seq_len`` inputs plus the
  last target). Every document starts at a window boundary (a multiple of ``window_len``): the
  rest of the previous window is padding with loss mask 0. ``doc_starts[b, w]`` is True where a
  document starts with window w; the model resets its state there. A document longer than the
  rest of the row continues at the start of the next row, repeating its last token there so
  that no target is lost. The first token of a document is never a target.

Position and resume: each worker's position (shard cursor, documents taken from the current
shard, the unfinished document, skipped shards) travels with every batch it produces; the
loader keeps the position of each worker's last consumed batch and the number of batches
consumed. ``state_dict`` / ``load_state_dict`` save and restore exactly that, and a restarted
loader continues with the same worker, so the stream after a resume is the uninterrupted one.

Integrity (``_ShardStream``, ``_check_sample``): a shard is read in one pass; the bytes are
hashed as the tar reader consumes them and, once the tar has been read to its end, the sha256
of the whole file is compared with the manifest's, before the last ``shuffle_buffer`` samples
are released. Every sample that carries a digest member (``format.sample_digest``; all samples
of a manifest with ``sample_digest``) is checked as it is read from the tar, before it enters
the shuffle buffer, so no byte of a corrupt sample is ever yielded. Shards of older writers
(no per-sample digests) are read too; for them only the shard-level check exists, and it
comes after all but the last ``shuffle_buffer`` of the shard's samples were yielded. Any
mismatch is a ``ShardError`` naming the shard (and the sample's key and index in the shard);
``on_corrupt: skip`` prints it once per reader on stderr, records the shard in the position
(``ShardLoader.skipped``) and never reads that shard again in that reader. Uncompressed tars
are parsed by ``_tar_files`` (header checksums checked, as ``tarfile`` does, at a fraction
of its cost per member), compressed ones by WebDataset's ``tarfile`` reader; plain 1-D
``.npy`` members are decoded without ``np.load``'s header parser (``_npy``).

Trust: ``pipe:`` specs run a shell command and are refused unless ``allow_pipe``; a manifest
can only list files inside its own directory (``format.read_manifest``).

Worker lifetime: DataLoader workers are forked; each asks the kernel for SIGKILL when its
parent dies (``prctl(PR_SET_PDEATHSIG)``, Linux) and exits at once if the parent is already
gone; elsewhere a watchdog thread polls the parent pid. A SIGKILLed trainer leaves no worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import hashlib
import io
import math
import os
import re
import signal
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import numpy as np
import torch
import torch.distributed as dist

from sleeptrain.data.format import (
    DIGEST_MEMBER,
    MANIFEST,
    MASK_MEMBER,
    TOKENS_MEMBER,
    ShardError,
    read_manifest,
    sample_digest,
)

STATE_VERSION = 1


@dataclass
class ShardSet:
    """Resolved shard URLs, with what the manifest says about them (when there is one).

    Per shard: ``n_samples`` and ``sha256`` (the manifest's sample count and whole-file digest,
    None without a manifest), ``digests`` (True: the manifest says every sample carries a
    digest member, so a sample without one is an error) and ``local`` (a file path, opened
    directly; False: a URL opened through WebDataset's ``gopen``).
    """

    urls: list[str]
    n_samples: list[int | None]
    vocab_size: int | None = None
    pad_id: int = 0
    sha256: list[str | None] = field(default_factory=list)
    digests: list[bool] = field(default_factory=list)
    local: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.urls)
        self.sha256 += [None] * (n - len(self.sha256))
        self.digests += [False] * (n - len(self.digests))
        self.local += [not _is_url(u) for u in self.urls[len(self.local):]]


def _is_pipe(spec: str) -> bool:
    """True for a ``pipe:`` spec (any case, leading blanks), which runs a shell command."""
    return spec.strip().lower().startswith("pipe:") or urlsplit(spec).scheme.lower() == "pipe"


def _is_url(spec: str) -> bool:
    return _is_pipe(spec) or "://" in spec


def resolve_shards(specs: list[str] | tuple[str, ...], *, allow_pipe: bool = False) -> ShardSet:
    """Shard list from specs: a dataset directory or ``manifest.json`` (its shards, in order,
    with their sample counts and digests), a glob or brace pattern of ``.tar`` paths, a
    ``scheme://`` URL (WebDataset's ``gopen``: curl, gsutil, ...) or, only with
    ``allow_pipe`` (``data.allow_pipe``), a ``pipe:`` shell command (taken as is).

    ShardError for a ``pipe:`` spec without ``allow_pipe``, a pattern matching nothing, a
    missing file, or a manifest that fails ``format.read_manifest``'s checks.
    """
    import braceexpand

    sset = ShardSet([], [])

    def add(url: str, n: int | None = None, sha: str | None = None, digests: bool = False,
            local: bool = True) -> None:
        sset.urls.append(url)
        sset.n_samples.append(n)
        sset.sha256.append(sha)
        sset.digests.append(digests)
        sset.local.append(local)

    if isinstance(specs, str):
        specs = [specs]
    for spec in specs:
        spec = str(spec)
        if _is_pipe(spec) and not allow_pipe:
            raise ShardError(f"data.shards: {spec!r} is a pipe: URL, which runs a shell command "
                             "on every reader; it is accepted only with data.allow_pipe=true "
                             "(ShardLoader / resolve_shards: allow_pipe=True)")
        if _is_url(spec):
            for url in braceexpand.braceexpand(spec):
                add(url, local=False)
            continue
        if os.path.isdir(spec) or spec.endswith(MANIFEST):
            man = read_manifest(spec)
            if not man["shards"]:
                raise ShardError(f"{spec}: the manifest lists no complete shard")
            for sh in man["shards"]:
                add(sh["path"], int(sh["n_samples"]), str(sh["sha256"]),
                    bool(man.get("sample_digest")))
            tok = man["tokenizer"]
            v = tok.get("vocab_size")
            if v is not None:
                sset.vocab_size = max(sset.vocab_size or 0, int(v))
            sset.pad_id = int(tok.get("pad_id") or 0)
            continue
        found: list[str] = []
        for pat in braceexpand.braceexpand(spec):
            found += sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
        if not found:
            raise ShardError(f"data.shards: {spec!r} matches no file")
        for f in found:
            if not os.path.isfile(f):
                raise ShardError(f"data.shards: shard {f!r} does not exist")
            add(f)  # no manifest: no shard digest, sample digests checked where present
    if not sset.urls:
        raise ShardError("data.shards: no shard given")
    return sset


def _fingerprint(urls: list[str]) -> str:
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Reading one slot's documents
# ---------------------------------------------------------------------------------------------


class _HashingReader:
    """A read-only file object over ``raw`` that feeds every byte it returns into a sha256."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.hash = hashlib.sha256()
        self.n_bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        self.n_bytes += len(data)
        return data

    def drain(self) -> None:
        """Reads (and hashes) what the tar reader left: the end-of-archive blocks and padding."""
        while self.read(1 << 20):
            pass


class _Replay:
    """A file object that returns ``head`` first, then the rest of ``reader``."""

    def __init__(self, head: bytes, reader: _HashingReader):
        self.head, self.reader = head, reader

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.reader.read(n)
        if n < 0:
            data, self.head = self.head + self.reader.read(), b""
            return data
        data, self.head = self.head[:n], self.head[n:]
        return data if len(data) == n else data + self.reader.read(n - len(data))


def _read_exact(read: Callable[[int], bytes], n: int) -> bytes:
    """``n`` bytes from ``read``, fewer only at the end of the stream."""
    data = read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
# gzip, bzip2, xz, lzma: the magic numbers by which tarfile's "r|*" detects a compressed tar
_COMPRESSED = (b"\x1f\x8b\x08", b"BZh91", b"\xfd7zXZ", b"\x5d\x00\x00\x80")
_REGULAR = (b"0", b"\x00", b"7")  # regular file, old regular file, contiguous file


def _tar_number(field_: bytes) -> int:
    """A tar header number: NUL/space-terminated octal, or GNU base-256 (high bit set)."""
    if field_[0] in (0o200, 0o377):
        n = int.from_bytes(field_[1:], "big")
        return n - 256 ** (len(field_) - 1) if field_[0] == 0o377 else n
    try:
        return int(field_.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.InvalidHeaderError("invalid header (a number field)") from None


def _tar_text(field_: bytes) -> str:
    return field_.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """The ``length key=value\\n`` records of a pax extended header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        sp = data.find(b" ", pos)
        try:
            length = int(data[pos:sp]) if sp > pos else 0
        except ValueError:
            length = 0
        if length <= sp - pos + 1 or pos + length > len(data):
            raise tarfile.InvalidHeaderError("invalid pax header")
        key, _, value = data[sp + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _tar_files(read: Callable[[int], bytes], head: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular members of an uncompressed tar stream whose first block is
    ``head``; the reading that ``tarfile``'s stream mode does for WebDataset, in a fraction of
    its time per member. Checks every header's checksum; ustar prefixes, pax ``path``/``size``
    records and GNU long names are honoured, other member types are passed over. Ends at the
    first zero block or at the end of the stream on a block boundary (as ``tarfile`` does);
    ``tarfile.ReadError`` for a stream cut inside a member."""
    hdr = head
    pax: dict[str, str] = {}
    long_name: str | None = None
    while True:
        if not hdr or hdr == _ZERO_BLOCK:
            return
        if len(hdr) < _BLOCK:
            raise tarfile.ReadError("unexpected end of data (inside a header)")
        stored = _tar_number(hdr[148:156])
        unsigned = 256 + sum(hdr[:148]) + sum(hdr[156:])
        if stored != unsigned:
            high = sum(1 for b in hdr[:148] + hdr[156:] if b > 127)
            if stored != unsigned - 256 * high:  # some tars sum signed chars
                raise tarfile.InvalidHeaderError("bad checksum")
        kind = hdr[156:157]
        try:
            size = int(pax["size"]) if "size" in pax else _tar_number(hdr[124:136])
        except ValueError:
            raise tarfile.InvalidHeaderError("invalid pax size") from None
        if size < 0:
            raise tarfile.InvalidHeaderError("negative member size")
        name = _tar_text(hdr[:100])
        prefix = _tar_text(hdr[345:500])
        if prefix and kind not in (b"L", b"K", b"S"):  # a ustar long name (as tarfile does)
            name = prefix + "/" + name
        data = _read_exact(read, size)
        if len(data) < size:
            raise tarfile.ReadError(f"unexpected end of data (member {name!r})")
        pad = -size % _BLOCK
        if pad and len(_read_exact(read, pad)) < pad:
            raise tarfile.ReadError(f"unexpected end of data (after member {name!r})")
        if kind == b"x":
            pax = _pax_records(data)
        elif kind == b"L":
            long_name = _tar_text(data)
        elif kind not in (b"g", b"K"):
            name = pax.get("path") or long_name or name
            pax, long_name = {}, None
            if kind == b"S":
                raise tarfile.ReadError(f"member {name!r} is a sparse file (unsupported)")
            if kind in _REGULAR and not name.endswith("/"):
                yield name, data
        hdr = _read_exact(read, _BLOCK)


class _ShardStream:
    """One pass over one shard: ``samples()`` yields its raw samples (WebDataset's grouping of
    members by key) while ``_HashingReader`` hashes the bytes; ``finish()`` reads the rest of
    the file and returns the hex sha256 of all of it. Uncompressed tars are read by
    ``_tar_files``, compressed ones by WebDataset's ``tarfile`` reader. Local files are opened
    directly, URLs with ``gopen``. ``close()`` is safe at any time (an abandoned read)."""

    def __init__(self, url: str, local: bool):
        self.url = url
        if local:
            raw: BinaryIO = open(url, "rb", buffering=1 << 16)  # noqa: SIM115 (closed by close())
        else:
            from webdataset.gopen import gopen

            raw = gopen(url, "rb")
        self.raw: BinaryIO | None = raw
        self.reader = _HashingReader(raw)

    def _files(self) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import meta_prefix, meta_suffix, tar_file_iterator

        head = _read_exact(self.reader.read, _BLOCK)
        if head.startswith(_COMPRESSED):
            for f in tar_file_iterator(_Replay(head, self.reader)):  # type: ignore[arg-type]
                yield {**f, "__url__": self.url}
        else:
            for name, data in _tar_files(self.reader.read, head):
                if _META.match(name) or ("/" not in name and name.startswith(meta_prefix)
                                         and name.endswith(meta_suffix)):
                    continue  # WebDataset's metadata members, skipped as tar_file_iterator does
                yield {"fname": name, "data": data, "__url__": self.url}
        yield {}  # end of shard: group_by_keys releases the last sample

    def samples(self) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import group_by_keys

        yield from group_by_keys(self._files())

    def finish(self) -> str:
        self.reader.drain()
        raw, self.raw = self.raw, None
        if raw is not None:
            raw.close()  # a pipe: command's exit status is checked here
        return self.reader.hash.hexdigest()

    def close(self) -> None:
        raw, self.raw = self.raw, None
        if raw is not None:
            with contextlib.suppress(Exception):  # abandoned mid-shard: a pipe may be cut off
                raw.close()


_META = re.compile(r"__[^/]*__($|/)")


def _check_sample(sample: dict[str, Any], url: str, index: int, required: bool) -> None:
    """ShardError naming the shard and the sample (key, index in the shard) unless the sample's
    digest member matches ``sample_digest`` of its key and members; a sample without one is
    an error when ``required`` (its manifest says every sample has one), else unchecked."""
    key = sample.get("__key__", "?")
    where = f"shard {url}: sample {key} (index {index} in the shard)"
    stored = sample.get(DIGEST_MEMBER)
    if stored is None:
        if required:
            raise ShardError(f"{where} has no {DIGEST_MEMBER} member, but its manifest says "
                             "every sample carries one (corrupt tar header?)")
        return
    computed = sample_digest(str(key), sample)
    if bytes(stored).strip() != computed.encode("ascii"):
        raise ShardError(f"{where}: its {DIGEST_MEMBER} does not match its contents (stored "
                         f"{bytes(stored)[:16].decode('ascii', 'replace')}..., computed "
                         f"{computed[:16]}...): the sample is corrupt and none of it was used")


_NPY_1D = re.compile(rb"\{'descr': '([<>|][biuf]\d{1,2})', 'fortran_order': False, "
                     rb"'shape': \((\d+),\), \} *\n")


def _npy(data: bytes) -> np.ndarray:
    """The array of ``np.save`` bytes. The header of a plain 1-D numeric array (what the writer
    writes) is matched here, which is several times faster than ``np.load``'s header parsing;
    anything else (or a size that does not add up) goes to ``np.load`` and its errors."""
    if data[:8] == b"\x93NUMPY\x01\x00" and len(data) >= 10:
        end = 10 + int.from_bytes(data[8:10], "little")
        m = _NPY_1D.fullmatch(data, 10, end)
        if m is not None:
            dtype = np.dtype(m.group(1).decode("ascii"))
            n = int(m.group(2))
            if len(data) == end + n * dtype.itemsize:
                return np.frombuffer(data, dtype, n, end)
    return np.load(io.BytesIO(data), allow_pickle=False)


def _decode(sample: dict[str, Any], url: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens as int64, mask as uint8) of a raw sample; ShardError naming shard and sample."""
    key = sample.get("__key__", "?")
    if TOKENS_MEMBER not in sample:
        raise ShardError(f"shard {url}: sample {key} has no {TOKENS_MEMBER}")
    try:
        tokens = _npy(sample[TOKENS_MEMBER])
        mask = (_npy(sample[MASK_MEMBER]).astype(np.uint8)
                if MASK_MEMBER in sample else np.ones(len(tokens), dtype=np.uint8))
    except (ValueError, OSError, EOFError) as e:
        raise ShardError(f"shard {url}: sample {key}: undecodable .npy ({e})") from e
    if tokens.ndim != 1:
        raise ShardError(f"shard {url}: sample {key}: tokens must be 1-D, got {tokens.shape}")
    if mask.shape != tokens.shape:
        raise ShardError(f"shard {url}: sample {key}: mask shape {mask.shape} differs from "
                         f"tokens shape {tokens.shape}")
    return tokens.astype(np.int64), mask


class _SlotReader:
    """The documents of one slot, with a position that can be saved and restored."""

    def __init__(self, shards: ShardSet, slot: int, n_slots: int, seed: int,
                 shuffle_buffer: int, epochs: int, on_corrupt: str,
                 state: dict[str, Any] | None):
        self.shards = shards
        self.slot, self.n_slots = slot, n_slots
        self.seed, self.buffer, self.epochs = seed, shuffle_buffer, epochs
        self.on_corrupt = on_corrupt
        st = state or {}
        self.cursor = int(st.get("cursor", 0))  # index into this slot's shard sequence
        self.taken = int(st.get("taken", 0))  # documents taken from that shard so far
        self.skipped: list[str] = list(st.get("skipped", []))

    def position(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "taken": self.taken, "skipped": list(self.skipped)}

    def _shard_at(self, cursor: int) -> tuple[int, int] | None:
        """(epoch, shard index) of the slot's cursor-th shard; None past the last epoch."""
        n = len(self.shards.urls)
        g = self.slot + cursor * self.n_slots
        epoch, k = divmod(g, n)
        if self.epochs and epoch >= self.epochs:
            return None
        perm = np.random.default_rng([self.seed, epoch]).permutation(n)
        return epoch, int(perm[k])

    def _shuffled(self, url: str, epoch: int, index: int) -> Iterator[dict[str, Any]]:
        """The shard's samples through the shuffle buffer, each checked (``_check_sample``)
        as it is read; the whole-file sha256 and the sample count are checked against the
        manifest when the tar ends, before the buffer's last samples are yielded."""
        shards = self.shards
        expected, sha = shards.n_samples[index], shards.sha256[index]
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        buf: list[dict[str, Any]] = []
        n_read = 0
        stream = None
        try:
            stream = _ShardStream(url, shards.local[index])
            for sample in stream.samples():
                _check_sample(sample, url, n_read, shards.digests[index])
                n_read += 1
                if len(buf) < self.buffer:
                    buf.append(sample)
                    continue
                j = int(rng.integers(len(buf)))
                buf[j], sample = sample, buf[j]
                yield sample
            actual = stream.finish()
        except (tarfile.TarError, EOFError, OSError, ValueError, KeyError) as e:
            raise ShardError(f"shard {url}: unreadable after {n_read} samples "
                             f"({type(e).__name__}: {e})") from e
        finally:
            if stream is not None:
                stream.close()
        if expected is not None and n_read != expected:
            raise ShardError(f"shard {url}: {n_read} samples read but the manifest lists "
                             f"{expected} (truncated or replaced shard?)")
        if sha is not None and actual != sha:
            raise ShardError(f"shard {url}: sha256 of the file is {actual[:16]}... but the "
                             f"manifest lists {sha[:16]}...: the shard is corrupt (read "
                             f"{stream.reader.n_bytes} bytes, {n_read} samples)")
        rng.shuffle(buf)
        yield from buf

    def documents(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This slot's documents from its cursor on; a shard already in ``skipped`` is passed
        over unread, a corrupt one (ShardError) raises or, with ``on_corrupt: skip``, is
        printed on stderr, recorded in ``skipped`` and left."""
        while True:
            where = self._shard_at(self.cursor)
            if where is None:
                return
            epoch, index = where
            url = self.shards.urls[index]
            skip = self.taken
            if url not in self.skipped:
                try:
                    for i, sample in enumerate(self._shuffled(url, epoch, index)):
                        if i < skip:
                            continue
                        doc = _decode(sample, url)
                        self.taken = i + 1
                        yield doc
                except ShardError as e:
                    if self.on_corrupt != "skip":
                        raise
                    self.skipped.append(url)
                    print(f"sleeptrain: data.on_corrupt=skip: skipping shard {url} (reader "
                          f"{self.slot} of {self.n_slots}; its first {self.taken} documents "
                          f"were used): {e}", file=sys.stderr, flush=True)
            self.cursor += 1
            self.taken = 0


# ---------------------------------------------------------------------------------------------
# Packing documents into window-aligned rows
# ---------------------------------------------------------------------------------------------


class RowPacker:
    """Packs documents into rows of ``seq_len + 1`` tokens; see the module docstring."""

    def __init__(self, seq_len: int, window_len: int, pad_id: int,
                 pending: tuple[np.ndarray, np.ndarray] | None = None):
        self.seq_len, self.window_len, self.pad_id = seq_len, window_len, pad_id
        self.n_windows = math.ceil(seq_len / window_len)
        self.pending = pending

    def row(self, next_doc: Callable[[], tuple[np.ndarray, np.ndarray] | None]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(tokens [T+1], mask [T+1], doc_starts [n_windows]); None once no document is left."""
        T, L = self.seq_len, self.window_len
        toks = np.full(T + 1, self.pad_id, dtype=np.int64)
        mask = np.zeros(T + 1, dtype=np.uint8)
        starts = np.zeros(self.n_windows, dtype=bool)
        p = 0
        while p < T:
            if self.pending is None:
                doc = next_doc()
                if doc is None:
                    break
                if len(doc[0]) < 2:  # nothing to predict
                    continue
                self.pending = doc
            t, m = self.pending
            n = min(len(t), T + 1 - p)
            toks[p : p + n] = t[:n]
            mask[p : p + n] = m[:n]
            mask[p] = 0  # a document's (or continuation's) first token has no context
            starts[p // L] = True
            if n < len(t):  # the row is full: continue this document in the next row
                self.pending = (t[n - 1 :], m[n - 1 :])
                return toks, mask, starts
            self.pending = None
            p = -(-(p + n) // L) * L
        if p == 0:
            return None
        return toks, mask, starts


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One micro-batch: tokens, mask [B, T+1] and doc_starts [B, n_windows] (CPU tensors)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    doc_starts: torch.Tensor


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _exit_with_parent(parent: int, watch_interval: float = 0.5) -> None:
    """Makes this process (a loader worker) exit when process ``parent`` dies, even by SIGKILL.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, then, for the race where the parent died
    before the call (the signal then never comes), an immediate exit if the parent pid is no
    longer ``parent``. Elsewhere (or if prctl fails): a daemon thread that polls
    ``os.getppid()`` every ``watch_interval`` seconds and exits once it differs.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            ok = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            ok = False
        if ok:
            if os.getppid() != parent:
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(watch_interval)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="sleeptrain-parent-watch", daemon=True).start()


def _worker_init(parent: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` of the shard loader: the worker dies with ``parent``."""
    del worker_id
    _exit_with_parent(parent)


class _Rows(torch.utils.data.IterableDataset):
    """Per-worker stream of (logical worker, batch, position after the batch); a reader that
    runs out (finite stream) ends with (logical worker, None, its final position)."""

    def __init__(self, loader: ShardLoader, offset: int, states: dict[int, Any]):
        super().__init__()
        self.ld, self.offset, self.states = loader, offset, states

    def __iter__(self):
        ld = self.ld
        info = torch.utils.data.get_worker_info()
        phys, n_work = (info.id, info.num_workers) if info else (0, 1)
        logical = (phys + self.offset) % n_work
        st = self.states.get(logical) or {}
        reader = _SlotReader(ld.shards, ld.dp_rank * n_work + logical, ld.dp_size * n_work,
                             ld.seed, ld.shuffle_buffer, ld.epochs, ld.on_corrupt,
                             st.get("reader"))
        pend = st.get("pending")
        packer = RowPacker(ld.seq_len, ld.window_len, ld.pad_id,
                           None if pend is None else (pend[0].numpy(), pend[1].numpy()))
        docs = reader.documents()

        def next_doc():
            return next(docs, None)

        def position() -> dict[str, Any]:
            return {"reader": reader.position(),
                    "pending": None if packer.pending is None else
                    (torch.from_numpy(packer.pending[0].copy()),
                     torch.from_numpy(packer.pending[1].copy()))}

        while True:
            rows = []
            for _ in range(ld.batch_size):
                r = packer.row(next_doc)
                if r is None:  # the last, partial batch is dropped; the final position (its
                    yield logical, None, position()  # skipped shards) still goes to the loader
                    return
                rows.append(r)
            batch = Batch(torch.from_numpy(np.stack([r[0] for r in rows])),
                          torch.from_numpy(np.stack([r[1] for r in rows])),
                          torch.from_numpy(np.stack([r[2] for r in rows])))
            yield logical, batch, position()


class ShardLoader:
    """Micro-batches of packed rows for one data-parallel rank; resumable (module docstring).

    ``agree``: when the stream is finite (``epochs > 0``) and a process group is up, every
    batch is preceded by an all-reduce (MIN) of "I have a batch" over all ranks, so that all
    ranks stop at the same step (``agree_device``: where that flag lives, CUDA for NCCL).
    ``allow_pipe``: accept ``pipe:`` specs, which run a shell command (``data.allow_pipe``).
    ``on_corrupt``: ``error`` raises the ``ShardError`` of a corrupt shard; ``skip`` prints it
    on stderr (in the reader that met it: every rank prints its own) and moves on.
    Workers (``workers > 0``) are forked processes that die with this one (``_worker_init``).
    """

    def __init__(self, shards: list[str], *, seq_len: int, window_len: int, batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, workers: int = 2, seed: int = 0,
                 shuffle_buffer: int = 1000, epochs: int = 0, on_corrupt: str = "error",
                 agree_device: torch.device | str = "cpu", allow_pipe: bool = False):
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"data.on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        for name, v, lo in (("data.seq_len", seq_len, 1), ("sleep.window_len", window_len, 1),
                            ("data.batch_size", batch_size, 1), ("data.workers", workers, 0),
                            ("data.shuffle_buffer", shuffle_buffer, 1), ("data.epochs", epochs, 0)):
            if int(v) < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")
        self.shards = resolve_shards(list(shards), allow_pipe=allow_pipe)
        self.seq_len, self.window_len, self.batch_size = seq_len, window_len, batch_size
        self.dp_rank, self.dp_size, self.workers = dp_rank, dp_size, workers
        self.seed, self.shuffle_buffer, self.epochs = seed, shuffle_buffer, epochs
        self.on_corrupt, self.agree_device = on_corrupt, torch.device(agree_device)
        self.pad_id = self.shards.pad_id
        n_slots = dp_size * max(workers, 1)
        if len(self.shards.urls) < n_slots:
            raise ShardError(
                f"data.shards: {len(self.shards.urls)} shards for {dp_size} data-parallel "
                f"ranks x {max(workers, 1)} workers = {n_slots} readers; every reader needs "
                "a shard (write more, smaller shards or lower data.workers)")
        self._states: dict[int, Any] = {}
        self.consumed = 0

    @property
    def vocab_size(self) -> int | None:
        return self.shards.vocab_size

    @property
    def skipped(self) -> list[str]:
        """Shards skipped as corrupt (``on_corrupt: skip``), sorted: those in the positions of
        the batches consumed so far and in the final positions of readers that ran out. Part
        of ``state_dict``, so a resumed loader reports (and keeps skipping) them too."""
        return sorted({u for st in self._states.values() for u in st["reader"]["skipped"]})

    def _identity(self) -> dict[str, Any]:
        return {"shards": _fingerprint(self.shards.urls), "seq_len": self.seq_len,
                "window_len": self.window_len, "batch_size": self.batch_size,
                "dp_size": self.dp_size, "workers": max(self.workers, 1), "seed": self.seed,
                "shuffle_buffer": self.shuffle_buffer}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "identity": self._identity(),
                "consumed": self.consumed,
                "workers": {int(k): v for k, v in self._states.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("version") != STATE_VERSION:
            raise ShardError(f"data position: version {sd.get('version')!r} is not supported")
        mine, saved = self._identity(), sd["identity"]
        diff = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in mine.items()
                if saved.get(k) != v]
        if diff:
            raise ShardError("the checkpoint's data position was saved for a different data "
                             "layout, so the stream cannot resume exactly (" + "; ".join(diff)
                             + "); start a new run directory or restore those settings")
        self.consumed = int(sd["consumed"])
        self._states = {int(k): v for k, v in sd["workers"].items()}

    def _agree(self, have: bool) -> bool:
        if not (self.epochs and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return have
        flag = torch.tensor([int(have)], device=self.agree_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def __iter__(self) -> Iterator[Batch]:
        n_work = max(self.workers, 1)
        ds = _Rows(self, self.consumed % n_work, dict(self._states))
        extra: dict[str, Any] = {}
        if self.workers:
            # Forked workers have this process as parent (what _worker_init checks).
            extra = {"worker_init_fn": functools.partial(_worker_init, os.getpid()),
                     "multiprocessing_context": "fork" if sys.platform.startswith("linux")
                     else None}
        dl = torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=self.workers,
            prefetch_factor=2 if self.workers else None, persistent_workers=False, **extra)
        it = iter(dl)
        while True:
            item = next(it, None)
            if item is not None and item[1] is None:  # a reader's final position, no batch
                self._states[int(item[0])] = item[2]
                continue
            if not self._agree(item is not None):
                return
            assert item is not None
            logical, batch, pos = item
            self._states[int(logical)] = pos
            self.consumed += 1
            yield batch


__all__ = ["Batch", "RowPacker", "ShardError", "ShardLoader", "ShardSet", "resolve_shards"]
