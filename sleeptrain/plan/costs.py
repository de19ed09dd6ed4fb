"""Parameter counts, sleep-aware FLOPs per token and a per-GPU memory estimate.

``sleeptrain plan CONFIG --gpus G`` prints these before any heavy work; the trainer logs MFU
with :func:`train_flops_per_token`. The formulas (docs/design.md, "FLOPs and MFU"):

Forward FLOPs per token of a block (multiply-add = 2 FLOPs, d = d_model):

* attention: projections ``2 d (Hq + 2 Hkv) D + 2 Hq D d``; scores and values
  ``4 Hq D k``, with ``k`` the keys a query sees: ``(L + 1) / 2`` on average for hard
  eviction (causal inside the window), ``L`` for sliding eviction (the band of L keys);
* GDN: projections ``2 d H w + 2 Hv dv d`` (w: the fused in-projection's rows per head), the
  short convolution ``2 K C``, and the chunked gated delta rule ``Hv (6 dk dv + 2 c (dk + dv))``
  with chunk size c: per token the output and the state update through the state
  (``q S``, ``k S``, ``k^T u``: ``6 dk dv``) and the causal intra-chunk products
  (``q k^T`` and ``(.) v`` over on average c/2 positions, twice for the WY terms);
* SwiGLU: ``6 d f``; the output head ``2 d V`` (wake pass only); norms and elementwise ops
  are not counted.

A training token costs ``3 F_all + (N - 1 + 2 g) F_loop s``: the wake pass over all blocks
forward and backward (backward = 2 x forward), N - 1 sleep passes over the loop range
forward, and the backward of the g of them that are differentiated (all N - 1 for full BPTT,
the last k for truncated and implicit/phantom, the m Neumann vector-Jacobian products for
implicit/neumann), where ``s`` is the share of windows that sleep (the last window of a row
never does). Activation
checkpointing recomputes a forward pass; that is hardware work, not model FLOPs, and MFU
does not count it (as in Megatron-LM and PaLM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from sleeptrain.config import SleepConfig, autocast_on, switch_on
from sleeptrain.config.validate import PATTERN_SYMBOLS
from sleeptrain.sleep.runner import sleep_passes


@dataclass(frozen=True)
class BlockCost:
    params: int
    matrices: int  # parameters in 2-D hidden matrices (Muon's; the rest is AdamW's)
    flops: float  # forward FLOPs per token
    linears: int = 0  # parameters in the block's megatron-core linears (projections, MLP)
    shapes: tuple[tuple[int, int], ...] = ()  # those matrices' (rows, columns), whole


#: Newton-Schulz iterations of Muon's orthogonalization (torch.optim.Muon's default, which
#: ``sleeptrain.train.optim.build_optimizer`` keeps)
MUON_NS_STEPS = 5


def _attn(m: Any) -> tuple[int, int, int]:
    hkv = m.n_kv_heads or m.n_heads
    hd = m.head_dim or m.d_model // m.n_heads
    return m.n_heads, hkv, hd


def _gdn(m: Any) -> tuple[int, int, int, int]:
    hv = m.gdn_v_heads or m.gdn_heads
    return m.gdn_heads, hv, m.gdn_head_dim, m.gdn_v_head_dim or m.gdn_head_dim


def block_cost(m: Any, symbol: str, window: int, sliding: bool) -> BlockCost:
    """Parameters and forward FLOPs per token of one block of pattern symbol ``symbol``."""
    from sleeptrain.config import ffn_hidden

    kind, has_mlp = PATTERN_SYMBOLS[symbol]
    d = m.d_model
    params, flops, lin = 0, 0.0, 0
    shapes: list[tuple[int, int]] = []  # the Muon matrices (sleeptrain.train.optim)
    if kind == "attention":
        hq, hkv, hd = _attn(m)
        proj = d * (hq + 2 * hkv) * hd + hq * hd * d
        shapes += [((hq + 2 * hkv) * hd, d), (d, hq * hd)]
        lin += proj
        params += proj + d + ((hq + 2 * hkv) * hd if m.qkv_bias else 0)
        keys = window if sliding else (window + 1) / 2
        flops += 2 * proj + 4 * hq * hd * keys
    elif kind == "gdn":
        h, hv, dk, dv = _gdn(m)
        r = hv // h
        width = 2 * dk + 2 * r * dv + 2 * r
        conv_ch = h * (2 * dk + r * dv)
        proj = d * h * width + hv * dv * d
        shapes += [(h * width, d), (d, hv * dv)]  # the conv kernel [C, K] is AdamW's
        lin += proj
        params += proj + conv_ch * m.conv_kernel + 2 * hv + dv + d
        c = m.gdn_chunk_size
        flops += 2 * proj + 2 * m.conv_kernel * conv_ch + hv * (6 * dk * dv + 2 * c * (dk + dv))
    if has_mlp:
        f = ffn_hidden(m)
        shapes += [(2 * f, d), (d, f)]
        lin += 3 * d * f
        params += 3 * d * f + d
        flops += 6 * d * f
    mats = sum(rows * cols for rows, cols in shapes)
    return BlockCost(params, mats, flops, lin, tuple(shapes))


def muon_flops(m: Any, symbols: str | None = None) -> float:
    """FLOPs of Muon's orthogonalization per optimizer step over the Muon matrices of the
    blocks ``symbols`` (default the whole pattern), whole matrices: ``MUON_NS_STEPS``
    quintic Newton-Schulz iterations of ``4 a^2 b + 2 a^3`` for an a x b matrix, a <= b
    (``X X^T``, its square, the product with X: ``sleeptrain.train.optim.newton_schulz``).
    Not model FLOPs: MFU leaves it out, as it leaves out recomputation, but a step pays it.
    Every TP rank orthogonalizes the full matrices it holds a shard of; with
    ``parallel.shard_optimizer`` each DP rank only the matrices it owns."""
    total = 0.0
    for sym in m.pattern if symbols is None else symbols:
        for rows, cols in block_cost(m, sym, 1, False).shapes:
            a, b = min(rows, cols), max(rows, cols)
            total += MUON_NS_STEPS * (4 * a * a * b + 2 * a**3)
    return total


def param_count(m: Any) -> int:
    """Parameters of the full (unsharded) model."""
    n = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.d_model
    return n + sum(block_cost(m, s, 1, False).params for s in m.pattern)


def linear_weight_count(m: Any) -> int:
    """Entries of the weights the fused linears copy to bf16 (full model): every block's
    projection and MLP matrices and the output head (the embedding when tied)."""
    blocks = sum(block_cost(m, sym, 1, False).linears for sym in m.pattern)
    return blocks + m.vocab_size * m.d_model


def param_bytes(m: Any) -> int:
    """Bytes of one value in ``model.params_dtype``."""
    return {"float32": 4, "float64": 8, "bfloat16": 2}[m.params_dtype]


def row_tokens(cfg: DictConfig) -> int:
    """Input tokens of one training row: the task's rows minus the last token (its target)
    for ``data.source=task`` (tasks fix their own length), else ``data.seq_len``."""
    if cfg.data.source == "task":
        from sleeptrain.data.tasks import build_task

        return int(build_task(cfg.data.task, **dict(cfg.data.task_args)).seq_len) - 1
    return int(cfg.data.seq_len)


def _windows(seq_len: int, window: int) -> int:
    return max(1, math.ceil(seq_len / window))


def train_flops_per_token(cfg: DictConfig, seq_len: int | None = None, passes: int | None = None,
                          sleep: Any | None = None) -> float:
    """Sleep-aware model FLOPs per trained token (module docstring) for rows of ``seq_len``
    input tokens (default ``data.seq_len``) and ``sleep`` (default ``cfg.sleep``)."""
    from sleeptrain.config import loop_range

    m, s = cfg.model, (sleep if sleep is not None else cfg.sleep)
    n = int(s.passes if passes is None else passes)
    L, sliding = int(s.window_len), s.eviction == "sliding"
    costs = [block_cost(m, sym, L, sliding).flops for sym in m.pattern]
    a, b = loop_range(m)
    f_all = sum(costs) + 2 * m.d_model * m.vocab_size
    w = _windows(int(seq_len or cfg.data.seq_len), L)
    sleep_units = (n - 1) + 2 * backward_passes(s, n)  # forwards + 2 x passes with backward
    return 3 * f_all + sleep_units * sum(costs[a:b]) * (w - 1) / w


def backward_passes(sleep: SleepConfig, passes: int) -> int:
    """Sleep passes of a window that are differentiated: all N-1 (full), the last k
    (truncated, implicit/phantom), or the m vector-Jacobian products of implicit/neumann."""
    n_sleep = sleep_passes(max(passes, 1))
    if sleep.grad_mode == "full":
        return n_sleep
    if sleep.grad_mode == "implicit" and sleep.implicit_method == "neumann":
        return min(int(sleep.neumann_terms), n_sleep)
    return min(int(sleep.grad_passes), n_sleep)


#: Activation values kept per token by one block in backward, in units of d_model values of
#: the compute dtype, by block kind and kernel path (``activation_coefficients``). "cpu": the
#: PyTorch reference kernels in fp32 on a CPU, measured with the CPU allocator's exact peak
#: (2026-12-06, d = 128 and 256, H x dk = d, f = 2.75 d: G 53.3 / 51.6, A 23.0 / 23.0, an MLP
#: alone 14.0; the test holds the estimate to a measured step). "cuda": FLA's kernels under
#: bf16 autocast, fit to recorded GPU runs (two with checkpointing, one that ran out of
#: memory; docs/design.md, "Memory estimate"). "recompute": with ``sleep.checkpoint`` the
#: window-pass being recomputed holds this multiple of its forward activations (CPU: 1.4, read
#: from one measured step, d = 192, N = 3: its gradients live beside them).
ACTIVATION_COEFFICIENTS = {
    "cpu": {"gdn": 52.0, "attention": 23.0, "mlp_only": 14.0, "recompute": 1.4},
    "cuda": {"gdn": 41.0, "attention": 20.0, "mlp_only": 11.0, "recompute": 1.0},
}


def activation_coefficients(cfg: DictConfig) -> dict[str, float]:
    """The coefficient table of the kernel path this config trains on: CUDA (FLA) unless the
    run is on a CPU or asks for the PyTorch reference GDN kernels."""
    on_cpu = cfg.train.device == "cpu" or cfg.model.gdn_backend in ("chunked", "recurrent")
    return ACTIVATION_COEFFICIENTS["cpu" if on_cpu else "cuda"]


def block_activation_values(m: Any, symbol: str, table: dict[str, float], tp: int) -> float:
    """Values per token that one block of pattern symbol ``symbol`` keeps for its backward, in
    the compute dtype: the table's coefficient x d_model, a third of it (norms, residual)
    replicated over tensor-parallel ranks and two thirds split by them."""
    kind, has_mlp = PATTERN_SYMBOLS[symbol]
    mlp = table["mlp_only"]
    coef = (table[kind] - mlp if kind else 0.0) + (mlp if has_mlp else 0.0)
    return coef * m.d_model * (1 / 3 + 2 / (3 * tp))


def block_activation_bytes(cfg: DictConfig, tp: int) -> list[float]:
    """Bytes per token that each block of ``cfg``'s pattern keeps for its backward: its
    ``block_activation_values`` in the compute dtype (bf16 under autocast, else the
    parameters' dtype), on the kernel path of ``activation_coefficients``."""
    t, m = cfg.train, cfg.model
    amp = autocast_on(t, "cpu" if t.device == "cpu" else "cuda")
    nbytes = 2 if amp else param_bytes(m)
    table = activation_coefficients(cfg)
    return [nbytes * block_activation_values(m, sym, table, tp) for sym in m.pattern]


def memory_estimate(cfg: DictConfig, tp: int, seq_len: int | None = None,
                    dp: int = 1, stage: int | None = None) -> dict[str, float]:
    """Bytes per GPU. Weights, gradients and optimizer state are exact for this trainer
    (weights and gradients in ``model.params_dtype``, AdamW two moments, Muon one momentum, in
    the same dtype; split by TP, replicated over DP, or for the optimizer state split over DP
    with ``parallel.shard_optimizer``: the average share). Activations are an estimate for one
    micro-batch: every block keeps ``block_activation_values`` per token of each window-pass
    in backward (coefficients by block kind and kernel path, ``ACTIVATION_COEFFICIENTS``), all
    window-passes of a row without ``sleep.checkpoint`` (the last window never sleeps), one
    window-pass (times the table's ``recompute``) plus one fp32 hidden state per token per
    pass boundary with it; the head's fp32 logits and their softmax
    (B L V / tp, 6 bytes a value with bf16 autocast, 8 without) for every window that is kept
    (one with checkpointing). ``weight_copies``: the fused linears' bf16 weight copies
    (``train.grad_accum_fusion`` on, or auto off CPU, with bf16 autocast and non-bf16
    weights; exact). With context parallelism (``parallel.cp`` = C) a rank holds a chunk of
    ceil(L / C) tokens of every window (and of every row for the checkpointed boundaries);
    the gathered keys/values of a window (2 L Hkv D per attention block) are not counted.
    Not counted: framework buffers, CUDA graph pools and fragmentation. With pipeline
    parallelism (``parallel.pp`` > 1) the numbers are one stage's (``stage``; default the
    stage with the largest total): ``sleeptrain.plan.pipeline.stage_memory``."""
    from sleeptrain.config import loop_range

    if int(cfg.parallel.pp) > 1:
        from sleeptrain.plan.pipeline import stage_memory

        per = stage_memory(cfg, tp, seq_len, dp)
        return per[stage] if stage is not None else max(per, key=lambda x: x["total"])

    m, s = cfg.model, cfg.sleep
    p = param_count(m)
    mats = sum(block_cost(m, sym, 1, False).matrices for sym in m.pattern)
    if not cfg.optim.use_muon:
        mats = 0
    size = param_bytes(m)
    weights = grads = size * p / tp
    optimizer = size * (mats + 2 * (p - mats)) / tp  # state in the parameters' dtype
    if cfg.parallel.shard_optimizer:
        optimizer /= dp
    B, L = cfg.data.batch_size, int(s.window_len)
    T = int(seq_len or cfg.data.seq_len)
    cp = int(cfg.parallel.cp)  # context parallelism: a rank holds ceil(L / cp) per window
    a, b = loop_range(m)
    t = cfg.train
    amp = autocast_on(t, "cpu" if t.device == "cpu" else "cuda")
    table = activation_coefficients(cfg)
    per_block = block_activation_bytes(cfg, tp)
    chunk = B * math.ceil(L / cp)
    wake = chunk * sum(per_block)
    sleep = chunk * sum(per_block[a:b]) * sleep_passes(s.passes)
    logits = chunk * m.vocab_size / tp * (6 if amp else 2 * size)
    W = _windows(T, L)
    if s.checkpoint:  # one window-pass recomputed at a time, the boundaries of the whole row
        acts = (table["recompute"] * wake + logits
                + B * math.ceil(T / cp) * m.d_model * 4 * (1 + sleep_passes(s.passes)))
    else:  # every window's wake pass and logits, the sleep passes of all but the last window
        acts = (wake + logits) * W + sleep * (W - 1)
    fusion = switch_on(t.grad_accum_fusion, cuda=t.device != "cpu")
    copies = 2 * linear_weight_count(m) / tp if fusion and amp and size != 2 else 0.0
    return {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": acts,
            "weight_copies": copies, "total": weights + grads + optimizer + acts + copies}


__all__ = ["ACTIVATION_COEFFICIENTS", "MUON_NS_STEPS", "BlockCost", "activation_coefficients",
           "backward_passes", "block_activation_bytes", "block_activation_values", "block_cost",
           "linear_weight_count", "memory_estimate", "muon_flops", "param_bytes", "param_count",
           "row_tokens", "train_flops_per_token"]
