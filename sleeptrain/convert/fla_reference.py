"""Run flash-linear-attention's Gated DeltaNet models on the CPU with reference operators.

FLA's model classes call Triton kernels (gated delta rule, short convolution, gated RMSNorm,
rotary embedding, SwiGLU) and flash-attn; none of them runs without a GPU. ``reference_ops()``
swaps, for the duration of a ``with`` block, each of those entry points for a plain-PyTorch
equivalent, so that ``tools/convert.py verify`` and the tests can run an FLA checkpoint on the
CPU and compare it with the imported sleeptrain model:

* the gated delta rule: FLA's own reference ``naive_recurrent_gated_delta_rule``, after the
  steps FLA's kernel does in-kernel (L2 norm of q and k, ``beta = sigmoid(b)``,
  ``g = -exp(A_log) * softplus(a + dt_bias)``, grouped value heads: value head i reads
  query/key head ``i // (HV / H)``);
* the short convolution: a causal depthwise ``conv1d`` (+ SiLU), with its cache;
* the output norm: ``rmsnorm(x) * weight * silu(g)`` (or ``sigmoid(g)``);
* rotary embeddings: FLA's ``rotary_embedding_ref`` at the given offset;
* SwiGLU: ``silu(gate) * up``; attention: PyTorch SDPA (causal, grouped-query).

The patch is for inference comparisons (no gradients through the replaced kernels are
promised). It targets FLA 0.6 (the pinned version); a missing entry point raises ImportError
naming it rather than leaving a Triton kernel in place.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F


def _gated_delta(q, k, v, g, beta, initial_state=None, output_final_state=False,
                 use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                 allow_neg_eigval=False, state_v_first=False, cu_seqlens=None,
                 use_gate_in_kernel=False, A_log=None, dt_bias=None, scale=None, **_: Any):
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    if cu_seqlens is not None:
        raise NotImplementedError("reference gated delta rule: cu_seqlens (packed) inputs")
    if use_qk_l2norm_in_kernel:
        q = F.normalize(q.float(), p=2, dim=-1, eps=1e-6)
        k = F.normalize(k.float(), p=2, dim=-1, eps=1e-6)
    if use_beta_sigmoid_in_kernel:
        beta = beta.float().sigmoid()
    if allow_neg_eigval:
        beta = beta * 2
    if use_gate_in_kernel:
        g = -A_log.float().exp() * F.softplus(g.float() + dt_bias.float())
    r = v.shape[2] // q.shape[2]
    if r > 1:  # grouped value heads: value head i uses query/key head i // r
        q, k = q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)
    state = initial_state
    if state is not None and state_v_first:
        state = state.transpose(-1, -2)
    o, final = naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale, state,
                                                output_final_state)
    if final is not None and state_v_first:
        final = final.transpose(-1, -2).contiguous()
    return o.to(v.dtype), final


def _causal_conv(x, weight, bias=None, activation=None, initial_state=None,
                 output_final_state=False, residual=None, cu_seqlens=None, **_: Any):
    """x [B, T, C], weight [C, K] (or [C, 1, K]); state [B, C, K-1]."""
    if cu_seqlens is not None:
        raise NotImplementedError("reference causal conv: cu_seqlens (packed) inputs")
    w = weight.reshape(weight.shape[0], -1)
    c, kk = w.shape
    xt = x.transpose(1, 2)
    pad = (initial_state.to(xt.dtype) if initial_state is not None
           else xt.new_zeros(xt.shape[0], c, kk - 1))
    ext = torch.cat([pad, xt], dim=-1)
    y = F.conv1d(ext, w.unsqueeze(1).to(xt.dtype), bias, groups=c).transpose(1, 2)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    elif activation is not None:
        raise NotImplementedError(f"reference causal conv: activation {activation!r}")
    if residual is not None:
        y = y + residual
    return y, (ext[..., ext.shape[-1] - (kk - 1):] if output_final_state else None)


def _short_conv_forward(self, x, residual=None, mask=None, cache=None,
                        output_final_state=False, cu_seqlens=None, **_: Any):
    if mask is not None:
        x = x * mask[..., None]
    return _causal_conv(x, self.weight, self.bias, self.activation, cache,
                        output_final_state, residual, cu_seqlens=cu_seqlens)


def _rms_norm_gated(x, g, weight, bias, activation="swish", residual=None, prenorm=False,
                    residual_in_fp32=False, eps=1e-6):
    if residual is not None or prenorm or bias is not None:
        raise NotImplementedError("reference gated RMSNorm: residual/prenorm/bias")
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    gate = F.silu(g.float()) if activation in ("swish", "silu") else torch.sigmoid(g.float())
    return (y * gate).to(x.dtype)


def _rotary(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0,
            cu_seqlens=None, chunk_indices=None):
    from fla.modules.rotary.ops import rotary_embedding_ref

    if cu_seqlens is not None or not isinstance(seqlen_offsets, int):
        raise NotImplementedError("reference rotary: packed inputs or per-sequence offsets")
    t = x.shape[1]
    c, s = cos[seqlen_offsets:seqlen_offsets + t], sin[seqlen_offsets:seqlen_offsets + t]
    return rotary_embedding_ref(x.float(), c.float(), s.float(), interleaved).to(x.dtype)


def _sdpa_attention(q, k, v, causal=True, window_size=(-1, -1), softmax_scale=None, **_: Any):
    """flash_attn_func's interface ([B, T, H, D]) on PyTorch SDPA."""
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError("reference attention: sliding-window attention")
    qt, kt, vt = (z.transpose(1, 2) for z in (q, k, v))
    tq, tk = qt.shape[2], kt.shape[2]
    mask = None
    if causal and tq != tk:  # decoding against a cache: bottom-right aligned causal mask
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask,
                                         is_causal=causal and tq == tk, scale=softmax_scale,
                                         enable_gqa=kt.shape[1] != qt.shape[1])
    return out.transpose(1, 2)


def _swiglu(x, y):
    return F.silu(x.float()).to(x.dtype) * y


# (module, attribute, replacement): module globals the FLA classes look up at call time
_PATCHES: list[tuple[str, str, Any]] = [
    ("fla.layers.gated_deltanet", "chunk_gated_delta_rule", _gated_delta),
    ("fla.layers.gated_deltanet", "fused_recurrent_gated_delta_rule", _gated_delta),
    ("fla.layers.gated_deltanet", "causal_conv1d", _causal_conv),
    ("fla.modules.norm.fused_norm_gate", "rms_norm_gated", _rms_norm_gated),
    ("fla.modules.rotary.ops", "rotary_embedding", _rotary),
    ("fla.modules.mlp", "swiglu", _swiglu),
    ("fla.layers.attn", "flash_attn_func", _sdpa_attention),
]


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Within the block, FLA's Gated DeltaNet models (built or loaded inside it, or before)
    run on plain PyTorch operators (module docstring)."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for mod_name, attr, repl in _PATCHES:
            mod = importlib.import_module(mod_name)
            if not hasattr(mod, attr):
                raise ImportError(f"{mod_name}.{attr} not found: the FLA reference patch "
                                  "targets flash-linear-attention 0.6")
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, repl)
        from fla.modules.causal_conv1d.ops import ShortConvolution

        saved.append((ShortConvolution, "forward", ShortConvolution.forward))
        ShortConvolution.forward = _short_conv_forward
        yield
    finally:
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)


__all__ = ["reference_ops"]
