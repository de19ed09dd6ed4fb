"""Values derived from the config, resolved here once and read everywhere else.

Several model fields default to ``null`` meaning "derived" (``n_kv_heads``: ``n_heads``,
``head_dim``: ``d_model / n_heads``, ...); ``model_dims`` resolves all of them, so that no
other module re-derives a default. ``autocast_on`` is the one reading of
``train.precision``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sleeptrain.config.schema import ModelConfig, TrainConfig


@dataclass(frozen=True)
class ModelDims:
    """The model's shapes with every default resolved (full model, before any TP split)."""

    depth: int
    loop_start: int
    loop_end: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    gdn_heads: int
    gdn_v_heads: int
    gdn_head_dim: int
    gdn_v_head_dim: int
    ffn_hidden: int


def loop_range(model: ModelConfig) -> tuple[int, int]:
    """The loop range [a, b) of the stack with ``loop_end: null`` resolved to the depth."""
    depth = len(model.pattern)
    end = depth if model.loop_end is None else model.loop_end
    return int(model.loop_start), int(end)


def ffn_hidden(model: ModelConfig) -> int:
    """SwiGLU width: model.ffn_hidden, or 8/3 d_model rounded up to a multiple of 64."""
    if model.ffn_hidden:
        return int(model.ffn_hidden)
    return int(64 * math.ceil(8 * model.d_model / 3 / 64))


def model_dims(model: ModelConfig) -> ModelDims:
    """Every shape of the ``model`` config section, defaults resolved."""
    a, b = loop_range(model)
    return ModelDims(
        depth=len(model.pattern), loop_start=a, loop_end=b,
        n_heads=int(model.n_heads),
        n_kv_heads=int(model.n_kv_heads or model.n_heads),
        head_dim=int(model.head_dim or model.d_model // model.n_heads),
        gdn_heads=int(model.gdn_heads),
        gdn_v_heads=int(model.gdn_v_heads or model.gdn_heads),
        gdn_head_dim=int(model.gdn_head_dim),
        gdn_v_head_dim=int(model.gdn_v_head_dim or model.gdn_head_dim),
        ffn_hidden=ffn_hidden(model),
    )


def autocast_on(train: TrainConfig, device_type: str) -> bool:
    """Whether the forward runs under bf16 autocast: ``train.precision`` bf16, or auto on a
    CUDA device (fp32 elsewhere)."""
    return device_type == "cuda" and train.precision in ("auto", "bf16")


__all__ = ["ModelDims", "autocast_on", "ffn_hidden", "loop_range", "model_dims"]
