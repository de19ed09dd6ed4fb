"""Causal attention with an optional sliding band, over keys that may start before the queries.

q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D] with Tk >= Tq: the last Tq keys belong to the queries'
own tokens, the first Tk - Tq are carried from earlier (the KV carry). Query i sits at key
index i + (Tk - Tq). ``window`` None: plain causal; ``window`` L: query sees the keys at
distance 0..L-1 behind it (a band of L tokens including itself). Returns [B, Tq, Hq, D].

Backends: ``sdpa`` (PyTorch scaled_dot_product_attention, everywhere) and ``flash``
(flash-attn 2, CUDA, fp16/bf16).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("sdpa", "flash")


@functools.lru_cache(maxsize=64)
def _band_mask(tq: int, tk: int, window: int | None, device: str) -> torch.Tensor:
    """Boolean [tq, tk] mask, True where query i may attend key j."""
    qi = torch.arange(tq, device=device)[:, None] + (tk - tq)
    kj = torch.arange(tk, device=device)[None, :]
    dist = qi - kj
    mask = dist >= 0
    if window is not None:
        mask = mask & (dist < window)
    return mask


def _sdpa(q, k, v, window, scale, key_keep=None):
    if q.is_cuda and q.shape[1] == 1:
        # Decoding: the key length changes every call, and cuDNN attention builds a new
        # execution plan per shape (~9 ms each on H200); the other kernels need no plan.
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH]):
            return _sdpa_call(q, k, v, window, scale, key_keep)
    return _sdpa_call(q, k, v, window, scale, key_keep)


def _sdpa_call(q, k, v, window, scale, key_keep):
    tq, tk = q.shape[1], k.shape[1]
    gqa = q.shape[2] != k.shape[2]
    if tq == 1 and gqa:
        return _one_query_grouped(q, k, v, window, scale, key_keep)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if key_keep is not None:
        mask = _band_mask(tq, tk, window, str(q.device))[None, None] & key_keep[:, None, None, :]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale,
                                             enable_gqa=gqa)
    elif tq == tk and (window is None or window >= tk):
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale,
                                             enable_gqa=gqa)
    else:
        mask = _band_mask(tq, tk, window, str(q.device))
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale,
                                             enable_gqa=gqa)
    return out.transpose(1, 2)


def _one_query_grouped(q, k, v, window, scale, key_keep):
    """One query per row with grouped heads (decoding): each key/value head's G query heads
    become G queries of that one head ([B, 1, KV G, D] -> [B, KV, G, D]; the query heads of a
    key/value head are adjacent, as ``enable_gqa`` pairs them), so SDPA sees equal head
    counts and reads each key/value head once. With ``enable_gqa`` and a key mask it would run
    its math kernel, which first copies the keys and values G times; here its fused kernels
    (memory-efficient with a mask, flash without) apply. Same values: each query still sees
    its own head's keys under the same mask."""
    b, _, hq, d = q.shape
    tk, kv = k.shape[1], k.shape[2]
    mask = None
    if key_keep is not None or (window is not None and window < tk):
        mask = _band_mask(1, tk, window, str(q.device))[None, None]
        if key_keep is not None:
            mask = mask & key_keep[:, None, None, :]
    out = F.scaled_dot_product_attention(q.reshape(b, kv, hq // kv, d), k.transpose(1, 2),
                                         v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.reshape(b, 1, hq, d)


def _flash(q, k, v, window, scale):
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise RuntimeError(
            "model.attention_backend='flash' needs the flash-attn package "
            f"(pip install 'sleeptrain[gpu]'), which is not importable here: {e}; "
            "use model.attention_backend=sdpa"
        ) from e
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(
            "model.attention_backend='flash' needs CUDA fp16/bf16 tensors "
            f"(got {q.dtype} on {q.device}); use sdpa or bf16 autocast"
        )
    ws = (-1, -1) if window is None else (window - 1, 0)
    return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=ws)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None = None,
    scale: float | None = None,
    backend: str = "sdpa",
    key_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (optionally banded) attention; see the module docstring for the layout.

    ``key_keep`` [B, Tk] bool hides, per sequence, the keys where it is False (used to drop a
    KV carry at a document boundary). flash-attn has no per-sequence key mask: such calls run
    on SDPA (with a one-time warning).
    """
    if backend == "flash" and key_keep is not None:
        # once per call site under Python's default warning filter
        warnings.warn("attention with a per-sequence key mask (a document boundary under "
                      "sliding eviction) runs on SDPA: flash-attn has no such mask",
                      stacklevel=2)
        backend = "sdpa"
    if backend == "sdpa":
        return _sdpa(q, k, v, window, scale, key_keep)
    if backend == "flash":
        return _flash(q, k, v, window, scale)
    raise ValueError(f"model.attention_backend: unknown backend {backend!r}; one of {BACKENDS}")
