"""Sharded training checkpoints that load at any tensor-parallel size (resharding).

Every rank writes its own slices of the model and of the optimizer state with
``torch.distributed.checkpoint`` (DCP) into ``step_N/shards/``; a TP-split tensor is a
``DTensor`` sharded along its ``partition_dim`` over a device mesh of the TP group, so the
files record each slice's offsets in the full tensor and a later load at another TP size
(or on one process) reads exactly the slices it needs. Replicated tensors are written once
(DCP de-duplicates them across ranks). Rank 0 writes the rest of the training state
(step, RNG, data position, config, optimizer hyper-parameters and the layout of its state)
to ``state.pt`` and finalizes the directory atomically (:mod:`sleeptrain.train.checkpoint`).

Why not megatron-core's ``dist_checkpointing``: its ``torch_dist`` backend writes DCP files
too, but its writer calls ``torch.cuda.synchronize()`` unconditionally, so it cannot run in the
CPU test suite; one format on both device kinds keeps a checkpoint saved on GPUs loadable on a
CPU and the reverse (docs/design.md, "Checkpoints").

Optimizer state is stored per parameter *name* (``optim.<muon|adamw>.<name>.<key>``), so it
does not depend on parameter order or on how parameters are split over ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sleeptrain.parallel.tensors import partition_dim, tp_group_and_size
from sleeptrain.train.checkpoint import CheckpointError

SHARDS_DIR = "shards"
_MESH: dict[Any, Any] = {}
# implementation choices of this process, not training state: never restored from a save
_IMPL_FLAGS = frozenset({"fused", "foreach", "capturable", "differentiable"})


def _mesh(group: Any, device: torch.device) -> Any:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    key = (tuple(dist.get_process_group_ranks(group)), device.type)
    if key not in _MESH:
        _MESH[key] = DeviceMesh.from_group(group, device.type)
    return _MESH[key]


def _as_saved(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``t`` as DCP should see it: a DTensor over the TP mesh when split, else itself."""
    group, tp, _ = tp_group_and_size()
    if dim is None or tp == 1:
        return t
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(t, _mesh(group, t.device), [Shard(dim)], run_check=False)


def _model_tensors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, int | None]]:
    out: dict[str, tuple[torch.Tensor, int | None]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t is None and name.endswith("._extra_state"):
            continue  # megatron-core layers' empty extra state (no FP8 metadata here)
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"model state entry {name!r} is not a tensor ({type(t)})")
        out[name] = (t, partition_dim(t))
    return out


def _optim_parts(opt: Any) -> dict[str, torch.optim.Optimizer]:
    return {k: o for k, o in (("muon", opt.muon), ("adamw", opt.adamw)) if o is not None}


def _named_params(o: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor, dict]]:
    out = []
    for g in o.param_groups:
        names = g.get("param_names")
        if names is None or len(names) != len(g["params"]):
            raise CheckpointError("optimizer param groups must carry 'param_names'")
        out += [(n, p, g) for n, p in zip(names, g["params"], strict=True)]
    return out


def sharded_state(model: torch.nn.Module, opt: Any | None) -> tuple[dict[str, Any], dict]:
    """(tensors for DCP, layout for state.pt) of the model and the optimizer's state."""
    tensors: dict[str, Any] = {}
    for name, (t, dim) in _model_tensors(model).items():
        tensors[f"model.{name}"] = _as_saved(t.detach(), dim)
    layout: dict[str, Any] = {"optim": {}, "groups": {}}
    for part, o in (_optim_parts(opt).items() if opt is not None else []):
        entries: dict[str, dict[str, list]] = {}
        for name, p, _ in _named_params(o):
            for key, v in o.state.get(p, {}).items():
                if not isinstance(v, torch.Tensor):
                    continue
                like = v.shape == p.shape
                dim = partition_dim(p) if like else None
                tensors[f"optim.{part}.{name}.{key}"] = _as_saved(v, dim)
                entries.setdefault(name, {})[key] = ["param" if like else "scalar",
                                                     str(v.dtype).removeprefix("torch."),
                                                     list(v.shape)]
        layout["optim"][part] = entries
        layout["groups"][part] = [{k: v for k, v in g.items() if k != "params"}
                                  for g in o.param_groups]
    if getattr(opt, "sharded", False):  # each rank holds its parameters' state: the union
        import torch.distributed as dist

        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, layout["optim"])
        for other in every:
            for part, entries in other.items():
                layout["optim"][part].update(entries)
    return tensors, layout


def save_shards(path: Path, tensors: dict[str, Any]) -> None:
    """Collective: every rank writes its slices under ``path`` (DCP)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(tensors, checkpoint_id=str(path))


def save_sharded_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, opt: Any | None,
                            state: dict[str, Any] | None, keep_last: int,
                            extra_files: dict[str, str] | None = None,
                            after_shards: Callable[[], None] | None = None) -> Any:
    """Collective: every rank writes its shards of ``model`` (and ``opt``'s state) into rank
    0's temporary directory, then rank 0 writes ``state`` (its training state; the optimizer
    layout is added) as state.pt and finalizes the checkpoint atomically (an interrupted write
    leaves only the temporary directory). ``after_shards`` runs on every rank once its shards
    are written. Returns rank 0's SaveInfo, its ``seconds`` counted from the start of the
    shard write; None on the other ranks."""
    import dataclasses
    import shutil
    import time

    import torch.distributed as dist

    from sleeptrain.train.checkpoint import save_checkpoint, tmp_dir_for

    tensors, layout = sharded_state(model, opt)
    multi = dist.is_initialized() and dist.get_world_size() > 1
    rank0 = not multi or dist.get_rank() == 0
    box = [str(tmp_dir_for(run_dir, step)) if rank0 else None]
    if multi:
        dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    if rank0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if multi:
        dist.barrier()
    t0 = time.perf_counter()
    save_shards(tmp / SHARDS_DIR, tensors)
    if after_shards is not None:
        after_shards()
    info = None
    if rank0:
        info = save_checkpoint(run_dir, step, {**(state or {}), "optim_layout": layout},
                               keep_last, extra_files=extra_files, prepared=tmp)
        info = dataclasses.replace(info, seconds=time.perf_counter() - t0)
    if multi:
        dist.barrier()
    return info


def _load(path: Path, tensors: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(tensors, checkpoint_id=str(path))
    except Exception as e:  # DCP raises CheckpointException with per-rank causes
        raise CheckpointError(f"{path}: cannot load sharded checkpoint: "
                              f"{type(e).__name__}: {e}") from e


def _stored_keys(path: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable shard metadata: {type(e).__name__}: "
                              f"{e}") from e


def load_model(path: Path, model: torch.nn.Module) -> None:
    """Collective: loads the model weights of a sharded checkpoint directory ``path``
    (``step_N``) at this process's TP size; a missing or extra tensor is named."""
    shards = Path(path) / SHARDS_DIR
    have = {k.removeprefix("model.") for k in _stored_keys(shards) if k.startswith("model.")}
    ours = _model_tensors(model)
    missing, extra = sorted(set(ours) - have), sorted(have - set(ours))
    if missing or extra:
        raise CheckpointError(f"{path}: model tensors do not match this model: missing "
                              f"{missing[:8]}, unexpected {extra[:8]}")
    tensors = {f"model.{n}": _as_saved(t.detach(), d) for n, (t, d) in ours.items()}
    _load(shards, tensors)  # in place: DTensors wrap the local parameters


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Model weights of checkpoint directory ``path``: sharded (:func:`load_model`,
    collective) or a single-file checkpoint of earlier versions (its ``model`` entry)."""
    if is_sharded(path):
        load_model(path, model)
        return
    from sleeptrain.train.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    if "model" not in state:
        raise CheckpointError(f"{path}: holds neither shards/ nor a 'model' entry")
    model.load_state_dict(state["model"])


def load_optimizer(path: Path, opt: Any, layout: dict[str, Any]) -> None:
    """Collective: restores the optimizer state and hyper-parameters saved with
    :func:`sharded_state` into ``opt`` (built for this model at this TP size)."""
    parts = _optim_parts(opt)
    if set(parts) != set(layout["optim"]):
        raise CheckpointError(f"{path}: optimizer parts {sorted(layout['optim'])} saved, this "
                              f"optimizer has {sorted(parts)}")
    tensors: dict[str, Any] = {}
    locals_: dict[str, torch.Tensor] = {}
    for part, o in parts.items():
        named = {n: p for n, p, _ in _named_params(o)}
        saved = layout["optim"][part]
        unknown = sorted(set(saved) - set(named))
        if unknown:
            raise CheckpointError(f"{path}: {part} state for parameters this optimizer lacks: "
                                  f"{unknown[:8]}")
        mine = getattr(opt, "owns", lambda _: True)  # a sharded optimizer: its own share
        for name, keys in saved.items():
            p = named[name]
            if not mine(p):
                continue
            for key, (kind, dtype, shape) in keys.items():
                dt = getattr(torch, dtype)
                if kind == "param":
                    local = torch.zeros_like(p, dtype=dt)
                    tensors[f"optim.{part}.{name}.{key}"] = _as_saved(local, partition_dim(p))
                else:
                    local = torch.zeros(shape, dtype=dt)
                    tensors[f"optim.{part}.{name}.{key}"] = local
                locals_[f"optim.{part}.{name}.{key}"] = local
    if tensors:
        _load(Path(path) / SHARDS_DIR, tensors)
    for part, o in parts.items():
        sd = o.state_dict()  # this optimizer's structure: groups with param indices
        groups = layout["groups"][part]
        if len(groups) != len(sd["param_groups"]):
            raise CheckpointError(f"{path}: {part} has {len(groups)} saved param groups, this "
                                  f"optimizer {len(sd['param_groups'])}")
        index = {}
        for g, sg in zip(sd["param_groups"], groups, strict=True):
            if list(g["param_names"]) != list(sg["param_names"]):
                raise CheckpointError(f"{path}: {part} param group parameters differ from the "
                                      "saved ones")
            g.update({k: v for k, v in sg.items() if k not in _IMPL_FLAGS})
            index.update(zip(g["param_names"], g["params"], strict=True))
        sd["state"] = {index[name]: {key: locals_[f"optim.{part}.{name}.{key}"]
                                     for key in keys}
                       for name, keys in layout["optim"][part].items()
                       if f"optim.{part}.{name}.{next(iter(keys), '')}" in locals_}
        o.load_state_dict(sd)


def is_sharded(path: Path) -> bool:
    """Whether checkpoint directory ``path`` holds sharded (DCP) weights."""
    return (Path(path) / SHARDS_DIR).is_dir()


__all__ = ["SHARDS_DIR", "is_sharded", "load_model", "load_model_weights", "load_optimizer",
           "save_sharded_checkpoint", "save_shards", "sharded_state"]
