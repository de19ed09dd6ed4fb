"""Learning-rate schedule as a pure function of the step.

The schedule has no state of its own: the multiplier for step ``s`` depends only on ``s`` and
the config, so resuming needs nothing but the step number (no scheduler state_dict).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Protocol

__all__ = ["SCHEDULES", "apply_lr", "lr_multiplier"]

SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")


class _HasParamGroups(Protocol):
    param_groups: list[dict[str, Any]]


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def lr_multiplier(
    step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float
) -> float:
    """Return the factor applied to every group's peak learning rate at 0-based ``step``.

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (so the last warm-up step
    reaches 1.0). Afterwards, with ``t = (step - warmup_steps) / (total_steps - warmup_steps)``
    clamped to [0, 1]: 'cosine' gives ``r + (1 - r) * (1 + cos(pi * t)) / 2``, 'linear' gives
    ``r + (1 - r) * (1 - t)`` (``r = min_lr_ratio``; both reach ``r`` at ``total_steps`` and stay
    there), and 'constant' gives 1.0.
    """
    for arg, val, low in (
        ("step", step, 0),
        ("warmup_steps", warmup_steps, 0),
        ("total_steps", total_steps, 1),
    ):
        if not _is_int(val) or val < low:
            raise ValueError(f"{arg} must be an int >= {low}, got {val!r}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps})")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not (isinstance(min_lr_ratio, numbers.Real) and 0.0 <= min_lr_ratio <= 1.0):
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")

    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = total_steps - warmup_steps
    t = 1.0 if decay_steps == 0 else min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - t)


def apply_lr(optimizer: _HasParamGroups, multiplier: float) -> None:
    """Set ``group['lr'] = group['base_lr'] * multiplier`` for every param group.

    Works on a ``HybridOptimizer`` or any torch optimizer; a group without ``base_lr`` gets its
    current ``lr`` recorded as ``base_lr`` on the first call.
    """
    if not (math.isfinite(multiplier) and multiplier >= 0):
        raise ValueError(f"multiplier must be a finite number >= 0, got {multiplier!r}")
    for group in optimizer.param_groups:
        base = group.setdefault("base_lr", group["lr"])
        group["lr"] = base * multiplier
