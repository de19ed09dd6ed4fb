"""The DeepSpeed ZeRO engine (``train.engine=deepspeed``): the same model, the same ``sleep/``
window runner, the same data, stages, schedule, logging and evaluation as the megatron
engine, with DeepSpeed's ZeRO 0-3 (optimizer / gradient / parameter partitioning, CPU offload)
doing the reductions, the clipping, the optimizer step and the checkpoints.

``deepspeed.initialize`` wraps :class:`SleepLoss` (the model, with the windowed loss of one
micro-batch as its forward), so that every micro-batch goes through the engine's forward
(ZeRO-3's parameter coordinator starts its step there). Per micro-batch: ``engine(...)``,
``engine.backward(loss)``, ``engine.step()`` (DeepSpeed steps the optimizer at the
accumulation boundary only). The loss handed to ``engine.backward`` is the micro-batch's loss
sum times ``grad_accum * dp / n_loss``: DeepSpeed divides by the accumulation steps and
averages over data-parallel ranks, so the gradient is the megatron engine's (the masked
cross-entropy summed over the step's micro-batches and ranks, divided by the global number
of loss tokens). Decisions, ZeRO-3 settings and checkpoint formats: docs/design.md,
"DeepSpeed engine".
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from sleeptrain.config import to_yaml
from sleeptrain.config.derived import loop_range
from sleeptrain.config.validate import ConfigError, deepspeed_zero, read_deepspeed_file
from sleeptrain.sleep.runner import (
    heads_from_counts,
    parallel_applies,
    parallel_loss,
    windowed_loss,
)
from sleeptrain.train.checkpoint import (
    DIR_DIGESTS_FILE,
    CheckpointError,
    capture_rng_state,
    checkpoint_step,
    find_latest_checkpoint,
    publish,
    record_dir_digests,
    restore_rng_state,
    resume_in_order,
    step_dirs,
    verify_dir_digests,
)
from sleeptrain.train.optim import is_muon_param, uses_weight_decay
from sleeptrain.train.resume import check_resume
from sleeptrain.train.stages import sleep_for_eval, stage_at, trainable_predicate
from sleeptrain.train.trainer import (
    NonFiniteLossError,
    StepResult,
    Trainer,
    _fault_point,
    _init_from,
)

#: Where a DeepSpeed run keeps its checkpoints (DeepSpeed's own format), under the run dir.
DS_DIR = "ds_checkpoints"
#: The file naming the newest complete checkpoint tag (written atomically after every rank
#: has finished writing; DeepSpeed's own ``latest`` file is not written).
LATEST = "latest"

MISSING = ("train.engine=deepspeed needs the deepspeed package, which cannot be imported "
           "({err}). Install it with pip install -e \".[deepspeed]\" (on a CPU machine no CUDA "
           "op is built: DeepSpeed compiles the ones it needs when first used)")


class DeepSpeedMissingError(ConfigError):
    """train.engine=deepspeed was asked for and the deepspeed package is not importable."""


def import_deepspeed() -> Any:
    """The deepspeed module; DeepSpeedMissingError (a ConfigError naming train.engine and the
    install command) when it cannot be imported."""
    try:
        import deepspeed
    except ImportError as e:
        raise DeepSpeedMissingError(f"train.engine: {MISSING.format(err=e)}") from None
    return deepspeed


class SleepLoss(nn.Module):
    """The module DeepSpeed wraps: ``model`` as a child, and as forward the summed masked
    cross-entropy of one micro-batch run window by window with sleep
    (``sleeptrain.sleep.runner.windowed_loss``; ``parallel_loss`` where it applies and
    ``one_call`` is set). Returns (loss_sum, n_correct); bf16 autocast on CUDA when asked."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor,
                doc_starts: torch.Tensor | None, sleep_cfg: DictConfig, heads: list[bool],
                autocast: bool, one_call: bool) -> tuple[torch.Tensor, torch.Tensor]:
        amp = autocast and tokens.is_cuda
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            if one_call and parallel_applies(self.model, sleep_cfg, None, doc_starts):
                out = parallel_loss(self.model, tokens, mask, sleep_cfg)
            else:
                out = windowed_loss(self.model, tokens, mask, sleep_cfg, doc_starts=doc_starts,
                                    heads=heads)
        return out.loss_sum, out.n_correct


def loop_numel(cfg: DictConfig, model: nn.Module) -> tuple[int, int]:
    """(elements of the loop range's parameters, elements of the largest block)."""
    a, b = loop_range(cfg.model)
    sizes = [sum(p.numel() for p in blk.parameters()) for blk in model.blocks]
    return sum(sizes[a:b]), max(sizes)


def zero3_settings(cfg: DictConfig, model: nn.Module) -> dict[str, int]:
    """ZeRO-3's parameter settings the ``deepspeed`` section leaves at null, from the loop
    range (docs/design.md): a loop-range parameter's next use is one sleep pass later, after
    the rest of the loop range has been fetched, so a reuse distance of the loop range's
    size keeps it gathered through a window's N passes instead of re-gathering the loop
    range N times per window (and again in the backward); the live limit leaves room for that
    plus one block being prefetched. Prefetch and persistence keep DeepSpeed's defaults (the
    prefetch follows the trace recorded in the first step, which holds the repeated visits)."""
    loop, block = loop_numel(cfg, model)
    return {"stage3_max_reuse_distance": loop,
            "stage3_max_live_parameters": max(1_000_000_000, loop + block)}


def optimizer_section(cfg: DictConfig, cuda: bool) -> dict[str, Any]:
    """DeepSpeed's optimizer entry for ``optim``: Muon (DeepSpeed's ``MuonWithAuxAdam``, which
    ZeRO 1-3 orthogonalize on the full matrix) for the parameters tagged ``use_muon``, AdamW
    for the rest; AdamW alone with ``optim.use_muon=false``. The Adam part is
    ``torch.optim.AdamW`` except with optimizer offload on CUDA (DeepSpeed's CPU Adam)."""
    o = cfg.optim
    offload = "offload_optimizer" in deepspeed_zero(cfg)
    torch_adam = not (offload and cuda)
    adam = {"betas": list(o.adamw_betas), "eps": o.adamw_eps, "weight_decay": o.weight_decay,
            "torch_adam": torch_adam}
    if not o.use_muon:
        return {"type": "AdamW", "params": {"lr": o.adamw_lr, **adam}}
    return {"type": "Muon", "params": {"lr": o.adamw_lr, "muon_lr": o.muon_lr,
                                       "adam_lr": o.adamw_lr, "momentum": o.muon_momentum,
                                       **adam}}


def deepspeed_config(cfg: DictConfig, model: nn.Module, dp: int, cuda: bool) -> dict[str, Any]:
    """The whole DeepSpeed config: batch, accumulation and clipping from the run's config,
    ``zero_optimization`` from the ``deepspeed`` section (and its file), the optimizer from
    ``optim``; the other keys of ``deepspeed.config_file`` are laid over it."""
    zero = deepspeed_zero(cfg)
    if zero["stage"] == 3:
        for k, v in zero3_settings(cfg, model).items():
            zero.setdefault(k, v)
        if cfg.optim.use_muon:  # DeepSpeed's ZeRO-3 Muon refuses reduce-scatter
            zero.setdefault("reduce_scatter", False)
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * dp,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "optimizer": optimizer_section(cfg, cuda),
        "bf16": {"enabled": bool(cfg.deepspeed.bf16_weights)},
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.config_file:
        extra = read_deepspeed_file(cfg.deepspeed.config_file)
        conf.update({k: v for k, v in extra.items() if k != "zero_optimization"})
    return conf


def param_groups(model: nn.Module, use_muon: bool) -> list[dict[str, Any]]:
    """The trainable parameters in two groups (with and without weight decay, as
    ``sleeptrain.train.optim``), each parameter tagged ``use_muon`` by the same rule."""
    decay: list[nn.Parameter] = []
    nodecay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        p.use_muon = use_muon and is_muon_param(name, p)
        if p.requires_grad:
            (decay if p.use_muon or uses_weight_decay(name, p) else nodecay).append(p)
    groups = [{"params": decay, "name": "decay"},
              {"params": nodecay, "weight_decay": 0.0, "name": "nodecay"}]
    return [g for g in groups if g["params"]]


def latest_tag(run_dir: Path) -> str | None:
    """The tag ``latest`` names (None: no ``latest``, or one that names no step_<step> tag:
    resume then takes the newest checkpoint with a digest record, as the megatron engine
    does)."""
    try:
        tag = (run_dir / DS_DIR / LATEST).read_text().strip()
        checkpoint_step(tag)
    except (OSError, UnicodeDecodeError, CheckpointError):
        return None
    return tag


def resume_candidates(run_dir: Path) -> list[str]:
    """The tags a resume tries, in order: the one ``latest`` names, then every older step_*
    tag, newest first (without ``latest``: every tag with a digest record). Saves are
    written as ``.tmp-*`` tags and renamed when complete (never candidates)."""
    ckdir = run_dir / DS_DIR
    if not ckdir.is_dir():
        return []
    tags = step_dirs(ckdir)
    latest = latest_tag(run_dir)
    if latest is None:
        return [p.name for _, p in tags if (p / DIR_DIGESTS_FILE).is_file()]
    older = [p.name for step, p in tags if step < checkpoint_step(latest)]
    return ([latest] if (ckdir / latest).is_dir() else []) + older


def _prune(ckdir: Path, keep_last: int) -> None:
    """Removes all but the newest ``keep_last`` step_* tags (never the one ``latest`` names)."""
    keep = (ckdir / LATEST).read_text().strip()
    tags = sorted(p for p in ckdir.glob("step_*") if p.is_dir())
    for old in tags[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


class DeepSpeedTrainer(Trainer):
    """The trainer with DeepSpeed's engine in place of the megatron engine's reductions,
    optimizer and checkpoints (module docstring)."""

    engine: Any = None

    def _build_model_and_optimizer(self, trust: bool) -> None:
        """The model, train.init_from's weights when starting fresh, then
        ``deepspeed.initialize`` (which partitions for ZeRO and builds the optimizer)."""
        import sleeptrain

        deepspeed = import_deepspeed()
        cfg = self.cfg
        resuming = bool(resume_candidates(self.run_dir))
        if find_latest_checkpoint(self.run_dir, verify=False) is not None:
            raise ConfigError(
                f"train.engine: {self.run_dir} holds checkpoints of the megatron engine; "
                "train.engine=deepspeed does not resume them (start a new train.run_dir with "
                f"train.init_from={self.run_dir})")
        if resuming:
            self.changes = check_resume(self.run_dir, cfg)
        torch.manual_seed(cfg.train.seed)
        self.model = sleeptrain.build_model(cfg, device=self.device)
        if not resuming and cfg.train.init_from:
            _init_from(cfg.train.init_from, self.model, self.rank0, trust)
        stage = cfg.train.stages[0] if cfg.train.stages else None
        pred = trainable_predicate(stage.trainable if stage else "all")
        for name, p in self.model.named_parameters():
            p.requires_grad_(pred(name))
        conf = deepspeed_config(cfg, self.model, self.info.dp_size, self.device.type == "cuda")
        # ZeRO-3 releases a module's parameters when its forward ends, also in a checkpoint's
        # recompute: checkpointed regions are recomputed before their backward reaches any
        # module (sleeptrain.sleep.runner._maybe_checkpoint)
        self.model.recompute_first = conf["zero_optimization"]["stage"] == 3
        if conf["zero_optimization"]["stage"] == 3 and cfg.model.tie_embeddings:
            # the output head multiplies by the embedding's weight: ZeRO-3 must gather it for
            # the head's forward too, not only for the embedding's
            deepspeed.zero.register_external_parameter(self.model.head, self.model.embed.weight)
        self.engine, self.opt, _, _ = deepspeed.initialize(
            model=SleepLoss(self.model), model_parameters=param_groups(
                self.model, cfg.optim.use_muon), config=conf, dist_init_required=False)

    def _speed_paths(self) -> str | None:
        self.parallel = self.device.type == "cuda" and self.cfg.train.parallel_n1 != "off"
        return "train.engine=deepspeed runs eagerly"

    def _restore(self, trust: bool) -> None:
        """Resumes from the newest intact DeepSpeed checkpoint (:func:`resume_candidates`):
        its files verified against its digest record before DeepSpeed unpickles anything; a
        damaged one is renamed ``corrupt-<tag>`` (kept, never loaded again) with a message and
        the next older one is tried; one without a record is refused unless ``trust``."""
        ckdir = self.run_dir / DS_DIR
        box = [(resume_candidates(self.run_dir), latest_tag(self.run_dir))
               if self.rank0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)  # every rank tries rank 0's list
        order, named = box[0]
        missing = []
        if named is not None and named not in order:
            self.say(f"{ckdir / LATEST} names {named}, which is missing; trying older ones")
            missing = [f"{named}: missing"]

        def attempt(path: Path) -> None:
            t0 = time.perf_counter()
            verify_dir_digests(path, trust=trust)
            self._load_tag(path, time.perf_counter() - t0)

        used, _, failures = resume_in_order(ckdir, order, attempt, log=self.say,
                                            what="DeepSpeed checkpoint")
        if used is None and (missing or failures):
            raise CheckpointError(f"{ckdir}: no DeepSpeed checkpoint could be used, refusing to "
                                  f"start from step 0: {'; '.join(missing + failures)}")

    def _load_tag(self, path: Path, verify_s: float) -> None:
        """DeepSpeed's load of checkpoint ``path`` (model, optimizer, the client state: step,
        RNG, data position)."""
        t0 = time.perf_counter()
        try:
            loaded, client = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        except Exception as e:  # noqa: BLE001 - any failure to load names the checkpoint
            raise CheckpointError(f"{path}: cannot load the DeepSpeed checkpoint: "
                                  f"{type(e).__name__}: {e}") from e
        if loaded is None or client is None or "step" not in client:
            raise CheckpointError(f"{path}: DeepSpeed loaded no training state from it")
        self.step = int(client["step"])
        self.nonfinite_total = int(client.get("nonfinite_total", 0))
        restore_rng_state(client["rng"])
        self.data.load_state_dict(client.get("data"))
        self.resumed_from = path
        if self.rank0:
            print(f"resumed from step {self.step}: DeepSpeed checkpoint {path} in "
                  f"{time.perf_counter() - t0:.1f} s (digests verified in {verify_s:.1f} s)",
                  flush=True)

    def _banner(self, no_graphs: str | None) -> None:
        super()._banner(None)
        if self.rank0:
            zero = self.engine.zero_optimization_stage()
            print(f"  engine: DeepSpeed ZeRO-{zero}, optimizer {type(self.opt).__name__}"
                  f" ({self.cfg.deepspeed.config_file or 'deepspeed section'})", flush=True)

    def _enter_stage(self) -> Any:
        """The stage's N and eviction (the trainable set is fixed: validate_deepspeed)."""
        stage_idx, stage = stage_at(self.cfg, self.step)
        if stage_idx != self.stage_idx:
            self.stage_idx = stage_idx
            self.model.use_sleep(sleep_for_eval(self.cfg, stage))
        return stage

    def _zero_grad(self) -> None:
        """DeepSpeed clears gradients in its step."""

    def train_step(self, batches: list[Any], sleep_cfg: DictConfig, data_s: float) -> StepResult:
        """Every micro-batch through engine forward / backward / step; the loss scaled so
        that the reduced gradient is the megatron engine's (module docstring). A non-finite
        loss stops the run before the optimizer update (NonFiniteLossError)."""
        device, dp = self.device, self.info.dp_size
        counts = self._host_counts(batches)
        n_loss = sum(int(c.numpy().sum()) for c in counts)
        if dp > 1:
            t = torch.tensor([n_loss], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            n_loss = int(t.item())
        scale = self.cfg.train.grad_accum * dp / max(n_loss, 1)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        last = len(batches) - 1
        for i, ((tokens, mask, doc_starts), c) in enumerate(zip(batches, counts, strict=True)):
            ls, nc = self.engine(tokens, mask, doc_starts, sleep_cfg,
                                 heads_from_counts(c, sleep_cfg.window_len), self.amp,
                                 self.parallel)
            if ls.requires_grad:
                self.engine.backward(ls * scale)
            loss_sum += ls.detach().double()
            correct += nc
            if i == last:
                if dp > 1:
                    dist.all_reduce(loss_sum)
                    dist.all_reduce(correct)
                if not math.isfinite(loss_sum.item()):
                    raise NonFiniteLossError(
                        f"step {self.step}: non-finite loss {loss_sum.item()}; "
                        "train.engine=deepspeed stops before the optimizer update (the last "
                        "checkpoint is intact)")
            self.engine.step()
        gnorm = self.engine.get_global_grad_norm()
        gnorm = float(gnorm) if gnorm is not None else 0.0
        return StepResult(loss_sum.item() / max(n_loss, 1), correct.item() / max(n_loss, 1),
                          gnorm, True, batches[0][0].shape[1] - 1, data_s)

    def save(self) -> None:
        """DeepSpeed's checkpoint of every rank, the training state as its client state,
        written as tag ``.tmp-step_<step>``; then the digest record of its files (every rank
        hashing a share: :func:`~sleeptrain.train.checkpoint.record_dir_digests`), the rename
        to ``step_<step>`` (replacing a checkpoint of the same step) and ``latest``, so a
        crash at any point leaves the previous checkpoint in force and nothing half written
        under a step name."""
        cfg, step = self.cfg, self.step
        t0 = time.perf_counter()
        client = {"step": step, "rng": capture_rng_state(), "nonfinite_total":
                  self.nonfinite_total, "config": to_yaml(cfg), "data": self.data.state_dict()}
        ckdir = self.run_dir / DS_DIR
        tag = f"step_{step:08d}"
        tmp = ckdir / f".tmp-{tag}"
        if self.rank0:
            for left in ckdir.glob(".tmp-*"):  # an unfinished save's (one writer per run)
                shutil.rmtree(left)
        if dist.is_initialized():
            dist.barrier()
        self.engine.save_checkpoint(str(ckdir), tag=tmp.name, client_state=client,
                                    save_latest=False)
        _fault_point("after_shards", step)
        if dist.is_initialized():
            dist.barrier()
        nbytes = record_dir_digests(tmp)
        if self.rank0:
            publish(tmp, ckdir, tag)
            _prune(ckdir, cfg.train.keep_last)
            secs = time.perf_counter() - t0
            self.say(f"checkpoint step {step}: {nbytes / 2**30:.3f} GiB in {secs:.1f} s "
                     f"({ckdir / tag}, DeepSpeed format, digests recorded)")
            self._perf({"step": step, "ckpt_s": round(secs, 3), "ckpt_bytes": nbytes})
        if dist.is_initialized():
            dist.barrier()
