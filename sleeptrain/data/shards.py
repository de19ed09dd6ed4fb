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
"""

from __future__ import annotations

import glob
import hashlib
import io
import math
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sleeptrain.data.format import (
    MANIFEST,
    MASK_MEMBER,
    TOKENS_MEMBER,
    ShardError,
    read_manifest,
)

STATE_VERSION = 1


@dataclass
class ShardSet:
    """Resolved shard URLs, with what the manifest says about them (when there is one)."""

    urls: list[str]
    n_samples: list[int | None]
    vocab_size: int | None = None
    pad_id: int = 0


def resolve_shards(specs: list[str] | tuple[str, ...]) -> ShardSet:
    """Shard list from specs: a dataset directory or ``manifest.json`` (its shards, in order,
    with their sample counts), a glob or brace pattern of ``.tar`` paths, or a ``pipe:``
    command / URL (taken as is)."""
    import braceexpand

    urls: list[str] = []
    counts: list[int | None] = []
    vocab, pad = None, 0
    if isinstance(specs, str):
        specs = [specs]
    for spec in specs:
        spec = str(spec)
        if spec.startswith("pipe:") or "://" in spec:
            urls += list(braceexpand.braceexpand(spec))
            counts += [None] * (len(urls) - len(counts))
            continue
        if os.path.isdir(spec) or spec.endswith(MANIFEST):
            man = read_manifest(spec)
            if not man["shards"]:
                raise ShardError(f"{spec}: the manifest lists no complete shard")
            for sh in man["shards"]:
                urls.append(sh["path"])
                counts.append(int(sh["n_samples"]))
            tok = man["tokenizer"]
            v = tok.get("vocab_size")
            if v is not None:
                vocab = max(vocab or 0, int(v))
            pad = int(tok.get("pad_id") or 0)
            continue
        found: list[str] = []
        for pat in braceexpand.braceexpand(spec):
            found += sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
        if not found:
            raise ShardError(f"data.shards: {spec!r} matches no file")
        for f in found:
            if not os.path.isfile(f):
                raise ShardError(f"data.shards: shard {f!r} does not exist")
        urls += found
        counts += [None] * len(found)
    if not urls:
        raise ShardError("data.shards: no shard given")
    return ShardSet(urls, counts, vocab, pad)


def _fingerprint(urls: list[str]) -> str:
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Reading one slot's documents
# ---------------------------------------------------------------------------------------------


def _shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard, through WebDataset's tar reader."""
    from webdataset.tariterators import tarfile_samples

    yield from tarfile_samples([{"url": url}])


def _decode(sample: dict[str, Any], url: str) -> tuple[np.ndarray, np.ndarray]:
    key = sample.get("__key__", "?")
    if TOKENS_MEMBER not in sample:
        raise ShardError(f"shard {url}: sample {key} has no {TOKENS_MEMBER}")
    try:
        tokens = np.load(io.BytesIO(sample[TOKENS_MEMBER]), allow_pickle=False)
        mask = (np.load(io.BytesIO(sample[MASK_MEMBER]), allow_pickle=False).astype(np.uint8)
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
        expected = self.shards.n_samples[index]
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        buf: list[dict[str, Any]] = []
        n_read = 0
        try:
            for sample in _shard_samples(url):
                n_read += 1
                if len(buf) < self.buffer:
                    buf.append(sample)
                    continue
                j = int(rng.integers(len(buf)))
                buf[j], sample = sample, buf[j]
                yield sample
        except (tarfile.TarError, EOFError, OSError, ValueError, KeyError) as e:
            raise ShardError(f"shard {url}: unreadable after {n_read} samples "
                             f"({type(e).__name__}: {e})") from e
        if expected is not None and n_read != expected:
            raise ShardError(f"shard {url}: {n_read} samples read but the manifest lists "
                             f"{expected} (truncated or replaced shard?)")
        rng.shuffle(buf)
        yield from buf

    def documents(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            where = self._shard_at(self.cursor)
            if where is None:
                return
            epoch, index = where
            url = self.shards.urls[index]
            skip = self.taken
            try:
                for i, sample in enumerate(self._shuffled(url, epoch, index)):
                    if i < skip:
                        continue
                    doc = _decode(sample, url)
                    self.taken = i + 1
                    yield doc
            except ShardError:
                if self.on_corrupt != "skip":
                    raise
                self.skipped.append(url)
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


class _Rows(torch.utils.data.IterableDataset):
    """Per-worker stream of (logical worker, batch, position after the batch)."""

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

        while True:
            rows = []
            for _ in range(ld.batch_size):
                r = packer.row(next_doc)
                if r is None:
                    return  # the last, partial batch is dropped
                rows.append(r)
            batch = Batch(torch.from_numpy(np.stack([r[0] for r in rows])),
                          torch.from_numpy(np.stack([r[1] for r in rows])),
                          torch.from_numpy(np.stack([r[2] for r in rows])))
            pos = {"reader": reader.position(),
                   "pending": None if packer.pending is None else
                   (torch.from_numpy(packer.pending[0].copy()),
                    torch.from_numpy(packer.pending[1].copy()))}
            yield logical, batch, pos


class ShardLoader:
    """Micro-batches of packed rows for one data-parallel rank; resumable (module docstring).

    ``agree``: when the stream is finite (``epochs > 0``) and a process group is up, every
    batch is preceded by an all-reduce (MIN) of "I have a batch" over all ranks, so that all
    ranks stop at the same step (``agree_device``: where that flag lives, CUDA for NCCL).
    """

    def __init__(self, shards: list[str], *, seq_len: int, window_len: int, batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, workers: int = 2, seed: int = 0,
                 shuffle_buffer: int = 1000, epochs: int = 0, on_corrupt: str = "error",
                 agree_device: torch.device | str = "cpu"):
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"data.on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        for name, v, lo in (("data.seq_len", seq_len, 1), ("sleep.window_len", window_len, 1),
                            ("data.batch_size", batch_size, 1), ("data.workers", workers, 0),
                            ("data.shuffle_buffer", shuffle_buffer, 1), ("data.epochs", epochs, 0)):
            if int(v) < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")
        self.shards = resolve_shards(list(shards))
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
        """Shards skipped as corrupt (``on_corrupt: skip``) by the batches consumed so far."""
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
        dl = torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=self.workers,
            prefetch_factor=2 if self.workers else None, persistent_workers=False)
        it = iter(dl)
        while True:
            item = next(it, None)
            if not self._agree(item is not None):
                return
            assert item is not None
            logical, batch, pos = item
            self._states[int(logical)] = pos
            self.consumed += 1
            yield batch


__all__ = ["Batch", "RowPacker", "ShardError", "ShardLoader", "ShardSet", "resolve_shards"]
