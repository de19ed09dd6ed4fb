"""An exported sleeptrain model: a gated DeltaNet + attention hybrid with streaming sleep.

This file is copied next to the weights by ``sleeptrain.convert.hf_custom.export_custom`` and
loaded with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. It imports
only ``torch``, ``transformers`` and the standard library. Parameter names are sleeptrain's
state-dict names, so the weights file is sleeptrain's ``model.state_dict()`` as it is.

Inference is sleeptrain's streaming window/sleep inference (``sleeptrain.infer.Stream``):

* tokens fill the current window of ``window_len`` (L) tokens; a call may carry any number of
  tokens and is cut at window boundaries;
* within a window every block runs once (the wake pass) with the state reached so far: gated
  DeltaNet fast weights and conv states, and the keys/values of the window's earlier tokens
  (plus, with sliding eviction, the carried keys/values of the L-1 tokens before the window);
  the logits returned are the wake pass's;
* when the window is full and another token arrives, the window sleeps: the loop-range blocks
  [loop_start, loop_end) run ``sleep_passes - 1`` more times over the window, pass n taking
  the loop range's output hidden states and fast weights of pass n-1, refining only the fast
  weights; then eviction drops the window's keys/values (``hard``: also the conv states; only
  the fast weights cross; ``sliding``: the conv states and the last L-1 wake-pass keys/values
  cross as well).

The streaming state lives in a :class:`SleeptrainCache` returned as the output's ``cache``
(``past_key_values`` in older ``transformers``; either name is accepted as input); pass it back
to continue the stream. ``generate``
works with it (greedy, sampling, beam search). Rows of a batch advance together: equal-length
rows only, and an ``attention_mask`` with padding is refused.

Numerics follow sleeptrain: RMSNorm, RoPE angles, the gated delta rule (fp32 state) and the
gated output norm in fp32 (fp64 for fp64 models); projections in the weights' dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_sleeptrain import PATTERN_SYMBOLS, SleeptrainConfig

_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2] if x.isdigit()) >= (2, 5)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cdt = _compute_dtype(x.dtype)
        xf = x.to(cdt)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(cdt)).to(x.dtype)


def _rope(x: torch.Tensor, pos_start: int, theta: float) -> torch.Tensor:
    """Rotate-half RoPE on x [B, T, H, D] at absolute positions pos_start .. pos_start+T-1."""
    cdt = _compute_dtype(x.dtype)
    dim, t = x.shape[-1], x.shape[1]
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, device=x.device, dtype=cdt) / dim)
    pos = torch.arange(pos_start, pos_start + t, device=x.device).to(cdt)
    ang = pos[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    half = dim // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.to(cdt) * cos + rot.to(cdt) * sin).to(x.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            band: int | None) -> torch.Tensor:
    """Causal attention of q [B, Tq, Hq, D] over k, v [B, Tk, Hkv, D] (Tk >= Tq; the last Tq
    keys are the queries' own tokens). ``band`` L: a query sees the L keys ending at its own
    token. Returns [B, Tq, Hq, D]."""
    tq, tk = q.shape[1], k.shape[1]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    extra: dict[str, Any] = {}
    if qt.shape[1] != kt.shape[1]:
        if _SDPA_HAS_GQA:
            extra["enable_gqa"] = True
        else:
            rep = qt.shape[1] // kt.shape[1]
            kt, vt = kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1)
    if tq == tk and (band is None or band >= tk):
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, **extra)
    else:
        qi = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
        dist = qi - torch.arange(tk, device=q.device)[None, :]
        mask = dist >= 0
        if band is not None:
            mask = mask & (dist < band)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, **extra)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """GQA self-attention with RoPE at absolute positions over a key/value prefix.

    ``qkv`` rows are grouped per key/value head j: [the group's query heads, k_j, v_j].
    """

    def __init__(self, cfg: SleeptrainConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.n_kv = cfg.n_kv_heads
        self.group = cfg.n_heads // cfg.n_kv_heads
        self.theta = cfg.rope_theta
        width = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, width, bias=cfg.qkv_bias)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, pos_start: int,
                prefix: tuple[torch.Tensor, torch.Tensor] | None, band: int | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Returns (output [B, T, d], (k, v) [B, T, Hkv, D] of these tokens, post-RoPE)."""
        b, t = x.shape[:2]
        hd, g = self.head_dim, self.group
        y = self.qkv(x).view(b, t, self.n_kv, (g + 2) * hd)
        q = y[..., : g * hd].reshape(b, t, self.n_kv * g, hd)
        k = y[..., g * hd : (g + 1) * hd]
        v = y[..., (g + 1) * hd :]
        q, k = _rope(q, pos_start, self.theta), _rope(k, pos_start, self.theta)
        kk, vv = k, v
        if prefix is not None:
            kk = torch.cat([prefix[0].to(k.dtype), k], dim=1)
            vv = torch.cat([prefix[1].to(v.dtype), v], dim=1)
        o = _attend(q, kk, vv, band)
        return self.out(o.reshape(b, t, -1)), (k, v)


def _delta_rule_recurrent(q, k, v, g, beta, state):
    """Token by token: S <- exp(g) S; S <- S + beta k (v - S^T k)^T; o = S^T q.
    q, k [B, T, H, dk] (scaled q), v [B, T, H, dv], g, beta [B, T, H], S [B, H, dk, dv]."""
    outs = []
    for i in range(q.shape[1]):
        state = state * g[:, i].exp()[..., None, None]
        ki = k[:, i]
        err = v[:, i] - torch.einsum("bhk,bhkv->bhv", ki, state)
        state = state + ki[..., :, None] * (beta[:, i, :, None] * err)[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, i], state))
    return torch.stack(outs, dim=1), state


def _delta_rule_chunked(q, k, v, g, beta, state, chunk: int):
    """The same recurrence, ``chunk`` tokens at a time (same arguments).

    In a chunk with cumulative log-decay c and D_ij = exp(c_i - c_j) (j <= i), the values the
    delta rule writes are u = (I + A)^-1 (beta v - beta exp(c) k S0) with
    A_ij = beta_i D_ij k_i.k_j (j < i); then o_i = exp(c_i) S0^T q_i + sum_{j<=i} D_ij
    (q_i.k_j) u_j and S = exp(c_last) S0 + sum_j exp(c_last - c_j) k_j u_j^T.
    """
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    pad = (-t) % chunk
    if pad:  # zero g and beta: padded tokens leave the state as it is
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    n = (t + pad) // chunk
    # [B, H, n, C, *]
    q, k, v = (x.reshape(b, n, chunk, h, x.shape[-1]).permute(0, 3, 1, 2, 4) for x in (q, k, v))
    g, beta = (x.reshape(b, n, chunk, h).permute(0, 3, 1, 2) for x in (g, beta))
    c = g.cumsum(-1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (c[..., :, None] - c[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    kb = k * beta[..., None]
    a = ((kb @ k.transpose(-1, -2)) * decay).masked_fill(~causal.tril(-1), 0.0)
    m = a + torch.eye(chunk, dtype=q.dtype, device=q.device)
    w = torch.linalg.solve_triangular(m, kb * c.exp()[..., None], upper=False,
                                      unitriangular=True)
    u0 = torch.linalg.solve_triangular(m, v * beta[..., None], upper=False, unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * decay
    outs = []
    for i in range(n):
        u = u0[:, :, i] - w[:, :, i] @ state
        ci = c[:, :, i]
        outs.append((q[:, :, i] * ci.exp()[..., None]) @ state + scores[:, :, i] @ u)
        last = ci[..., -1:]
        state = state * last.exp()[..., None] + (k[:, :, i] * (last - ci).exp()[..., None]
                                                 ).transpose(-1, -2) @ u
    o = torch.stack(outs, dim=2).reshape(b, h, n * chunk, dv)[:, :, :t]
    return o.transpose(1, 2), state


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet mixer with explicit state (fast weights S and the conv state).

    ``in_proj`` rows, grouped per query/key head (r value heads per query/key head):
    [q (dk), k (dk), v (r dv), z (r dv), b (r), a (r)]. A causal depthwise conv with SiLU runs
    over the [q, k, v] channels; q, k are L2-normalized; g = -exp(A_log) softplus(a + dt_bias),
    beta = sigmoid(b); the gated delta rule; RMSNorm(o) * out_norm_weight * silu(z) per value
    head; ``out_proj``.
    """

    def __init__(self, cfg: SleeptrainConfig):
        super().__init__()
        self.h = cfg.gdn_heads
        self.r = cfg.gdn_v_heads // cfg.gdn_heads
        self.hv = cfg.gdn_v_heads
        self.dk, self.dv = cfg.gdn_head_dim, cfg.gdn_v_head_dim
        self.kernel = cfg.conv_kernel
        self.chunk = cfg.gdn_chunk_size
        self.eps = cfg.norm_eps
        self.conv_group = 2 * self.dk + self.r * self.dv
        self.group_width = self.conv_group + self.r * self.dv + 2 * self.r
        self.in_proj = nn.Linear(cfg.d_model, self.h * self.group_width, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.h * self.conv_group, self.kernel))
        self.A_log = nn.Parameter(torch.empty(self.hv))
        self.dt_bias = nn.Parameter(torch.empty(self.hv))
        self.out_norm_weight = nn.Parameter(torch.ones(self.dv))
        self.out_proj = nn.Linear(self.hv * self.dv, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, state: torch.Tensor, conv: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, d], S [B, HV, dk, dv], conv state [B, C, K-1] (None: zeros); returns
        (output [B, T, d], S after the tokens, conv state after the tokens)."""
        b, t = x.shape[:2]
        dk, dv, r, hv = self.dk, self.dv, self.r, self.hv
        y = self.in_proj(x).view(b, t, self.h, self.group_width)
        cg = self.conv_group
        xc = y[..., :cg].reshape(b, t, -1).transpose(1, 2)  # [B, C, T]
        z = y[..., cg : cg + r * dv]
        braw = y[..., cg + r * dv : cg + r * dv + r]
        araw = y[..., cg + r * dv + r :]
        km1 = self.kernel - 1
        if conv is None:
            conv = xc.new_zeros(b, xc.shape[1], km1)
        ext = torch.cat([conv.to(xc.dtype), xc], dim=-1)
        mixed = F.conv1d(ext, self.conv_weight.to(xc.dtype).unsqueeze(1), groups=xc.shape[1])
        new_conv = ext[..., ext.shape[-1] - km1 :]
        mixed = F.silu(mixed.transpose(1, 2)).reshape(b, t, self.h, cg)
        cdt = _compute_dtype(x.dtype)
        q = F.normalize(mixed[..., :dk].to(cdt), p=2, dim=-1, eps=1e-6).to(x.dtype)
        k = F.normalize(mixed[..., dk : 2 * dk].to(cdt), p=2, dim=-1, eps=1e-6).to(x.dtype)
        v = mixed[..., 2 * dk :].reshape(b, t, hv, dv)
        g = -self.A_log.to(cdt).exp() * F.softplus(araw.reshape(b, t, hv).to(cdt)
                                                   + self.dt_bias.to(cdt))
        beta = torch.sigmoid(braw.reshape(b, t, hv).to(cdt))
        if r > 1:
            q, k = q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)
        q = q.to(cdt) * dk ** -0.5
        k, vf = k.to(cdt), v.to(cdt)
        s = state.to(cdt)
        if t <= 1:
            o, s = _delta_rule_recurrent(q, k, vf, g, beta, s)
        else:
            o, s = _delta_rule_chunked(q, k, vf, g, beta, s, self.chunk)
        of = o.to(v.dtype).to(cdt)
        of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps)
        of = of * self.out_norm_weight.to(cdt) * F.silu(z.reshape(b, t, hv, dv).to(cdt))
        return self.out_proj(of.to(x.dtype).reshape(b, t, -1)), s, new_conv


class SwiGLU(nn.Module):
    """fc2(silu(gate) * up) with fc1's rows interleaved per hidden unit: [g0, u0, g1, u1, ...]."""

    def __init__(self, cfg: SleeptrainConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, 2 * cfg.ffn_hidden, bias=False)
        self.fc2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x).unflatten(-1, (-1, 2))
        return self.fc2(F.silu(y[..., 0]) * y[..., 1])


class Block(nn.Module):
    """Pre-norm residual block: h + mixer(norm1(h)), then h + mlp(norm2(h)) if it has one."""

    def __init__(self, symbol: str, cfg: SleeptrainConfig):
        super().__init__()
        self.kind, has_mlp = PATTERN_SYMBOLS[symbol]
        if self.kind is not None:
            self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mixer = Attention(cfg) if self.kind == "attention" else GatedDeltaNet(cfg)
        if has_mlp:
            self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mlp = SwiGLU(cfg)
        self.has_mlp = has_mlp

    def mlp_part(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm2(h)) if self.has_mlp else h


# ----------------------------------------------------------------------------- streaming state


class SleeptrainCache:
    """The streaming state of a batch of sequences that advance together.

    Per block index: ``fast`` GDN fast weights [B, HV, dk, dv] (fp32; fp64 for fp64 models);
    ``conv`` the GDN conv state [B, C, K-1] after the current window's tokens (None: zeros);
    ``start_conv`` the conv state entering the window (sliding eviction; the sleep passes start
    from it); ``carry`` the keys/values [B, c, Hkv, D] carried from before the window (sliding,
    c <= L-1); ``kv`` the keys/values of the current window's tokens. ``h_loop``: the loop
    range's wake-pass outputs of the window's tokens (what the sleep passes start from).
    ``window_start``: the absolute position of the window's first token; ``n``: tokens in it.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, config: SleeptrainConfig, batch_size: int, device: torch.device,
                 dtype: torch.dtype):
        self.batch_size = batch_size
        self.window_len = config.window_len
        self.window_start = 0
        self.n = 0
        self.windows_slept = 0
        sdt = _compute_dtype(dtype)
        hv, dk, dv = config.gdn_v_heads, config.gdn_head_dim, config.gdn_v_head_dim
        kinds = [PATTERN_SYMBOLS[s][0] for s in config.pattern]
        self.fast: dict[int, torch.Tensor] = {
            i: torch.zeros(batch_size, hv, dk, dv, dtype=sdt, device=device)
            for i, kind in enumerate(kinds) if kind == "gdn"}
        self.conv: dict[int, torch.Tensor | None] = dict.fromkeys(self.fast)
        self.start_conv: dict[int, torch.Tensor | None] = dict.fromkeys(self.fast)
        att = [i for i, kind in enumerate(kinds) if kind == "attention"]
        self.carry: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = dict.fromkeys(att)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = dict.fromkeys(att)
        self.h_loop: list[torch.Tensor] = []

    @property
    def position(self) -> int:
        """Tokens consumed so far (the absolute position of the next token)."""
        return self.window_start + self.n

    @property
    def is_linear(self) -> list[bool]:
        # generate() reads this: [False] lets it drop the tokens a passed-in cache already
        # consumed (get_seq_length) from the prompt before the first forward.
        return [False]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position

    def _tensors(self):
        yield from ((self.fast, k) for k in self.fast)
        for d in (self.conv, self.start_conv, self.carry, self.kv):
            yield from ((d, k) for k in d)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Selects the batch rows ``beam_idx`` of every state tensor (beam search)."""
        def pick(x):
            if x is None:
                return None
            if isinstance(x, tuple):
                return tuple(pick(y) for y in x)
            return x.index_select(0, beam_idx.to(x.device))

        for d, key in list(self._tensors()):
            d[key] = pick(d[key])
        self.h_loop = [pick(h) for h in self.h_loop]
        self.batch_size = int(beam_idx.shape[0])


# transformers >= 5.x names the cache field ``cache`` (``past_key_values`` reads it too);
# older versions name it ``past_key_values``.
_CACHE_FIELD = ("cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
                else "past_key_values")


# ----------------------------------------------------------------------------- the model


class SleeptrainPreTrainedModel(PreTrainedModel):
    config_class = SleeptrainConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _is_stateful = True  # recurrent state: no assisted decoding, no cache cropping

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not create a DynamicCache: the first forward creates the state.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        """Fresh weights (a model built from a config); weights loaded from a checkpoint
        (flagged ``_is_hf_initialized`` by ``from_pretrained``) are left as they are."""
        std = self.config.init_std

        def fill(p: torch.Tensor | None, draw) -> None:
            if p is not None and not getattr(p, "_is_hf_initialized", False):
                with torch.no_grad():
                    p.copy_(draw(p))

        if isinstance(module, (nn.Linear, nn.Embedding)):
            fill(module.weight, lambda p: torch.randn_like(p) * std)
            fill(getattr(module, "bias", None), torch.zeros_like)
        elif isinstance(module, RMSNorm):
            fill(module.weight, torch.ones_like)
        elif isinstance(module, GatedDeltaNet):
            bound = 1.0 / math.sqrt(module.kernel)
            fill(module.conv_weight, lambda p: torch.empty_like(p).uniform_(-bound, bound))
            fill(module.A_log, lambda p: torch.empty_like(p).uniform_(1.0, 16.0).log())

            def dt_bias(p: torch.Tensor) -> torch.Tensor:
                dt = torch.exp(torch.empty_like(p).uniform_(math.log(1e-3), math.log(1e-1)))
                dt = dt.clamp(min=1e-4)
                return dt + torch.log(-torch.expm1(-dt))

            fill(module.dt_bias, dt_bias)
            fill(module.out_norm_weight, torch.ones_like)


class SleeptrainForCausalLM(SleeptrainPreTrainedModel, GenerationMixin):
    """Embedding -> blocks (pattern) -> final RMSNorm -> head (tied to the embedding or not),
    run window by window with sleep (module docstring)."""

    def __init__(self, config: SleeptrainConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(s, config) for s in config.pattern)
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = (None if config.tie_word_embeddings
                     else nn.Linear(config.d_model, config.vocab_size, bias=False))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed = value

    def get_output_embeddings(self) -> nn.Module | None:
        return self.head

    # -- streaming

    def new_cache(self, batch_size: int, device: torch.device | None = None) -> SleeptrainCache:
        """The state at the start of a sequence: zero fast weights, no conv state, no keys."""
        return SleeptrainCache(self.config, batch_size, device or self.embed.weight.device,
                               self.embed.weight.dtype)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        x = self.final_norm(h)
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(x, weight)

    def _advance(self, h: torch.Tensor, cache: SleeptrainCache) -> torch.Tensor:
        """The wake pass of a chunk that fits in the current window: every block once with
        the cache's state, which it updates; returns the final hidden states [B, t, d]."""
        cfg = self.config
        sliding = cfg.eviction == "sliding"
        band = cfg.window_len if sliding else None
        pos = cache.position
        for i, blk in enumerate(self.blocks):
            if blk.kind == "attention":
                parts = [p for p in ((cache.carry[i] if sliding else None), cache.kv[i])
                         if p is not None]
                prefix = None
                if parts:
                    prefix = (torch.cat([p[0] for p in parts], 1),
                              torch.cat([p[1] for p in parts], 1))
                y, (k, v) = blk.mixer(blk.norm1(h), pos, prefix, band)
                old = cache.kv[i]
                cache.kv[i] = (k, v) if old is None else (torch.cat([old[0], k], 1),
                                                          torch.cat([old[1], v], 1))
                h = h + y
            elif blk.kind == "gdn":
                y, cache.fast[i], cache.conv[i] = blk.mixer(blk.norm1(h), cache.fast[i],
                                                            cache.conv[i])
                h = h + y
            h = blk.mlp_part(h)
            if i == cfg.loop_end - 1:
                cache.h_loop.append(h)
        cache.n += h.shape[1]
        return h

    def _sleep_and_evict(self, cache: SleeptrainCache) -> None:
        """The full window sleeps (sleep_passes - 1 loop-range passes refine the fast
        weights), then the eviction policy drops what does not cross windows."""
        cfg = self.config
        sliding = cfg.eviction == "sliding"
        band = cfg.window_len if sliding else None
        if cfg.sleep_passes > 1:
            h = torch.cat(cache.h_loop, 1)
            fast = dict(cache.fast)
            for _ in range(cfg.sleep_passes - 1):
                for i in range(cfg.loop_start, cfg.loop_end):
                    blk = self.blocks[i]
                    if blk.kind == "attention":
                        y, _ = blk.mixer(blk.norm1(h), cache.window_start,
                                         cache.carry[i] if sliding else None, band)
                        h = h + y
                    elif blk.kind == "gdn":
                        y, fast[i], _ = blk.mixer(blk.norm1(h), fast[i],
                                                  cache.start_conv[i] if sliding else None)
                        h = h + y
                    h = blk.mlp_part(h)
            cache.fast = fast
        keep = cfg.window_len - 1
        for i in cache.kv:
            new = None
            if sliding and keep > 0:
                parts = [p for p in (cache.carry[i], cache.kv[i]) if p is not None]
                k = torch.cat([p[0] for p in parts], 1)
                v = torch.cat([p[1] for p in parts], 1)
                new = (k[:, -keep:], v[:, -keep:])
            cache.carry[i] = new
            cache.kv[i] = None
        for i in cache.conv:
            if not sliding:
                cache.conv[i] = None
            cache.start_conv[i] = cache.conv[i]
        cache.h_loop = []
        cache.window_start += cache.n
        cache.n = 0
        cache.windows_slept += 1

    def stream(self, h: torch.Tensor, cache: SleeptrainCache) -> torch.Tensor:
        """Feeds embedded tokens h [B, t, d] into the stream; returns their final hidden
        states [B, t, d] (each from the wake pass of its window)."""
        outs = []
        s, t, L = 0, h.shape[1], self.config.window_len
        while s < t:
            if cache.n == L:
                self._sleep_and_evict(cache)
            e = min(t, s + L - cache.n)
            outs.append(self._advance(h[:, s:e], cache))
            s = e
        return torch.cat(outs, 1) if outs else h

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: SleeptrainCache | None = None,
        past_key_values: SleeptrainCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Consumes ``input_ids`` [B, t] (or ``inputs_embeds`` [B, t, d]) after the tokens
        already in ``cache`` (a new stream when None); returns the wake-pass logits of the
        last ``logits_to_keep`` tokens (0: all) and the cache (``use_cache``, default true).
        ``labels`` [B, t]: the mean next-token cross-entropy (shifted inside, -100 ignored).
        ``position_ids`` are not read: positions come from the stream (``cache.position``).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError(
                "SleeptrainForCausalLM: attention_mask with padding (zeros) is not supported; "
                "the rows of a batch advance together through windows, so batch only "
                "equal-length sequences (or run them one at a time)")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, SleeptrainCache):
            length = cache.get_seq_length() if hasattr(cache, "get_seq_length") else None
            if length != 0:
                raise ValueError(f"cache must be a SleeptrainCache from this model, got "
                                 f"{type(cache).__name__}")
            cache = None  # an empty cache object of another kind: start a new stream
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if cache is None:
            cache = self.new_cache(h.shape[0], h.device)
        elif cache.batch_size != h.shape[0]:
            raise ValueError(f"the cache holds {cache.batch_size} sequences, the input has "
                             f"{h.shape[0]} rows")
        h = self.stream(h, cache)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self._logits(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        out_cache = cache if use_cache else None
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None \
            else return_dict
        if not return_dict:
            return tuple(x for x in (loss, logits, out_cache) if x is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: out_cache})


__all__ = ["SleeptrainCache", "SleeptrainForCausalLM",
           "SleeptrainPreTrainedModel"]
