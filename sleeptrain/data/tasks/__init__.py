"""Seeded, infinite, procedural generators of the paper's synthetic tasks (rule110, depo).

Use ``build_task(name, **kwargs)`` to get a task; ``task.stream(split, seed, start)`` yields
``Example``s. See ``base`` for the common interface and each task module for its token layout.
With the option ``sampler='counter'`` the samples come from the counter-based hash RNG of
``counter`` and ``device.device_batch`` builds the same samples as tensors on any device.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from .base import MAX_TRIES, SAMPLERS, SPLITS, Example, Task, split_bucket, split_of_key
from .depo import DepoConfig, DepoTask
from .rule110 import Rule110Config, Rule110Task, rule110_evolve

TASKS: dict[str, tuple[type, type[Task]]] = {
    "rule110": (Rule110Config, Rule110Task),
    "depo": (DepoConfig, DepoTask),
}
"""Task name -> (config class, task class)."""


def _did_you_mean(word: str, options: list[str]) -> str:
    """Return a ' (did you mean X?)' hint naming the nearest option, or '' if there is none."""
    best = difflib.get_close_matches(word, options, n=1, cutoff=0.0)
    return f" (did you mean {best[0]!r}?)" if best else ""


def build_config(name: str, **kwargs: Any) -> Any:
    """Return the validated config of task ``name`` built from ``kwargs``.

    ``ValueError`` for an unknown task name or an unknown key (naming the nearest valid key) and
    for invalid values (naming the field).
    """
    if name not in TASKS:
        raise ValueError(
            f"unknown task {name!r}{_did_you_mean(str(name), sorted(TASKS))}; "
            f"available: {', '.join(sorted(TASKS))}"
        )
    config_cls, _ = TASKS[name]
    valid = [f.name for f in dataclasses.fields(config_cls)]
    for key in kwargs:
        if key not in valid:
            raise ValueError(
                f"unknown {name} task option {key!r}{_did_you_mean(key, valid)}; "
                f"valid options: {', '.join(valid)}"
            )
    return config_cls(**kwargs)


def build_task(name: str, **kwargs: Any) -> Task:
    """Return the task ``name`` ('rule110' or 'depo') configured by ``kwargs`` (validated)."""
    config = build_config(name, **kwargs)
    return TASKS[name][1](config)


__all__ = [
    "MAX_TRIES",
    "SAMPLERS",
    "SPLITS",
    "TASKS",
    "DepoConfig",
    "DepoTask",
    "Example",
    "Rule110Config",
    "Rule110Task",
    "Task",
    "build_config",
    "build_task",
    "rule110_evolve",
    "split_bucket",
    "split_of_key",
]
