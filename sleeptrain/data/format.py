"""The on-disk format of sleeptrain token shards (written by ``tools/make_shards.py``).

A dataset is a directory with tar shards and a ``manifest.json``:

* every shard is a WebDataset tar: one sample per document, key ``KEY_FORMAT`` of the document's
  global index, members ``tokens.npy`` (1-D ``uint32``, ``np.save`` format) and optionally
  ``mask.npy`` (1-D ``uint8``, same length; 1 where the token is a prediction target). Without
  ``mask.npy`` every token of the document except its first is a target.
* ``manifest.json`` lists only shards that were completely written, closed and renamed into
  place (a shard is written as ``<name>.tmp`` first), each with its sample, document and token
  counts, byte size and sha256; ``complete`` is true once the writer finished.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT_NAME = "sleeptrain-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENS_MEMBER = "tokens.npy"
MASK_MEMBER = "mask.npy"
KEY_FORMAT = "{:012d}"
SHARD_PATTERN = "{prefix}-{index:06d}.tar"


class ShardError(RuntimeError):
    """A shard or manifest is missing, corrupt, truncated or inconsistent (names the file)."""


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Loads and checks a manifest (a ``manifest.json`` file or the directory holding one).

    Returns the manifest dict with ``shards[i]["path"]`` filled in as absolute paths.
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
    if man.get("format") != FORMAT_NAME:
        raise ShardError(f"{p}: not a {FORMAT_NAME} manifest (format={man.get('format')!r})")
    if man.get("version") != FORMAT_VERSION:
        raise ShardError(f"{p}: manifest version {man.get('version')!r} is not supported "
                         f"(this sleeptrain reads version {FORMAT_VERSION})")
    for key in ("shards", "tokenizer"):
        if key not in man:
            raise ShardError(f"{p}: manifest has no {key!r} entry")
    for i, sh in enumerate(man["shards"]):
        for key in ("name", "n_samples", "n_tokens", "sha256"):
            if key not in sh:
                raise ShardError(f"{p}: shards[{i}] has no {key!r}")
        sh["path"] = str((p.parent / sh["name"]).resolve())
    return man
