"""Config tree: typed dataclasses, YAML files and ``key=value`` overrides (OmegaConf).

``load_config(path, overrides)`` returns a validated, read-only-structured ``DictConfig``.
Unknown keys fail before any work with the key named and the nearest valid key suggested.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sleeptrain.config.derived import (
    ModelDims,
    autocast_on,
    ffn_hidden,
    loop_range,
    model_dims,
)
from sleeptrain.config.schema import (
    DataConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    SleepConfig,
    StageConfig,
    TrainConfig,
)
from sleeptrain.config.validate import ConfigError, validate_run

__all__ = [
    "ConfigError",
    "ModelDims",
    "autocast_on",
    "ffn_hidden",
    "model_dims",
    "DataConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "SleepConfig",
    "StageConfig",
    "TrainConfig",
    "default_config",
    "load_config",
    "loop_range",
    "to_yaml",
]

# Dict-valued fields whose keys are free-form (checked later by their consumer).
_FREE_FORM = {"data.task_args"}


def default_config() -> DictConfig:
    """The structured default config (every field at its default)."""
    return OmegaConf.structured(RunConfig)


def _suggest(key: str, valid: Sequence[str], prefix: str) -> str:
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if near:
        return f"; did you mean {prefix + near[0]!r}?"
    return f"; valid keys under {prefix or 'the top level'!r}: {sorted(valid)}"


def _check_keys(given: Any, schema: Any, prefix: str) -> None:
    """Raises ConfigError for the first key in ``given`` that the schema does not have."""
    if isinstance(given, dict) and isinstance(schema, DictConfig):
        if prefix.rstrip(".") in _FREE_FORM:
            return
        valid = list(schema.keys())
        for k, v in given.items():
            full = f"{prefix}{k}"
            if k not in valid:
                raise ConfigError(f"unknown config key {full!r}{_suggest(str(k), valid, prefix)}")
            _check_keys(v, schema[k], f"{full}.")
    elif isinstance(given, list) and isinstance(schema, ListConfig) and _is_stage_list(schema):
        item_schema = OmegaConf.structured(StageConfig)
        for i, v in enumerate(given):
            _check_keys(v, item_schema, f"{prefix.rstrip('.')}[{i}].")


def _is_stage_list(schema: ListConfig) -> bool:
    """True for list fields whose items are StageConfig (the only typed list of dicts)."""
    return schema._metadata.element_type is StageConfig


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` -> (key, YAML-parsed value); ConfigError naming the item otherwise."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value {raw!r}: {e}") from None
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    out: dict[str, Any] = {}
    cur = out
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return out


def switch_on(value: str, cuda: bool) -> bool:
    """Whether a three-way switch (auto|on|off: train.cuda_graphs, train.compile,
    train.grad_accum_fusion, train.parallel_n1, train.optimizer_graph) is on; auto means on for
    a CUDA run."""
    return value == "on" or (value == "auto" and cuda)


def _switch_words(cfg: DictConfig) -> None:
    """YAML reads the words on/off as booleans: the three-way switches take them back."""
    for key in ("cuda_graphs", "compile", "grad_accum_fusion", "parallel_n1", "optimizer_graph"):
        if str(cfg.train[key]) in ("True", "False"):
            cfg.train[key] = "on" if str(cfg.train[key]) == "True" else "off"


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Loads defaults <- YAML file <- ``key=value`` overrides, then validates the result.

    Raises ConfigError naming the file, the key (with the nearest valid key) or the value.
    """
    cfg = default_config()
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
        except OmegaConfBaseException as e:  # pragma: no cover - malformed YAML
            raise ConfigError(f"{p}: cannot parse YAML: {e}") from e
        except Exception as e:
            raise ConfigError(f"{p}: cannot parse YAML: {e}") from e
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
        layers.append((str(p), data))
    for item in overrides:
        key, value = parse_override(item)
        layers.append((f"override {item!r}", _nest(key, value)))
    for source, data in layers:
        try:
            _check_keys(data, cfg, "")
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            why = str(e.msg).splitlines()[0]
            raise ConfigError(f"{source}: invalid value for {key!r}: {why}") from None
    _switch_words(cfg)
    validate_run(cfg)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (saved in the run directory and in checkpoints)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def from_yaml_text(text: str) -> DictConfig:
    """Rebuilds a validated structured config from ``to_yaml`` output."""
    cfg = OmegaConf.merge(default_config(), OmegaConf.create(text))
    _switch_words(cfg)
    validate_run(cfg)
    return cfg
