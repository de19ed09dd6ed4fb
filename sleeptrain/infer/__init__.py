"""Streaming sleep inference: consume long contexts window by window, decode greedily."""

from sleeptrain.infer.engine import Stream, generate

__all__ = ["Stream", "generate"]
