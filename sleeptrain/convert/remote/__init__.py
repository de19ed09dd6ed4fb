"""Custom-code files copied next to exported weights (``sleeptrain.convert.hf_custom``).

They import only torch, transformers and the standard library, never sleeptrain.
"""
