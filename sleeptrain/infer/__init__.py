"""Streaming sleep inference: consume long contexts window by window, decode greedily.

``Stream``: one batch of equal-length sequences fed in chunks of any size. ``BatchedStream``:
samples of different lengths prefilled together and decoded one token per step with static
buffers (CUDA-graph capturable). ``generate``: batched greedy decoding for evaluation.
"""

from sleeptrain.infer.batched import BatchedStream, generate_batched
from sleeptrain.infer.engine import Stream, generate

__all__ = ["BatchedStream", "Stream", "generate", "generate_batched"]
