"""Op dispatch: each op has a fast path (FLA, flash-attn/SDPA) and a PyTorch reference."""

from sleeptrain.model.kernels.attention import attention
from sleeptrain.model.kernels.gated_delta import (
    chunk_transition,
    chunked_gated_delta_rule,
    compose_chunk_states,
    fla_available,
    fla_gated_delta_rule,
    gated_delta_rule,
    recurrent_gated_delta_rule,
)

__all__ = [
    "attention",
    "chunk_transition",
    "chunked_gated_delta_rule",
    "compose_chunk_states",
    "fla_available",
    "fla_gated_delta_rule",
    "gated_delta_rule",
    "recurrent_gated_delta_rule",
]
