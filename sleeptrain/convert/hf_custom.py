"""sleeptrain -> a self-contained Hugging Face custom-code model with streaming sleep inference.

``export_custom`` writes a directory that ``transformers`` loads with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``:

* ``config.json``: a ``SleeptrainConfig`` (model fields resolved to explicit values, plus
  ``window_len``, ``sleep_passes``, ``eviction``) with ``auto_map`` pointing at the two files
  below and ``architectures: ["SleeptrainForCausalLM"]``;
* ``configuration_sleeptrain.py`` and ``modeling_sleeptrain.py``: copies of
  ``sleeptrain/convert/remote/`` (torch + transformers only), running the same window/sleep
  streaming inference as ``sleeptrain.infer.Stream``;
* ``model.safetensors``: sleeptrain's ``model.state_dict()`` as it is (no renaming; megatron's
  ``_extra_state`` entries left out).

The directory is built next to ``out_dir`` and renamed into place: an interrupted export leaves
no partial directory, and an existing non-empty ``out_dir`` is refused unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from sleeptrain.convert.common import ConversionError, write_safetensors

REMOTE_DIR = Path(__file__).resolve().parent / "remote"
REMOTE_FILES = ("configuration_sleeptrain.py", "modeling_sleeptrain.py")
ARCH = "SleeptrainForCausalLM"
AUTO_MAP = {"AutoConfig": "configuration_sleeptrain.SleeptrainConfig",
            "AutoModelForCausalLM": "modeling_sleeptrain.SleeptrainForCausalLM"}

# model.* fields: what the exported config carries; kernel choices (same math, other kernels)
MODEL_FIELDS = {"vocab_size", "d_model", "pattern", "loop_start", "loop_end", "n_heads",
                "n_kv_heads", "head_dim", "rope_theta", "qkv_bias", "gdn_heads", "gdn_v_heads",
                "gdn_head_dim", "gdn_v_head_dim", "conv_kernel", "ffn_hidden", "norm_eps",
                "tie_embeddings", "init_std", "params_dtype", "gdn_chunk_size"}
MODEL_KERNEL_FIELDS = {"attention_backend", "gdn_backend", "gdn_inputs", "fla_chunk_size"}
# sleep.* fields: inference ones are exported, the rest only shape training gradients
SLEEP_FIELDS = {"window_len", "passes", "eviction"}
SLEEP_TRAINING_FIELDS = {"grad_mode", "grad_passes", "detach_every", "implicit_method",
                         "neumann_terms", "checkpoint", "random_passes"}
SYMBOLS = "AaGgM"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _keys(section: Any) -> list[str]:
    if hasattr(section, "keys"):
        return [str(k) for k in section.keys()]
    return list(vars(section))


def config_fields(cfg: DictConfig, passes: int | None = None) -> dict[str, Any]:
    """The ``SleeptrainConfig`` fields of a sleeptrain config; refuses (ConversionError naming
    the key) what the custom-code model does not implement."""
    m, s = cfg.model, cfg.sleep
    unknown = [f"model.{k}" for k in _keys(m) if k not in MODEL_FIELDS | MODEL_KERNEL_FIELDS]
    unknown += [f"sleep.{k}" for k in _keys(s) if k not in SLEEP_FIELDS | SLEEP_TRAINING_FIELDS]
    if unknown:
        raise ConversionError(f"{', '.join(unknown)}: not represented by the custom-code model "
                              "(sleeptrain/convert/remote); it cannot be exported faithfully")
    bad = sorted({c for c in m.pattern if c not in SYMBOLS})
    if bad:
        raise ConversionError(f"model.pattern: symbols {bad} in {m.pattern!r} are not "
                              f"implemented by the custom-code model (it has {SYMBOLS})")
    if m.params_dtype not in DTYPES:
        raise ConversionError(f"model.params_dtype: {m.params_dtype!r} is not one of "
                              f"{sorted(DTYPES)}")
    if s.eviction not in ("hard", "sliding"):
        raise ConversionError(f"sleep.eviction: {s.eviction!r} is not implemented by the "
                              "custom-code model (hard or sliding)")
    n_pass = int(s.passes if passes is None else passes)
    if n_pass < 1:
        raise ConversionError(f"sleep.passes: must be >= 1, got {n_pass}")
    from sleeptrain.config import ffn_hidden

    return {
        "vocab_size": int(m.vocab_size), "d_model": int(m.d_model), "pattern": str(m.pattern),
        "loop_start": int(m.loop_start),
        "loop_end": len(m.pattern) if m.loop_end is None else int(m.loop_end),
        "n_heads": int(m.n_heads), "n_kv_heads": int(m.n_kv_heads or m.n_heads),
        "head_dim": int(m.head_dim or m.d_model // m.n_heads),
        "rope_theta": float(m.rope_theta), "qkv_bias": bool(m.qkv_bias),
        "gdn_heads": int(m.gdn_heads), "gdn_v_heads": int(m.gdn_v_heads or m.gdn_heads),
        "gdn_head_dim": int(m.gdn_head_dim),
        "gdn_v_head_dim": int(m.gdn_v_head_dim or m.gdn_head_dim),
        "conv_kernel": int(m.conv_kernel), "gdn_chunk_size": int(m.gdn_chunk_size),
        "ffn_hidden": ffn_hidden(m), "norm_eps": float(m.norm_eps),
        "tie_word_embeddings": bool(m.tie_embeddings), "init_std": float(m.init_std),
        "window_len": int(s.window_len), "sleep_passes": n_pass, "eviction": str(s.eviction),
    }


def _remote_classes() -> tuple[type, type]:
    try:
        from sleeptrain.convert.remote.configuration_sleeptrain import SleeptrainConfig
        from sleeptrain.convert.remote.modeling_sleeptrain import SleeptrainForCausalLM
    except ImportError as e:
        raise ConversionError(f"the custom-code export needs transformers "
                              f"(pip install 'sleeptrain[convert]'): {e}") from e
    return SleeptrainConfig, SleeptrainForCausalLM


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    extra = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if extra or missing:
        raise ConversionError(f"the model's tensors do not match the custom-code model: "
                              f"not in it {extra[:10]}, missing {missing[:10]}")
    wrong = [f"{k}: {tuple(t.shape)} vs {expected[k]}" for k, t in tensors.items()
             if tuple(t.shape) != expected[k]]
    if wrong:
        raise ConversionError(f"tensor shapes differ from the custom-code model's: {wrong[:10]}")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Moves the finished directory ``tmp`` to ``out`` (empty or absent, or replaced)."""
    if not out.exists():
        tmp.rename(out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_custom(model: torch.nn.Module, cfg: DictConfig, out_dir: str | Path,
                  passes: int | None = None, overwrite: bool = False) -> Path:
    """Writes ``model`` (a sleeptrain HybridModel at TP=1) with ``cfg``'s window/sleep settings
    as a custom-code Hugging Face directory (module docstring); returns its path.

    ``passes`` overrides ``sleep.passes``. An existing non-empty ``out_dir`` is refused unless
    ``overwrite`` (then it is replaced only once the new directory is complete).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConversionError(f"{out}: exists and is not an empty directory; refusing to "
                              "overwrite it (pass overwrite=True to replace it)")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out}: exists and is not a directory")
    tp = int(getattr(model, "tp", 1))
    if tp != 1:
        raise ConversionError(f"parallel.tp: the model holds tensor-parallel shards (tp={tp}); "
                              "export a model built at tp=1 (checkpoints load at any TP size)")
    fields = config_fields(cfg, passes)
    config_cls, model_cls = _remote_classes()
    try:
        hf_cfg = config_cls(**fields)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    hf_cfg.architectures = [ARCH]
    hf_cfg.auto_map = dict(AUTO_MAP)
    dtype = DTYPES[cfg.model.params_dtype]
    hf_cfg.dtype = dtype
    tensors = {k: v for k, v in model.state_dict().items()
               if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)}
    with torch.device("meta"):
        ref = model_cls(hf_cfg)
    _check_tensors(tensors, {k: tuple(v.shape) for k, v in ref.state_dict().items()})
    odd = sorted(k for k, v in tensors.items() if v.dtype != dtype and v.is_floating_point())
    if odd:
        raise ConversionError(f"model.params_dtype is {cfg.model.params_dtype} but tensors "
                              f"{odd[:10]} are not")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would stay on the renamed directory
        for name in REMOTE_FILES:
            shutil.copyfile(REMOTE_DIR / name, tmp / name)
        (tmp / "config.json").write_text(hf_cfg.to_json_string(use_diff=False))
        write_safetensors(tmp / "model.safetensors", sorted(tensors.items()))
        _replace_dir(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return out


__all__ = ["ARCH", "AUTO_MAP", "config_fields", "export_custom"]
