"""sleeptrain: training 'sleep' SSM-attention hybrid language models at scale.

Public API::

    cfg = sleeptrain.load_config("configs/rule110_tiny.yaml", overrides=["sleep.passes=4"])
    model = sleeptrain.build_model(cfg)
    state = model.init_state(batch_size)
    logits, state = model.step_window(tokens, state, passes=4)
    out = sleeptrain.windowed_loss(model, tokens, loss_mask, cfg.sleep)

The names are imported on first use, so that ``import sleeptrain.config`` (and the
command line's ``--help``) does not import torch, megatron-core or FLA.
"""

from __future__ import annotations

import warnings
from typing import Any

# Import-time notices of optional libraries that say nothing about the user's run.
for _msg in (".*Transformer Engine and Apex are not installed.*",
             ".*Triton is not supported on current platform.*", ".*tp_group is None.*"):
    warnings.filterwarnings("ignore", message=_msg)

__version__ = "0.1.0"
__all__ = ["__version__", "build_model", "load_config", "windowed_loss"]
_API = {"build_model", "load_config", "windowed_loss", "load_run"}


def __getattr__(name: str) -> Any:
    if name in _API:
        from sleeptrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'sleeptrain' has no attribute {name!r}")
