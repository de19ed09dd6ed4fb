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

Integrity and trust. Every rank hashes the shard files it writes from the bytes as DCP writes
them (threads; no second read) and rank 0 records all digests in meta.json
(:mod:`sleeptrain.train.checkpoint`, which also verifies them on load). DCP's own reader
unpickles ``shards/.metadata`` with plain ``pickle``; every load here goes through
:class:`SafeFileSystemReader` instead, whose unpickler resolves only the classes DCP metadata
consists of (anything else: CheckpointError "refusing to unpickle module.name from file"), and
through a planner that refuses non-tensor entries (DCP would ``torch.load`` them with
``weights_only=False``); tensor slices are read by DCP with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from sleeptrain.parallel.tensors import partition_dim, tp_group_and_size
from sleeptrain.train.checkpoint import CheckpointError

SHARDS_DIR = "shards"
METADATA_FILE = ".metadata"
#: (module, name) of every global a DCP ``.metadata`` pickle may reference (checked against the
#: pickles this code writes: ``pickletools.dis`` lists these; torch dtypes are allowed besides)
_DCP_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "Path"),
    ("pathlib._local", "PosixPath"),  # Python >= 3.13 pickles paths from here
    ("pathlib._local", "PurePosixPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("collections", "OrderedDict"),
})
_SHARD_NAME_RE = re.compile(r"^__\d+_\d+\.distcp$")
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
    if getattr(opt, "sharded", False) or _stage_of(model) is not None:
        _union_layout(layout)  # each rank holds its parameters' (or stage's) state
    return tensors, layout


def _stage_of(model: torch.nn.Module) -> tuple[int, int] | None:
    """The block range of a pipeline-stage model (None: the whole model)."""
    return getattr(model, "stage", None)


def _group_key(g: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a param group across pipeline stages: its kind and decay class
    (``decay``, set by ``build_optimizer``; older layouts: a positive weight decay)."""
    return g.get("kind"), bool(g.get("decay", g.get("weight_decay", 0.0) > 0))


def _union_layout(layout: dict[str, Any]) -> None:
    """Collective: the optimizer layout of every rank merged (state entries by name; a param
    group's names over the stages that hold part of it, in rank order)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, layout)
    optim: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[dict[str, Any]]] = {}
    for other in every:
        for part, entries in other["optim"].items():
            optim.setdefault(part, {}).update(entries)
        for part, gs in other["groups"].items():
            merged = groups.setdefault(part, [])
            for g in gs:
                same = [m for m in merged if _group_key(m) == _group_key(g)]
                if not same:
                    merged.append({**g, "param_names": list(g["param_names"])})
                    continue
                have = set(same[0]["param_names"])
                same[0]["param_names"] += [n for n in g["param_names"] if n not in have]
    layout["optim"], layout["groups"] = optim, groups


class _HashedFile:
    """A DCP file stream whose bytes also go to a digest (the writer's or the reader's)."""

    def __init__(self, f: Any, digest: Any) -> None:
        self.f, self.digest = f, digest

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()

    @property
    def closed(self) -> bool:
        return self.f.closed


class _DigestingStream(_HashedFile):
    """A shard file being written: every byte written also goes to a StreamDigest."""

    def write(self, b: Any) -> int:
        # b is hashed from b itself while it is being written (DCP's torch.save hands over a
        # tensor's storage as one buffer): no copy of the data
        reading = self.digest.update(b)
        try:
            n = self.f.write(b)
        finally:
            self.digest.wait(reading)
        if n != memoryview(b).nbytes:
            raise OSError(f"short write: {n} of {memoryview(b).nbytes} bytes")
        return n

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def writable(self) -> bool:
        return True


def _digesting_file_system(pool: Any) -> Any:
    """A DCP ``FileSystem`` whose ``.distcp`` files are hashed as DCP writes them
    (``fs.digests``: file name -> (hex digest, bytes written)); other files as usual."""
    import contextlib

    from torch.distributed.checkpoint.filesystem import FileSystem

    from sleeptrain.train.checkpoint import StreamDigest

    class DigestingFileSystem(FileSystem):
        def __init__(self) -> None:
            super().__init__()
            self.digests: dict[str, tuple[str, int]] = {}
            self.lock = threading.Lock()

        @contextlib.contextmanager
        def create_stream(self, path: Any, mode: str) -> Any:
            path = Path(path)
            if mode != "wb" or path.suffix != ".distcp":
                with super().create_stream(path, mode) as f:
                    yield f
                return
            digest = StreamDigest(pool)
            with super().create_stream(path, mode) as f:
                yield _DigestingStream(f, digest)
            with self.lock:
                self.digests[path.name] = (digest.hexdigest(), digest.size)

    return DigestingFileSystem()


def save_shards(path: Path, tensors: dict[str, Any], *,
                digest: bool = False) -> dict[str, tuple[str, int]]:
    """Collective: every rank writes its slices under ``path`` (DCP): rank r the files
    ``__<r>_<i>.distcp``, rank 0 also ``.metadata``. ``digest``: each shard file this rank
    writes is hashed from the bytes as they are written (no second read); returns
    ``{file name: (hex digest, bytes written)}`` of them (empty without ``digest``)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from sleeptrain.train.checkpoint import hash_threads

    writer = FileSystemWriter(str(path))
    if not digest:
        dcp.save(tensors, storage_writer=writer)
        return {}
    # 8 threads hash ~7 GiB/s (sha256 with SHA extensions), more than a rank writes
    threads = min(8, hash_threads())
    with ThreadPoolExecutor(threads, thread_name_prefix="ckpt-hash") as pool:
        fs = writer.fs = _digesting_file_system(pool)
        dcp.save(tensors, storage_writer=writer)
    return dict(fs.digests)


def _own_shard_digests(tmp: Path, streamed: dict[str, tuple[str, int]]) -> dict[str, str]:
    """Collective: digests (names relative to the checkpoint directory ``tmp``) of the shard
    files every rank wrote: each rank's own ``__<rank>_*.distcp`` files from ``streamed``
    (:func:`save_shards`; a file missing there is hashed from disk, in threads), after
    checking each file's size against the bytes hashed; a rank that cannot hash makes every
    rank raise CheckpointError."""
    import torch.distributed as dist

    from sleeptrain.train.checkpoint import digest_files

    multi = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if multi else 0
    mine = re.compile(rf"^__{rank}_\d+\.distcp$")
    result: dict[str, str] | str
    try:
        names = sorted(n for n in os.listdir(tmp / SHARDS_DIR) if mine.match(n))
        result = {}
        for n in names:
            if n not in streamed:
                continue
            hexd, size = streamed[n]
            on_disk = (tmp / SHARDS_DIR / n).stat().st_size
            if on_disk != size:
                raise CheckpointError(f"{tmp / SHARDS_DIR / n}: {on_disk} bytes on disk, "
                                      f"{size} written")
            result[f"{SHARDS_DIR}/{n}"] = hexd
        result.update(digest_files(tmp, [f"{SHARDS_DIR}/{n}" for n in names
                                         if n not in streamed]))
    except (OSError, CheckpointError) as e:
        result = f"rank {rank}: {type(e).__name__}: {e}"
    every: list[Any] = [result]
    if multi:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, result)
    errors = [r for r in every if isinstance(r, str)]
    if errors:
        raise CheckpointError(f"{tmp}: hashing the written shards failed: {'; '.join(errors)}")
    return {k: v for r in every for k, v in r.items()}


def save_sharded_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, opt: Any | None,
                            state: dict[str, Any] | None, keep_last: int,
                            extra_files: dict[str, str] | None = None,
                            after_shards: Callable[[], None] | None = None, *,
                            _digests: bool = True) -> Any:
    """Collective: every rank writes its shards of ``model`` (and ``opt``'s state) into rank
    0's temporary directory and hashes the files it wrote; rank 0 gathers the digests, writes
    ``state`` (its training state; the optimizer layout is added) as state.pt and finalizes
    the checkpoint atomically with meta.json recording every file's size and digest (an
    interrupted write leaves only the temporary directory). ``after_shards`` runs on every rank
    once its shards are written and hashed. Returns rank 0's SaveInfo, its ``seconds`` counted
    from the start of the shard write; None on the other ranks. ``_digests=False`` (benchmarks
    and tests only): no digests, a checkpoint that loads only with ``trust=True``."""
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
    streamed = save_shards(tmp / SHARDS_DIR, tensors, digest=_digests)
    digests = _own_shard_digests(tmp, streamed) if _digests else None
    if after_shards is not None:
        after_shards()
    info = None
    if rank0:
        info = save_checkpoint(run_dir, step, {**(state or {}), "optim_layout": layout},
                               keep_last, extra_files=extra_files, prepared=tmp,
                               digests=digests, _digests=_digests)
        info = dataclasses.replace(info, seconds=time.perf_counter() - t0)
    if multi:
        dist.barrier()
    return info


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file resolving only :data:`_DCP_GLOBALS` and torch dtypes;
    any other global raises CheckpointError before it is called."""

    def __init__(self, data: bytes, file: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.file = file

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"refusing to unpickle {module}.{name} from {self.file}: not a "
                              "class of DCP checkpoint metadata (a crafted or foreign file)")

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"refusing to unpickle a persistent id from {self.file}")


def read_dcp_metadata(file: Path) -> Any:
    """DCP ``Metadata`` of the ``.metadata`` file ``file``, unpickled with the restricted
    unpickler and checked: tensor entries only (DCP would ``torch.load`` other entries with
    ``weights_only=False``), storage in plain ``__<r>_<i>.distcp`` files of the same directory,
    no stream transforms. Anything else raises CheckpointError naming ``file``."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    file = Path(file)
    try:
        data = file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{file}: unreadable shard metadata: {e}") from e
    try:
        md = _MetadataUnpickler(data, file).load()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{file}: unreadable shard metadata: {type(e).__name__}: "
                              f"{e}") from e
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointError(f"{file}: holds a {type(md).__name__}, not DCP Metadata")
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{file}: entry {key!r} is a {type(entry).__name__}, not a "
                                  "tensor (sleeptrain writes tensors only; refusing to load it)")
    storage = md.storage_data
    if not isinstance(storage, dict):
        raise CheckpointError(f"{file}: malformed storage data ({type(storage).__name__})")
    for info in storage.values():
        if (not isinstance(info, _StorageInfo) or not isinstance(info.relative_path, str)
                or not _SHARD_NAME_RE.match(info.relative_path)):
            raise CheckpointError(f"{file}: storage entry {info!r} does not name a shard file "
                                  "of its directory")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{file}: storage entry {info.relative_path} asks for stream "
                                  f"transforms {info.transform_descriptors!r}, never written")
    return md


class _DigestingReader(_HashedFile):
    """A shard file being read: every byte read also goes to a ReadDigest, hashed from the
    reader's own buffer (no copy, no second read). A large read is done in pieces of
    :attr:`PIECE` bytes, each hashed (in the digest's threads) while the next is read; the
    read returns once nothing reads the buffer any more."""

    PIECE = 8 << 20

    def readinto(self, b: Any) -> int:
        from sleeptrain.train.checkpoint import StreamDigest

        view = memoryview(b).cast("B")
        pos, done, reading = self.f.tell(), 0, []
        try:
            while done < len(view):
                piece = view[done:done + self.PIECE]
                n = self.f.readinto(piece)
                if not n:
                    break
                reading += self.digest.read(pos + done, piece[:n])
                done += n
                if n < len(piece):
                    break
        finally:
            StreamDigest.wait(reading)
        return done

    def read(self, size: int = -1) -> bytes:
        pos = self.f.tell()
        data = self.f.read(size)
        if data:  # immutable: the digest's tasks keep it alive, nothing to wait for
            self.digest.read(pos, data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.f.seek(offset, whence)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def _reading_file_system() -> Any:
    """A DCP ``FileSystem`` whose ``.distcp`` files, when a verified load of their checkpoint
    is in progress (``checkpoint.read_digest_for``), are hashed from DCP's reads."""
    import contextlib

    from torch.distributed.checkpoint.filesystem import FileSystem

    from sleeptrain.train.checkpoint import read_digest_for

    class ReadingFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path: Any, mode: str) -> Any:
            digest = read_digest_for(path) if mode == "rb" else None
            with super().create_stream(path, mode) as f:
                yield f if digest is None else _DigestingReader(f, digest)

    return ReadingFileSystem()


class SafeFileSystemReader(FileSystemReader):
    """DCP's file system reader with :func:`read_dcp_metadata` in place of ``pickle.load``,
    reading every file in the order of its bytes (so a verified load hashes from the reads:
    ``checkpoint.ReadDigest``)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.fs = _reading_file_system()

    def prepare_local_plan(self, plan: Any) -> Any:
        def where(item: Any) -> tuple[str, int]:
            info = self.storage_data[item.storage_index]
            return str(info.relative_path), int(info.offset)

        return dataclasses.replace(plan, items=sorted(plan.items, key=where))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        if kwargs.get("rank") is not None:  # DCP's fallback when .metadata is unreadable
            raise CheckpointError(f"{self.path}: sleeptrain writes no rank-local metadata")
        md = read_dcp_metadata(Path(self.path) / METADATA_FILE)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class _TensorLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, refusing byte (pickled object) entries."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise CheckpointError(f"refusing to unpickle the non-tensor entry "
                              f"{read_item.dest_index.fqn!r} of a sharded checkpoint")


def _first_failure(e: BaseException) -> BaseException:
    """The first rank's exception inside a DCP CheckpointException (which carries every
    failing rank's exception and traceback), else ``e`` itself."""
    for failure in (getattr(e, "failures", None) or {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return inner
    return e


def _load(path: Path, tensors: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(tensors, storage_reader=SafeFileSystemReader(str(path)),
                 planner=_TensorLoadPlanner())
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        inner = _first_failure(e)
        if isinstance(inner, CheckpointError):
            raise CheckpointError(f"{path}: {inner}") from e
        raise CheckpointError(f"{path}: cannot load sharded checkpoint: "
                              f"{type(inner).__name__}: {inner}") from e


def _stored_keys(path: Path) -> set[str]:
    return set(read_dcp_metadata(Path(path) / METADATA_FILE).state_dict_metadata)


def load_model(path: Path, model: torch.nn.Module) -> None:
    """Collective: loads the model weights of a sharded checkpoint directory ``path``
    (``step_N``) at this process's TP size; a missing or extra tensor is named. Reads the
    shard metadata with the restricted unpickler but checks no digests: use
    :func:`load_model_weights` (or ``checkpoint.load_verified``) for that."""
    _load(Path(path) / SHARDS_DIR, _model_targets(path, model))


def _model_targets(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """The tensors DCP loads the model weights of checkpoint ``path`` into (the parameters
    themselves), after checking that the checkpoint holds exactly this model's tensors."""
    shards = Path(path) / SHARDS_DIR
    have = {k.removeprefix("model.") for k in _stored_keys(shards) if k.startswith("model.")}
    ours = _model_tensors(model)
    missing, extra = sorted(set(ours) - have), sorted(have - set(ours))
    holds = getattr(model, "holds", None)
    if _stage_of(model) is not None and holds is not None:  # other stages' tensors
        extra = [n for n in extra if holds(n)]
    if missing or extra:
        raise CheckpointError(f"{path}: model tensors do not match this model: missing "
                              f"{missing[:8]}, unexpected {extra[:8]}")
    # in place: DTensors wrap the local parameters
    return {f"model.{n}": _as_saved(t.detach(), d) for n, (t, d) in ours.items()}


def load_model_and_optimizer(path: Path, model: torch.nn.Module, opt: Any,
                             layout: dict[str, Any]) -> None:
    """Collective: :func:`load_model` and :func:`load_optimizer` in one DCP load, so each
    shard file is read once, in the order of its bytes (DCP's writer orders GPU tensors by
    size, so model and optimizer tensors alternate in the file: two loads would each skip
    over the other's, and a verified load would hash the skipped bytes from the file)."""
    targets = _model_targets(path, model)
    optim, apply = _optimizer_targets(path, opt, layout, model)
    _load(Path(path) / SHARDS_DIR, {**targets, **optim})
    apply()


def load_model_from(path: Path, state: dict[str, Any], model: torch.nn.Module) -> None:
    """Collective: the model weights of checkpoint ``path`` whose ``state.pt`` is ``state``:
    its shards (:func:`load_model`) or, for a single-file checkpoint of earlier versions, its
    ``model`` entry."""
    if is_sharded(path):
        load_model(path, model)
        return
    if "model" not in state:
        raise CheckpointError(f"{path}: holds neither shards/ nor a 'model' entry")
    model.load_state_dict(state["model"])


def load_model_weights(path: Path, model: torch.nn.Module, *, trust: bool = False) -> None:
    """Collective: model weights of checkpoint directory ``path`` (sharded, or a single-file
    checkpoint of earlier versions), verified first: its small files' digests before anything
    is unpickled, its shard files' digests while loading (``checkpoint.load_verified``); a
    mismatch raises CheckpointError naming the file. A checkpoint without digests needs
    ``trust=True``."""
    from sleeptrain.train.checkpoint import load_verified

    load_verified(path, lambda p, s: load_model_from(p, s, model), trust=trust)


def load_optimizer(path: Path, opt: Any, layout: dict[str, Any],
                   model: torch.nn.Module | None = None) -> None:
    """Collective: restores the optimizer state and hyper-parameters saved with
    :func:`sharded_state` into ``opt`` (built for ``model`` at this TP size; a pipeline
    stage's model takes its own parameters' state, whatever the saved pipeline size)."""
    tensors, apply = _optimizer_targets(path, opt, layout, model)
    if tensors:
        _load(Path(path) / SHARDS_DIR, tensors)
    apply()


def _optimizer_targets(path: Path, opt: Any, layout: dict[str, Any],
                       model: torch.nn.Module | None
                       ) -> tuple[dict[str, Any], Callable[[], None]]:
    """The tensors DCP loads ``opt``'s saved state into (new ones, after checking the saved
    layout against ``opt``), and the function that then hands them to ``opt`` with the saved
    hyper-parameters."""
    parts = _optim_parts(opt)
    if set(parts) != set(layout["optim"]):
        raise CheckpointError(f"{path}: optimizer parts {sorted(layout['optim'])} saved, this "
                              f"optimizer has {sorted(parts)}")
    tensors: dict[str, Any] = {}
    locals_: dict[str, torch.Tensor] = {}
    for part, o in parts.items():
        named = {n: p for n, p, _ in _named_params(o)}
        saved = layout["optim"][part]
        if model is not None and _stage_of(model) is not None:  # other stages' entries
            saved = {n: k for n, k in saved.items() if model.holds(n)}
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
    return tensors, lambda: _apply_optimizer_state(path, parts, layout, locals_)


def _apply_optimizer_state(path: Path, parts: dict[str, torch.optim.Optimizer],
                           layout: dict[str, Any], locals_: dict[str, torch.Tensor]) -> None:
    """Hands the loaded state tensors ``locals_`` and the saved hyper-parameters to each
    optimizer part."""
    for part, o in parts.items():
        sd = o.state_dict()  # this optimizer's structure: groups with param indices
        groups = layout["groups"][part]
        index = {}
        for i, g in enumerate(sd["param_groups"]):
            sg = _saved_group(path, part, i, g, groups)
            g.update({k: v for k, v in sg.items() if k not in _IMPL_FLAGS and
                      k != "param_names"})
            index.update(zip(g["param_names"], g["params"], strict=True))
        sd["state"] = {index[name]: {key: locals_[f"optim.{part}.{name}.{key}"]
                                     for key in keys}
                       for name, keys in layout["optim"][part].items()
                       if f"optim.{part}.{name}.{next(iter(keys), '')}" in locals_}
        o.load_state_dict(sd)


def _saved_group(path: Path, part: str, i: int, g: dict[str, Any],
                 groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The saved param group whose hyper-parameters group ``g`` (the i-th of this optimizer)
    takes: the i-th with the same parameters, or for a pipeline stage (or a checkpoint of
    one) the one holding all of g's parameters. CheckpointError when there is none."""
    names = list(g["param_names"])
    if i < len(groups) and list(groups[i]["param_names"]) == names:
        return groups[i]
    for sg in groups:  # saved by, or loaded into, another pipeline layout
        if _group_key(sg) == _group_key(g) and set(names) <= set(sg["param_names"]):
            return sg
    raise CheckpointError(f"{path}: {part} param group parameters differ from the saved ones")


def is_sharded(path: Path) -> bool:
    """Whether checkpoint directory ``path`` holds sharded (DCP) weights."""
    return (Path(path) / SHARDS_DIR).is_dir()


__all__ = ["SHARDS_DIR", "SafeFileSystemReader", "is_sharded", "load_model",
           "load_model_and_optimizer", "load_model_from", "load_model_weights", "load_optimizer",
           "read_dcp_metadata", "save_sharded_checkpoint", "save_shards", "sharded_state"]
