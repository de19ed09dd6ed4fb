"""The public entry points: load a config, build a model, compute the windowed loss."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from omegaconf import DictConfig

from sleeptrain.config import SleepConfig, load_config, switch_on
from sleeptrain.parallel.state import context_parallel, init_parallel, tp_group
from sleeptrain.sleep.runner import windowed_loss
from sleeptrain.sleep.wrapper import SleepModel

__all__ = ["build_model", "load_config", "load_run", "sleep_in_force", "windowed_loss"]


def build_model(cfg: DictConfig, device: torch.device | str | None = None,
                seed: int | None = None) -> SleepModel:
    """A SleepModel for ``cfg`` (the full run config), on ``device``.

    Initializes the process groups first if needed (a one-process gloo group on a CPU, see
    ``sleeptrain.parallel.init_parallel``). Weights are drawn from ``seed`` (default
    ``cfg.train.seed``) identically at every tensor-parallel and pipeline size; they are
    replicated over the context-parallel group, which the model gets for splitting training
    windows. At ``parallel.pp > 1`` the model is this rank's pipeline stage
    (``sleeptrain.plan.pipeline.stage_bounds``): its blocks, and the embedding / head where
    the stage holds them.
    """
    info = init_parallel(cfg.parallel.tp, cfg.parallel.backend,
                         "cpu" if device is not None and str(device) == "cpu" else
                         cfg.train.device, cp=cfg.parallel.cp, pp=cfg.parallel.pp)
    if cfg.parallel.sequence_parallel and info.tp_size == 1:
        warnings.warn("parallel.sequence_parallel has no effect at parallel.tp=1", stacklevel=2)
    stage = None
    if info.pp_size > 1:  # this rank's pipeline stage holds its blocks only
        from sleeptrain.plan.pipeline import stage_bounds

        bounds = stage_bounds(cfg, info.pp_size)
        stage = (bounds[info.pp_rank], bounds[info.pp_rank + 1])
    gen_state = torch.get_rng_state()
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    try:
        model = SleepModel(cfg.model, cfg.sleep, tp=info.tp_size, tp_rank=info.tp_rank,
                           sequence_parallel=cfg.parallel.sequence_parallel,
                           tp_group=tp_group(), cp=context_parallel(), stage=stage)
    finally:
        torch.set_rng_state(gen_state)
    model = model.to(info.device if device is None else device)
    _warn_fla_fp32(cfg, next(model.parameters()).device)
    return model


def _warn_fla_fp32(cfg: DictConfig, device: torch.device) -> None:
    """Warn when this model's GDN gradients in fp32 come from FLA's less exact TileLang
    backward (``kernels.gated_delta.fla_fp32_gate_caveat``)."""
    from sleeptrain.model.kernels.gated_delta import fla_fp32_gate_caveat

    if device.type != "cuda" or cfg.train.precision != "fp32" or \
            cfg.model.gdn_backend not in ("auto", "fla", "short") or \
            cfg.model.params_dtype == "float64":
        return
    note = fla_fp32_gate_caveat(device)
    if note is not None:
        warnings.warn(note, stacklevel=3)


def load_run(run_dir: Any, overrides: list[str] | tuple[str, ...] = (),
             device: torch.device | str | None = None, *,
             trust: bool = False) -> tuple[Any, SleepModel, Any]:
    """(config, model in eval mode with the newest intact checkpoint's weights, checkpoint
    path) of the run directory ``run_dir``.

    Checkpoints are tried newest first (``checkpoint.resume_checkpoint`` without renaming
    anything): each is verified -- the digests of its small files before anything is
    unpickled, of its shard files while loading -- and a damaged one (incomplete, a digest
    mismatch) is skipped with a line on stderr naming it and the file. A checkpoint without
    digests (format 1) needs ``trust``. The model is the whole model (``parallel.pp=1``,
    ``parallel.cp=1`` unless ``overrides`` say otherwise) at the run's TP size, its layers'
    elementwise chains compiled as the run's ``train.compile`` says (auto: on CUDA), as in
    training (evaluation and streaming inference then launch the same fused kernels). Raises
    CheckpointError naming what is missing or what failed."""
    import sys
    from pathlib import Path

    from sleeptrain.train.checkpoint import CheckpointError, resume_checkpoint
    from sleeptrain.train.dist_ckpt import load_model_from

    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run} is not a run directory (no config.yaml)")
    # the whole model in this process: a pipeline or context-parallel run's checkpoint loads
    # at any layout (keyed by full names); an explicit override still wins
    cfg = load_config(cfg_path, ["parallel.pp=1", "parallel.cp=1", *overrides])
    ckpt_dir = run / "checkpoints"
    if not ckpt_dir.is_dir() or not any(ckpt_dir.iterdir()):
        raise CheckpointError(f"no complete checkpoint under {ckpt_dir}")
    model = build_model(cfg, device=device)
    found = resume_checkpoint(run, lambda p, s: load_model_from(p, s, model), trust=trust,
                              quarantine=False,
                              log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if found is None:
        raise CheckpointError(f"no complete checkpoint under {run / 'checkpoints'}")
    path, state = found
    cfg.sleep = sleep_in_force(cfg, int(state["step"]), overrides)
    model.use_sleep(cfg.sleep)
    cuda = next(model.parameters()).device.type == "cuda"
    model.set_kernels(compile=switch_on(cfg.train.compile, cuda))
    return cfg, model.eval(), path


def sleep_in_force(cfg: DictConfig, step: int,
                   overrides: list[str] | tuple[str, ...] = ()) -> SleepConfig:
    """The sleep settings a run's checkpoint at ``step`` is evaluated and streamed with: the
    stage's ``passes``/``eviction`` in force at its last step (``train.stages``), unless
    ``overrides`` set ``sleep.passes`` / ``sleep.eviction`` themselves (an explicit choice,
    e.g. evaluating a randomized-depth model at another N, wins)."""
    from sleeptrain.train.stages import sleep_for_eval, stage_at

    stage = stage_at(cfg, max(step - 1, 0))[1]
    sc = sleep_for_eval(cfg, stage)
    given = {o.split("=", 1)[0].strip() for o in overrides}
    if "sleep.passes" in given:
        sc.passes = cfg.sleep.passes
    if "sleep.eviction" in given:
        sc.eviction = cfg.sleep.eviction
    return sc
