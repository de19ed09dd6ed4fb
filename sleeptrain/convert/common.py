"""Shared pieces of the converters: errors, streaming tensor readers, sleeptrain run output."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file or the tensors."""


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found (a Hugging Face model directory holds "
                              "config.json and *.safetensors)") from None
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON: {e}") from None


class SafetensorsReader:
    """Tensors of a Hugging Face directory's ``*.safetensors`` (single file or sharded with
    ``model.safetensors.index.json``), read one at a time. ``.bin`` checkpoints are refused:
    they are pickles (convert them with ``transformers`` ``save_pretrained`` first)."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            weight_map = None
        if not files:
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = f" (found {bins}: pickled weights are not read)" if bins else ""
            raise ConversionError(f"{self.dir}: no *.safetensors files{hint}")
        self._handles = {f: safe_open(str(self.dir / f), framework="pt") for f in files}
        self.where: dict[str, str] = {}
        for f, h in self._handles.items():
            for k in h.keys():
                if weight_map is not None and weight_map.get(k) != f:
                    continue
                self.where[k] = f

    def names(self) -> set[str]:
        return set(self.where)

    def __call__(self, name: str) -> torch.Tensor:
        return self._handles[self.where[name]].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the file header (nothing is read)."""
        if name not in self.where:
            raise ConversionError(f"{self.dir}: tensor {name!r} not found")
        return tuple(self._handles[self.where[name]].get_slice(name).get_shape())


def checked_plan(plan: list[tuple[str, list[str], Any]], names: set[str], ignored: set[str],
                 family: str) -> list[tuple[str, list[str], Any]]:
    """``plan`` ((sleeptrain name, source names, fuse function) per converted tensor) after
    checking it against the source's tensor ``names`` before anything is read:
    ConversionError lists the tensors the mapping needs and does not find, and those it does
    not use (other than ``ignored``)."""
    needed = [n for _, srcs, _ in plan for n in srcs]
    missing = [n for n in needed if n not in names]
    unmapped = sorted(names - set(needed) - ignored)
    if missing or unmapped:
        raise ConversionError(f"{family} tensors missing: {missing[:10]}; unmapped: "
                              f"{unmapped[:10]}")
    return plan


def read_plan(read: Any, plan: list[tuple[str, list[str], Any]]
              ) -> Iterator[tuple[str, torch.Tensor]]:
    """(sleeptrain name, tensor) pairs of a checked plan, reading the source tensors
    ``read(name)`` one converted tensor at a time."""
    for name, srcs, fuse in plan:
        yield name, fuse(*(read(n) for n in srcs))


def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                      metadata: dict[str, str] | None = None) -> None:
    """One safetensors file, written to ``path.tmp`` then renamed (never a partial file)."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors}, str(tmp),
              metadata=metadata or {"format": "pt"})
    tmp.replace(path)


def save_run(out_dir: Path, cfg: DictConfig, model: torch.nn.Module, note: dict[str, Any],
             opt: Any | None = None, state: dict[str, Any] | None = None) -> Path:
    """``out_dir`` as a sleeptrain run directory: ``config.yaml`` and a sharded checkpoint of
    ``model`` (and ``opt``'s state). ``state``: the training state to carry (step, RNG, data
    position, ...; default: step 0, weights only). Load it with ``train.init_from``, resume
    it with ``train.run_dir``, or use it with ``sleeptrain generate`` / ``eval``.

    Collective when several processes run: every rank writes its shards into rank 0's
    temporary directory, then rank 0 writes state.pt and finalizes the checkpoint atomically
    (an interrupted write leaves no checkpoint behind, only a temporary directory)."""
    from sleeptrain.config import to_yaml
    from sleeptrain.train.checkpoint import capture_rng_state
    from sleeptrain.train.dist_ckpt import save_sharded_checkpoint

    state = dict(state or {"step": 0, "rng": capture_rng_state(), "nonfinite_total": 0,
                           "data": None})
    state.update({"config": to_yaml(cfg), "converted_from": json.dumps(note)})
    info = save_sharded_checkpoint(out_dir, int(state["step"]), model, opt, state, keep_last=1,
                                   extra_files={"config.yaml": to_yaml(cfg)})
    if info is None:
        return Path(out_dir) / "checkpoints"
    (out_dir / "config.yaml").write_text(to_yaml(cfg))
    return info.path


__all__ = ["ConversionError", "SafetensorsReader", "checked_plan", "read_hf_config", "read_plan",
           "save_run", "write_safetensors"]
