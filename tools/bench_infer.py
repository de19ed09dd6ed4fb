"""Benchmark of batched streaming sleep inference: prefill tokens/s and decode ms/token per
batch size and context length, peak memory, and the device-hours of a full RULER table.

The points run batch by batch, each batch's contexts in the order given, so the points
compared for memory at one batch size follow each other. Each runs in a fresh process; with
``--one-process`` all run in this one, on one model, so the chains compile once. The GPU's
peak memory is then still per point, but what earlier points left allocated (a library's
workspace) counts in a later point's peak: ``start_mib`` is the memory allocated when the
point starts. The CPU's RSS growth is reported in fresh processes only.

A point (the model built first: random weights; once with ``--one-process``): prefill a
short context untimed (first calls of the window shapes), prefill ``batch`` random contexts
with ``BatchedStream`` (window by window, sleeping at every eviction), then decode
``--decode`` timed steps (one token per sample each) after ``--decode-warmup`` untimed ones
(on CUDA the decode step is captured as a CUDA graph after two eager steps unless
``--cuda-graph off``), the layers' elementwise chains compiled on CUDA as in training
(``--compile``, default auto: on for CUDA; ``HybridModel.set_kernels``). Peak memory:
``torch.cuda.max_memory_allocated`` on CUDA; on CPU the growth of the peak RSS
(``--cpu-memory``: also the exact peak of live bytes in PyTorch's CPU allocator, from a
second, profiled run).

The estimate: a RULER table of ``--ruler-tasks`` x ``--ruler-samples`` samples at each of
``--estimate-lengths`` costs, per batch size B, samples x length / prefill_tok_s(B) plus
ceil(samples / B) x ``--answer-tokens`` x decode_s_per_step(B) (the mean step, sleeps
included), with the rates measured at the largest context run (both are flat in context
length: the state is O(window)).

    python tools/bench_infer.py --preset tiny --contexts 4096 --batches 1,4        # CPU
    python tools/bench_infer.py --preset 1.3b --device cuda --window 2048 --passes 2 \\
        --contexts 4096,1048576 --batches 1,32
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _build(args):
    """(model, config, device): the preset's random model in eval mode, chains compiled as
    ``--compile`` says."""
    import torch
    from bench_window import PRESETS

    import sleeptrain
    from sleeptrain.config import switch_on

    dev = torch.device(args.device)
    over = [*PRESETS[args.preset], f"sleep.window_len={args.window}",
            f"sleep.passes={args.passes}", f"sleep.eviction={args.eviction}",
            f"train.device={args.device}"]
    if dev.type == "cuda":
        over.append("model.params_dtype=bfloat16")
    cfg = sleeptrain.load_config(None, over)
    model = sleeptrain.build_model(cfg, device=dev)
    model.eval()
    model.set_kernels(compile=switch_on(args.compile, dev.type == "cuda"))
    return model, cfg, dev


def _measure(args, model, cfg, dev, context: int, batch: int, rss: bool = True) -> dict:
    """One (context, batch) point on ``model`` (module docstring); ``rss``: on CPU, also the
    growth of the process's peak RSS (meaningful in a fresh process only)."""
    import torch

    from sleeptrain.infer import BatchedStream

    graph = dev.type == "cuda" if args.cuda_graph == "auto" else args.cuda_graph == "on"
    g = torch.Generator().manual_seed(0)
    vocab = cfg.model.vocab_size
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    prompts = [torch.randint(0, vocab, (context,), generator=g) for _ in range(batch)]
    # untimed: one full window and the last window's length (first calls of both shapes)
    warm = context if context <= args.window else (
        (context - 1) % args.window + 1 + args.window)
    with torch.no_grad():
        BatchedStream(model, batch, cuda_graph=False).prefill([p[:warm] for p in prompts])

    def run() -> dict:
        stream = BatchedStream(model, batch, cuda_graph=graph)
        sync()
        t0 = time.perf_counter()
        logits = stream.prefill(prompts)
        sync()
        prefill = time.perf_counter() - t0
        nxt = logits.argmax(-1)
        for _ in range(args.decode_warmup):  # first calls of new shapes, graph capture
            nxt = stream.step(nxt).argmax(-1)
        if args.profile and dev.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(4):
                    nxt = stream.step(nxt).argmax(-1)
                sync()
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25),
                  file=sys.stderr)
        lat = []
        for _ in range(args.decode):
            sync()
            t1 = time.perf_counter()
            logits = stream.step(nxt)
            nxt = logits.argmax(-1)
            sync()
            lat.append(time.perf_counter() - t1)
        if not bool(torch.isfinite(logits).all()):
            raise SystemExit("non-finite logits: the timing would be meaningless")
        return {"prefill_tok_s": batch * context / prefill,
                "decode_ms_median": 1e3 * statistics.median(lat),
                "decode_ms_mean": 1e3 * statistics.fmean(lat),
                "windows_slept": stream.windows_slept, "cuda_graph": stream.graph is not None}

    row = {"context": context, "batch": batch, "preset": args.preset,
           "device": args.device, "window": args.window, "passes": args.passes,
           "eviction": args.eviction, "compile": args.compile}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        row["start_mib"] = torch.cuda.memory_allocated() / 2**20
        row.update(run())
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row["gpu"] = torch.cuda.get_device_name()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        row.update(run())  # timed and RSS-measured without the profiler, which costs memory
        if rss:
            row["rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                     - base) / 1024
        if args.cpu_memory:
            from bench_memory_cpu import alloc_peak_bytes

            row["peak_mib"] = alloc_peak_bytes(run) / 2**20
    row["torch"] = torch.__version__
    return row


def _child(args) -> None:
    model, cfg, dev = _build(args)
    print(json.dumps(_measure(args, model, cfg, dev, args.context, args.batch)), flush=True)


def _in_process(args, points: list[tuple[int, int]]):
    """``--one-process``: every point on one model in this process (compiled kernels and the
    model shared), yielding each row as it is measured."""
    import gc

    import torch

    model, cfg, dev = _build(args)
    for c, b in points:
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        yield _measure(args, model, cfg, dev, c, b, rss=False)


def _in_subprocesses(args, points: list[tuple[int, int]]):
    """Each point in a fresh process of this tool (``_child``), yielding each row as it is
    measured."""
    for c, b in points:
        cmd = [sys.executable, __file__, "--context", str(c), "--batch", str(b)]
        for k in ("preset", "device", "window", "passes", "eviction", "decode",
                  "decode_warmup", "cuda_graph", "compile"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        cmd += ["--cpu-memory"] if args.cpu_memory else []
        cmd += ["--profile"] if args.profile else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0 or args.profile:
            print(out.stderr[-8000:], file=sys.stderr)
        if out.returncode != 0:
            raise SystemExit(f"context {c}, batch {b} failed")
        yield json.loads(out.stdout.strip().splitlines()[-1])


def estimate(rows: list[dict], lengths: list[int], tasks: int, samples: int,
             answer_tokens: int) -> list[dict]:
    """Device-hours of a RULER table (``tasks`` x ``samples`` at each length) per batch size,
    from the rows measured at the largest context (module docstring)."""
    top = max(r["context"] for r in rows)
    out = []
    for r in sorted((r for r in rows if r["context"] == top), key=lambda r: r["batch"]):
        n = tasks * samples
        est = {"batch": r["batch"], "measured_at": top}
        for x in lengths:
            prefill_s = n * x / r["prefill_tok_s"]
            decode_s = math.ceil(n / r["batch"]) * answer_tokens * r["decode_ms_mean"] / 1e3
            est[str(x)] = (prefill_s + decode_s) / 3600
        out.append(est)
    return out


def _ints(name: str, spec: str) -> list[int]:
    try:
        vals = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: {name} {spec!r}: a comma list of integers") from None
    if not vals or min(vals) < 1:
        raise SystemExit(f"error: {name} {spec!r}: every value must be >= 1")
    return vals


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--contexts", default="4096")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--eviction", default="hard", choices=["hard", "sliding"])
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--decode-warmup", type=int, default=8)
    ap.add_argument("--cuda-graph", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                    help="torch.compile of the layers' elementwise chains (auto: on CUDA)")
    ap.add_argument("--cpu-memory", action="store_true",
                    help="CPU: also the allocator's exact peak (a second, profiled run)")
    ap.add_argument("--profile", action="store_true", help="print a profile of 4 decode steps")
    ap.add_argument("--one-process", action="store_true",
                    help="every point in this process on one model (compiled once; no "
                    "per-point RSS growth on CPU)")
    ap.add_argument("--ruler-tasks", type=int, default=13)
    ap.add_argument("--ruler-samples", type=int, default=100)
    ap.add_argument("--answer-tokens", type=int, default=128,
                    help="decode steps per sample in the estimate (RULER's longest answer)")
    ap.add_argument("--estimate-lengths", default="131072,1048576")
    ap.add_argument("--json", default="", help="also write the rows and estimates here")
    ap.add_argument("--context", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for name in ("window", "passes", "decode", "ruler_tasks", "ruler_samples",
                 "answer_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got "
                             f"{getattr(args, name)}")
    if args.decode_warmup < 0:
        raise SystemExit(f"error: --decode-warmup must be >= 0, got {args.decode_warmup}")
    return args


def _report(rows: list[dict], ests: list[dict], lengths: list[int], device: str) -> None:
    print("\n| context | batch | windows slept | prefill tok/s | decode ms/step (median) | "
          "decode tok/s | peak MiB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_mib']:.1f}" if "peak_mib" in r else ""
        print(f"| {r['context']} | {r['batch']} | {r['windows_slept']} | "
              f"{r['prefill_tok_s']:.0f} | {r['decode_ms_median']:.2f} | "
              f"{1e3 * r['batch'] / r['decode_ms_median']:.0f} | {peak} |")
    kind = "GPU" if device.startswith("cuda") else "CPU"
    print(f"\nRULER table estimate, {kind}-hours (rates at context {ests[0]['measured_at']}):\n"
          "| batch | " + " | ".join(str(x) for x in lengths) + " |\n|---|"
          + "---|" * len(lengths))
    for e in ests:
        print(f"| {e['batch']} | " + " | ".join(f"{e[str(x)]:.2f}" for x in lengths) + " |")


def main() -> None:
    args = _parse()
    if args.context:
        _child(args)
        return
    contexts, batches = _ints("--contexts", args.contexts), _ints("--batches", args.batches)
    lengths = _ints("--estimate-lengths", args.estimate_lengths)
    points = [(c, b) for b in batches for c in contexts]
    rows = []
    for row in (_in_process if args.one_process else _in_subprocesses)(args, points):
        rows.append(row)
        print(json.dumps(row), flush=True)
    ests = estimate(rows, lengths, args.ruler_tasks, args.ruler_samples, args.answer_tokens)
    _report(rows, ests, lengths, args.device)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "estimate": ests}, indent=1))


if __name__ == "__main__":
    main()
