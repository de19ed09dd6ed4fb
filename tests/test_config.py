"""The config tree: YAML + overrides, unknown keys, invalid values named by key."""

from __future__ import annotations

import pytest

import sleeptrain
from sleeptrain.config import ConfigError, from_yaml_text, load_config, to_yaml


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  pattern: AGGA\nsleep:\n  passes: 3\n")
    cfg = load_config(p, ["sleep.passes=4", "optim.adamw_lr=1e-3", "model.loop_end=null"])
    assert cfg.model.pattern == "AGGA" and cfg.sleep.passes == 4
    assert cfg.optim.adamw_lr == pytest.approx(1e-3) and cfg.model.loop_end is None
    assert from_yaml_text(to_yaml(cfg)) == cfg


def test_misspelled_key_names_key_and_nearest():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["sleep.pases=4"])
    assert "sleep.pases" in str(e.value) and "sleep.passes" in str(e.value)


def test_misspelled_key_in_yaml_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*model.d_modle.*model.d_model"):
        load_config(p)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.pattern=AXG", "model.pattern"),
        ("model.loop_end=9", "model.loop_end"),
        ("model.loop_start=4", "model.loop_start"),
        ("sleep.window_len=0", "sleep.window_len"),
        ("model.n_kv_heads=3", "model.n_kv_heads"),
        ("model.gdn_v_heads=3", "model.gdn_v_heads"),
        ("sleep.passes=0", "sleep.passes"),
        ("sleep.eviction=soft", "sleep.eviction"),
        ("sleep.passes=abc", "sleep.passes"),
        ("model.attention_backend=xformers", "model.attention_backend"),
    ],
)
def test_invalid_values_name_the_field(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_heads_not_divisible_by_tp_named():
    with pytest.raises(ConfigError, match="model.gdn_heads"):
        load_config(None, ["parallel.tp=4", "model.gdn_heads=2", "model.n_heads=4",
                           "model.n_kv_heads=4", "model.vocab_size=32"])


def test_stage_steps_must_add_up():
    with pytest.raises(ConfigError, match="train.stages"):
        load_config(None, ["train.steps=10", "train.stages=[{name: a, steps: 4}]"])


def test_missing_file_and_bad_override_form():
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["sleep.passes"])


def test_build_model_rejects_invalid_model_section():
    cfg = load_config(None, ["train.device=cpu"])
    cfg.model.pattern = "AQ"
    with pytest.raises(ConfigError, match="model.pattern"):
        sleeptrain.build_model(cfg, device="cpu")
