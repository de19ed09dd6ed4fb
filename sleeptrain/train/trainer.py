"""The training loop: stages, Muon + AdamW, schedule, accumulation, guard, checkpoints, eval.

A run directory holds ``config.yaml``, ``metrics.jsonl`` (deterministic values only, so a
resumed run's file equals an uninterrupted run's), ``perf.jsonl`` (wall-clock numbers),
``checkpoints/`` and ``eval.json``. Starting a run whose directory has a complete checkpoint
resumes from it.

Data (``sleeptrain.train.data``): with a task source the order is a pure function of the step;
with shards, every data-parallel rank's loader position is saved in the checkpoint and restored
exactly. Loss normalization: the summed masked cross-entropy of every micro-batch on every
data-parallel rank, divided by the number of loss tokens of the whole global batch.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sleeptrain.config import switch_on, to_yaml
from sleeptrain.config.validate import ConfigError
from sleeptrain.data.tasks import build_task
from sleeptrain.eval.lm import evaluate_shards
from sleeptrain.eval.tasks import evaluate_task, format_table
from sleeptrain.model.kernels import fused
from sleeptrain.model.kernels import linear as fused_linear
from sleeptrain.parallel.plan import measure_bf16_peak, peak_flops, train_flops_per_token
from sleeptrain.parallel.state import init_parallel
from sleeptrain.parallel.tensors import clip_grad_norm_, sync_tp_grads
from sleeptrain.sleep.graphs import (
    MicroBatchGraphs,
    forward_backward,
    graphs_unavailable,
    zero_grads,
)
from sleeptrain.sleep.runner import window_heads
from sleeptrain.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_bytes,
    cleanup_stale_tmp,
    find_latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
)
from sleeptrain.train.data import build_train_data
from sleeptrain.train.dist_ckpt import (
    is_sharded,
    load_model,
    load_model_weights,
    load_optimizer,
    save_sharded_checkpoint,
)
from sleeptrain.train.logging import MetricsLogger, ProgressBar
from sleeptrain.train.optim import optimizer_for
from sleeptrain.train.schedule import apply_lr, lr_multiplier


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def trainable_predicate(spec: str):
    """name -> bool for a stage's ``trainable``: all, gdn (GDN mixers only) or a regex."""
    if spec == "all":
        return lambda name: True
    if spec == "gdn":
        return lambda name: ".mixer." in name and _is_gdn_param(name)
    try:
        rx = re.compile(spec)
    except re.error as e:
        raise ConfigError(
            f"train.stages[].trainable: invalid regular expression {spec!r}: {e}") from None
    return lambda name: rx.search(name) is not None


_GDN_NAMES = ("in_proj", "conv_weight", "A_log", "dt_bias", "out_norm_weight", "out_proj")


def _is_gdn_param(name: str) -> bool:
    return any(f".mixer.{n}" in name for n in _GDN_NAMES)


def stage_at(cfg: Any, step: int) -> tuple[int, Any]:
    """(stage index, stage config or None) in force at ``step`` (0-based)."""
    start = 0
    for i, st in enumerate(cfg.train.stages):
        if step < start + st.steps:
            return i, st
        start += st.steps
    return -1, None


def _sleep_for_stage(cfg: Any, stage: Any) -> Any:
    sc = cfg.sleep.copy()
    if stage is not None:
        if stage.eviction is not None:
            sc.eviction = stage.eviction
        if stage.passes is not None:
            sc.passes = stage.passes
    return sc


class _StopFlag:
    """Set by SIGTERM/SIGUSR1 (the handler only sets the flag) or by a STOP file."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _any_rank(flag: bool, device: torch.device) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def train(cfg: Any, max_steps: int | None = None) -> dict[str, Any]:
    """Trains (or resumes) the run of ``cfg``; returns a summary dict.

    ``max_steps`` saves and stops after that many optimizer steps in this process (tests use it
    to interrupt a run); the schedule still follows ``train.steps``.
    """
    import sleeptrain  # local import: the package's API module builds the model

    info = init_parallel(cfg.parallel.tp, cfg.parallel.backend, cfg.train.device)
    device = info.device
    is_cuda = device.type == "cuda"
    precision = cfg.train.precision
    autocast = precision == "bf16" or (precision == "auto" and is_cuda)
    run_dir = Path(cfg.train.run_dir)
    rank0 = info.rank == 0
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        cleanup_stale_tmp(run_dir)
    task = None
    if cfg.data.source == "task":
        task = build_task(cfg.data.task, **dict(cfg.data.task_args))
        if task.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the {cfg.data.task} "
                f"task's vocabulary ({task.vocab_size} tokens)"
            )
    data = build_train_data(cfg, info, task)
    torch.manual_seed(cfg.train.seed)
    model = sleeptrain.build_model(cfg, device=device)
    opt = optimizer_for(cfg, model)
    if rank0 and getattr(opt, "sharded", False):
        params = {id(p): p for g in opt.param_groups for p in g["params"]}.values()
        mine = sum(p.numel() for p in params if opt.owns(p))
        total = sum(p.numel() for p in params)
        print(f"optimizer state sharded over {info.dp_size} data-parallel ranks: rank 0 keeps "
              f"it for {mine:,} of {total:,} parameter elements", flush=True)
    step = 0
    nonfinite_total = 0
    latest = find_latest_checkpoint(run_dir)
    if latest is not None:
        t0 = time.perf_counter()
        state = load_checkpoint(latest, map_location="cpu")
        load_train_state(latest, state, model, opt)
        restore_rng_state(state["rng"])
        step = int(state["step"])
        nonfinite_total = int(state.get("nonfinite_total", 0))
        data.load_state_dict(state.get("data"))
        _log_restore(run_dir, step, latest, t0, rank0, device)
    elif cfg.train.init_from:
        _init_from(cfg.train.init_from, model, rank0)
    metrics = MetricsLogger(run_dir, info.rank, {
        "mode": cfg.log.wandb, "project": cfg.log.wandb_project,
        "name": cfg.log.wandb_name, "config": _plain(cfg),
    })
    if latest is not None:
        metrics.truncate_after(step)
    perf_path = run_dir / "perf.jsonl"
    total = cfg.train.steps
    bar = ProgressBar(total, initial=step, enabled=rank0 and cfg.log.progress,
                      every=cfg.log.every)
    stop = _StopFlag()
    stop.install()
    started = time.monotonic()
    bs, accum = cfg.data.batch_size, cfg.train.grad_accum
    global_batch = bs * accum * info.dp_size
    peak = _peak_flops(cfg, device, rank0)
    measured_peak = measure_bf16_peak(device) if is_cuda else None
    if rank0 and measured_peak:
        print(f"measured bf16 matmul peak: {measured_peak / 1e12:.0f} TFLOP/s per GPU "
              "(perf.jsonl mfu_measured)", flush=True)
    compile_before = fused.compile_enabled()
    fused.set_compile(switch_on(cfg.train.compile, is_cuda))
    fusion_before = fused_linear.enabled()
    fused_linear.set_enabled(switch_on(cfg.train.grad_accum_fusion, is_cuda))
    no_graphs = graphs_unavailable(device, info.tp_size, cfg.train.cuda_graphs)
    graphs = MicroBatchGraphs(model, verbose=rank0) if no_graphs is None else None
    if rank0 and no_graphs and cfg.train.cuda_graphs == "on":
        print(f"train.cuda_graphs=on, but CUDA graphs are not used: {no_graphs}", flush=True)
    consecutive_bad = 0
    last_eval: dict[str, Any] | None = None
    steps_this_run = 0
    exit_reason = "done"
    current_stage = None

    try:
        while step < total:
            stage_idx, stage = stage_at(cfg, step)
            if stage_idx != current_stage:
                pred = trainable_predicate(stage.trainable if stage else "all")
                for name, p in model.named_parameters():
                    p.requires_grad_(pred(name))
                    if not p.requires_grad:
                        p.grad = None
                current_stage = stage_idx
                if graphs is not None:
                    graphs.reset()  # captured for the previous trainable set
            sleep_cfg = _sleep_for_stage(cfg, stage)
            mult = lr_multiplier(step, warmup_steps=min(cfg.optim.warmup_steps, total),
                                 total_steps=total, schedule=cfg.optim.schedule,
                                 min_lr_ratio=cfg.optim.min_lr_ratio)
            apply_lr(opt, mult)
            t0 = time.perf_counter()
            batches = data.step_batches(step, accum)
            data_s = time.perf_counter() - t0
            if batches is None:  # a finite shard stream ended (on every rank at once)
                _save(run_dir, step, model, opt, cfg, nonfinite_total, rank0, data)
                exit_reason = "data_exhausted"
                break
            # the masks on the host once per step: the loss normalizer and which windows
            # need the output head (so that no micro-batch syncs with the host)
            masks = [mk.cpu() for _, mk, _ in batches]
            n_loss = sum(int(mk[:, 1:].sum()) for mk in masks)
            heads = [window_heads(mk, sleep_cfg.window_len) for mk in masks]
            if info.dp_size > 1:
                t = torch.tensor([n_loss], dtype=torch.float64, device=device)
                dist.all_reduce(t, group=_dp_group())
                n_loss = int(t.item())
            _zero_grad(opt, model, graphs)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            amp = autocast and is_cuda
            for (tokens, mask, doc_starts), hd in zip(batches, heads, strict=True):
                if graphs is not None:
                    ls, nc = graphs.step(tokens, mask, doc_starts, sleep_cfg, max(n_loss, 1),
                                         amp, hd)
                else:
                    ls, nc = forward_backward(model, tokens, mask, doc_starts, sleep_cfg,
                                              max(n_loss, 1), amp, hd)
                loss_sum += ls.double()
                correct += nc
            sync_tp_grads(model.parameters())
            _reduce_grads(model, info)
            if info.dp_size > 1:
                dist.all_reduce(loss_sum, group=_dp_group())
                dist.all_reduce(correct, group=_dp_group())
            params = [p for p in model.parameters() if p.grad is not None]
            gnorm = clip_grad_norm_(params, cfg.optim.grad_clip
                                    if cfg.optim.grad_clip > 0 else math.inf)
            # the step's one host sync: loss, gradient norm and correct count together
            loss_t, gnorm_f, correct_n = torch.stack(
                [loss_sum, gnorm.to(device=device, dtype=torch.float64),
                 correct.to(torch.float64)]).tolist()
            loss_val = loss_t / max(n_loss, 1)
            finite = math.isfinite(loss_val) and math.isfinite(gnorm_f)
            if finite:
                opt.step()
                consecutive_bad = 0
            else:
                _zero_grad(opt, model, graphs)
                consecutive_bad += 1
                nonfinite_total += 1
                if consecutive_bad >= cfg.train.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{consecutive_bad} steps in a row had a non-finite loss or gradient "
                        f"(train.max_nonfinite={cfg.train.max_nonfinite}); last loss {loss_val}"
                    )
            step += 1
            steps_this_run += 1
            dt = time.perf_counter() - t0
            acc = correct_n / max(n_loss, 1)
            seq = batches[0][0].shape[1] - 1
            tok_s = global_batch * seq / dt
            flops_s = tok_s * train_flops_per_token(cfg, seq, sleep=sleep_cfg)
            mfu = flops_s / (peak * info.world_size) if peak else None
            bar.update(step, loss=loss_val, acc=acc, tok_s=tok_s)
            if step % cfg.log.every == 0 or step == total:
                rec = {"loss": round(loss_val, 6), "acc": round(acc, 6), "lr_mult": mult,
                       "grad_norm": round(gnorm_f, 6), "skipped": int(not finite),
                       "nonfinite_total": nonfinite_total,
                       "stage": stage.name if stage else "main", "passes": sleep_cfg.passes}
                metrics.log(step, rec)
                if rank0:
                    with open(perf_path, "a") as f:
                        mfu_s = f', "mfu": {mfu:.4f}' if mfu is not None else ""
                        if measured_peak:
                            mfu_m = flops_s / (measured_peak * info.world_size)
                            mfu_s += f', "mfu_measured": {mfu_m:.4f}'
                        if graphs is not None:
                            mfu_s += f', "graph_replays": {graphs.replays}'
                        if is_cuda:
                            gib = torch.cuda.max_memory_allocated(device) / 2**30
                            mfu_s += f', "peak_gib": {gib:.2f}'
                        f.write(f'{{"step": {step}, "step_s": {dt:.4f}, "data_s": {data_s:.5f}, '
                                f'"tok_s": {tok_s:.1f}{mfu_s}}}\n')
            if (step % cfg.train.eval_every == 0 or step == total) and (
                    task is not None or cfg.data.eval_shards):
                last_eval = _evaluate(model, task, cfg, sleep_cfg, info, autocast and is_cuda)
                metrics.log(step, _eval_record(last_eval))
            want_stop = stop.requested or (run_dir / "STOP").exists()
            if cfg.train.exit_after_minutes > 0:
                want_stop |= (time.monotonic() - started) / 60 > cfg.train.exit_after_minutes
            want_stop = _any_rank(want_stop, device)
            limit_hit = max_steps is not None and steps_this_run >= max_steps
            at_end = step == total and cfg.train.save_at_end
            if step % cfg.train.ckpt_every == 0 or at_end or want_stop or limit_hit:
                _save(run_dir, step, model, opt, cfg, nonfinite_total, rank0, data)
            if want_stop:
                exit_reason = "stopped"
                break
            if limit_hit:
                exit_reason = "max_steps"
                break
    finally:
        bar.close()
        metrics.close()
        stop.restore()
        fused.set_compile(compile_before)
        fused_linear.set_enabled(fusion_before)
    if rank0 and last_eval is not None and step == total:
        import json

        (run_dir / "eval.json").write_text(json.dumps(last_eval, indent=2))
        if task is not None:
            print(format_table(last_eval, "t" if cfg.data.task == "rule110" else "k"), flush=True)
        else:
            print(f"eval: loss {last_eval['loss']:.4f}, token accuracy "
                  f"{last_eval['token_acc']:.4f} over {last_eval['tokens']} tokens", flush=True)
    return {"step": step, "exit": exit_reason, "eval": last_eval, "run_dir": str(run_dir)}


def _evaluate(model: Any, task: Any, cfg: Any, sleep_cfg: Any, info: Any,
              autocast: bool) -> dict[str, Any]:
    if task is not None:
        return evaluate_task(model, task, sleep_cfg, cfg.train.eval_examples,
                             cfg.data.eval_batch_size, cfg.train.seed, info.device,
                             autocast=autocast)
    return evaluate_shards(model, cfg, sleep_cfg, info, cfg.train.eval_examples, autocast)


def _eval_record(ev: dict[str, Any]) -> dict[str, Any]:
    if "by_depth" not in ev:
        return {"eval_loss": round(ev["loss"], 6), "eval_token_acc": round(ev["token_acc"], 6)}
    return {"eval_token_acc": round(ev["token_acc"], 6),
            "eval_example_acc": round(ev["example_acc"], 6),
            **{f"eval_acc_depth{d}": round(r["token_acc"], 6) for d, r in ev["by_depth"].items()}}


def _plain(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _peak_flops(cfg: Any, device: torch.device, rank0: bool) -> float | None:
    """Per-GPU bf16 peak FLOP/s for MFU: train.peak_tflops, else by the GPU's name."""
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name)
    if peak is None and rank0:
        print(f"MFU not logged: unknown peak for {name!r}; set train.peak_tflops", flush=True)
    return peak


def _zero_grad(opt: Any, model: torch.nn.Module, graphs: MicroBatchGraphs | None) -> None:
    """Clears gradients: in place while CUDA graphs accumulate into the buffers (they must
    not move), else by dropping them."""
    if graphs is not None and graphs.disabled is None:
        zero_grads(list(model.parameters()))
    else:
        opt.zero_grad(set_to_none=True)


def _dp_group():
    from megatron.core import parallel_state as mpu

    return mpu.get_data_parallel_group()


def _reduce_grads(model: torch.nn.Module, info: Any) -> None:
    """Sums gradients over data-parallel ranks (the loss is already globally normalized)."""
    if info.dp_size == 1:
        return
    group = _dp_group()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def _init_from(source: str, model: Any, rank0: bool) -> None:
    """Model weights of a run directory's latest checkpoint, or of a checkpoint directory."""
    path = Path(source)
    ckpt = path if (path / "meta.json").is_file() else find_latest_checkpoint(path)
    if ckpt is None:
        raise ConfigError(f"train.init_from: no complete checkpoint under {path}")
    load_model_weights(ckpt, model)
    if rank0:
        print(f"initialized the model from {ckpt}", flush=True)


def load_train_state(path: Path, state: dict[str, Any], model: Any, opt: Any) -> None:
    """Model weights and optimizer state of checkpoint ``path`` (its ``state.pt`` already
    loaded as ``state``), sharded or (single-file checkpoints of earlier versions) not."""
    if is_sharded(path):
        load_model(path, model)
        if state["optim_layout"]["optim"]:  # empty: weights only (a converted checkpoint)
            load_optimizer(path, opt, state["optim_layout"])
        return
    if "model" not in state:
        raise CheckpointError(f"{path}: holds neither shards/ nor a 'model' entry")
    model.load_state_dict(state["model"])  # already loaded: not load_model_weights
    opt.load_state_dict(state["optimizer"])


def _save(run_dir: Path, step: int, model: Any, opt: Any, cfg: Any, nonfinite_total: int,
          rank0: bool, data: Any) -> None:
    """Every rank writes its shards into rank 0's temporary directory, then rank 0 writes
    state.pt and finalizes the checkpoint atomically (``save_sharded_checkpoint``)."""
    data_state = data.state_dict()  # a collective with shards: every rank calls it
    state = {"step": step, "rng": capture_rng_state(), "nonfinite_total": nonfinite_total,
             "config": to_yaml(cfg), "data": data_state} if rank0 else None
    info = save_sharded_checkpoint(run_dir, step, model, opt, state, cfg.train.keep_last,
                                   extra_files={"config.yaml": to_yaml(cfg)},
                                   after_shards=lambda: _fault_point("after_shards", step))
    if rank0:
        print(f"checkpoint step {step}: {info.bytes / 2**30:.3f} GiB in {info.seconds:.1f} s "
              f"({info.path})", flush=True)
        with open(run_dir / "perf.jsonl", "a") as f:
            f.write(f'{{"step": {step}, "ckpt_s": {info.seconds:.3f}, '
                    f'"ckpt_bytes": {info.bytes}}}\n')


def _log_restore(run_dir: Path, step: int, path: Path, t0: float, rank0: bool,
                 device: torch.device) -> None:
    """Once every rank has loaded checkpoint ``path`` (model, optimizer, RNG and data state):
    its size and the seconds since ``t0`` to stdout and perf.jsonl, as ``_save`` does."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    secs = time.perf_counter() - t0
    if rank0:
        nbytes = checkpoint_bytes(path)
        print(f"resumed from step {step}: {nbytes / 2**30:.3f} GiB in {secs:.1f} s ({path})",
              flush=True)
        with open(run_dir / "perf.jsonl", "a") as f:
            f.write(f'{{"step": {step}, "restore_s": {secs:.3f}, "restore_bytes": {nbytes}}}\n')


def _fault_point(where: str, step: int) -> None:
    """Fault injection for the crash-safety tests: SLEEPTRAIN_FAULT=where:step:rank kills
    that rank (SIGKILL) at that point of that step's checkpoint write."""
    spec = os.environ.get("SLEEPTRAIN_FAULT", "")
    if not spec:
        return
    at, s, r = spec.split(":")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if at == where and int(s) == step and int(r) == rank:
        os.kill(os.getpid(), signal.SIGKILL)
