"""Checkpoint save and load time with and without the integrity digests, in one process.

Builds the model of a config (``--config`` plus ``key=value`` overrides) and its optimizer
state (one optimizer step on zero gradients, taken over groups of parameters of at most
``--grad-chunk-gib`` of gradients at a time, so a 7B model's gradients never all exist: the
same state as one step over all of them, without ~27 GiB of extra GPU memory), writes one
untimed checkpoint (first touch of the output's pages; ``--no-warmup`` skips it), then,
``--repeat`` times, in one run (the order alternating):

* ``save``: ``save_sharded_checkpoint`` without the digest step (``_digests=False``) and with
  it (every shard hashed from the bytes as they are written, digests in meta.json);
* ``load``: the model and optimizer load of the trainer's resume (``load_train_state``) through
  ``checkpoint.load_verified``, from the state a resumed process starts in (no optimizer state,
  the saves' pinned host copies released), with verification (small files before, shard
  files hashed from the bytes the load reads) and without (``_verify=False``);
* ``hash``: ``digest_files`` over the whole checkpoint alone (the throughput of reading it
  back and hashing it, as a verification that reads the files does; ``--no-hash`` skips it).

``--load-pairs K`` loads each checkpoint saved with digests K times each way, the order of a
pair reversed from the one before (``--load-pairs 2``: both orders in one process, as two
one-repeat runs with and without ``--digests-first`` give them for the loads);
``--load-pairs 0`` times the saves only (``--repeat 2``: both save orders in one process).

With ``--cold`` every measurement starts as a training process's first one would: every save
with no pinned host memory cached (DCP's device-to-host copies allocate it; without ``--cold``
the first save of the run pays that and the later ones reuse it), every load and the hash pass
with the checkpoint's files dropped from the page cache (``posix_fadvise(DONTNEED)``; the files
are fsynced, so their pages are clean), as after a requeue onto other nodes, and the share of
the files still cached is printed (``mincore``). Without it the first load after a save reads
what the save left cached and the second what the first read.

Each save with digests also prints how long its writer waited for the hashing of the buffers
it had handed over (``StreamDigest.wait``, timed by this tool around the library's call): the
part of the digest step that is not hidden behind the write.

After each load the bytes the process read are printed as multiples of the checkpoint's size
(``/proc/self/io``): ``rchar``, every read call's bytes (a verification that read the shards
a second time would show about 2x), and ``read_bytes``, what came from storage.

Only one checkpoint is on disk at a time; the free space of ``OUT_DIR`` is printed first and the
run is refused (exit 2) when the checkpoint's estimated size does not fit. Results: a markdown
table on stdout (median seconds, GiB/s, ratio with/without) and JSON (``--json``, default
``OUT_DIR/bench_ckpt.json``). Examples:

    python tools/bench_ckpt.py /tmp/bench --config configs/7b_sleep.yaml parallel.tp=1 \
        --no-warmup
    python tools/bench_ckpt.py /tmp/bench --device cpu model.d_model=64 model.vocab_size=256

The 7B checkpoint from one process goes to a disk directory on a 128 GB host: in ``/dev/shm``
the files and DCP's host copies would not fit together, and the run is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path, help="directory the checkpoints are written to")
    ap.add_argument("overrides", nargs="*", help="config keys, e.g. parallel.tp=1")
    ap.add_argument("--config", default=None, help="config file (default: built-in defaults)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--repeat", type=int, default=1, help="measurements of each kind")
    ap.add_argument("--json", type=Path, default=None, help="result file")
    ap.add_argument("--grad-chunk-gib", type=float, default=1.0,
                    help="zero gradients held at once while the optimizer state is built")
    ap.add_argument("--digests-first", action="store_true",
                    help="start with the reversed order (save with digests, then without; load "
                         "plain, then verified): two one-repeat runs cover both orders")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed first save (a 7B checkpoint takes minutes to write "
                         "from one process; the alternating order still balances the pairs)")
    ap.add_argument("--cold", action="store_true",
                    help="start every save without cached pinned host memory and every load and "
                         "the hash pass with the files dropped from the page cache (Linux), as "
                         "a fresh process on another node would")
    ap.add_argument("--load-pairs", type=int, default=1,
                    help="verified and plain loads of each checkpoint saved with digests, the "
                         "order reversed from one pair to the next (2 covers both orders in "
                         "one process; 0: saves only)")
    ap.add_argument("--no-hash", action="store_true",
                    help="skip the hash-only pass (its ~40 s for the 7B checkpoint)")
    return ap


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fill_optimizer_state(model: Any, opt: Any, chunk_bytes: int) -> int:
    """One optimizer step on zero gradients, over groups of parameters whose gradients add up
    to at most ``chunk_bytes`` (a larger parameter is a group alone); returns the number of
    groups. Each parameter is stepped exactly once, and the optimizers skip parameters without
    a gradient, so the state equals that of one step over all parameters at once."""
    import torch

    groups, group, size = [], [], 0
    for p in model.parameters():
        n = p.numel() * p.element_size()
        if group and size + n > chunk_bytes:
            groups.append(group)
            group, size = [], 0
        group.append(p)
        size += n
    if group:
        groups.append(group)
    for group in groups:
        for p in group:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return len(groups)


def _on_tmpfs(path: Path) -> bool:
    """Whether ``path`` lies on a memory file system (the longest mount point in /proc/mounts
    that contains it is tmpfs or ramfs); False where /proc/mounts is missing."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    path = path.resolve()
    best = ("", "")
    for point, fstype in mounts:
        if (path == Path(point) or Path(point) in path.parents) and len(point) > len(best[0]):
            best = (point, fstype)
    return best[1] in ("tmpfs", "ramfs")


def _mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _release_host_cache(device: Any) -> None:
    """Free the pinned host memory the saves left cached: DCP copies GPU tensors to the CPU
    with ``non_blocking=True``, into pinned memory that torch's host allocator keeps after
    the save (81 GiB of host memory stayed in use after a one-process 7B save), which a
    resumed process does not have and which leaves the page cache too small to hold the
    checkpoint for its verification."""
    import torch

    if device.type != "cuda":
        return
    release = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) or \
        getattr(torch._C, "_host_emptyCache", None)
    if release is None:
        print("note: this torch cannot release pinned host memory; the loads run with the "
              "saves' pinned copies still allocated", flush=True)
        return
    release()


def _files(root: Path) -> list[Path]:
    return sorted(f for f in root.rglob("*") if f.is_file())


def cached_fraction(root: Path) -> float | None:
    """Share of the pages of the files under ``root`` in the page cache (``mincore`` of a
    read-only mapping); None where it cannot be asked (not Linux, no libc)."""
    import ctypes
    import ctypes.util
    import mmap

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    cached = total = 0
    for f in _files(root):
        size = f.stat().st_size
        if size == 0:
            continue
        pages = (size + page - 1) // page
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = ctypes.create_string_buffer(pages)
                if libc.mincore(addr, size, vec) != 0:
                    return None
                cached += sum(b & 1 for b in vec.raw)
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
        total += pages
    return cached / total if total else 0.0


def drop_page_cache(root: Path) -> float | None:
    """Drop the files under ``root`` from the page cache (``posix_fadvise(DONTNEED)`` after an
    ``fdatasync``, so every page is clean and can go); returns :func:`cached_fraction` after."""
    if not hasattr(os, "posix_fadvise"):
        return None
    for f in _files(root):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return cached_fraction(root)


def io_counters() -> dict[str, int] | None:
    """This process's ``rchar`` (bytes returned by its read calls, page cache or not) and
    ``read_bytes`` (bytes it made the kernel fetch from storage) of /proc/self/io; None
    where that cannot be read."""
    try:
        fields = dict(line.split(": ") for line in
                      Path("/proc/self/io").read_text().splitlines())
        return {k: int(fields[k]) for k in ("rchar", "read_bytes")}
    except (OSError, KeyError, ValueError):
        return None


def _io_note(before: dict[str, int] | None, after: dict[str, int] | None,
             nbytes: int) -> str:
    if before is None or after is None:
        return ""
    calls = (after["rchar"] - before["rchar"]) / nbytes
    storage = (after["read_bytes"] - before["read_bytes"]) / nbytes
    return (f"  read calls returned {calls:.2f}x the checkpoint's bytes, storage reads "
            f"{storage:.2f}x")


def _cold(root: Path, enabled: bool) -> None:
    if not enabled:
        return
    before, after = cached_fraction(root), drop_page_cache(root)
    print(f"page cache of {root.name}: {_percent(before)} of its pages cached, "
          f"{_percent(after)} after dropping", flush=True)


def _percent(x: float | None) -> str:
    return "unknown" if x is None else f"{100 * x:.1f}%"


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _progress(repeat: int, kind: str, seconds: float, nbytes: int) -> None:
    """One measurement as it is taken (a run cut short keeps what it printed)."""
    print(f"repeat {repeat}: {kind} {seconds:.3f} s ({nbytes / GIB / seconds:.2f} GiB/s)",
          flush=True)


class _WaitClock:
    """Seconds spent in ``StreamDigest.wait`` while installed (``with`` block): a save's
    writer waiting for the hash of the buffers it wrote. Patches the class attribute for the
    block only; the writer calls it from DCP's writer threads, hence the lock."""

    def __init__(self) -> None:
        import threading

        self.seconds, self.lock = 0.0, threading.Lock()

    def __enter__(self) -> _WaitClock:
        from sleeptrain.train.checkpoint import StreamDigest

        self.cls, self.orig = StreamDigest, StreamDigest.__dict__["wait"]
        inner = self.orig.__func__

        def timed(futures: list[Any]) -> None:
            t0 = time.perf_counter()
            try:
                inner(futures)
            finally:
                with self.lock:
                    self.seconds += time.perf_counter() - t0

        self.cls.wait = staticmethod(timed)
        return self

    def __exit__(self, *exc: object) -> None:
        self.cls.wait = self.orig


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The measurements (see the module docstring) as a dict; raises SystemExit(2) when the
    checkpoint would not fit into ``args.out_dir``."""
    import torch

    import sleeptrain
    from sleeptrain.train.checkpoint import (
        DIGEST_ALGO,
        checkpoint_bytes,
        digest_files,
        hash_threads,
        load_verified,
    )
    from sleeptrain.train.dist_ckpt import save_sharded_checkpoint, sharded_state
    from sleeptrain.train.optim import optimizer_for
    from sleeptrain.train.trainer import load_train_state

    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    if args.load_pairs < 0:
        raise SystemExit("--load-pairs must be >= 0")
    if args.grad_chunk_gib <= 0:
        raise SystemExit("--grad-chunk-gib must be > 0")
    cfg = sleeptrain.load_config(args.config, [*args.overrides, f"train.device={args.device}"])
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    print(f"{out}: {free / GIB:.2f} GiB free", flush=True)
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    model = sleeptrain.build_model(cfg)
    device = next(model.parameters()).device
    opt = optimizer_for(cfg, model)
    fill_optimizer_state(model, opt, int(args.grad_chunk_gib * GIB))
    tensors, _ = sharded_state(model, opt)
    estimate = sum(t.numel() * t.element_size() for t in tensors.values())
    del tensors
    print(f"model + optimizer state: {estimate / GIB:.2f} GiB "
          f"({sum(p.numel() for p in model.parameters()):,} parameters on {device}), built in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    if estimate * 1.05 + 64 * 2**20 > free:
        print(f"error: the checkpoint (~{estimate / GIB:.2f} GiB) does not fit into {out} "
              f"({free / GIB:.2f} GiB free)", file=sys.stderr)
        raise SystemExit(2)
    # DCP's file writer keeps the CPU copy of every GPU tensor of a rank's file until the file
    # is closed (torch.distributed.checkpoint.filesystem): one process can hold its whole
    # checkpoint in host memory while it saves, and on a memory file system the written
    # checkpoint takes as much again. Refused here with 10% to spare, not killed mid-save.
    tmpfs = _on_tmpfs(out)
    need = estimate * (2 if tmpfs else 1) if device.type == "cuda" else 0
    avail = _mem_available()
    if avail is not None and need * 1.1 > avail:
        where = f" plus the checkpoint itself in {out} (tmpfs)" if tmpfs else ""
        print(f"error: saving may need ~{need / GIB:.2f} GiB of host memory (the process's "
              f"whole checkpoint copied from the GPU{where}), {avail / GIB:.2f} GiB available: "
              "write to a disk directory, or use more ranks", file=sys.stderr)
        raise SystemExit(2)

    times: dict[str, list[float]] = {k: [] for k in
                                     ("save_plain", "save_digests", "load_plain",
                                      "load_verified", "hash_only", "save_hash_wait")}
    nbytes = 0

    def _load(path: Path, state: dict[str, Any]) -> None:
        # as in a resumed process: the optimizer has no state yet (loading into the existing
        # state would hold two copies: 7B at TP=1 ran out of memory on an 80 GB GPU)
        for o in opt.optimizers:
            o.state.clear()
        load_train_state(path, state, model, opt)

    if not args.no_warmup:  # an untimed first write: the first touch of the output's pages
        t0 = time.perf_counter()
        save_sharded_checkpoint(out / "warm-up", 1, model, opt, {"step": 1}, keep_last=1)
        print(f"untimed first save: {time.perf_counter() - t0:.1f} s", flush=True)
        shutil.rmtree(out / "warm-up", ignore_errors=True)
    for r in range(args.repeat):
        even = (r + args.digests_first) % 2 == 0
        for digests in ((False, True) if even else (True, False)):
            run_dir = out / f"run-{r}-{'digests' if digests else 'plain'}"
            shutil.rmtree(run_dir, ignore_errors=True)
            if args.cold:
                _release_host_cache(device)
            _sync(device)
            t0 = time.perf_counter()
            with _WaitClock() as clock:
                info = save_sharded_checkpoint(run_dir, 1, model, opt, {"step": 1},
                                               keep_last=1, _digests=digests)
                _sync(device)
            kind = "save_digests" if digests else "save_plain"
            times[kind].append(time.perf_counter() - t0)
            nbytes = checkpoint_bytes(info.path)
            _progress(r, kind, times[kind][-1], nbytes)
            if digests:
                times["save_hash_wait"].append(clock.seconds)
                print(f"  the writer waited {clock.seconds:.3f} s for hashes", flush=True)
                _release_host_cache(device)
                first = (True, False) if even else (False, True)
                orders = [first if k % 2 == 0 else first[::-1] for k in range(args.load_pairs)]
                for verify in (v for order in orders for v in order):
                    _cold(info.path, args.cold)
                    _sync(device)
                    io0, t0 = io_counters(), time.perf_counter()
                    load_verified(info.path, _load, _verify=verify)
                    _sync(device)
                    kind = "load_verified" if verify else "load_plain"
                    times[kind].append(time.perf_counter() - t0)
                    _progress(r, kind, times[kind][-1], nbytes)
                    if note := _io_note(io0, io_counters(), nbytes):
                        print(note, flush=True)
                if not args.no_hash:
                    names = [str(f.relative_to(info.path)) for f in _files(info.path)
                             if f.name != "meta.json"]
                    _cold(info.path, args.cold)
                    t0 = time.perf_counter()
                    digest_files(info.path, names)
                    times["hash_only"].append(time.perf_counter() - t0)
                    _progress(r, "hash_only", times["hash_only"][-1], nbytes)
            shutil.rmtree(run_dir, ignore_errors=True)

    med = {k: _median(v) for k, v in times.items() if v}
    result = {
        "bytes": nbytes,
        "gib": nbytes / GIB,
        "device": str(device),
        "algo": DIGEST_ALGO,
        "hash_threads": hash_threads(),
        "repeat": args.repeat,
        "load_pairs": args.load_pairs,
        "cold": args.cold,
        "seconds": times,
        "median_s": med,
        "gib_per_s": {k: nbytes / GIB / v for k, v in med.items()
                      if v > 0 and k != "save_hash_wait"},
        "ratio": {what: med[f"{what}_{b}"] / med[f"{what}_{a}"]
                  for what, a, b in (("save", "plain", "digests"), ("load", "plain", "verified"))
                  if f"{what}_{a}" in med},
        "config": args.config,
        "overrides": args.overrides,
    }
    return result


def table(res: dict[str, Any]) -> str:
    """Markdown table of :func:`run`'s result."""
    med, rate = res["median_s"], res["gib_per_s"]
    rows = [("save", "save_plain", "save_digests", res["ratio"]["save"]),
            ("load", "load_plain", "load_verified", res["ratio"].get("load"))]
    pairs = res.get("load_pairs", 1)
    loads = f"{res['repeat'] * pairs} loads and " if pairs else ""
    lines = [f"checkpoint {res['gib']:.3f} GiB on {res['device']}, {res['algo']} in "
             f"{res['hash_threads']} threads, median of {loads}{res['repeat']} saves"
             + (", page cache dropped before each load" if res.get("cold") and pairs else ""), "",
             "| | without digests | with digests | ratio |", "|---|---|---|---|"]
    for what, a, b, ratio in rows:
        if a not in med:  # --load-pairs 0
            continue
        lines.append(f"| {what} | {med[a]:.3f} s ({rate.get(a, 0):.2f} GiB/s) | "
                     f"{med[b]:.3f} s ({rate.get(b, 0):.2f} GiB/s) | {ratio:.3f} |")
    if "save_hash_wait" in med:
        lines.append(f"| save: writer waiting for hashes | | {med['save_hash_wait']:.3f} s | |")
    if "hash_only" in med:
        lines.append(f"| hash only | | {med['hash_only']:.3f} s "
                     f"({rate.get('hash_only', 0):.2f} GiB/s) | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    res = run(args)
    print(table(res))
    path = args.json or args.out_dir / "bench_ckpt.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
