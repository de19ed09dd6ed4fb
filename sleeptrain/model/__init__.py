"""The hybrid model's math: layers, the stack and its kernels."""

from sleeptrain.model.hybrid import Block, BlockContext, HybridModel

__all__ = ["Block", "BlockContext", "HybridModel"]
