"""The sleep method: windows, state, eviction, wake/sleep passes, gradient modes, checkpointing."""

from sleeptrain.sleep.runner import LossOutput, WindowOutput, run_window, windowed_loss
from sleeptrain.sleep.state import SleepState
from sleeptrain.sleep.wrapper import SleepModel

__all__ = ["LossOutput", "SleepModel", "SleepState", "WindowOutput", "run_window",
           "windowed_loss"]
