"""What a resumed run may change: the saved config against the new one.

A run directory's ``config.yaml`` is the config of its last successful start (the trainer
writes it only once a start has got past validation and the checkpoint load). On a restart,
keys that change the shape of the model or of the optimizer state cannot apply to the
checkpoint: they are refused before anything is touched, naming the keys. Every other change
(``sleep.passes``, ``train.steps``, learning rates, ...) is allowed and printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sleeptrain.config import ConfigError, from_yaml_text

#: Keys whose change makes a checkpoint unloadable (tensor shapes, the parameter set, dtypes,
#: the optimizer's state layout).
SHAPE_KEYS = frozenset({
    "model.vocab_size", "model.d_model", "model.pattern", "model.n_heads", "model.n_kv_heads",
    "model.head_dim", "model.qkv_bias", "model.gdn_heads", "model.gdn_v_heads",
    "model.gdn_head_dim", "model.gdn_v_head_dim", "model.conv_kernel", "model.ffn_hidden",
    "model.tie_embeddings", "model.params_dtype", "optim.use_muon",
})


def _flat(cfg: DictConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix.rstrip(".")] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def config_changes(saved: DictConfig, new: DictConfig) -> dict[str, tuple[Any, Any]]:
    """Flattened keys whose value differs: key -> (saved value, new value)."""
    a, b = _flat(saved), _flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def saved_config(run_dir: Path) -> DictConfig | None:
    """The config of the run's last successful start, or None for a new run directory."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        return from_yaml_text(path.read_text())
    except Exception as e:  # noqa: BLE001 - any unreadable saved config is reported as such
        raise ConfigError(f"{path}: the run's saved config cannot be read ({e}); move the "
                          "run directory aside or fix the file") from None


def check_resume(run_dir: Path, cfg: DictConfig) -> list[str]:
    """Refuses shape-changing changes against the saved config (ConfigError naming every
    such key); returns the printable lines of the other changes."""
    saved = saved_config(run_dir)
    if saved is None:
        return []
    changes = config_changes(saved, cfg)
    bad = sorted(k for k in changes if k in SHAPE_KEYS)
    if bad:
        what = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in bad)
        raise ConfigError(f"{run_dir} holds a run whose checkpoints have other shapes: {what}. "
                          "These cannot change on resume; use a new train.run_dir (or "
                          "train.init_from for the weights of a compatible model)")
    return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()]


__all__ = ["SHAPE_KEYS", "check_resume", "config_changes", "saved_config"]
