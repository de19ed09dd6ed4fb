"""The gated delta rule with explicit initial and final state.

For every head, with fast weights S [d_k, d_v] (fp32), per token t:

    S <- exp(g_t) * S
    S <- S + beta_t * k_t (v_t - S^T k_t)^T
    o_t = S^T (scale * q_t)

Inputs follow FLA's layout: q, k [B, T, H, d_k]; v [B, T, HV, d_v]; g, beta [B, T, HV] with
HV a multiple of H (grouped value heads: value head j reads query/key head j // (HV // H)).
``initial_state`` is [B, HV, d_k, d_v]. Every backend returns (o [B, T, HV, d_v] in v's dtype,
final state [B, HV, d_k, d_v] in fp32, or fp64 for fp64 inputs), and gradients flow through q,
k, v, g, beta and the initial state.

Backends: ``fla`` (FLA's chunked Triton/TileLang kernels, CUDA), ``short`` (calls of at
most 64 tokens in sleeptrain's one-kernel-per-direction Triton rule, ``gdn_short``; longer
ones in FLA's), ``chunked`` (a PyTorch WY-form chunked reference, the CPU default),
``recurrent`` (token-by-token PyTorch, the ground truth for tests).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "fla", "short", "chunked", "recurrent")
_F = TypeVar("_F", bound=Callable)


def _outside_autocast(fn: _F) -> _F:
    """Runs a PyTorch reference in the dtype it states (fp32, or fp64 for fp64 inputs) also
    inside an autocast region: autocast would otherwise round its matrix products, the state
    recurrence's included, to bf16 (FLA's kernels keep the state and their accumulators in
    fp32 whatever the region). A no-op outside autocast."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        tensor = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        device = tensor.device.type
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _expand_qk(q: torch.Tensor, k: torch.Tensor, hv: int) -> tuple[torch.Tensor, torch.Tensor]:
    h = q.shape[2]
    if hv == h:
        return q, k
    if hv % h != 0:
        raise ValueError(f"value heads ({hv}) must be a multiple of query/key heads ({h})")
    r = hv // h
    return q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)


def _zero_state(q: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b, _, hv, dv = v.shape
    return torch.zeros(b, hv, q.shape[-1], dv, dtype=dtype, device=v.device)


@_outside_autocast
def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token reference (slow, exact): returns (o, final_state)."""
    dt, out_dtype = _compute_dtype(q), v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k = _expand_qk(q, k, v.shape[2])
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    s = _zero_state(q, v, dt) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(q.shape[1]):
        s = s * g[:, t].exp()[..., None, None]
        kt = k[:, t]
        pred = torch.einsum("bhk,bhkv->bhv", kt, s)
        delta = (v[:, t] - pred) * beta[:, t, :, None]
        s = s + kt[..., :, None] * delta[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, s))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o.to(out_dtype), s


@_outside_autocast
def chunked_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked (WY-form) reference: exact in exact arithmetic, O(T/C) sequential steps.

    Inside a chunk with cumulative log-decay c_i and Gamma_ij = exp(c_i - c_j) (j <= i):
    M = I + strict_lower(diag(beta) K K^T * Gamma), W = M^-1 (diag(beta) K * exp(c)),
    U = M^-1 (diag(beta) V); then per chunk V' = U - W S, O = (Q * exp(c)) S +
    tril(Q K^T * Gamma) V', S <- exp(c_last) S + (K * exp(c_last - c))^T V'.
    Padding tokens (beta = 0, g = 0) leave the state unchanged.
    """
    dt, out_dtype = _compute_dtype(q), v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, t_len, hv, dv = v.shape
    q, k = _expand_qk(q, k, hv)
    dk = q.shape[-1]
    s = _zero_state(q, v, dt) if initial_state is None else initial_state.to(dt)
    if t_len == 0:
        return v.new_zeros(v.shape), s
    c = chunk_size
    pad = (-t_len) % c
    # [B, H, T, D] in the compute dtype
    q, k, v = (x.to(dt).transpose(1, 2) for x in (q, k, v))
    g, beta = (x.to(dt).transpose(1, 2) for x in (g, beta))
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (t_len + pad) // c
    q = (q * scale).reshape(b, hv, n, c, dk)
    k = k.reshape(b, hv, n, c, dk)
    v = v.reshape(b, hv, n, c, dv)
    beta = beta.reshape(b, hv, n, c)
    cum = g.reshape(b, hv, n, c).cumsum(-1)
    lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    diff = (cum[..., :, None] - cum[..., None, :]).masked_fill(~lower, float("-inf"))
    gamma = diff.exp()  # zero above the diagonal
    kb = k * beta[..., None]
    strict = (kb @ k.transpose(-1, -2)) * gamma
    eye = torch.eye(c, dtype=dt, device=q.device)
    m = eye + strict.masked_fill(~lower.tril(-1), 0.0)
    w = torch.linalg.solve_triangular(m, kb * cum.exp()[..., None], upper=False,
                                      unitriangular=True)
    u = torch.linalg.solve_triangular(m, v * beta[..., None], upper=False, unitriangular=True)
    qk = (q @ k.transpose(-1, -2)) * gamma
    outs = []
    for i in range(n):
        v_new = u[:, :, i] - w[:, :, i] @ s
        o_i = (q[:, :, i] * cum[:, :, i, :, None].exp()) @ s + qk[:, :, i] @ v_new
        outs.append(o_i)
        last = cum[:, :, i, -1]
        k_dec = k[:, :, i] * (last[..., None] - cum[:, :, i]).exp()[..., None]
        s = s * last.exp()[..., None, None] + k_dec.transpose(-1, -2) @ v_new
    o = torch.stack(outs, dim=2).reshape(b, hv, n * c, dv)[:, :, :t_len]
    return o.transpose(1, 2).to(out_dtype), s


def fla_available() -> bool:
    """True when FLA's GPU kernels can run here (CUDA and an importable ``fla``)."""
    if not torch.cuda.is_available():
        return False
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception:
        return False
    return True


def _version(text: str) -> tuple[int, ...]:
    """The leading numbers of a version string ("3.7.1+git1234" -> (3, 7, 1))."""
    out = []
    for part in text.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def fla_fp32_gate_caveat(device: torch.device | int | None = None) -> str | None:
    """Why FLA's fp32 gate gradients are less exact on this GPU and Triton, or None.

    On Hopper (compute capability 9.x) with Triton >= 3.4 and < 3.7.1, FLA 0.6.0 refuses its
    Triton kernel for the gated backward (``chunk_bwd_dqkwg``, miscompiled there: FLA issue
    #640) and runs its TileLang kernel, whose gate gradients (``A_log``, ``dt_bias``) in
    fp32 were 2.1e-2 of their largest entry from float64 on an H100, every run alike, against
    at most 2.8e-3 for every other parameter (docs/benchmarks.md, 2026-12-06). Under bf16
    autocast (the default on CUDA) this is below bf16's own rounding."""
    if not torch.cuda.is_available():
        return None
    try:
        import triton
    except ImportError:
        return None
    version = _version(getattr(triton, "__version__", ""))
    if torch.cuda.get_device_capability(device)[0] != 9 or not (3, 4) <= version < (3, 7, 1):
        return None
    return (f"FLA runs the gated delta rule's backward with its TileLang kernel on this Hopper "
            f"GPU with Triton {triton.__version__} (its Triton kernel is miscompiled by "
            "Triton >= 3.4 and < 3.7.1, FLA issue #640); in fp32 its gate gradients (A_log, "
            "dt_bias) were 2.1e-2 of their largest entry from float64 on an H100, eight "
            "times any other parameter's (docs/benchmarks.md). For fp32-exact gate gradients "
            "use Triton >= 3.7.1 or model.gdn_backend=chunked (slower).")


# the chunk lengths sleeptrain runs FLA 0.6.0's gated delta rule with: FLA takes 16 too, but its
# TileLang backward (the one FLA uses on Hopper) refuses 16-row chunks ("no valid warp
# partition for T.gemm: M=16, N=16", H100, 2026-12-07)
FLA_CHUNKS = (32, 64)


def fla_chunk(t: int, setting: int = 64) -> int:
    """FLA's chunk length for a call over ``t`` tokens: ``setting`` (``model.fla_chunk_size``)
    when it is one of ``FLA_CHUNKS``; 0 means the smallest of them that holds the call's
    tokens (64 from 64 tokens on): a 24-token window then runs in one 32-row chunk, not in
    a 64-row one that is mostly padding."""
    if setting:
        return setting
    return next(c for c in FLA_CHUNKS if c >= min(t, FLA_CHUNKS[-1]))


def fla_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLA's ``chunk_gated_delta_rule`` (CUDA) with the state in and out in fp32; ``chunk``
    is ``fla_chunk``'s setting (64, FLA's default; 0 picks by length).

    Decoding uses it too: FLA 0.6.0's ``fused_recurrent_gated_delta_rule`` returned NaN
    outputs and states on an H200 (torch 2.11, triton 3.6) in our check, see
    ``docs/benchmarks.md``.
    """
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "model.gdn_backend='fla' needs flash-linear-attention with a working triton "
            f"(pip install 'flash-linear-attention'): {e}"
        ) from e
    if not q.is_cuda:
        raise RuntimeError(
            "model.gdn_backend='fla' runs on CUDA tensors only; use 'chunked' on CPU")
    if initial_state is not None:
        initial_state = initial_state.float()
    # FLA wants q, k, v in one dtype; under autocast the projections give bf16.
    dtype = v.dtype
    o, s = chunk_gated_delta_rule(
        q.to(dtype).contiguous(),
        k.to(dtype).contiguous(),
        v.contiguous(),
        g.float().contiguous(),
        beta.to(dtype).contiguous(),
        scale=scale,
        initial_state=initial_state,
        output_final_state=True,
        chunk_size=fla_chunk(q.shape[1], chunk),
    )
    return o, s


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 32,
    fla_chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatches to ``backend`` (auto: FLA for CUDA tensors below fp64, else chunked).
    ``chunk_size``: the chunked reference's chunk; ``fla_chunk_size``: FLA's (``fla_chunk``)."""
    if backend not in BACKENDS:
        raise ValueError(f"model.gdn_backend: unknown backend {backend!r}; one of {BACKENDS}")
    if backend == "auto":
        backend = "fla" if q.is_cuda and q.dtype != torch.float64 else "chunked"
    if backend == "short":
        from sleeptrain.model.kernels.gdn_short import MAX_T, short_gated_delta_rule

        if q.shape[1] <= MAX_T:
            return short_gated_delta_rule(q, k, v, g, beta, scale, initial_state)
        backend = "fla"
    if backend == "fla":
        return fla_gated_delta_rule(q, k, v, g, beta, scale, initial_state, fla_chunk_size)
    if backend == "recurrent":
        return recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state)
    return chunked_gated_delta_rule(q, k, v, g, beta, scale, initial_state, chunk_size)


def chunk_transition(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's state map S_out = M S_in + E (context parallelism): per token the rule is
    S <- exp(g) (I - beta k k^T) S + beta k v^T, affine in S, so over the chunk
    M = prod_t exp(g_t) (I - beta_t k_t k_t^T) (latest factor leftmost) and E is the final
    state from a zero state. Both come from one call of the same kernel on the augmented
    values [v, 0] from the initial state [0, I] (its final state is [E, M]).

    Same inputs as :func:`gated_delta_rule`; returns M [B, HV, d_k, d_k] and
    E [B, HV, d_k, d_v] in the state dtype (fp32; fp64 for fp64 inputs), differentiable.
    """
    b, t, hv, dv = v.shape
    dk = q.shape[-1]
    sdt = _compute_dtype(q)
    v_aug = torch.cat([v, v.new_zeros(b, t, hv, dk)], dim=-1)
    eye = torch.eye(dk, dtype=sdt, device=v.device).expand(b, hv, dk, dk)
    init = torch.cat([torch.zeros(b, hv, dk, dv, dtype=sdt, device=v.device), eye], dim=-1)
    if backend == "short":  # the augmented width dv + dk need not be a power of two
        backend = "fla"
    _, final = gated_delta_rule(q, k, v_aug, g, beta, scale, init, backend, chunk_size)
    return final[..., dv:], final[..., :dv]


@_outside_autocast
def compose_chunk_states(m: torch.Tensor, e: torch.Tensor, s0: torch.Tensor,
                         upto: int | None = None) -> list[torch.Tensor]:
    """Incoming states of consecutive chunks from their maps m [C, B, HV, d_k, d_k],
    e [C, B, HV, d_k, d_v] (``chunk_transition``) and the incoming state s0 [B, HV, d_k, d_v]:
    out[0] = s0, out[r + 1] = m[r] out[r] + e[r], for r < ``upto`` (default C; out[C] is the
    state after the last chunk). Differentiable in all three."""
    n = m.shape[0] if upto is None else upto
    out = [s0]
    for r in range(n):
        out.append(m[r].to(s0.dtype) @ out[-1] + e[r].to(s0.dtype))
    return out
