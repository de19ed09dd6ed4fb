"""Tokenizers for ``tools/make_shards.py``: raw UTF-8 bytes or a local Hugging Face tokenizer.

Every tokenizer has ``encode(text) -> list[int]`` (no special tokens added), ``decode(ids)``,
``vocab_size``, ``eos_id``, ``pad_id`` and ``describe()`` (the manifest's ``tokenizer`` entry).
``build_tokenizer(spec)`` picks one: ``"byte"`` or the path of a local tokenizer directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "build_tokenizer"]


class Tokenizer(Protocol):
    """What the shard writer needs from a tokenizer."""

    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def describe(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids ``0..255``; ``eos_id`` 256, ``pad_id`` 257, ``vocab_size`` 258."""

    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> list[int]:
        """Return the UTF-8 bytes of ``text`` as ids."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Return the text of the byte ids in ``ids`` (special ids skipped, bad UTF-8 replaced)."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict[str, Any]:
        """Return the manifest entry of this tokenizer."""
        return {"kind": "byte", "path": None, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "pad_id": self.pad_id}


def _configured_eos(path: Path) -> str | None:
    """Return the ``eos_token`` of ``tokenizer_config.json`` or ``special_tokens_map.json``."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = path / name
        if not f.is_file():
            continue
        try:
            eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{f}: not a JSON object ({e})") from e
        if isinstance(eos, dict):  # serialized AddedToken
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (never downloads).

    ``path/tokenizer.json`` is read with the ``tokenizers`` library; without it the directory is
    loaded by ``transformers.AutoTokenizer`` (``local_files_only``). The eos token is
    ``eos_token`` if given, else the ``eos_token`` of the directory's ``tokenizer_config.json`` /
    ``special_tokens_map.json`` (or, for ``transformers``, the tokenizer's own); ``pad_id``
    defaults to ``eos_id``. ``vocab_size`` covers the added tokens (largest id + 1).
    """

    def __init__(
        self, path: str | Path, eos_token: str | None = None, pad_id: int | None = None
    ) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {str(self.path)!r} does not exist")
        eos_token = eos_token or _configured_eos(self.path)
        if (self.path / "tokenizer.json").is_file():
            self._load_tokenizers(eos_token)
        else:
            self._load_transformers(eos_token)
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"{self.path}: pad_id {self.pad_id} is outside the vocabulary "
                             f"(size {self.vocab_size})")

    def _load_tokenizers(self, eos_token: str | None) -> None:
        try:
            from tokenizers import Tokenizer as HFTok
        except ImportError as e:
            raise ImportError(f"{self.path}/tokenizer.json needs the 'tokenizers' package "
                              "(pip install tokenizers)") from e
        tok = HFTok.from_file(str(self.path / "tokenizer.json"))
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        if eos_token is None:
            raise ValueError(f"{self.path}: no eos_token in tokenizer_config.json or "
                             "special_tokens_map.json; pass eos_token (make_shards: --eos-token)")
        if eos_token not in vocab:
            raise ValueError(f"{self.path}: eos token {eos_token!r} is not in the vocabulary")
        self.eos_id = vocab[eos_token]
        self._encode = lambda text: tok.encode(text, add_special_tokens=False).ids
        self._decode = lambda ids: tok.decode(ids, skip_special_tokens=True)

    def _load_transformers(self, eos_token: str | None) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError(f"{self.path}: no tokenizer.json here, and loading the directory "
                              "otherwise needs 'transformers' (pip install transformers)") from e
        tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        vocab = tok.get_vocab()
        self.vocab_size = max(len(tok), max(vocab.values()) + 1)
        if eos_token is None:
            if tok.eos_token_id is None:
                raise ValueError(f"{self.path}: the tokenizer has no eos token; pass "
                                 "eos_token (make_shards: --eos-token)")
            self.eos_id = int(tok.eos_token_id)
        elif eos_token in vocab:
            self.eos_id = vocab[eos_token]
        else:
            raise ValueError(f"{self.path}: eos token {eos_token!r} is not in the vocabulary")
        self._encode = lambda text: tok.encode(text, add_special_tokens=False)
        self._decode = lambda ids: tok.decode(ids, skip_special_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Return the token ids of ``text`` without special tokens (no BOS/EOS added)."""
        return list(self._encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Return the text of ``ids`` with special tokens skipped."""
        return self._decode([int(i) for i in ids])

    def describe(self) -> dict[str, Any]:
        """Return the manifest entry of this tokenizer."""
        return {"kind": "hf", "path": str(self.path.resolve()), "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "pad_id": self.pad_id}


def build_tokenizer(spec: str, eos_token: str | None = None) -> ByteTokenizer | HFTokenizer:
    """Return the tokenizer of ``spec``: ``"byte"`` or a local Hugging Face tokenizer directory.

    ``eos_token`` overrides the eos token of a Hugging Face tokenizer.
    """
    if spec == "byte":
        if eos_token is not None:
            raise ValueError("an eos token can only be chosen for a Hugging Face tokenizer, "
                             "not for 'byte'")
        return ByteTokenizer()
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"tokenizer {spec!r} is neither 'byte' nor an existing "
                                "directory holding a Hugging Face tokenizer")
    return HFTokenizer(spec, eos_token=eos_token)
