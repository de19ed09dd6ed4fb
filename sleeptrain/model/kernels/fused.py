"""The elementwise chains of the hybrid's layers, eager or fused by ``torch.compile``.

Between its GEMMs and its GDN/attention kernels, a block runs chains of small elementwise ops
in fp32 -- RMSNorm, RoPE, the SwiGLU gate, the GDN short convolution with its SiLU, the GDN
input gates (L2-normalized q/k, decay g, beta) and the GDN output norm with its SiLU gate --
each a handful of kernels forward and more backward, each reading and writing the whole
activation. On an H200 they took about 75% of the GPU time of a 350M hybrid's training step
(docs/benchmarks.md). ``torch.compile`` turns each chain into one or two generated kernels per
direction.

The layers call the combined functions -- ``gdn_inputs`` (the GDN projection to the delta
rule's inputs: ``causal_conv_silu``, then ``gdn_gates``) and ``qkv_rope`` (attention's
projection to q, k, v with ``apply_rope``) -- so that the backward writes each projection's
gradient once; the parts stay callable on their own (tests compare each compiled part).

Every function here is the PyTorch reference (what runs on CPU, in fp64 and with compilation
off); called with ``compiled=True`` it routes CUDA tensors (below fp64) through
``torch.compile`` of the same function (the convolution, alone or inside ``gdn_inputs``,
compiles its shifted-sum form, equal to the reference in fp64: tests/test_kernels.py). Tests
compare the two on GPU (tests/test_fused_gpu.py). There is no process-wide switch: each layer
passes its own ``compiled`` attribute, which ``HybridModel.set_kernels`` sets from
``train.compile``.

``compiled`` is ``False`` (eager), ``True`` (static shapes: kernels per distinct input shape,
what training uses) or ``"dynamic"`` (one set of kernels for any batch and length, besides
torch's own specializations of sizes 0 and 1). Streaming inference switches its layers to
``"dynamic"`` for the calls whose shapes follow the samples' lengths (a batch's last windows,
the windows that fill while decoding): with static shapes each new length compiled every
chain again (and, these compiles being ``fullgraph``, torch raises once a chain passes its
recompile limit), and long-context evaluation has a new length in nearly every sample.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# torch.compile wrappers, made once per (chain, dynamic); a chain whose dynamic-shape compile
# failed has its static wrapper under (chain, True) too
_COMPILED: dict[tuple[str, bool], Callable[..., Any]] = {}


def configure_compile() -> None:
    """What compiled chains need from torch.compile (idempotent, called before the first
    compiled call): a cache large enough for every distinct shape (windows, the last window,
    eval batches) and inductor's deterministic mode.

    Static-shape chains (``compiled_chain(dynamic=False)``, training's): every distinct input
    shape gets its own kernels, generated the same way whatever the process compiled before,
    and inductor runs no on-device benchmarking that could pick configurations with other
    roundings. So a resumed process computes exactly what the uninterrupted one did
    (docs/design.md).
    """
    import torch._dynamo
    import torch._inductor.config as inductor_config

    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    if hasattr(inductor_config, "deterministic"):
        inductor_config.deterministic = True


def compiled_chain(fn: Callable[..., Any], dynamic: bool, name: str | None = None,
                   backend: str | Callable[..., Any] = "inductor") -> Callable[..., Any]:
    """The ``torch.compile`` wrapper of chain ``fn`` (made once per name and ``dynamic``):
    ``dynamic=False`` static shapes (every distinct input shape its own kernels, generated
    the same way whatever the process compiled before, so a resumed process computes exactly
    what the uninterrupted one did), ``dynamic=True`` symbolic shapes from the first call
    (one kernel set for every batch and length, so no recompilation per length; inductor
    still tunes from the first call's sizes, so this form's roundings are not promised to
    be the same across processes). ``backend``: another torch.compile backend (not cached;
    tests trace with a counting CPU backend)."""
    key = (name or fn.__name__, bool(dynamic))
    fast = _COMPILED.get(key) if backend == "inductor" else None
    if fast is None:
        configure_compile()
        fast = torch.compile(fn, fullgraph=True, dynamic=bool(dynamic), backend=backend)
        if dynamic:
            fast = _without_duck_shapes(fast)
        if backend == "inductor":
            _COMPILED[key] = fast
    return fast


def _without_duck_shapes(fast: Callable[..., Any]) -> Callable[..., Any]:
    """``fast`` traced without duck shaping: by default dynamo gives sizes that are equal in
    the first call one symbol (a batch of 3 and a convolution's 3 carried inputs), guards on
    their equality and traces again when a later call breaks it, so which kernels ran would
    depend on the first call's coincidences. Scoped to these calls (torch's config patch),
    not set process-wide."""
    from torch.fx.experimental import _config as fx_config

    @functools.wraps(fast)
    def call(*args: Any) -> Any:
        with fx_config.patch(use_duck_shape=False):
            return fast(*args)

    return call


def _compilable(x: torch.Tensor) -> bool:
    """Compiled chains run for CUDA tensors below fp64 (fp64 and CPU: the reference)."""
    return x.is_cuda and x.dtype != torch.float64


def _fusable(fn: Callable[..., Any], form: Callable[..., Any] | None = None,
             name: str | None = None) -> Callable[..., Any]:
    """``fn`` eagerly; with ``compiled`` truthy (the calling layer's ``compiled`` attribute),
    torch.compile'd (``form``, default ``fn`` itself) for CUDA tensors below fp64: static
    shapes for ``True``, symbolic ones for ``"dynamic"`` (a dynamic-shape compile that the
    compiler cannot do -- ``Unsupported``, ``BackendCompilerFailed`` -- warns once with its
    cause and the chain uses the static kernels from then on; any other error, such as a
    tracing error from bad inputs, propagates). ``name``: the public name, where
    ``fn`` is a private reference that other chains call."""
    public = name or fn.__name__

    @functools.wraps(fn)
    def dispatch(x: torch.Tensor, *args: Any, compiled: bool | str = False) -> Any:
        if compiled and _compilable(x):
            static = compiled_chain(form or fn, False, public)
            if compiled == "dynamic":
                fast = compiled_chain(form or fn, True, public)
                if fast is not static:
                    try:
                        return fast(x, *args)
                    except Exception as e:
                        from torch._dynamo.exc import BackendCompilerFailed, Unsupported

                        if not isinstance(e, (BackendCompilerFailed, Unsupported)):
                            raise  # not a compiler limitation: the caller's error
                        out = static(x, *args)  # raises too if the inputs are at fault
                        _COMPILED[(public, True)] = static
                        cause = getattr(e, "inner_exception", None) or e
                        why = (f"{type(cause).__name__}: "
                               f"{(str(cause).strip().splitlines() or [''])[0]}")
                        warnings.warn(f"fused.{public}: the dynamic-shape compile failed "
                                      f"({why}); static-shape kernels (one compile per "
                                      "shape) from here on", stacklevel=2)
                        return out
            return static(x, *args)
        return fn(x, *args)

    if name is not None:
        dispatch.__name__ = dispatch.__qualname__ = name
    return dispatch


def _cdt(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@_fusable
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.dtype | None = None) -> torch.Tensor:
    """x / rms(x) * weight in fp32 (fp64 for fp64 x), returned as ``out`` (default x's dtype).

    The layers pass bf16 under CUDA autocast: every norm output feeds a linear, which would
    round it to bf16 anyway, so the rounding moves into the norm's kernel (same values).
    """
    dt = _cdt(x)
    xf = x.to(dt)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(dt)).to(x.dtype if out is None else out)


@_fusable
def swiglu(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for y [..., 2h] with gate/up interleaved per hidden unit."""
    gate, up = y.unflatten(-1, (-1, 2)).unbind(-1)
    return F.silu(gate) * up


@_fusable
def gdn_token_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                   beta: torch.Tensor, state: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule for one token per row (decoding): q, k [B, 1, H, dk]
    (L2-normalized), v [B, 1, HV, dv], g, beta [B, 1, HV], state [B, HV, dk, dv] (None:
    zeros). Returns (o [B, 1, HV, dv] in v's dtype, the new state in fp32, fp64 for fp64 v):
    S <- exp(g) S, S <- S + k (beta (v - S^T k))^T, o = S^T q / sqrt(dk), value head j
    reading query/key head j // (HV / H) -- ``recurrent_gated_delta_rule`` for one token,
    written with elementwise products and sums (autocast leaves them in the state's dtype).
    Compiled it is a few generated kernels that read and write the state once, where FLA's
    chunk path runs its kernels over a 64-token chunk padded from one token."""
    b, _, hv, dv = v.shape
    r, dk = hv // q.shape[2], q.shape[-1]
    cdt = _cdt(v)
    s = v.new_zeros(b, hv, dk, dv, dtype=cdt) if state is None else state.to(cdt)
    qf = q[:, 0].to(cdt).repeat_interleave(r, dim=1) * dk**-0.5
    kf = k[:, 0].to(cdt).repeat_interleave(r, dim=1)
    s = s * g[:, 0].to(cdt).exp()[..., None, None]
    pred = (kf[..., None] * s).sum(-2)
    delta = (v[:, 0].to(cdt) - pred) * beta[:, 0].to(cdt)[..., None]
    s = s + kf[..., None] * delta[..., None, :]
    o = (qf[..., None] * s).sum(-2)
    return o[:, None].to(v.dtype), s


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Llama/Qwen2 convention) on x [B, T, H, D]; cos, sin [T, D]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rot = torch.cat([-x2, x1], dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return (x.to(c.dtype) * c + rot.to(c.dtype) * s).to(x.dtype)


apply_rope = _fusable(_apply_rope, name="apply_rope")


@_fusable
def qkv_rope(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention's q, k, v from its fused projection y [B, T, KV, (group + 2) D] (rows per
    key/value head: the group's queries, k, v), RoPE applied to q and k: q [B, T, KV group, D],
    k, v [B, T, KV, D]. One function, so that compiled, the backward writes the projection's
    gradient in one pass instead of two RoPE backward kernels and a concatenation."""
    b, t, kv, width = y.shape
    hd = width // (group + 2)
    q, k, v = torch.split(y, [group * hd, hd, hd], dim=-1)
    q = q.reshape(b, t, kv * group, hd)
    return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v


def _gdn_gates(qkv: torch.Tensor, araw: torch.Tensor, braw: torch.Tensor, a_log: torch.Tensor,
              dt_bias: torch.Tensor, dk: int, hv: int,
              dv: int) -> tuple[torch.Tensor, ...]:
    """The delta rule's inputs from the conv output qkv [B, T, H, 2 dk + r dv] and the raw
    gates araw, braw [B, T, H, r]: q, k (L2-normalized in fp32, qkv's dtype) [B, T, H, dk],
    v [B, T, HV, dv], g = -exp(A_log) softplus(a + dt_bias) and beta = sigmoid(b) [B, T, HV]
    (fp32; fp64 for fp64 input)."""
    b, t = qkv.shape[:2]
    cdt = _cdt(qkv)
    q = F.normalize(qkv[..., :dk].to(cdt), p=2, dim=-1, eps=1e-6).to(qkv.dtype)
    k = F.normalize(qkv[..., dk : 2 * dk].to(cdt), p=2, dim=-1, eps=1e-6).to(qkv.dtype)
    v = qkv[..., 2 * dk :].reshape(b, t, hv, dv)
    a = araw.reshape(b, t, hv).to(cdt)
    g = -a_log.to(cdt).exp() * F.softplus(a + dt_bias.to(cdt))
    beta = torch.sigmoid(braw.reshape(b, t, hv).to(cdt))
    return q, k, v, g, beta


def _causal_conv_silu_shifted(ext: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``causal_conv_silu`` as K shifted multiply-adds in fp32 (fp64 for fp64 ext), channels
    last: the form ``torch.compile`` turns into one generated kernel per direction."""
    k = weight.shape[1]
    t = ext.shape[1] - k + 1
    cdt = _cdt(ext)
    e, w = ext.to(cdt), weight.to(cdt)
    y = e[:, 0:t] * w[:, 0]
    for j in range(1, k):
        y = y + e[:, j : j + t] * w[:, j]
    return F.silu(y).to(ext.dtype)


def _causal_conv_silu(ext: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SiLU of the causal depthwise convolution: ext [B, T + K - 1, C] (the K-1 inputs before
    the window, then the window's T), weight [C, K]; returns [B, T, C] in ext's dtype with
    y[t] = silu(sum_j weight[:, j] * ext[t + j]). Eagerly this is torch's grouped
    ``F.conv1d`` (cuDNN on CUDA) in ext's dtype; compiled it is the shifted-sum form
    (``_causal_conv_silu_shifted``, fp32 sums, no [B, C, T] transposes)."""
    y = F.conv1d(ext.transpose(1, 2), weight.to(ext.dtype).unsqueeze(1), groups=ext.shape[2])
    return F.silu(y.transpose(1, 2))


causal_conv_silu = _fusable(_causal_conv_silu, _causal_conv_silu_shifted,
                            name="causal_conv_silu")
gdn_gates = _fusable(_gdn_gates, name="gdn_gates")


def _gdn_inputs_via(conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                    ) -> Callable[..., tuple[torch.Tensor, ...]]:
    def gdn_inputs(y: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor,
                   a_log: torch.Tensor, dt_bias: torch.Tensor, dk: int, r: int,
                   dv: int) -> tuple[torch.Tensor, ...]:
        """Everything between a GDN block's input projection and its delta rule.

        y [B, T, H, G]: the projection's rows per query/key head h (r value heads per qk
        head), [q_h (dk), k_h (dk), v (r dv), z (r dv), b (r), a (r)]; conv_state [B, C, K-1]
        (C = H (2 dk + r dv)): the K-1 conv inputs before the window; conv_weight [C, K].
        Returns q, k [B, T, H, dk] (L2-normalized), v [B, T, H r, dv], g, beta [B, T, H r]
        (fp32; fp64 for fp64 y), z [B, T, H r, dv] and the new conv state [B, C, K-1]:
        ``causal_conv_silu`` over the [q, k, v] channels, then ``gdn_gates``. One function,
        so that compiled it is one kernel per direction: the window's concatenation with the
        conv state, the convolution, the gates, and in backward the projection's whole
        gradient (no split's concatenation)."""
        b, t, h, _ = y.shape
        cg = 2 * dk + r * dv
        qkv, z, braw, araw = torch.split(y, [cg, r * dv, r, r], dim=-1)
        x = qkv.reshape(b, t, h * cg)
        ext = torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], dim=1)
        new_state = ext[:, t:].transpose(1, 2).contiguous()
        c = conv(ext, conv_weight).view(b, t, h, cg)
        q, k, v, g, beta = _gdn_gates(c, araw, braw, a_log, dt_bias, dk, h * r, dv)
        return q, k, v, g, beta, z.reshape(b, t, h * r, dv), new_state

    return gdn_inputs


gdn_inputs = _fusable(_gdn_inputs_via(_causal_conv_silu),
                      _gdn_inputs_via(_causal_conv_silu_shifted))


@_fusable
def gated_rms_norm(o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                   out: torch.dtype) -> torch.Tensor:
    """RMSNorm(o) * weight * silu(z) per value head, in fp32 (fp64 for fp64 o), as ``out``."""
    cdt = torch.float64 if out == torch.float64 else torch.float32
    of = o.to(cdt)
    of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + eps)
    return (of * weight.to(cdt) * F.silu(z.to(cdt))).to(out)


__all__ = ["apply_rope", "causal_conv_silu", "compiled_chain", "configure_compile",
           "gated_rms_norm", "gdn_gates", "gdn_inputs", "gdn_token_step", "qkv_rope", "rms_norm",
           "swiglu"]
