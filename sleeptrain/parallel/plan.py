"""Layout checks, parameter counts, sleep-aware FLOPs and a per-GPU memory estimate.

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
import time
from dataclasses import dataclass
from typing import Any

import torch

from sleeptrain.config import switch_on
from sleeptrain.config.validate import PATTERN_SYMBOLS, ConfigError, validate_model

#: Dense bf16 tensor-core peaks (FLOP/s) by device-name substring, first match wins.
PEAK_BF16 = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200", 989e12), ("H100", 989e12),
    ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
)


@dataclass(frozen=True)
class BlockCost:
    params: int
    matrices: int  # parameters in 2-D hidden matrices (Muon's; the rest is AdamW's)
    flops: float  # forward FLOPs per token
    linears: int = 0  # parameters in the block's megatron-core linears (projections, MLP)


def _attn(m: Any) -> tuple[int, int, int]:
    hkv = m.n_kv_heads or m.n_heads
    hd = m.head_dim or m.d_model // m.n_heads
    return m.n_heads, hkv, hd


def _gdn(m: Any) -> tuple[int, int, int, int]:
    hv = m.gdn_v_heads or m.gdn_heads
    return m.gdn_heads, hv, m.gdn_head_dim, m.gdn_v_head_dim or m.gdn_head_dim


def block_cost(m: Any, symbol: str, window: int, sliding: bool) -> BlockCost:
    """Parameters and forward FLOPs per token of one block of pattern symbol ``symbol``."""
    from sleeptrain.model.hybrid import ffn_hidden

    kind, has_mlp = PATTERN_SYMBOLS[symbol]
    d = m.d_model
    params, mats, flops, lin = 0, 0, 0.0, 0
    if kind == "attention":
        hq, hkv, hd = _attn(m)
        proj = d * (hq + 2 * hkv) * hd + hq * hd * d
        mats += proj
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
        mats += proj  # the conv kernel [C, K] goes to AdamW (sleeptrain.train.optim)
        lin += proj
        params += proj + conv_ch * m.conv_kernel + 2 * hv + dv + d
        c = m.gdn_chunk_size
        flops += 2 * proj + 2 * m.conv_kernel * conv_ch + hv * (6 * dk * dv + 2 * c * (dk + dv))
    if has_mlp:
        f = ffn_hidden(m)
        mats += 3 * d * f
        lin += 3 * d * f
        params += 3 * d * f + d
        flops += 6 * d * f
    return BlockCost(params, mats, flops, lin)


def param_count(m: Any) -> int:
    """Parameters of the full (unsharded) model."""
    n = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.d_model
    return n + sum(block_cost(m, s, 1, False).params for s in m.pattern)


def linear_weight_count(m: Any) -> int:
    """Entries of the weights the fused linears copy to bf16 (full model): every block's
    projection and MLP matrices and the output head (the embedding when tied)."""
    blocks = sum(block_cost(m, sym, 1, False).linears for sym in m.pattern)
    return blocks + m.vocab_size * m.d_model


def _windows(seq_len: int, window: int) -> int:
    return max(1, math.ceil(seq_len / window))


def train_flops_per_token(cfg: Any, seq_len: int | None = None, passes: int | None = None,
                          sleep: Any | None = None) -> float:
    """Sleep-aware model FLOPs per trained token (module docstring) for rows of ``seq_len``
    input tokens (default ``data.seq_len``) and ``sleep`` (default ``cfg.sleep``)."""
    from sleeptrain.model.hybrid import loop_range

    m, s = cfg.model, (sleep if sleep is not None else cfg.sleep)
    n = int(s.passes if passes is None else passes)
    L, sliding = int(s.window_len), s.eviction == "sliding"
    costs = [block_cost(m, sym, L, sliding).flops for sym in m.pattern]
    a, b = loop_range(m)
    f_all = sum(costs) + 2 * m.d_model * m.vocab_size
    w = _windows(int(seq_len or cfg.data.seq_len), L)
    sleep_units = (n - 1) + 2 * backward_passes(s, n)  # forwards + 2 x passes with backward
    return 3 * f_all + sleep_units * sum(costs[a:b]) * (w - 1) / w


def backward_passes(sleep: Any, passes: int) -> int:
    """Sleep passes of a window that are differentiated: all N-1 (full), the last k
    (truncated, implicit/phantom), or the m vector-Jacobian products of implicit/neumann."""
    n_sleep = max(0, passes - 1)
    if sleep.grad_mode == "full":
        return n_sleep
    if sleep.grad_mode == "implicit" and sleep.implicit_method == "neumann":
        return min(int(sleep.neumann_terms), n_sleep)
    return min(int(sleep.grad_passes), n_sleep)


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``device_name`` (None when unknown)."""
    for key, val in PEAK_BF16:
        if key.lower() in device_name.lower():
            return val
    return None


def measure_bf16_peak(device: torch.device | str = "cuda", n: int = 8192,
                      iters: int = 20) -> float:
    """This GPU's bf16 matmul throughput (FLOP/s): n x n x n GEMMs, timed after warm-up.

    The denominator of the "measured" MFU (train and tools/bench_window.py), next to the
    datasheet peak of ``peak_flops``: a kernel can beat neither.
    """
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b, out=c)
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b, out=c)
    torch.cuda.synchronize(dev)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def check_layout(cfg: Any, gpus: int) -> tuple[int, int]:
    """(tp, dp) for ``gpus`` ranks; ConfigError naming the numbers when impossible."""
    tp = int(cfg.parallel.tp)
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    if tp < 1:
        raise ConfigError(f"parallel.tp must be >= 1, got {tp}")
    if gpus % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide the {gpus} GPUs "
                          f"(world size = tp x dp must hold)")
    validate_model(cfg.model, tp)
    return tp, gpus // tp


def memory_estimate(cfg: Any, tp: int, seq_len: int | None = None,
                    dp: int = 1) -> dict[str, float]:
    """Bytes per GPU. Weights, gradients and optimizer state are exact for this trainer
    (weights and gradients in ``model.params_dtype``, AdamW two moments, Muon one momentum, in
    the same dtype; split by TP, replicated over DP, or for the optimizer state split over DP
    with ``parallel.shard_optimizer``: the average share). Activations are a rough estimate for one
    micro-batch: the window in backward holds ~(8 + 16 / tp) d values per token per block in
    the compute dtype, and with ``sleep.checkpoint`` the row keeps one fp32 hidden state per
    token per pass boundary. ``weight_copies``: the fused linears' bf16 weight copies
    (``train.grad_accum_fusion`` on, or auto off CPU, with bf16 autocast and non-bf16
    weights; exact). Not counted: the fp32 logits of a window's head (B L V / tp x 4 bytes,
    and their gradient), framework buffers and fragmentation."""
    from sleeptrain.model.hybrid import loop_range

    m, s = cfg.model, cfg.sleep
    p = param_count(m)
    mats = sum(block_cost(m, sym, 1, False).matrices for sym in m.pattern)
    if not cfg.optim.use_muon:
        mats = 0
    size = {"float32": 4, "float64": 8, "bfloat16": 2}[m.params_dtype]
    weights = grads = size * p / tp
    optimizer = size * (mats + 2 * (p - mats)) / tp  # state in the parameters' dtype
    if cfg.parallel.shard_optimizer:
        optimizer /= dp
    B, L, d = cfg.data.batch_size, int(s.window_len), m.d_model
    T = int(seq_len or cfg.data.seq_len)
    a, b = loop_range(m)
    depth = len(m.pattern)
    nbytes = 4 if cfg.train.precision == "fp32" else 2
    window = B * L * depth * nbytes * (8 + 16 / tp) * d
    if s.checkpoint:
        acts = window + B * T * d * 4 * (1 + (s.passes - 1))
    else:
        acts = window * _windows(T, L) * (1 + (s.passes - 1) * (b - a) / depth)
    t = cfg.train
    fusion = switch_on(t.grad_accum_fusion, cuda=t.device != "cpu")
    amp = t.precision == "bf16" or (t.precision == "auto" and t.device != "cpu")
    copies = 2 * linear_weight_count(m) / tp if fusion and amp and size != 2 else 0.0
    return {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": acts,
            "weight_copies": copies, "total": weights + grads + optimizer + acts + copies}


def plan_report(cfg: Any, gpus: int, seq_len: int | None = None,
                device_name: str = "H100") -> str:
    """The text ``sleeptrain plan`` prints."""
    tp, dp = check_layout(cfg, gpus)
    T = int(seq_len or cfg.data.seq_len)
    p = param_count(cfg.model)
    f = train_flops_per_token(cfg, T)
    f1 = train_flops_per_token(cfg, T, passes=1)
    mem = memory_estimate(cfg, tp, T, dp)
    gb = cfg.data.batch_size * cfg.train.grad_accum * dp
    peak = peak_flops(device_name)
    gib = 1024 ** 3
    copies = (f", bf16 weight copies {mem['weight_copies'] / gib:.1f}"
              if mem["weight_copies"] else "")
    lines = [
        f"layout: {gpus} GPUs = TP {tp} x DP {dp}; global batch {gb} rows x {T} tokens "
        f"({cfg.data.batch_size} per rank x {cfg.train.grad_accum} accumulation x {dp})",
        f"parameters: {p / 1e9:.3f} B ({p:,})",
        f"window {cfg.sleep.window_len}, passes N={cfg.sleep.passes}, eviction "
        f"{cfg.sleep.eviction}, loop blocks {_loop_text(cfg)}",
        f"train FLOPs per token: {f / 1e9:.2f} GFLOP (N=1: {f1 / 1e9:.2f}; sleep adds "
        f"{100 * (f / f1 - 1):.0f}%)",
        f"per-GPU memory estimate: weights {mem['weights'] / gib:.1f} GiB, grads "
        f"{mem['grads'] / gib:.1f}, optimizer {mem['optimizer'] / gib:.1f}"
        f"{' (sharded over DP)' if cfg.parallel.shard_optimizer and dp > 1 else ''}"
        f"{copies}, activations "
        f"~{mem['activations'] / gib:.1f} (checkpoint={cfg.sleep.checkpoint}) -> "
        f"~{mem['total'] / gib:.1f} GiB",
    ]
    if peak:
        tok = 0.4 * peak * gpus / f
        lines.append(f"at 40% MFU on {gpus} x {device_name} ({peak / 1e12:.0f} TFLOP/s bf16): "
                     f"{tok:,.0f} tokens/s, {tok * 3600 / 1e9:.2f} B tokens/hour")
    return "\n".join(lines)


def preflight(cfg: Any, gpus: int) -> list[str]:
    """Checks to run before a job starts its GPUs; ConfigError naming the problem. Returns
    what was checked. Layout and divisibility (check_layout), shards vs readers (every
    data-parallel rank x loader worker needs a shard), a writable run directory."""
    import os
    import tempfile
    from pathlib import Path

    tp, dp = check_layout(cfg, gpus)
    done = [f"layout TP {tp} x DP {dp} = {gpus}"]
    if cfg.data.source == "shards":
        from sleeptrain.data.format import ShardError
        from sleeptrain.data.shards import resolve_shards

        try:
            n = len(resolve_shards(list(cfg.data.shards), allow_pipe=cfg.data.allow_pipe).urls)
        except (ShardError, OSError, ValueError) as e:
            raise ConfigError(f"data.shards: {e}") from e
        readers = dp * max(1, int(cfg.data.workers))
        if n < readers:
            raise ConfigError(f"data.shards: {n} shards for {dp} data-parallel ranks x "
                              f"{max(1, int(cfg.data.workers))} workers = {readers} readers; "
                              "every reader needs a shard")
        done.append(f"{n} shards for {readers} readers")
    run = Path(cfg.train.run_dir)
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=run, prefix=".preflight-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"train.run_dir: {run} is not writable: {e}") from e
    done.append(f"run directory {run} writable")
    return done


def _loop_text(cfg: Any) -> str:
    from sleeptrain.model.hybrid import loop_range

    a, b = loop_range(cfg.model)
    return f"[{a}, {b}) of {len(cfg.model.pattern)}"


__all__ = ["backward_passes", "block_cost", "check_layout", "memory_estimate", "param_count",
           "measure_bf16_peak", "peak_flops", "plan_report", "preflight", "train_flops_per_token"]
