"""The public entry points: load a config, build a model, compute the windowed loss."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from sleeptrain.config import load_config
from sleeptrain.parallel.state import init_parallel
from sleeptrain.sleep.model import SleepModel
from sleeptrain.sleep.runner import windowed_loss

__all__ = ["build_model", "load_config", "windowed_loss"]


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
