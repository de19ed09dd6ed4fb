"""``sleeptrain plan``: the layout check, the report (parameters, FLOPs, memory, throughput)
and the pre-launch checks of a run (shards vs readers, a writable run directory)."""

from __future__ import annotations

from omegaconf import DictConfig

from sleeptrain.config import ConfigError
from sleeptrain.config.validate import validate_model
from sleeptrain.plan.costs import (
    memory_estimate,
    muon_flops,
    param_count,
    row_tokens,
    train_flops_per_token,
)
from sleeptrain.plan.hardware import device_memory_gib, peak_flops


def check_layout(cfg: DictConfig, gpus: int) -> tuple[int, int]:
    """(tp, dp) for ``gpus`` ranks (world = tp x cp x pp x dp, ``parallel.cp``
    context-parallel ranks, ``parallel.pp`` pipeline stages); ConfigError naming the numbers
    when impossible (a gradient mode the stage layout cannot run included)."""
    tp, cp, pp = int(cfg.parallel.tp), int(cfg.parallel.cp), int(cfg.parallel.pp)
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    if tp < 1:
        raise ConfigError(f"parallel.tp must be >= 1, got {tp}")
    if cp < 1:
        raise ConfigError(f"parallel.cp must be >= 1, got {cp}")
    if gpus % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide the {gpus} GPUs "
                          f"(world size = tp x dp must hold)")
    if gpus % (tp * cp):
        raise ConfigError(f"parallel.tp={tp} x parallel.cp={cp} does not divide the {gpus} "
                          f"GPUs (world size = tp x cp x dp must hold)")
    if gpus % (tp * cp * pp):
        raise ConfigError(f"parallel.tp={tp} x parallel.cp={cp} x parallel.pp={pp} does not "
                          f"divide the {gpus} GPUs (world size = tp x cp x pp x dp must hold)")
    validate_model(cfg.model, tp)
    if pp > 1:
        from sleeptrain.plan.pipeline import loop_split, stage_bounds
        from sleeptrain.sleep.stage import check_pipeline

        bounds = stage_bounds(cfg)
        try:
            check_pipeline(cfg.sleep, loop_split(cfg, bounds))
        except ValueError as e:
            raise ConfigError(f"{e} (parallel.pp={pp}, stages {bounds})") from None
    return tp, gpus // (tp * cp * pp)


def plan_report(cfg: DictConfig, gpus: int, seq_len: int | None = None,
                device_name: str = "H100", gpu_memory_gib: float | None = None) -> str:
    """The text ``sleeptrain plan`` prints: rows of ``seq_len`` tokens (default: the task's
    rows for ``data.source=task``, else ``data.seq_len``), and a warning when the memory
    estimate exceeds one GPU's memory (``gpu_memory_gib``, default by ``device_name``)."""
    tp, dp = check_layout(cfg, gpus)
    cp = int(cfg.parallel.cp)
    T = int(seq_len or row_tokens(cfg))
    p = param_count(cfg.model)
    f = train_flops_per_token(cfg, T)
    f1 = train_flops_per_token(cfg, T, passes=1)
    mem = memory_estimate(cfg, tp, T, dp)
    gb = cfg.data.batch_size * cfg.train.grad_accum * dp
    peak = peak_flops(device_name)
    gib = 1024 ** 3
    copies = (f", bf16 weight copies {mem['weight_copies'] / gib:.1f}"
              if mem["weight_copies"] else "")
    L = int(cfg.sleep.window_len)
    pp = int(cfg.parallel.pp)
    lines = [
        f"layout: {gpus} GPUs = TP {tp} x {f'CP {cp} x ' if cp > 1 else ''}"
        f"{f'PP {pp} x ' if pp > 1 else ''}DP {dp}; global "
        f"batch {gb} rows x {T} tokens{_row_source(cfg, seq_len)} ({cfg.data.batch_size} per "
        f"rank x {cfg.train.grad_accum} accumulation x {dp})",
        f"parameters: {p / 1e9:.3f} B ({p:,})",
        f"window {L}{_per_rank(L, cp)}, passes N={cfg.sleep.passes}, eviction "
        f"{cfg.sleep.eviction}, loop blocks {_loop_text(cfg)}",
        f"train FLOPs per token: {f / 1e9:.2f} GFLOP (N=1: {f1 / 1e9:.2f}; sleep adds "
        f"{100 * (f / f1 - 1):.0f}%)",
        f"per-GPU memory estimate{_stage_text(mem)}: weights {mem['weights'] / gib:.1f} "
        f"GiB, grads "
        f"{mem['grads'] / gib:.1f}, optimizer {mem['optimizer'] / gib:.1f}"
        f"{' (sharded over DP)' if cfg.parallel.shard_optimizer and dp > 1 else ''}"
        f"{copies}, activations "
        f"~{mem['activations'] / gib:.1f} (checkpoint={cfg.sleep.checkpoint}) -> "
        f"~{mem['total'] / gib:.1f} GiB",
    ]
    lines += _fit_lines(mem["total"], device_name, gpu_memory_gib)
    if pp > 1:
        lines += _pipeline_lines(cfg, T)
    ns = _muon_per_gpu(cfg, dp)
    share = ns / (f * gb * T / gpus)
    if ns:
        lines.append(f"optimizer: Muon's orthogonalization {ns / 1e12:.2f} TFLOP per step per "
                     f"GPU, {100 * share:.0f}% on top of the GPU's model FLOPs per step (MFU "
                     f"leaves it out; more tokens per step make it smaller)")
    if peak:
        tok = 0.4 * peak * gpus / f
        with_ns = (f"; with the orthogonalization at that rate {tok / (1 + share):,.0f} "
                   f"tokens/s" if ns else "")
        lines.append(f"at 40% MFU on {gpus} x {device_name} ({peak / 1e12:.0f} TFLOP/s bf16): "
                     f"{tok:,.0f} tokens/s, {tok * 3600 / 1e9:.2f} B tokens/hour{with_ns}")
    return "\n".join(lines)


def _muon_per_gpu(cfg: DictConfig, dp: int) -> float:
    """Muon's orthogonalization FLOPs per optimizer step on one GPU (``costs.muon_flops``):
    the matrices of the largest pipeline stage, whole at every TP rank, an average DP rank's
    share with ``parallel.shard_optimizer``; 0 without Muon."""
    if not cfg.optim.use_muon:
        return 0.0
    m, pp = cfg.model, int(cfg.parallel.pp)
    if pp > 1:
        from sleeptrain.plan.pipeline import stage_bounds

        b = stage_bounds(cfg, pp)
        ns = max(muon_flops(m, m.pattern[b[i] : b[i + 1]]) for i in range(pp))
    else:
        ns = muon_flops(m)
    return ns / dp if cfg.parallel.shard_optimizer else ns


def preflight(cfg: DictConfig, gpus: int) -> list[str]:
    """Checks to run before a job starts its GPUs; ConfigError naming the problem. Returns
    what was checked. Layout and divisibility (check_layout), shards vs readers (every
    data-parallel rank x loader worker needs a shard), a writable run directory."""
    import os
    import tempfile
    from pathlib import Path

    tp, dp = check_layout(cfg, gpus)
    cp, pp = int(cfg.parallel.cp), int(cfg.parallel.pp)
    done = [f"layout TP {tp} x {f'CP {cp} x ' if cp > 1 else ''}"
            f"{f'PP {pp} x ' if pp > 1 else ''}DP {dp} = {gpus}"]
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


#: Share of a GPU's memory the estimate may fill before the report warns: the estimate does
#: not count allocator fragmentation, CUDA graph pools and framework buffers (a 1.3B run
#: estimated at 93% of an H200 ran out of memory; docs/design.md, "Memory estimate").
FIT_MARGIN = 0.85


def _row_source(cfg: DictConfig, seq_len: int | None) -> str:
    if seq_len or cfg.data.source != "task":
        return ""
    return f" (the {cfg.data.task} task's rows; data.seq_len is not used)"


def _fit_lines(total: float, device_name: str, gpu_memory_gib: float | None) -> list[str]:
    """A warning when the per-GPU estimate exceeds the GPU's memory, with what lowers it."""
    cap = gpu_memory_gib or device_memory_gib(device_name)
    if cap is None:
        return [f"GPU memory of {device_name!r} unknown (--gpu-memory-gib): fit not checked"]
    need = total / 1024**3
    share = f"{need:.1f} GiB, {100 * need / cap:.0f}% of one {device_name}'s {cap:.0f} GiB"
    if need <= FIT_MARGIN * cap:
        return [f"fits by this estimate ({share})"]
    lower = ("Lower it with sleep.checkpoint=true, fewer rows per micro-batch "
             "(data.batch_size, with train.grad_accum to keep the batch), a larger parallel.tp / "
             "parallel.cp / parallel.pp, or parallel.shard_optimizer=true")
    if need <= cap:
        return [f"WARNING: the estimate ({share}) leaves less than "
                f"{100 * (1 - FIT_MARGIN):.0f}% for what it does not count (allocator "
                f"fragmentation, CUDA graph pools, buffers): this layout may run out of memory. "
                f"{lower}"]
    return [f"WARNING: the estimate ({share}) exceeds the GPU: this layout will run out of "
            f"memory. {lower}"]


def _stage_text(mem: dict[str, float]) -> str:
    return f" (pipeline stage {int(mem['stage'])}, the largest)" if "stage" in mem else ""


def _pipeline_lines(cfg: DictConfig, seq_len: int) -> list[str]:
    """The stage assignment (blocks, share of the training work, parameters) and the
    simulated bubble for M = 1, P, 2P, 4P micro-batches and for the step's own."""
    from sleeptrain.plan.pipeline import block_weights, bubble_table, stage_bounds, stage_params

    bounds = stage_bounds(cfg, seq_len=seq_len)
    P = len(bounds) - 1
    work, head = block_weights(cfg, seq_len)
    per = [sum(work[bounds[s]:bounds[s + 1]]) + (head if s == P - 1 else 0) for s in range(P)]
    params = stage_params(cfg, bounds)
    how = "parallel.pp_split" if list(cfg.parallel.pp_split) else "balanced by the FLOP model"
    lines = [f"pipeline: {P} stages ({how}; loop blocks {_loop_text(cfg)})"]
    for s in range(P):
        lines.append(f"  stage {s}: blocks [{bounds[s]}, {bounds[s + 1]}) "
                     f"{cfg.model.pattern[bounds[s]:bounds[s + 1]]}, "
                     f"{100 * per[s] / sum(per):.1f}% of the work, {params[s] / 1e9:.3f} B "
                     "parameters")
    accum = int(cfg.train.grad_accum)
    micro = sorted({1, P, 2 * P, 4 * P, accum})
    rows = bubble_table(cfg, P, micro, seq_len)
    cells = ", ".join(f"M={r['micro']}{' (this run)' if r['micro'] == accum else ''}: "
                      f"{100 * r['bubble']:.1f}%" for r in rows)
    lines.append(f"pipeline bubble (simulated, idle / stage time): {cells}")
    return lines


def _per_rank(window: int, cp: int) -> str:
    """The tokens of a window each context-parallel rank holds (empty without CP)."""
    if cp == 1:
        return ""
    lo, hi = window // cp, -(-window // cp)
    return f" ({lo if lo == hi else f'{lo}-{hi}'} tokens per context-parallel rank)"


def _loop_text(cfg: DictConfig) -> str:
    from sleeptrain.config import loop_range

    a, b = loop_range(cfg.model)
    return f"[{a}, {b}) of {len(cfg.model.pattern)}"


__all__ = ["check_layout", "plan_report", "preflight"]
