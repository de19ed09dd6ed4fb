"""The on-disk format of sleeptrain token shards (written by ``tools/make_shards.py``).

A dataset is a directory with tar shards and a ``manifest.json``:

* every shard is a WebDataset tar: one sample per document, key ``KEY_FORMAT`` of the document's
  global index, members ``tokens.npy`` (1-D ``uint32``, ``np.save`` format), optionally
  ``mask.npy`` (1-D ``uint8``, same length; 1 where the token is a prediction target) and
  ``sha256`` (the sample's digest, ``sample_digest``: 64 lowercase hex characters). Without
  ``mask.npy`` every token of the document except its first is a target.
* ``manifest.json`` lists only shards that were completely written, closed and renamed into
  place (a shard is written as ``<name>.tmp`` first), each with its sample, document and token
  counts, byte size and sha256 (of the whole tar file); ``complete`` is true once the writer
  finished. ``sample_digest: "sha256"`` says that every sample of its shards carries a
  ``sha256`` member; manifests of older writers have no such entry (and their samples no
  digest), and are still read.
* Shard names in a manifest are plain relative paths inside the dataset directory (checked by
  ``read_manifest``: no absolute paths, no ``..``, no symlink leading out, no URL).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FORMAT_NAME = "sleeptrain-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENS_MEMBER = "tokens.npy"
MASK_MEMBER = "mask.npy"
DIGEST_MEMBER = "sha256"
SAMPLE_DIGEST = "sha256"  # the manifest's ``sample_digest`` value of digest-carrying shards
KEY_FORMAT = "{:012d}"
SHARD_PATTERN = "{prefix}-{index:06d}.tar"


class ShardError(RuntimeError):
    """A shard or manifest is missing, corrupt, truncated or inconsistent (names the file)."""


def sample_digest(key: str, members: Mapping[str, bytes]) -> str:
    """Return the hex sha256 of one sample: its key, then every member except ``DIGEST_MEMBER``
    (and WebDataset's ``__key__`` / ``__url__`` fields) in sorted name order.

    The hashed bytes are ``key NUL`` followed, per member, by ``name NUL``, the data's length
    as 8 bytes little-endian, and the data; so a changed, added, dropped or renamed member and
    a changed key all change the digest.
    """
    h = hashlib.sha256(key.encode() + b"\0")
    for name in sorted(members):
        if name == DIGEST_MEMBER or name.startswith("__"):
            continue
        data = members[name]
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _is_hex_digest(value: Any) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))


def _shard_path(manifest: Path, i: int, name: Any) -> str:
    """Return the absolute path of entry ``i`` (``name``) of ``manifest``; ShardError unless it
    is a relative file name that stays inside the manifest's directory (symlinks resolved)."""
    where = f"{manifest}: shards[{i}] name {name!r}"
    if not isinstance(name, str) or not name or "\0" in name:
        raise ShardError(f"{where} is not a file name")
    if name.strip().lower().startswith("pipe:") or "://" in name:
        raise ShardError(f"{where} is a URL; a manifest may only list files inside its own "
                         "directory (pipe: and URL shards go in data.shards, see "
                         "data.allow_pipe)")
    if os.path.isabs(name) or name.startswith(("/", os.sep)):
        raise ShardError(f"{where} is an absolute path; a manifest may only list files inside "
                         "its own directory")
    if ".." in Path(name).parts:
        raise ShardError(f"{where} has a '..' component; a manifest may only list files "
                         "inside its own directory")
    root = manifest.parent.resolve()
    full = (root / name).resolve()
    if full == root or not full.is_relative_to(root):
        raise ShardError(f"{where} resolves to {full}, outside the dataset directory {root} "
                         "(a symlink leading out?)")
    return str(full)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Loads and checks a manifest (a ``manifest.json`` file or the directory holding one).

    Returns the manifest dict with ``shards[i]["path"]`` filled in as absolute paths. Every
    shard name must stay inside the manifest's directory (``_shard_path``) and every sha256 be
    a 64-character hex digest; ShardError naming the manifest and the entry otherwise.
    """
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    if not p.is_file():
        raise ShardError(f"{p}: no shard manifest here (expected {MANIFEST} from make_shards)")
    try:
        man = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{p}: manifest is not valid JSON ({e})") from e
    if not isinstance(man, dict) or man.get("format") != FORMAT_NAME:
        fmt = man.get("format") if isinstance(man, dict) else None
        raise ShardError(f"{p}: not a {FORMAT_NAME} manifest (format={fmt!r})")
    if man.get("version") != FORMAT_VERSION:
        raise ShardError(f"{p}: manifest version {man.get('version')!r} is not supported "
                         f"(this sleeptrain reads version {FORMAT_VERSION})")
    for key in ("shards", "tokenizer"):
        if key not in man:
            raise ShardError(f"{p}: manifest has no {key!r} entry")
    if man.get("sample_digest", SAMPLE_DIGEST) != SAMPLE_DIGEST:
        raise ShardError(f"{p}: sample_digest {man['sample_digest']!r} is not supported "
                         f"(this sleeptrain checks {SAMPLE_DIGEST!r})")
    for i, sh in enumerate(man["shards"]):
        for key in ("name", "n_samples", "n_tokens", "sha256"):
            if key not in sh:
                raise ShardError(f"{p}: shards[{i}] has no {key!r}")
        if not _is_hex_digest(sh["sha256"]):
            raise ShardError(f"{p}: shards[{i}] ({sh['name']!r}) sha256 {sh['sha256']!r} is "
                             "not a hex sha256 digest")
        sh["path"] = _shard_path(p, i, sh["name"])
    return man
