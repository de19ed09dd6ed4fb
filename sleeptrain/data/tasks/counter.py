"""Counter-based integer hash RNG shared by the scalar (pure Python) and the torch samplers.

Everything is arithmetic modulo 2**64 on unsigned 64-bit words. The scalar functions take and
return Python ints in ``[0, 2**64)``; the ``*_t`` functions take and return ``torch.int64``
tensors holding the same bit patterns (two's complement), on any device. torch's int64 ``+``,
``*`` and ``<<`` wrap modulo 2**64, ``^``/``&``/``|`` act on bits, and ``>>`` is arithmetic, so
the logical right shift is emulated as ``(z >> s) & (2**(64-s) - 1)``.

Definitions (``G = 0x9E3779B97F4A7C15``, the splitmix64 increment):

* ``mix64(z)``: the splitmix64 finalizer (Stafford's mix 13):
  ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB;
  z ^= z >> 31`` (logical shifts, products mod 2**64). A bijection of 64-bit words.
* ``stream_key(tag, seed, split_id, index)``: ``h = mix64(tag + (seed + 1) G)``,
  ``h = mix64(h + (split_id + 1) G)``, ``key = mix64(h + (index + 1) G)``.
* ``draw(key, position) = mix64(key + (position + 1) G)``: the splitmix64 output stream seeded
  with ``key``. A task uses ``n_slots`` draws per candidate try: try ``r``, slot ``s`` is
  ``draw(key, r * n_slots + s)``, so every (sample, try, slot) has its own word and any of them
  can be computed without the others.
* ``below(u, m) = (u mod 2**63) % m``: an integer in ``[0, m)`` from the low 63 bits (bias
  below ``m / 2**63``).
* ``content_hash(words)``: for words ``w_j`` at positions ``j``,
  ``mix64(sum_j w_j * A_j)`` with the odd multipliers ``A_j = mix64(CONTENT_TAG + (j + 1) G)
  | 1``; the sum is order-free, so a vectorized sum over any layout gives the same value, and
  changing any one word changes the sum.
* ``bucket(h) = (h mod 2**63) % 1000``: the split bucket of a content hash.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

import torch

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
CONTENT_TAG = 0x636F6E74656E7421  # b"content!" (big endian)
MAX_INDEX = (1 << 63) - 1
"""Largest sample index of a counter stream (indices live in int64 tensors on the device)."""
LOW63 = (1 << 63) - 1


def task_tag(name: str) -> int:
    """The stream tag of a task: its name's first 8 bytes as a little-endian word."""
    return int.from_bytes(name.encode("utf-8")[:8].ljust(8, b"\0"), "little")


def signed64(u: int) -> int:
    """The int64 value with the bit pattern of the unsigned word ``u`` (for torch scalars)."""
    u &= M64
    return u - (1 << 64) if u >> 63 else u


# ----------------------------------------------------------------------------------------------
# Scalar reference (Python ints)
# ----------------------------------------------------------------------------------------------


def mix64(z: int) -> int:
    """splitmix64's finalizer of a 64-bit word (see the module docstring)."""
    z = ((z ^ (z >> 30)) * MIX1) & M64
    z = ((z ^ (z >> 27)) * MIX2) & M64
    return z ^ (z >> 31)


def stream_key(tag: int, seed: int, split_id: int, index: int) -> int:
    """The per-sample key of sample ``index`` of the stream ``(tag, seed, split_id)``."""
    h = mix64((tag + (seed + 1) * GOLDEN) & M64)
    h = mix64((h + (split_id + 1) * GOLDEN) & M64)
    return mix64((h + (index + 1) * GOLDEN) & M64)


def draw(key: int, position: int) -> int:
    """Word ``position`` of the splitmix64 stream seeded with ``key``."""
    return mix64((key + (position + 1) * GOLDEN) & M64)


def below(u: int, m: int) -> int:
    """An integer in ``[0, m)`` from the word ``u``: ``(u mod 2**63) % m``."""
    return (u & LOW63) % m


@cache
def salt(position: int) -> int:
    """The (odd) content-hash multiplier of word position ``position``."""
    return mix64((CONTENT_TAG + (position + 1) * GOLDEN) & M64) | 1


def content_hash(words: Iterable[tuple[int, int]]) -> int:
    """The hash of content given as ``(position, word)`` pairs (words reduced mod 2**64)."""
    total = 0
    for position, word in words:
        total += word * salt(position)
    return mix64(total & M64)


def bucket(h: int) -> int:
    """The split bucket in ``[0, 1000)`` of a content hash."""
    return (h & LOW63) % 1000


# ----------------------------------------------------------------------------------------------
# torch (int64 tensors with the same bit patterns)
# ----------------------------------------------------------------------------------------------

_MIX1_S = signed64(MIX1)
_MIX2_S = signed64(MIX2)
GOLDEN_S = signed64(GOLDEN)
"""``GOLDEN`` as an int64 scalar."""


def srl_t(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 words by ``1 <= s <= 63`` bits."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64_t(z: torch.Tensor) -> torch.Tensor:
    """``mix64`` of every element of an int64 tensor (same shape)."""
    z = (z ^ srl_t(z, 30)) * _MIX1_S
    z = (z ^ srl_t(z, 27)) * _MIX2_S
    return z ^ srl_t(z, 31)


def stream_key_t(tag: int, seed: int, split_id: int, index: torch.Tensor) -> torch.Tensor:
    """``stream_key`` of every sample index in the int64 tensor ``index`` (same shape)."""
    h = mix64((tag + (seed + 1) * GOLDEN) & M64)
    h = mix64((h + (split_id + 1) * GOLDEN) & M64)
    return mix64_t(index * GOLDEN_S + signed64(h + GOLDEN))


def position_offsets_t(first: int, count: int, device: torch.device | str) -> torch.Tensor:
    """``(position + 1) * G`` (int64, wrapping) for positions ``first .. first + count - 1``."""
    pos = torch.arange(count, dtype=torch.int64, device=device)
    return (pos + (first + 1)) * GOLDEN_S


def below_t(u: torch.Tensor, m: int | torch.Tensor) -> torch.Tensor:
    """``below(u, m)`` elementwise; ``m`` a positive int or an int64 tensor broadcast to ``u``."""
    return (u & LOW63) % m


def salts_t(positions: Iterable[int], device: torch.device | str) -> torch.Tensor:
    """The content-hash multipliers of the given word positions as an int64 tensor."""
    return torch.tensor([signed64(salt(p)) for p in positions], dtype=torch.int64,
                        device=device)


def content_hash_t(words: torch.Tensor, salts: torch.Tensor,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """``content_hash`` over the last dim: words [..., m] at the positions whose multipliers
    [m] are given; ``valid`` [..., m] bool drops the words where it is False. Returns [...]."""
    terms = words * salts if valid is None else (words * valid) * salts
    return mix64_t(terms.sum(-1))


def bucket_t(h: torch.Tensor) -> torch.Tensor:
    """``bucket`` of every content hash (int64, values in ``[0, 1000)``)."""
    return (h & LOW63) % 1000


__all__ = [
    "CONTENT_TAG",
    "GOLDEN",
    "GOLDEN_S",
    "M64",
    "MAX_INDEX",
    "below",
    "below_t",
    "bucket",
    "bucket_t",
    "content_hash",
    "content_hash_t",
    "draw",
    "mix64",
    "mix64_t",
    "position_offsets_t",
    "salt",
    "salts_t",
    "signed64",
    "srl_t",
    "stream_key",
    "stream_key_t",
    "task_tag",
]
