"""The training loop: stages, Muon + AdamW, schedule, accumulation, guard, checkpoints, eval.

A run directory holds ``config.yaml``, ``metrics.jsonl`` (deterministic values only, so a
resumed run's file equals an uninterrupted run's), ``perf.jsonl`` (wall-clock numbers),
``checkpoints/`` and ``eval.json``. Starting a run whose directory has a complete checkpoint
resumes from it.

The loop reads as ``setup`` (process groups, data, model, optimizer, resume), then per step
``train_step`` (forward and backward of every micro-batch, reductions, clip, optimizer
update), ``log_step``, ``evaluate`` at the eval cadence and ``save`` at the checkpoint
cadence or on a stop request.

Data (``sleeptrain.train.data``): with a task source the order is a pure function of the step;
with shards, every data-parallel rank's loader position is saved in the checkpoint and restored
exactly. Loss normalization: the summed masked cross-entropy of every micro-batch on every
data-parallel rank, divided by the number of loss tokens of the whole global batch. With
context parallelism (``parallel.cp``) the CP peers of a rank read the same batch and each
sums its chunks' share: loss sums and gradients are summed over DP x CP, the count over DP.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from sleeptrain.config import autocast_on, switch_on, to_yaml
from sleeptrain.config.validate import ConfigError
from sleeptrain.data.tasks import build_task
from sleeptrain.eval.lm import evaluate_shards
from sleeptrain.eval.tasks import eval_record, evaluate_task, format_table
from sleeptrain.parallel.state import (
    ParallelInfo,
    embedding_group,
    grad_group,
    init_parallel,
    pipeline_groups,
)
from sleeptrain.parallel.tensors import clip_grad_norm_, sync_tp_grads
from sleeptrain.plan import measure_bf16_peak, param_count, peak_flops, train_flops_per_token
from sleeptrain.plan.pipeline import loop_split, stage_bounds
from sleeptrain.sleep.runner import heads_from_counts, target_counts
from sleeptrain.sleep.stage import check_pipeline
from sleeptrain.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_bytes,
    cleanup_stale_tmp,
    find_latest_checkpoint,
    restore_rng_state,
    resume_checkpoint,
)
from sleeptrain.train.data import TaskData, build_train_data
from sleeptrain.train.determinism import deterministic_algorithms
from sleeptrain.train.dist_ckpt import (
    is_sharded,
    load_model,
    load_model_and_optimizer,
    load_model_from,
    load_model_weights,
    save_sharded_checkpoint,
)
from sleeptrain.train.logging import MetricsLogger, ProgressBar
from sleeptrain.train.optim import optimizer_for
from sleeptrain.train.optim_step import DeviceLrStep
from sleeptrain.train.pipeline_step import PipelineStep
from sleeptrain.train.profiling import StepProfiler, phase
from sleeptrain.train.resume import check_resume
from sleeptrain.train.schedule import apply_lr, lr_multiplier
from sleeptrain.train.signals import StopFlag, process_stop_flag, stop_file
from sleeptrain.train.stages import (
    sleep_for_eval,
    sleep_for_step,
    stage_at,
    trainable_predicate,
)
from sleeptrain.train.step import MicroBatchGraphs, forward_backward, graphs_unavailable, zero_grads


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def _max_over_ranks(value: int, device: torch.device) -> int:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# stop reasons as numbers, so that every rank agrees on one (the largest) and names it: a
# signal is its number; the STOP file and the time limit come after every signal number
_STOP_FILE, _STOP_TIME = 1000, 1001


def cpu_threads(setting: int, local_ranks: int, d_model: int) -> int:
    """torch's intra-op threads on a CPU for ``train.threads``. 0 = auto: ``OMP_NUM_THREADS``
    when set; else one thread for models narrower than 1024 (their ops are too small to gain
    from threads, and on a shared machine a second spinning thread made a 2-core run 4.6x
    slower, docs/design.md); else the cores this process may use, at most 8, shared by the
    ranks of this node."""
    if setting > 0:
        return setting
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if d_model < 1024:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores) // max(1, local_ranks))


@dataclass
class StepResult:
    """What one optimizer step measured (host numbers, after the step's one sync)."""

    loss: float
    acc: float
    grad_norm: float
    finite: bool
    seq: int
    data_s: float
    seconds: float = 0.0


@dataclass
class Trainer:
    """One training process: its config, groups, data, model, optimizer and counters."""

    cfg: DictConfig
    info: ParallelInfo
    stop: StopFlag
    max_steps: int | None = None
    source: str | None = None
    task: Any = None
    data: Any = None
    model: Any = None
    opt: Any = None
    metrics: Any = None
    bar: Any = None
    graphs: MicroBatchGraphs | None = None
    pipe: PipelineStep | None = None  # parallel.pp > 1: this rank's pipeline stage
    opt_step: DeviceLrStep | None = None
    parallel: bool = False
    fused_linears: bool = False
    step: int = 0
    nonfinite_total: int = 0
    consecutive_bad: int = 0
    steps_this_run: int = 0
    stage_idx: int | None = None
    resumed_from: Path | None = None
    changes: list[str] = field(default_factory=list)
    last_eval: dict[str, Any] | None = None
    peak: float | None = None
    measured_peak: float | None = None
    profiler: StepProfiler | None = None
    # task data on CUDA: the next step's micro-batches and their host target counts, made
    # during this step
    prefetch: bool = False
    prefetched: tuple[int, list[Any], list[torch.Tensor]] | None = None
    started: float = field(default_factory=time.monotonic)

    # --- setup ---------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def rank0(self) -> bool:
        return self.info.rank == 0

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)

    @property
    def amp(self) -> bool:
        return autocast_on(self.cfg.train, self.device.type)

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.cfg.train.grad_accum * self.info.dp_size

    def say(self, msg: str) -> None:
        """A line on rank 0's stdout that does not break a progress bar."""
        if not self.rank0:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def setup(self, trust_checkpoint: bool = False) -> None:
        """Everything before the first step; a failure here leaves the run directory as it
        was (config.yaml is written only once the start has succeeded)."""
        cfg = self.cfg
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(cfg.train.threads,
                                              int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                                              cfg.model.d_model))
        has_ckpt = find_latest_checkpoint(self.run_dir, verify=False) is not None
        if has_ckpt:
            self.changes = check_resume(self.run_dir, cfg)
        if cfg.train.engine == "megatron" and (self.run_dir / "ds_checkpoints").is_dir():
            raise ConfigError(
                f"train.engine: {self.run_dir} holds DeepSpeed checkpoints (train.engine="
                "deepspeed); resume it with that engine, or convert it (tools/convert.py "
                "deepspeed-to-run) and start from it with train.init_from")
        if cfg.data.source == "task":
            self.task = build_task(cfg.data.task, **dict(cfg.data.task_args))
            if self.task.vocab_size > cfg.model.vocab_size:
                raise ConfigError(
                    f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                    f"{cfg.data.task} task's vocabulary ({self.task.vocab_size} tokens)")
        self.data = build_train_data(cfg, self.info, self.task)
        self._build_model_and_optimizer(trust_checkpoint)
        self._restore(trust_checkpoint)
        if self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cleanup_stale_tmp(self.run_dir)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.metrics = MetricsLogger(self.run_dir, self.info.rank, {
            "mode": cfg.log.wandb, "project": cfg.log.wandb_project,
            "name": cfg.log.wandb_name, "config": _plain(cfg)})
        self.metrics.truncate_after(self.step)  # nothing past the step the run continues from
        self.peak = _peak_flops(cfg, self.device, self.rank0)
        self.measured_peak = measure_bf16_peak(self.device) if self.device.type == "cuda" else None
        self._banner(self._speed_paths())
        self.bar = ProgressBar(cfg.train.steps, initial=self.step, enabled=self.rank0,
                               every=cfg.log.every, tty=cfg.log.progress)
        self.profiler = StepProfiler(list(cfg.train.profile_steps), self.run_dir, self.device,
                                     self.info.rank, self.say)
        self.prefetch = _prefetch_on(self.data, self.device, self.pipe)

    def _build_model_and_optimizer(self, trust: bool) -> None:  # noqa: ARG002 - engines' hook
        """The model (and this rank's pipeline stage) and the optimizer, from the seed."""
        import sleeptrain  # the package's API module builds the model

        torch.manual_seed(self.cfg.train.seed)
        self.model = sleeptrain.build_model(self.cfg, device=self.device)
        if self.info.pp_size > 1:
            self.pipe = _pipeline(self.cfg, self.model, self.info)
        self.opt = optimizer_for(self.cfg, self.model)

    def _speed_paths(self) -> str | None:
        """The one-call N=1 form, fused linears, compiled chains, CUDA graphs and the device
        optimizer step as the config and device allow; returns why graphs are off (None: on)."""
        cfg = self.cfg
        is_cuda = self.device.type == "cuda"
        self.parallel = switch_on(cfg.train.parallel_n1, is_cuda)
        self.fused_linears = switch_on(cfg.train.grad_accum_fusion, is_cuda)
        self.model.set_kernels(compile=switch_on(cfg.train.compile, is_cuda))
        no_graphs = graphs_unavailable(self.device, self.info.tp_size, cfg.train.cuda_graphs,
                                       cp=self.info.cp_size, pp=self.info.pp_size)
        if no_graphs is None:
            n_layouts = max(4, len(cfg.sleep.random_passes) + 2)
            self.graphs = MicroBatchGraphs(self.model, max_graphs=n_layouts, verbose=self.rank0,
                                           parallel=self.parallel,
                                           fused_linears=self.fused_linears,
                                           context_parallel=self.info.cp_size > 1)
        if is_cuda and not getattr(self.opt, "sharded", False):
            # learning rates on the device; with graphs on, the step is one CUDA graph
            graph = self.graphs is not None and switch_on(cfg.train.optimizer_graph, is_cuda)
            self.opt_step = DeviceLrStep(self.opt, self.device, graph=graph, verbose=self.rank0)
        return no_graphs

    def _restore(self, trust: bool) -> None:
        """Resumes from the newest intact checkpoint (damaged ones are skipped and renamed
        corrupt-*, sleeptrain.train.checkpoint.resume_checkpoint), else starts from
        train.init_from's weights or from the initialization."""
        t0 = time.perf_counter()

        def load(path: Path, state: dict[str, Any]) -> None:
            load_train_state(path, state, self.model, self.opt)
            restore_rng_state(state["rng"])
            self.data.load_state_dict(state.get("data"))

        found = resume_checkpoint(self.run_dir, load, trust=trust,
                                  log=lambda m: print(m, flush=True))
        if found is None:
            if self.cfg.train.init_from:
                _init_from(self.cfg.train.init_from, self.model, self.rank0, trust)
            return
        latest, state = found
        self.step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.resumed_from = latest
        _log_restore(self.run_dir, self.step, latest, t0, self.rank0, self.device)

    def _banner(self, no_graphs: str | None) -> None:
        if not self.rank0:
            return
        cfg, info = self.cfg, self.info
        n_params = (sum(getattr(p, "ds_numel", p.numel())  # ZeRO-3: the full size
                        for p in self.model.parameters()) * info.tp_size
                    if self.pipe is None else param_count(cfg.model))
        dtype = "bf16 autocast" if self.amp else cfg.model.params_dtype
        threads = ""
        if self.device.type == "cpu":
            how = "train.threads" if cfg.train.threads else "auto; set train.threads=N"
            threads = f", {torch.get_num_threads()} CPU thread(s) ({how})"
        start = (f"resumed from step {self.step} ({self.resumed_from})" if self.resumed_from
                 else "fresh start" + (f" from the weights of {cfg.train.init_from}"
                                       if cfg.train.init_from else ""))
        cp = f"CP{info.cp_size} x " if info.cp_size > 1 else ""
        if info.pp_size > 1:
            cp += f"PP{info.pp_size} x "
        data = (f"task {cfg.data.task}" if cfg.data.source == "task"
                else f"shards {list(cfg.data.shards)}")
        lines = [
            f"sleeptrain train: {self.source or '(config object)'} -> {self.run_dir} ({start})",
            f"  model: {cfg.model.pattern} (d_model {cfg.model.d_model}), {n_params:,} "
            f"parameters; sleep: window {cfg.sleep.window_len}, N={cfg.sleep.passes}"
            + (f" (random from {list(cfg.sleep.random_passes)})" if cfg.sleep.random_passes
               else "") + f", {cfg.sleep.eviction} eviction, gradient {cfg.sleep.grad_mode}",
            f"  device: {self.device} ({dtype}{threads}); layout TP{info.tp_size} x {cp}"
            f"DP{info.dp_size}; data: {data}, batch {cfg.data.batch_size} x accum "
            f"{cfg.train.grad_accum} x DP{info.dp_size}; {cfg.train.steps} steps",
        ]
        if self.pipe is not None:
            b = self.pipe.bounds
            stages = ", ".join(f"[{b[i]}, {b[i + 1]})" for i in range(len(b) - 1))
            lines.append(f"  pipeline: {info.pp_size} stages, blocks {stages}; evaluation "
                         "is not run at parallel.pp > 1 (evaluate a checkpoint at pp=1)")
        if no_graphs and cfg.train.cuda_graphs == "on":
            lines.append(f"  train.cuda_graphs=on, but CUDA graphs are not used: {no_graphs}")
        if getattr(self.opt, "sharded", False):
            params = {id(p): p for g in self.opt.param_groups for p in g["params"]}.values()
            mine = sum(p.numel() for p in params if self.opt.owns(p))
            total = sum(p.numel() for p in params)
            lines.append(f"  optimizer state sharded over {info.dp_size} data-parallel ranks: "
                         f"rank 0 keeps it for {mine:,} of {total:,} parameter elements")
        if self.measured_peak:
            lines.append(f"  measured bf16 matmul peak: {self.measured_peak / 1e12:.0f} "
                         "TFLOP/s per GPU (perf.jsonl mfu_measured)")
        lines += [f"  changed since the last start: {c}" for c in self.changes]
        print("\n".join(lines), flush=True)

    # --- one step ------------------------------------------------------------------------------

    def _enter_stage(self) -> Any:
        stage_idx, stage = stage_at(self.cfg, self.step)
        if stage_idx != self.stage_idx:
            pred = trainable_predicate(stage.trainable if stage else "all")
            for name, p in self.model.named_parameters():
                p.requires_grad_(pred(name))
                if not p.requires_grad:
                    p.grad = None
            self.stage_idx = stage_idx
            # the stage's N (and eviction) for evaluation, step_window and streaming
            self.model.use_sleep(sleep_for_eval(self.cfg, stage))
            if self.graphs is not None:
                self.graphs.reset()  # captured for the previous trainable set
            if self.opt_step is not None:
                self.opt_step.reset()
        return stage

    def train_step(self, batches: list[Any], sleep_cfg: DictConfig, data_s: float
                   ) -> StepResult:
        """Forward and backward of the step's micro-batches, gradient reductions, clip and
        the optimizer update (skipped when the loss or the gradient is not finite)."""
        info, device = self.info, self.device
        # the masks' target counts on the host once per step: the loss normalizer and which
        # windows need the output head (so that no micro-batch syncs with the host)
        with phase("masks"):
            counts = self._host_counts(batches)
        n_loss = sum(int(c.numpy().sum()) for c in counts)
        heads = [heads_from_counts(c, sleep_cfg.window_len) for c in counts]
        if info.dp_size > 1:
            t = torch.tensor([n_loss], dtype=torch.float64, device=device)
            dist.all_reduce(t, group=_dp_group())
            n_loss = int(t.item())
        self._zero_grad()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        if self.pipe is not None:
            return self._pipeline_step(batches, sleep_cfg, data_s, n_loss, heads)
        with phase("forward_backward"):
            for (tokens, mask, doc_starts), hd in zip(batches, heads, strict=True):
                if self.graphs is not None:
                    ls, nc = self.graphs.step(tokens, mask, doc_starts, sleep_cfg,
                                              max(n_loss, 1), self.amp, hd)
                else:
                    ls, nc = forward_backward(self.model, tokens, mask, doc_starts, sleep_cfg,
                                              max(n_loss, 1), self.amp, hd,
                                              parallel=self.parallel,
                                              fused_linears=self.fused_linears,
                                              context_parallel=info.cp_size > 1)
                loss_sum += ls.double()
                correct += nc
        return self._reduce_clip_finish(loss_sum, correct, n_loss, batches, data_s)

    def _reduce_clip_finish(self, loss_sum: torch.Tensor, correct: torch.Tensor, n_loss: int,
                            batches: list[Any], data_s: float) -> StepResult:
        """TP/DP(/CP) gradient reductions, the loss and count over ranks, the clip, then
        ``_finish_step``."""
        info = self.info
        with phase("reduce_clip"):
            sync_tp_grads(self.model.parameters())
            _reduce_grads(self.model, info)
            if info.dp_size * info.cp_size > 1:  # CP peers hold their chunks' shares
                dist.all_reduce(loss_sum, group=_reduce_group(info))
                dist.all_reduce(correct, group=_reduce_group(info))
            params = [p for p in self.model.parameters() if p.grad is not None]
            clip = self.cfg.optim.grad_clip
            gnorm = clip_grad_norm_(params, clip if clip > 0 else math.inf)
        self._prefetch_next_step()
        return self._finish_step(loss_sum, correct, gnorm, n_loss, batches, data_s)

    def _step_batches(self) -> list[Any] | None:
        """This step's micro-batches: made during the previous step (``_prefetch_next_step``)
        or now."""
        pre = self.prefetched
        if pre is not None and pre[0] == self.step:
            return pre[1]
        self.prefetched = None
        return self.data.step_batches(self.step, self.cfg.train.grad_accum)

    def _host_counts(self, batches: list[Any]) -> list[torch.Tensor]:
        """The micro-batches' ``target_counts`` on the host (the loss normalizer and which
        windows need the head): the prefetched copies, or a copy now (which waits for the
        device)."""
        pre, self.prefetched = self.prefetched, None
        if pre is not None and pre[1] is batches:
            return pre[2]
        return _counts_on_host(batches)

    def _prefetch_next_step(self) -> None:
        """Task data is a pure function of the step number, so the next step's micro-batches
        and their host target counts are made here, while the GPU still runs this step's
        backward: their kernel launches and the generator's one host sync leave the critical
        path (the same tensors as made at the next step; a run that stops after this step
        drops them).
        Shard streams are stateful (their position is checkpointed) and are not prefetched."""
        nxt = self.step + 1
        if not self.prefetch or nxt >= self.cfg.train.steps:
            return
        with phase("prefetch"):
            batches = self.data.step_batches(nxt, self.cfg.train.grad_accum)
            self.prefetched = (nxt, batches, _counts_on_host(batches))

    def _finish_step(self, loss_sum: torch.Tensor, correct: torch.Tensor,
                     gnorm: torch.Tensor, n_loss: int, batches: list[Any],
                     data_s: float) -> StepResult:
        """The step's one host sync (loss, gradient norm and correct count together) and the
        optimizer update when both are finite."""
        device = self.device
        with phase("sync"):
            loss_t, gnorm_f, correct_n = torch.stack(
                [loss_sum, gnorm.to(device=device, dtype=torch.float64),
                 correct.to(torch.float64)]).tolist()
        loss_val = loss_t / max(n_loss, 1)
        finite = math.isfinite(loss_val) and math.isfinite(gnorm_f)
        with phase("optimizer"):
            if not finite:
                self._zero_grad()
            elif self.opt_step is not None:
                self.opt_step.step()
            else:
                self.opt.step()
        return StepResult(loss_val, correct_n / max(n_loss, 1), gnorm_f, finite,
                          batches[0][0].shape[1] - 1, data_s)

    def _pipeline_step(self, batches: list[Any], sleep_cfg: DictConfig, data_s: float,
                       n_loss: int, heads: list[list[bool]]) -> StepResult:
        """``train_step`` at parallel.pp > 1: every micro-batch through the visit schedule
        (``PipelineStep``), then the tied embedding's two copies summed over the first and
        last stage, DP (+CP) reductions per stage, the loss and count summed to every rank
        and the clipping norm over all stages."""
        info, device = self.info, self.device
        ls, nc = self.pipe.run(batches, sleep_cfg, max(n_loss, 1), self.amp, heads,
                               fused_linears=self.fused_linears)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        if ls is not None:
            loss_sum, correct = loss_sum + ls.double(), correct + nc
        sync_tp_grads(self.model.parameters())
        shared = _sum_tied_embedding(self.model, self.cfg)
        _reduce_grads(self.model, info)
        dist.all_reduce(loss_sum, group=self.pipe.groups.group)
        dist.all_reduce(correct, group=self.pipe.groups.group)
        if info.dp_size * info.cp_size > 1:
            dist.all_reduce(loss_sum, group=_reduce_group(info))
            dist.all_reduce(correct, group=_reduce_group(info))
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        gnorm = clip_grad_norm_(params, clip if clip > 0 else math.inf,
                                pp_group=self.pipe.groups.group, counted_elsewhere=shared)
        return self._finish_step(loss_sum, correct, gnorm, n_loss, batches, data_s)

    def _zero_grad(self) -> None:
        """Clears gradients: in place while CUDA graphs accumulate into the buffers (they
        must not move), else by dropping them."""
        if self.graphs is not None and self.graphs.disabled is None:
            zero_grads(list(self.model.parameters()))
        else:
            self.opt.zero_grad(set_to_none=True)

    def log_step(self, res: StepResult, mult: float, stage: Any, sleep_cfg: DictConfig) -> None:
        """The progress line, metrics.jsonl (deterministic values) and perf.jsonl."""
        cfg = self.cfg
        tok_s = self.global_batch * res.seq / res.seconds
        flops_s = tok_s * train_flops_per_token(cfg, res.seq, sleep=sleep_cfg)
        world = self.info.world_size
        self.bar.update(self.step, loss=res.loss, acc=res.acc, tok_s=tok_s)
        if not (self.step % cfg.log.every == 0 or self.step == cfg.train.steps
                or not res.finite):
            return
        rec = {"loss": round(res.loss, 6), "acc": round(res.acc, 6), "lr_mult": mult,
               "grad_norm": round(res.grad_norm, 6), "skipped": int(not res.finite),
               "nonfinite_total": self.nonfinite_total, "tokens": self._tokens(res.seq),
               "stage": stage.name if stage else "main", "passes": sleep_cfg.passes}
        skipped = getattr(self.data, "skipped", None)
        if skipped is not None:
            rec["shards_skipped"] = len(skipped)
        self.metrics.log(self.step, rec)
        perf: dict[str, Any] = {"step": self.step, "step_s": round(res.seconds, 4),
                                "data_s": round(res.data_s, 5), "tok_s": round(tok_s, 1)}
        if self.peak:
            perf["mfu"] = round(flops_s / (self.peak * world), 4)
        if self.measured_peak:
            perf["mfu_measured"] = round(flops_s / (self.measured_peak * world), 4)
        if self.graphs is not None:
            perf["graph_replays"] = self.graphs.replays
        if self.opt_step is not None and self.opt_step.replays:
            perf["optimizer_replays"] = self.opt_step.replays
        if self.device.type == "cuda":
            perf["peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        self._perf(perf)

    def _tokens(self, seq: int) -> int:
        """Training tokens consumed up to the current step (inputs, all ranks)."""
        return self.step * self.global_batch * seq

    def _perf(self, rec: dict[str, Any]) -> None:
        if self.rank0:
            with open(self.run_dir / "perf.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    # --- evaluation and checkpoints -------------------------------------------------------------

    def _run_eval(self) -> dict[str, Any]:
        """Held-out task accuracy by depth, or the held-out loss of eval shards, at the
        model's current sleep setting (the stage's)."""
        cfg, sleep_cfg = self.cfg, self.model.sleep_cfg
        if self.task is not None:
            return evaluate_task(self.model, self.task, sleep_cfg, cfg.train.eval_examples,
                                 cfg.data.eval_batch_size, cfg.train.seed, self.device,
                                 autocast=self.amp)
        return evaluate_shards(self.model, cfg, sleep_cfg, self.info, cfg.train.eval_examples,
                               self.amp)

    def evaluate(self, seq: int) -> None:
        """``_run_eval``, logged to metrics.jsonl and printed; its wall time to perf.jsonl."""
        t0 = time.perf_counter()
        ev = self.last_eval = self._run_eval()
        self.metrics.log(self.step, {**eval_record(ev), "tokens": self._tokens(seq)})
        self.say(f"eval at step {self.step}: {_eval_line(ev, self.cfg)}")
        self._perf({"step": self.step, "eval_s": round(time.perf_counter() - t0, 3)})

    def _log_first_step(self, step_s: float) -> None:
        """After this process's first step: how long the start took, split into the setup
        (data, model, optimizer, restore) and the first step itself (which compiles kernels
        and captures CUDA graphs where those are on): a stdout line and a perf.jsonl record.
        With train.exit_after_minutes the clock runs from the setup's start, so a short
        slice loses this time to training."""
        since = time.monotonic() - self.started
        self.say(f"first step done {since:.1f} s after the start: setup {since - step_s:.1f} s, "
                 f"the step {step_s:.1f} s (compilation and graph capture, where on)")
        self._perf({"step": self.step, "start_s": round(since, 3),
                    "first_step_s": round(step_s, 3)})

    def save(self) -> None:
        """Every rank writes its shards into rank 0's temporary directory, then rank 0 writes
        state.pt and finalizes the checkpoint atomically (``save_sharded_checkpoint``)."""
        cfg, step = self.cfg, self.step
        data_state = self.data.state_dict()  # a collective with shards: every rank calls it
        state = {"step": step, "rng": capture_rng_state(), "nonfinite_total":
                 self.nonfinite_total, "config": to_yaml(cfg), "data": data_state} \
            if self.rank0 else None
        info = save_sharded_checkpoint(self.run_dir, step, self.model, self.opt, state,
                                       cfg.train.keep_last,
                                       extra_files={"config.yaml": to_yaml(cfg)},
                                       after_shards=lambda: _fault_point("after_shards", step))
        if self.rank0:
            self.say(f"checkpoint step {step}: {info.bytes / 2**30:.3f} GiB in "
                     f"{info.seconds:.1f} s ({info.path})")
            self._perf({"step": step, "ckpt_s": round(info.seconds, 3),
                        "ckpt_bytes": info.bytes})

    def _stop_code(self) -> int:
        """The stop request as a number, agreed by all ranks (0: none; a signal's number;
        _STOP_FILE; _STOP_TIME): each rank's, the largest wins, so rank 0 sees a signal that
        only another rank has received yet (the launcher forwards it to each rank in turn)."""
        code = 0
        if self.stop.requested:
            code = int(self.stop.signal)
        elif stop_file(self.run_dir).exists():
            code = _STOP_FILE
        elif self.cfg.train.exit_after_minutes > 0 and (
                time.monotonic() - self.started) / 60 > self.cfg.train.exit_after_minutes:
            code = _STOP_TIME
        return _max_over_ranks(code, self.device)

    def stop_requested(self, code: int | None = None) -> str | None:
        """Why the run should stop now (signal, STOP file, time limit), agreed by all ranks;
        ``code``: that of a ``_stop_code()`` call already made."""
        code = self._stop_code() if code is None else code
        if code == 0:
            return None
        if code == _STOP_FILE:
            return f"{stop_file(self.run_dir)}"
        if code == _STOP_TIME:
            return f"train.exit_after_minutes={self.cfg.train.exit_after_minutes}"
        return f"signal {signal.Signals(code).name}"

    def consume_stop_file(self) -> None:
        """A stop request is done once the run has stopped: the signal is forgotten and the
        STOP file removed (a leftover would stop every later start after one step)."""
        self.stop.signal = None
        path = stop_file(self.run_dir)
        if self.rank0 and path.exists():
            path.unlink(missing_ok=True)
            self.say(f"removed {path} (the stop request it made is done)")

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> str:
        """Steps until train.steps, a stop request, max_steps or the end of the data; returns
        the exit reason."""
        cfg, total = self.cfg, self.cfg.train.steps
        if self.step >= total:
            self._report_finished()
            return "done"
        why = self.stop_requested()
        if why is not None and self.step > 0:  # nothing was trained: the checkpoint is it
            self.say(f"stop requested ({why}) before the first step; the run stays at step "
                     f"{self.step}")
            self.consume_stop_file()
            return "stopped"
        while self.step < total:
            stage = self._enter_stage()
            sleep_cfg = sleep_for_step(cfg, stage, self.step)
            mult = lr_multiplier(self.step, warmup_steps=min(cfg.optim.warmup_steps, total),
                                 total_steps=total, schedule=cfg.optim.schedule,
                                 min_lr_ratio=cfg.optim.min_lr_ratio)
            apply_lr(self.opt, mult)
            t0 = time.perf_counter()
            with self.profiler.step_context(self.step + 1):
                with phase("data"):
                    batches = self._step_batches()
                if batches is None:  # a finite shard stream ended (on every rank at once)
                    self.save()
                    return "data_exhausted"
                res = self.train_step(batches, sleep_cfg, time.perf_counter() - t0)
            self._count(res)
            self.step += 1
            self.profiler.after_step(self.step)
            self.steps_this_run += 1
            res.seconds = time.perf_counter() - t0
            self.log_step(res, mult, stage, sleep_cfg)
            if self.steps_this_run == 1:
                self._log_first_step(res.seconds)
            self._guard(res)
            if (self.step % cfg.train.eval_every == 0 or self.step == total) and (
                    self.task is not None or cfg.data.eval_shards) and self.pipe is None:
                # a signal or STOP file (a scheduler's, before its kill; the SLURM launcher's
                # trap writes STOP) saves first: the evaluation could outlast the grace
                # period; a finished run that stopped here gets its final evaluation at the
                # next start (_report_finished). train.exit_after_minutes sets no deadline:
                # the evaluation runs, then the run saves and stops.
                code = self._stop_code()
                if code in (0, _STOP_TIME):
                    self.evaluate(res.seq)
                else:
                    self.say(f"stop requested ({self.stop_requested(code)}): the evaluation "
                             f"at step {self.step} skipped")
            exit_reason = self._after_step()
            if exit_reason is not None:
                return exit_reason
        return "done"

    def _count(self, res: StepResult) -> None:
        if res.finite:
            self.consecutive_bad = 0
        else:
            self.consecutive_bad += 1
            self.nonfinite_total += 1

    def _guard(self, res: StepResult) -> None:
        limit = self.cfg.train.max_nonfinite
        if self.consecutive_bad >= limit:
            raise NonFiniteLossError(
                f"{self.consecutive_bad} steps in a row had a non-finite loss or gradient "
                f"(train.max_nonfinite={limit}); last loss {res.loss}")

    def _after_step(self) -> str | None:
        """Checkpoint at the cadence, at the end, on a stop request or at max_steps."""
        cfg = self.cfg
        why = self.stop_requested()
        limit_hit = self.max_steps is not None and self.steps_this_run >= self.max_steps
        at_end = self.step == cfg.train.steps and cfg.train.save_at_end
        if self.step % cfg.train.ckpt_every == 0 or at_end or why or limit_hit:
            self.save()
        if why is not None:
            self.say(f"stop requested ({why}): saved step {self.step}")
            self.consume_stop_file()
            return "stopped"
        return "max_steps" if limit_hit else None

    def _report_finished(self) -> None:
        """A re-run of a finished run: what it holds. A run that stopped between its last
        checkpoint and writing eval.json gets its final evaluation now."""
        ev_path = self.run_dir / "eval.json"
        self.say(f"{self.run_dir} already finished: step {self.step} of train.steps="
                 f"{self.cfg.train.steps} ({self.resumed_from}); raise train.steps to train on")
        if ev_path.is_file():
            self.last_eval = json.loads(ev_path.read_text())
        elif (self.task is not None or self.cfg.data.eval_shards) and self.pipe is None:
            self._enter_stage_at(self.step - 1)
            self.last_eval = self._run_eval()
            if self.rank0:
                ev_path.write_text(json.dumps(self.last_eval, indent=2))
        if self.last_eval is not None:
            self.say(f"eval: {_eval_line(self.last_eval, self.cfg)} ({ev_path})")

    def _enter_stage_at(self, step: int) -> None:
        self.model.use_sleep(sleep_for_eval(self.cfg, stage_at(self.cfg, max(step, 0))[1]))

    def finish(self, exit_reason: str) -> None:
        """Writes eval.json and the final table after a completed run."""
        if not (self.rank0 and self.last_eval is not None and exit_reason == "done"
                and self.steps_this_run > 0):
            return
        (self.run_dir / "eval.json").write_text(json.dumps(self.last_eval, indent=2))
        if self.task is not None:
            print(format_table(self.last_eval, "t" if self.cfg.data.task == "rule110" else "k"),
                  flush=True)
        else:
            print(f"eval: {_eval_line(self.last_eval, self.cfg)}", flush=True)

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.close()  # a run that ended inside the profiled steps
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()


def train(cfg: DictConfig, max_steps: int | None = None, source: str | None = None,
          trust_checkpoint: bool = False) -> dict[str, Any]:
    """Trains (or resumes) the run of ``cfg``; returns a summary dict.

    ``max_steps`` saves and stops after that many optimizer steps in this process (tests use it
    to interrupt a run); the schedule still follows ``train.steps``. ``source`` names the
    config file in the start-up banner.
    """
    stop = process_stop_flag()
    installed_here = not stop.installed
    stop.install()  # a signal during start-up is a stop request, not a kill
    try:
        engine: type[Trainer] = Trainer
        if cfg.train.engine == "deepspeed":
            from sleeptrain.train.ds_engine import DeepSpeedTrainer, import_deepspeed

            import_deepspeed()  # the missing-package message before any process group
            engine = DeepSpeedTrainer
        info = init_parallel(cfg.parallel.tp, cfg.parallel.backend, cfg.train.device,
                             cp=cfg.parallel.cp, pp=cfg.parallel.pp)
        trainer = engine(cfg, info, stop, max_steps=max_steps, source=source)
        try:
            with deterministic_algorithms(cfg.train.deterministic):
                trainer.setup(trust_checkpoint)
                exit_reason = trainer.run()
        finally:
            trainer.close()
    finally:
        if installed_here:
            stop.restore()
    trainer.finish(exit_reason)
    return {"step": trainer.step, "exit": exit_reason, "eval": trainer.last_eval,
            "run_dir": str(trainer.run_dir)}


def _eval_line(ev: dict[str, Any], cfg: DictConfig) -> str:
    if "by_depth" not in ev:
        return (f"loss {ev['loss']:.4f}, token accuracy {ev['token_acc']:.4f} over "
                f"{ev['tokens']} tokens")
    name = "t" if cfg.data.task == "rule110" else "k"
    depths = ", ".join(f"{name}={d}: {r['example_acc']:.3f}" for d, r in ev["by_depth"].items())
    return (f"exact {ev['example_acc']:.3f}, token {ev['token_acc']:.3f} "
            f"(exact by {name}: {depths})")


def _plain(cfg: DictConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _peak_flops(cfg: DictConfig, device: torch.device, rank0: bool) -> float | None:
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


def _counts_on_host(batches: list[Any]) -> list[torch.Tensor]:
    """Each micro-batch's ``target_counts`` copied to the host (waits for the device)."""
    return [target_counts(mk).cpu() for _, mk, _ in batches]


def _prefetch_on(data: Any, device: torch.device, pipe: Any) -> bool:
    """Whether the next step's batches are made during this step: task data (a pure
    function of the step) on CUDA (where it overlaps the GPU's work), without pipeline
    stages (their micro-batches move through a schedule of their own)."""
    return isinstance(data, TaskData) and device.type == "cuda" and pipe is None


def _pipeline(cfg: DictConfig, model: Any, info: ParallelInfo) -> PipelineStep:
    """This rank's stage of the pipelined step (collective: makes the pipeline's groups);
    ConfigError for a gradient mode the stage layout cannot run."""
    bounds = stage_bounds(cfg, info.pp_size)
    try:
        check_pipeline(cfg.sleep, loop_split(cfg, bounds))
    except ValueError as e:
        raise ConfigError(f"{e} (parallel.pp={info.pp_size}, stages {bounds})") from None
    if info.device.type == "cuda" and dist.get_backend() == "gloo":
        raise ConfigError(f"parallel.backend: gloo cannot send CUDA tensors between pipeline "
                          f"stages (parallel.pp={info.pp_size}); use parallel.backend=nccl or "
                          "auto")
    return PipelineStep(cfg, model, bounds, pipeline_groups())


def _sum_tied_embedding(model: Any, cfg: DictConfig) -> list[torch.Tensor]:
    """Tied embeddings at parallel.pp > 1: the first stage's lookup gradient and the last
    stage's head gradient of ``embed.weight`` summed over megatron-core's embedding group, so
    both copies take the same step. Returns the copy the gradient norm must not count twice
    (the last stage's), else nothing."""
    group = embedding_group()
    if not cfg.model.tie_embeddings or group is None or model.embed is None or \
            not model.embed.weight.requires_grad:
        return []
    w = model.embed.weight
    if w.grad is None:
        w.grad = torch.zeros_like(w)
    dist.all_reduce(w.grad, group=group)
    return [] if model.stage_blocks[0] == 0 else [w]


def _dp_group():
    from megatron.core import parallel_state as mpu

    return mpu.get_data_parallel_group()


def _reduce_group(info: ParallelInfo) -> Any:
    """The group gradients and loss sums are summed over: DP, with the CP ranks under
    context parallelism (each holds its chunks' share of the same batch)."""
    return grad_group() if info.cp_size > 1 else _dp_group()


def _reduce_grads(model: torch.nn.Module, info: ParallelInfo) -> None:
    """Sums gradients over data-parallel (and context-parallel) ranks (the loss is already
    globally normalized)."""
    if info.dp_size * info.cp_size == 1:
        return
    group = _reduce_group(info)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def _init_from(source: str, model: Any, rank0: bool, trust: bool = False) -> None:
    """Model weights of a run directory's newest intact checkpoint, or of a checkpoint
    directory (verified like a resume)."""
    path = Path(source)
    if (path / "meta.json").is_file():
        load_model_weights(path, model, trust=trust)
        ckpt = path
    else:
        found = resume_checkpoint(path, lambda p, s: load_model_from(p, s, model), trust=trust,
                                  quarantine=False, log=lambda m: print(m, flush=True))
        if found is None:
            raise ConfigError(f"train.init_from: no complete checkpoint under {path}")
        ckpt = found[0]
    if rank0:
        print(f"initialized the model from {ckpt}", flush=True)


def load_train_state(path: Path, state: dict[str, Any], model: torch.nn.Module,
                     opt: Any) -> None:
    """Model weights and optimizer state of checkpoint ``path`` (its ``state.pt`` already
    loaded as ``state``), sharded or (single-file checkpoints of earlier versions) not."""
    if is_sharded(path):
        if state["optim_layout"]["optim"]:
            load_model_and_optimizer(path, model, opt, state["optim_layout"])
        else:  # weights only (a converted checkpoint)
            load_model(path, model)
        return
    if "model" not in state:
        raise CheckpointError(f"{path}: holds neither shards/ nor a 'model' entry")
    if getattr(model, "stage", None) is not None:
        raise CheckpointError(f"{path}: a single-file checkpoint (an earlier version's format) "
                              "loads at parallel.pp=1 only; resume it at pp=1 once, which "
                              "writes sharded checkpoints that load at any pipeline size")
    model.load_state_dict(state["model"])  # already loaded: not load_model_weights
    opt.load_state_dict(state["optimizer"])


def _log_restore(run_dir: Path, step: int, path: Path, t0: float, rank0: bool,
                 device: torch.device) -> None:
    """Once every rank has loaded checkpoint ``path`` (model, optimizer, RNG and data state):
    its size and the seconds since ``t0`` to stdout and perf.jsonl, as ``save`` does."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    secs = time.perf_counter() - t0
    if rank0:
        nbytes = checkpoint_bytes(path)
        print(f"resumed from step {step}: {nbytes / 2**30:.3f} GiB in {secs:.1f} s ({path})",
              flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "perf.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "restore_s": round(secs, 3),
                                "restore_bytes": nbytes}) + "\n")


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
