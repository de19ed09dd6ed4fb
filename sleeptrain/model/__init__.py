"""The hybrid model's math: layers, the stack, the state, and kernels."""

from sleeptrain.model.hybrid import Block, HybridModel, PassContext, SleepState, ffn_hidden

__all__ = ["Block", "HybridModel", "PassContext", "SleepState", "ffn_hidden"]
