"""DeepSpeed checkpoint -> sleeptrain run (``tools/convert.py deepspeed-to-run``).

A ``train.engine=deepspeed`` run keeps DeepSpeed's own checkpoints under
``RUN/ds_checkpoints/step_<step>`` (ZeRO partitions of every rank). This reads one of them
with DeepSpeed's ``zero_to_fp32`` utilities (the fp32 master weights, merged over the ZeRO
partitions of every stage), loads them into the run's model and writes a sleeptrain run
directory (config.yaml + a weights-only sharded checkpoint at the same step), which
``export-hf``, ``verify``, ``eval``, ``generate`` and ``train.init_from`` read like any run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sleeptrain.convert.common import ConversionError, save_run

#: The prefix of the model's tensors in DeepSpeed's state dict (it wraps ``SleepLoss``).
PREFIX = "model."


def _tag_of(ckdir: Path, tag: str | None) -> str:
    from sleeptrain.train.ds_engine import LATEST

    if tag is None:
        file = ckdir / LATEST
        if not file.is_file():
            raise ConversionError(f"{ckdir}: no {LATEST} file (not a train.engine=deepspeed "
                                  "run, or no checkpoint was completed); pass --tag")
        tag = file.read_text().strip()
    if not (ckdir / tag).is_dir():
        raise ConversionError(f"{ckdir / tag}: no such DeepSpeed checkpoint")
    return tag


def deepspeed_state_dict(run_dir: str | Path, tag: str | None = None, *, trust: bool = False
                         ) -> tuple[str, dict[str, torch.Tensor]]:
    """(tag, the model's fp32 tensors by sleeptrain name) of a DeepSpeed run's checkpoint
    ``tag`` (default: the one ``latest`` names). Its files are checked against the digest
    record the trainer wrote before DeepSpeed unpickles them (CorruptCheckpointError naming
    the file); a checkpoint without one is refused unless ``trust``."""
    from sleeptrain.train.checkpoint import verify_dir_digests
    from sleeptrain.train.ds_engine import DS_DIR, import_deepspeed

    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckdir = Path(run_dir) / DS_DIR
    tag = _tag_of(ckdir, tag)
    verify_dir_digests(ckdir / tag, trust=trust)
    try:
        full = get_fp32_state_dict_from_zero_checkpoint(str(ckdir), tag=tag)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        raise ConversionError(f"{ckdir / tag}: not a readable DeepSpeed ZeRO checkpoint: "
                              f"{type(e).__name__}: {e}") from None
    foreign = sorted(k for k in full if not k.startswith(PREFIX))
    if foreign:
        raise ConversionError(f"{ckdir / tag}: tensors outside the sleeptrain model: "
                              f"{foreign[:5]}")
    return tag, {k[len(PREFIX):]: v for k, v in full.items()}


def deepspeed_to_run(run_dir: str | Path, out_dir: str | Path, tag: str | None = None, *,
                     trust: bool = False) -> tuple[Any, torch.nn.Module, int]:
    """Writes DeepSpeed run ``run_dir``'s checkpoint ``tag`` as the sleeptrain run
    ``out_dir`` (its config with ``train.engine=megatron``, weights at the checkpoint's step,
    no optimizer state); returns (config, model, step)."""
    import sleeptrain
    from sleeptrain.train.checkpoint import capture_rng_state

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConversionError(f"{run}: no config.yaml (not a sleeptrain run directory)")
    tag, tensors = deepspeed_state_dict(run, tag, trust=trust)
    cfg = sleeptrain.load_config(run / "config.yaml", [
        "train.engine=megatron", "train.device=cpu", f"train.run_dir={out_dir}",
        "deepspeed.config_file=''"])
    model = sleeptrain.build_model(cfg, device="cpu")
    ours = model.state_dict()
    missing = sorted(k for k in ours if k not in tensors and not k.endswith("_extra_state"))
    extra = sorted(k for k in tensors if k not in ours)
    if missing or extra:
        raise ConversionError(f"{run} {tag}: tensors missing {missing[:5]}, unexpected "
                              f"{extra[:5]}")
    with torch.no_grad():
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(ours[name].shape):
                raise ConversionError(f"{run} {tag}: {name} has shape {tuple(t.shape)}, the "
                                      f"model's is {tuple(ours[name].shape)}")
            ours[name].copy_(t.to(ours[name].dtype))
    step = int(tag.rsplit("_", 1)[-1]) if tag.rsplit("_", 1)[-1].isdigit() else 0
    save_run(Path(out_dir), cfg, model, {"from": str(run), "deepspeed_tag": tag},
             state={"step": step, "rng": capture_rng_state(), "nonfinite_total": 0,
                    "data": None})
    return cfg, model, step
