"""The sleep method: windows, eviction, wake/sleep passes, gradient modes, checkpointing."""

from sleeptrain.sleep.model import SleepModel
from sleeptrain.sleep.runner import LossOutput, WindowOutput, run_window, windowed_loss

__all__ = ["LossOutput", "SleepModel", "WindowOutput", "run_window", "windowed_loss"]
