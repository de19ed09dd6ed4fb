"""The public entry points: load a config, build a model, compute the windowed loss."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from sleeptrain.config import load_config
from sleeptrain.parallel.state import init_parallel
from sleeptrain.sleep.model import SleepModel
from sleeptrain.sleep.runner import windowed_loss

__all__ = ["build_model", "load_config", "load_run", "windowed_loss"]


def build_model(cfg: Any, device: torch.device | str | None = None,
                seed: int | None = None) -> SleepModel:
    """A SleepModel for ``cfg`` (the full run config), on ``device``.

    Initializes the process groups first if needed (a one-process gloo group on a CPU, see
    ``sleeptrain.parallel.init_parallel``). Weights are drawn from ``seed`` (default
    ``cfg.train.seed``) identically at every tensor-parallel size.
    """
    info = init_parallel(cfg.parallel.tp, cfg.parallel.backend,
                         "cpu" if device is not None and str(device) == "cpu" else
                         cfg.train.device)
    if cfg.parallel.sequence_parallel and info.tp_size == 1:
        warnings.warn("parallel.sequence_parallel has no effect at parallel.tp=1", stacklevel=2)
    gen_state = torch.get_rng_state()
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    try:
        model = SleepModel(cfg.model, cfg.sleep, tp=info.tp_size, tp_rank=info.tp_rank,
                           sequence_parallel=cfg.parallel.sequence_parallel)
    finally:
        torch.set_rng_state(gen_state)
    return model.to(info.device if device is None else device)


def load_run(run_dir: Any, overrides: list[str] | tuple[str, ...] = (),
             device: torch.device | str | None = None) -> tuple[Any, SleepModel, Any]:
    """(config, model in eval mode with the latest checkpoint's weights, checkpoint path) of
    the run directory ``run_dir``. Raises CheckpointError naming what is missing."""
    from pathlib import Path

    from sleeptrain.train.checkpoint import CheckpointError, find_latest_checkpoint
    from sleeptrain.train.dist_ckpt import load_model_weights

    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run} is not a run directory (no config.yaml)")
    cfg = load_config(cfg_path, list(overrides))
    ckpt = find_latest_checkpoint(run)
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint under {run / 'checkpoints'}")
    model = build_model(cfg, device=device)
    load_model_weights(ckpt, model)
    return cfg, model.eval(), ckpt
