"""The sleep recurrence wrapper: the hybrid model plus its window/sleep settings."""

from __future__ import annotations

import torch

from sleeptrain.config import ModelConfig, SleepConfig
from sleeptrain.config.validate import validate_sleep
from sleeptrain.model.hybrid import ContextParallel, HybridModel
from sleeptrain.sleep.runner import parallel_hidden, run_window
from sleeptrain.sleep.state import SleepState, initial_state


class SleepModel(HybridModel):
    """A HybridModel that consumes a stream window by window and sleeps at every eviction.

    ``step_window(tokens, state)`` is the streaming primitive; ``windowed_loss`` in
    ``sleeptrain.sleep`` composes it over a batch and gives the same numbers. ``sleep_cfg``
    is the sleep setting streaming uses when a call gives none: the one the model was built
    with, or the one ``use_sleep`` installed (the trainer installs each step's, so a stage's
    N reaches step_window and streaming inference too).
    """

    def __init__(self, model_cfg: ModelConfig, sleep_cfg: SleepConfig, tp: int = 1,
                 tp_rank: int = 0, sequence_parallel: bool = False, tp_group: object = None,
                 cp: ContextParallel | None = None, stage: tuple[int, int] | None = None):
        validate_sleep(sleep_cfg)
        super().__init__(model_cfg, tp=tp, tp_rank=tp_rank, sequence_parallel=sequence_parallel,
                         tp_group=tp_group, cp=cp, stage=stage)
        self.sleep_cfg = sleep_cfg

    def use_sleep(self, sleep_cfg: SleepConfig) -> None:
        """Makes ``sleep_cfg`` the default of step_window and streaming inference."""
        validate_sleep(sleep_cfg)
        self.sleep_cfg = sleep_cfg

    def init_state(self, batch_size: int, device: torch.device | str | None = None
                   ) -> SleepState:
        """The state at the start of a sequence: zero fast weights, empty conv state and KV."""
        return initial_state(self, batch_size, device)

    def step_window(
        self, tokens: torch.Tensor, state: SleepState, passes: int | None = None,
        reset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, SleepState]:
        """Wake pass over ``tokens`` [B, l] (l <= window_len), then passes-1 sleep passes and
        eviction. Returns (wake-pass logits [B, l, V], state for the next window).

        ``passes`` defaults to the model's sleep setting; pass 1 for a window that nothing
        follows. ``reset`` [B] bool: sequences whose state is cleared before this window (a
        new document starts with it).
        """
        n = self.sleep_cfg.passes if passes is None else passes
        if n < 1:
            raise ValueError(f"passes must be >= 1, got {n}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, l], got shape {tuple(tokens.shape)}")
        out, state = run_window(self, tokens, state, n, self.sleep_cfg, want_logits=True,
                                reset=reset)
        return out.logits, state

    def parallel_hidden(self, tokens: torch.Tensor, window_len: int,
                        eviction: str = "hard") -> torch.Tensor:
        """Final hidden states of the N=1 computation in one call per layer
        (``sleeptrain.sleep.runner.parallel_hidden``)."""
        return parallel_hidden(self, tokens, window_len, eviction)

    def forward_parallel(self, tokens: torch.Tensor, window_len: int,
                         eviction: str = "hard") -> torch.Tensor:
        """Full logits [B, T, V] of ``parallel_hidden`` (the N=1 computation in one call)."""
        return self.full_logits(self.parallel_hidden(tokens, window_len, eviction))
