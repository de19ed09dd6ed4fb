"""Training stages and the sleep settings in force at a step: the one place that resolves N.

``stage_at`` finds the stage of a step (``train.stages``), ``trainable_predicate`` which
parameters it trains, ``sleep_for_eval`` the sleep settings evaluation and streaming use
during it (the stage's ``passes``/``eviction`` overrides), ``sleep_for_step`` those of one
optimizer step (plus the ``sleep.random_passes`` draw). The trainer, ``sleeptrain.api``'s
run loader and the tools all read N through these.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from omegaconf import DictConfig

from sleeptrain.config import ConfigError


def trainable_predicate(spec: str):
    """name -> bool for a stage's ``trainable``: all, gdn (GDN mixers only) or a regex."""
    if spec == "all":
        return lambda name: True
    if spec == "gdn":
        return lambda name: ".mixer." in name and _is_gdn_param(name)
    try:
        rx = re.compile(spec)
    except re.error as e:
        raise ConfigError(
            f"train.stages[].trainable: invalid regular expression {spec!r}: {e}") from None
    return lambda name: rx.search(name) is not None


_GDN_NAMES = ("in_proj", "conv_weight", "A_log", "dt_bias", "out_norm_weight", "out_proj")


def _is_gdn_param(name: str) -> bool:
    return any(f".mixer.{n}" in name for n in _GDN_NAMES)


def stage_at(cfg: DictConfig, step: int) -> tuple[int, Any]:
    """(stage index, stage config or None) in force at ``step`` (0-based)."""
    start = 0
    for i, st in enumerate(cfg.train.stages):
        if step < start + st.steps:
            return i, st
        start += st.steps
    return -1, None


def sleep_for_eval(cfg: DictConfig, stage: Any) -> DictConfig:
    """The sleep settings evaluation and streaming use during ``stage``: ``sleep.*`` with the
    stage's ``eviction``/``passes`` overrides (never a random draw: ``sleep.passes`` is the
    evaluation N of a randomized-depth run)."""
    sc = cfg.sleep.copy()
    if stage is not None and stage.eviction is not None:
        sc.eviction = stage.eviction
    if stage is not None and stage.passes is not None:
        sc.passes = stage.passes
    return sc


def sleep_for_step(cfg: DictConfig, stage: Any, step: int) -> DictConfig:
    """The sleep settings of optimizer step ``step``: ``sleep_for_eval``'s, with N drawn from
    ``sleep.random_passes`` (uniformly, seeded by train.seed and the step, so a resumed run
    draws the same) when that list is set and the stage does not fix ``passes``."""
    sc = sleep_for_eval(cfg, stage)
    if (stage is None or stage.passes is None) and len(sc.random_passes) > 0:
        rng = np.random.default_rng([int(cfg.train.seed), 0x51EE9, int(step)])
        sc.passes = int(sc.random_passes[int(rng.integers(len(sc.random_passes)))])
    return sc


__all__ = ["sleep_for_eval", "sleep_for_step", "stage_at", "trainable_predicate"]
