"""Benchmark of streaming sleep inference: peak memory, prefill (sleep) throughput and per-token
decode latency vs context length.

Each context length runs in a fresh process: build the model (random weights), stream a
random context window by window (sleeping at every eviction), then decode ``--decode`` tokens
one forward pass each. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the
exact peak of live bytes in PyTorch's CPU allocator (profiler events, a second identical run)
and the growth of the process's peak RSS during the first, timed run.

    python tools/bench_infer.py --preset tiny --contexts 4096,8192,16384,32768      # CPU
    python tools/bench_infer.py --preset 1.3b --device cuda --contexts 4096,65536,1048576
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _child(args) -> None:
    import torch
    from bench_window import PRESETS

    import sleeptrain
    from sleeptrain.infer import Stream

    dev = torch.device(args.device)
    over = [*PRESETS[args.preset], f"sleep.window_len={args.window}",
            f"sleep.passes={args.passes}", f"sleep.eviction={args.eviction}",
            f"train.device={args.device}"]
    if dev.type == "cuda":
        over.append("model.params_dtype=bfloat16")
    cfg = sleeptrain.load_config(None, over)
    model = sleeptrain.build_model(cfg, device=dev)
    model.eval()
    ctx_len = args.context
    g = torch.Generator().manual_seed(0)
    vocab = cfg.model.vocab_size
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run() -> dict:
        stream = Stream(model, args.batch)
        sync()
        t0 = time.perf_counter()
        logits = None
        for s in range(0, ctx_len, args.window):
            n = min(args.window, ctx_len - s)
            chunk = torch.randint(0, vocab, (args.batch, n), generator=g)
            logits = stream.feed(chunk, want="last" if s + n == ctx_len else "none")
        sync()
        prefill = time.perf_counter() - t0
        lat = []
        nxt = logits.argmax(-1)
        for _ in range(args.decode_warmup):  # first calls of new shapes (kernel compilation)
            logits = stream.feed(nxt[:, None], want="last")
            nxt = logits.argmax(-1)
        if args.profile and dev.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(4):
                    logits = stream.feed(nxt[:, None], want="last")
                    nxt = logits.argmax(-1)
                sync()
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25),
                  file=sys.stderr)
        for _ in range(args.decode):
            sync()
            t1 = time.perf_counter()
            logits = stream.feed(nxt[:, None], want="last")
            nxt = logits.argmax(-1)
            sync()
            lat.append(time.perf_counter() - t1)
        if not bool(torch.isfinite(logits).all()):
            raise SystemExit("non-finite logits: the timing would be meaningless")
        return {"prefill_tok_s": args.batch * ctx_len / prefill,
                "decode_ms_median": 1e3 * statistics.median(lat),
                "windows_slept": stream.windows_slept}

    row = {"context": ctx_len, "preset": args.preset, "device": args.device,
           "window": args.window, "passes": args.passes, "batch": args.batch}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        row.update(run())
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row["gpu"] = torch.cuda.get_device_name()
    else:
        from bench_memory_cpu import alloc_peak_bytes

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        row.update(run())  # timed and RSS-measured without the profiler, which costs memory
        row["rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        row["peak_mib"] = alloc_peak_bytes(run) / 2**20
    row["torch"] = torch.__version__
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--contexts", default="4096,8192,16384,32768")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--eviction", default="hard", choices=["hard", "sliding"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--decode-warmup", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="print a profile of 4 decode steps")
    ap.add_argument("--context", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.context:
        _child(args)
        return
    rows = []
    for c in [int(x) for x in args.contexts.split(",")]:
        cmd = [sys.executable, __file__, "--context", str(c)]
        for k in ("preset", "device", "window", "passes", "eviction", "batch", "decode",
                  "decode_warmup"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        if args.profile:
            cmd.append("--profile")
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0 or args.profile:
            print(out.stderr[-8000:], file=sys.stderr)
        if out.returncode != 0:
            raise SystemExit(f"context {c} failed")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    b = rows[0]
    print(f"\n| context | prefill tok/s | decode ms/token | peak MiB | peak / peak({b['context']}) "
          f"| decode / decode({b['context']}) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['prefill_tok_s']:.0f} | {r['decode_ms_median']:.2f} | "
              f"{r['peak_mib']:.1f} | {r['peak_mib'] / b['peak_mib']:.3f} | "
              f"{r['decode_ms_median'] / b['decode_ms_median']:.3f} |")


if __name__ == "__main__":
    main()
