"""The sleep recurrence wrapper: the hybrid model plus its window/sleep settings."""

from __future__ import annotations

from typing import Any

import torch

from sleeptrain.config.validate import validate_sleep
from sleeptrain.model.hybrid import HybridModel, SleepState
from sleeptrain.sleep.runner import run_window


class SleepModel(HybridModel):
    """A HybridModel that consumes a stream window by window and sleeps at every eviction.

    ``step_window(tokens, state, passes)`` is the streaming primitive; ``windowed_loss`` in
    ``sleeptrain.sleep`` composes it over a batch and gives the same numbers.
    """

    def __init__(self, model_cfg: Any, sleep_cfg: Any, tp: int = 1, tp_rank: int = 0,
                 sequence_parallel: bool = False):
        validate_sleep(sleep_cfg)
        super().__init__(model_cfg, tp=tp, tp_rank=tp_rank, sequence_parallel=sequence_parallel)
        self.sleep_cfg = sleep_cfg

    def step_window(
        self, tokens: torch.Tensor, state: SleepState, passes: int | None = None,
        reset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, SleepState]:
        """Wake pass over ``tokens`` [B, l] (l <= window_len), then passes-1 sleep passes and
        eviction. Returns (wake-pass logits [B, l, V], state for the next window).

        ``passes`` defaults to sleep.passes; pass 1 for a window that nothing follows.
        ``reset`` [B] bool: sequences whose state is cleared before this window (a new
        document starts with it).
        """
        n = self.sleep_cfg.passes if passes is None else passes
        if n < 1:
            raise ValueError(f"passes must be >= 1, got {n}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, l], got shape {tuple(tokens.shape)}")
        out, state = run_window(self, tokens, state, n, self.sleep_cfg, want_logits=True,
                                reset=reset)
        return out.logits, state
