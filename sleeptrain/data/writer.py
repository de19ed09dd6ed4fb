"""Writes tokenized documents as WebDataset tar shards plus ``manifest.json`` (see ``format``).

Every sample carries its own digest (member ``sha256``, ``format.sample_digest`` of its key and
members), and the manifest the sha256 of every whole shard file, so that a reader can check each
sample before using it and each shard once it has been read to the end.

Each shard is written as ``<name>.tmp``; once closed it is fsynced, renamed into place, hashed
and appended to the manifest, which is rewritten atomically after every shard with
``complete: false`` and a last time with ``complete: true``. A crash therefore leaves at most
one ``.tmp`` file that the manifest never lists. Shards are reproducible (member mtimes are 0).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import string
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import webdataset as wds
from tqdm import tqdm

from .format import (
    DIGEST_MEMBER,
    FORMAT_NAME,
    FORMAT_VERSION,
    KEY_FORMAT,
    MANIFEST,
    MASK_MEMBER,
    SAMPLE_DIGEST,
    SHARD_PATTERN,
    TOKENS_MEMBER,
    sample_digest,
)

__all__ = ["existing_outputs", "write_shards"]

_COUNTS = ("n_samples", "n_docs", "n_tokens", "n_target_tokens")


def _shard_regex(prefix: str) -> re.Pattern[str]:
    """Return the regex of the shard names of ``prefix`` (and their ``.tmp`` files)."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(SHARD_PATTERN):
        parts.append(re.escape(literal))
        if field == "prefix":
            parts.append(re.escape(prefix))
        elif field == "index":
            parts.append(r"\d+")
    return re.compile("".join(parts) + r"(\.tmp)?")


def _printf_pattern(out_dir: Path, prefix: str) -> str:
    """Return ``out_dir/SHARD_PATTERN`` as the printf-style pattern that ShardWriter expects."""
    parts = []
    for literal, field, spec, _ in string.Formatter().parse(SHARD_PATTERN):
        parts.append(literal.replace("%", "%%"))
        if field == "prefix":
            parts.append(prefix.replace("%", "%%"))
        elif field == "index":
            parts.append("%" + (spec or "d"))
    return str(out_dir).replace("%", "%%") + os.sep + "".join(parts)


def existing_outputs(out_dir: str | Path, prefix: str) -> list[Path]:
    """Return the manifest and the shard files (final or ``.tmp``) of ``prefix`` in ``out_dir``."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    regex = _shard_regex(prefix)
    found = [p for p in out.iterdir() if p.is_file() and regex.fullmatch(p.name)]
    if (out / MANIFEST).exists():
        found.append(out / MANIFEST)
    return sorted(found)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` to ``path`` via a fsynced temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _check_doc(
    index: int, tokens: Any, mask: Any, vocab_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Return the document as ``uint32`` tokens and ``uint8`` mask; ValueError naming it."""
    arr = np.asarray(tokens)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"document {index}: tokens must be a 1-D integer array, "
                         f"got shape {arr.shape} dtype {arr.dtype}")
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
        raise ValueError(f"document {index}: token id {int(bad[0])} is outside the vocabulary "
                         f"(size {vocab_size})")
    arr = arr.astype(np.uint32)
    if mask is None:
        return arr, None
    m = np.asarray(mask)
    if m.shape != arr.shape:
        raise ValueError(f"document {index}: mask shape {m.shape} differs from tokens shape "
                         f"{arr.shape}")
    if m.size and (m.dtype.kind not in "iub" or m.min() < 0 or m.max() > 1):
        raise ValueError(f"document {index}: mask values must be 0 or 1")
    return arr, m.astype(np.uint8)


def _prepare_dir(out: Path, prefix: str, overwrite: bool) -> None:
    """Refuses (FileExistsError) a directory holding a dataset of ``prefix`` unless
    ``overwrite``, which deletes its manifest and shard files; creates the directory."""
    old = existing_outputs(out, prefix)
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds {old[0].name} ({len(old)} files of a "
                              "dataset); choose another directory or overwrite it")
    for p in old:
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)


class _ShardSink:
    """The manifest and the open shard of ``write_shards``: WebDataset's ShardWriter opens
    shards through ``opener`` (as ``<name>.tmp``) and ``post`` finalizes each (fsync,
    rename, manifest entry with counts and sha256, manifest replaced atomically)."""

    def __init__(self, out: Path, manifest: dict[str, Any], bar: Any):
        self.out, self.manifest, self.bar = out, manifest, bar
        self.path = out / MANIFEST
        self.current: dict[str, Any] = {}  # the open shard: its .tmp file object and counts

    def opener(self, fname: str) -> BinaryIO:
        self.current.clear()
        self.current.update(dict.fromkeys(_COUNTS, 0), file=open(fname + ".tmp", "wb"))
        return self.current["file"]

    def post(self, fname: str) -> None:
        cur, manifest = self.current, self.manifest
        f = cur["file"]
        f.flush()
        os.fsync(f.fileno())
        f.close()
        final = Path(fname)
        tmp = Path(fname + ".tmp")
        if cur["n_samples"] == 0:  # only the first shard, when no document was written
            tmp.unlink()
            return
        os.replace(tmp, final)
        _fsync_dir(self.out)
        entry = {"name": final.name, **{k: cur[k] for k in _COUNTS},
                 "bytes": final.stat().st_size, "sha256": _sha256(final)}
        manifest["shards"].append(entry)
        manifest["n_shards"] = len(manifest["shards"])
        for k in _COUNTS:
            manifest[k] += entry[k]
        _write_json_atomic(self.path, manifest)
        self.bar.set_postfix(shards=manifest["n_shards"], refresh=False)

    def count(self, arr: np.ndarray, mask: np.ndarray | None) -> None:
        cur = self.current
        cur["n_samples"] += 1
        cur["n_docs"] += 1
        cur["n_tokens"] += arr.size
        cur["n_target_tokens"] += arr.size - 1 if mask is None else int(mask.sum())


def write_shards(
    docs: Iterable[tuple[np.ndarray, np.ndarray | None]],
    out_dir: str | Path,
    prefix: str,
    tokenizer_info: dict[str, Any],
    max_samples_per_shard: int,
    max_bytes_per_shard: int,
    source_info: dict[str, Any],
    progress: bool = True,
    overwrite: bool = False,
    total: int | None = None,
) -> dict[str, Any]:
    """Write ``docs`` (``(tokens, mask or None)`` pairs) as shards ``out_dir/SHARD_PATTERN``.

    One sample per non-empty document, keyed by its index among the written documents, with
    members ``tokens.npy``, ``mask.npy`` (when the document has a mask) and ``sha256`` (its
    digest, ``format.sample_digest``); empty documents are skipped and counted as
    ``skipped_empty``. A shard is closed once it holds ``max_samples_per_shard`` samples or its
    payload reaches ``max_bytes_per_shard`` bytes.
    ``tokenizer_info['vocab_size']`` bounds the token ids (ValueError naming the document's
    position in ``docs`` and the id). Refuses (FileExistsError) a directory holding a manifest or
    shard files of ``prefix`` unless ``overwrite``, which deletes them first. ``total`` (the
    number of documents, if known) only sizes the progress bar (tqdm on stderr). Returns the
    final manifest.
    """
    out = Path(out_dir)
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"shard prefix {prefix!r} must be a non-empty file name part")
    if max_samples_per_shard < 1 or max_bytes_per_shard < 1:
        raise ValueError(f"max_samples_per_shard ({max_samples_per_shard}) and "
                         f"max_bytes_per_shard ({max_bytes_per_shard}) must be >= 1")
    vocab_size = int(tokenizer_info["vocab_size"])
    _prepare_dir(out, prefix, overwrite)
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "sample_digest": SAMPLE_DIGEST,
        "complete": False, "prefix": prefix, "tokenizer": tokenizer_info,
        "source": source_info, "max_samples_per_shard": max_samples_per_shard,
        "max_bytes_per_shard": max_bytes_per_shard, "n_shards": 0,
        **dict.fromkeys(_COUNTS, 0), "skipped_empty": 0, "shards": [],
    }
    _write_json_atomic(out / MANIFEST, manifest)
    bar = tqdm(total=total, unit="doc", file=sys.stderr, disable=not progress, mininterval=1.0)
    sink = _ShardSink(out, manifest, bar)
    writer = wds.ShardWriter(
        _printf_pattern(out, prefix), maxcount=max_samples_per_shard,
        maxsize=max_bytes_per_shard, post=sink.post, opener=sink.opener, verbose=0,
        encoder=False, mtime=0,
    )
    n_written = 0
    try:
        for index, (tokens, mask) in enumerate(docs):
            bar.update(1)
            arr, m = _check_doc(index, tokens, mask, vocab_size)
            if arr.size == 0:
                manifest["skipped_empty"] += 1
                continue
            key = KEY_FORMAT.format(n_written)
            sample = {"__key__": key, TOKENS_MEMBER: _npy_bytes(arr)}
            if m is not None:
                sample[MASK_MEMBER] = _npy_bytes(m)
            sample[DIGEST_MEMBER] = sample_digest(key, sample).encode("ascii")
            writer.write(sample)  # may close the previous shard first (post) and open a new one
            sink.count(arr, m)
            n_written += 1
    except BaseException:  # the unfinished shard stays behind as unlisted <name>.tmp debris
        with contextlib.suppress(Exception):  # end its tar stream now, not at garbage collection
            writer.tarstream.close()
        sink.current["file"].close()
        bar.close()
        raise
    writer.close()
    bar.close()
    if n_written == 0:
        raise ValueError(f"no documents to write ({manifest['skipped_empty']} empty documents "
                         f"skipped); {out / MANIFEST} stays incomplete")
    manifest["complete"] = True
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest
