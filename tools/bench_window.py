"""Benchmark: window-sequential sleep training steps vs one parallel call (GPU).

Measures, for one model and batch (bf16 autocast, fwd+bwd of the masked LM loss, no optimizer):
  1. N=1 window-sequential step time vs the same computation as one parallel call per layer
     (block-diagonal attention + conv reset, GDN through the whole sequence) at each L;
  2. tokens/s and peak memory at N in --passes, with and without window-pass checkpointing;
  3. where the time goes (torch.profiler CUDA kernel time: GDN / attention / GEMM / other).
Writes a JSON file and prints a markdown table. Example (the numbers in docs/benchmarks.md):

    python tools/bench_window.py --preset 350m --seq 16384 --batch 2 \
        --windows 512,2048,8192 --passes 1,2,4,8 --out bench_window.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from typing import Any

import torch

warnings.filterwarnings("ignore")

PRESETS: dict[str, list[str]] = {
    # ~350M: 24 blocks, 3 GDN : 1 attention, d=1024, GDN 8x128 heads, attention 16x64 (4 kv)
    "350m": ["model.d_model=1024", "model.pattern=GGGAGGGAGGGAGGGAGGGAGGGA",
             "model.n_heads=16", "model.n_kv_heads=4", "model.gdn_heads=8",
             "model.gdn_head_dim=128", "model.ffn_hidden=2816", "model.vocab_size=32000"],
    # ~1.3B: 24 blocks, d=2048, GDN 16x128, attention 16x128 (4 kv)
    "1.3b": ["model.d_model=2048", "model.pattern=GGGAGGGAGGGAGGGAGGGAGGGA",
             "model.n_heads=16", "model.n_kv_heads=4", "model.gdn_heads=16",
             "model.gdn_head_dim=128", "model.ffn_hidden=5632", "model.vocab_size=32000"],
    "tiny": ["model.d_model=128", "model.pattern=GGGA", "model.n_heads=4",
             "model.n_kv_heads=2", "model.gdn_heads=2", "model.gdn_head_dim=64",
             "model.vocab_size=512"],
}


def _time(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def _classify(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gated_delta", "chunk_", "wy_", "fwd_h", "bwd_dh", "recompute_w",
                            "solve_tril", "tilelang", "kkt", "l2norm")):
        return "gdn"
    if any(s in n for s in ("flash", "fmha", "attention", "sdpa", "attn")):
        return "attention"
    if any(s in n for s in ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul", "ampere_",
                            "sm80_xmma", "cublas")):
        return "gemm"
    return "other"


def _kernel_shares(fn) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    buckets: dict[str, float] = {}
    for ev in prof.key_averages():
        dev_time = getattr(ev, "device_time_total", None)
        if dev_time is None:
            dev_time = getattr(ev, "cuda_time_total", 0.0)
        if dev_time <= 0 or ev.key.startswith("ProfilerStep"):
            continue
        if getattr(ev, "device_type", None) is not None and "CUDA" not in str(ev.device_type):
            continue
        b = _classify(ev.key)
        buckets[b] = buckets.get(b, 0.0) + dev_time
    total = sum(buckets.values()) or 1.0
    out = {k: v / total for k, v in sorted(buckets.items())}
    out["gpu_busy_ms"] = total / 1e3
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="350m", choices=sorted(PRESETS))
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--windows", default="512,2048,8192")
    ap.add_argument("--passes", default="1,2,4,8")
    ap.add_argument("--passes-window", type=int, default=2048,
                    help="window length of the N-scaling runs")
    ap.add_argument("--checkpoint", default="both", choices=["both", "on", "off"],
                    help="N-scaling runs with window-pass checkpointing on, off or both")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="bench_window.json")
    ap.add_argument("--override", nargs="*", default=[], help="extra key=value config overrides")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_window.py needs a CUDA GPU")

    import sleeptrain
    from sleeptrain.sleep import windowed_loss
    from sleeptrain.sleep.runner import token_cross_entropy

    windows = [int(x) for x in args.windows.split(",") if x]
    ckpt_modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpoint]
    passes = [int(x) for x in args.passes.split(",") if x]
    base = [*PRESETS[args.preset], "train.device=cuda", *args.override]
    cfg = sleeptrain.load_config(None, base)
    model = sleeptrain.build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    dev = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1),
                           generator=gen).to(dev)
    mask = torch.ones_like(tokens)
    n_tok = args.batch * args.seq

    def seq_step(sleep_cfg, n):
        def run():
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = windowed_loss(model, tokens, mask, sleep_cfg, passes=n)
            out.loss.backward()
        return run

    def par_step(window):
        def run():
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits_local = model.logits(model.parallel_hidden(tokens[:, :-1], window))
                ce = token_cross_entropy(logits_local, tokens[:, 1:])
                loss = ce.mean()
            loss.backward()
        return run

    results: dict[str, Any] = {
        "preset": args.preset, "params": n_params, "seq": args.seq, "batch": args.batch,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "parallel_vs_sequential": [], "passes": [],
    }
    try:
        import fla

        results["fla"] = fla.__version__
    except Exception:  # pragma: no cover
        results["fla"] = None
    print(f"# {args.preset}: {n_params / 1e6:.1f}M params, B={args.batch}, T={args.seq}, "
          f"{results['device']}", flush=True)
    for w in windows:
        sc = cfg.sleep.copy()
        sc.window_len, sc.passes, sc.checkpoint = w, 1, False
        torch.cuda.reset_peak_memory_stats()
        t_seq = _time(seq_step(sc, 1), args.warmup, args.iters)
        mem_seq = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        t_par = _time(par_step(w), args.warmup, args.iters)
        mem_par = torch.cuda.max_memory_allocated() / 2**30
        shares = _kernel_shares(seq_step(sc, 1))
        row = {"window": w, "sequential_s": t_seq, "parallel_s": t_par,
               "ratio": t_seq / t_par, "seq_tok_s": n_tok / t_seq, "par_tok_s": n_tok / t_par,
               "seq_peak_gib": mem_seq, "par_peak_gib": mem_par, "seq_kernel_share": shares}
        results["parallel_vs_sequential"].append(row)
        print(json.dumps(row), flush=True)
    for ckpt in ckpt_modes:
        for n in passes:
            sc = cfg.sleep.copy()
            sc.window_len, sc.passes, sc.checkpoint = args.passes_window, n, ckpt
            torch.cuda.reset_peak_memory_stats()
            try:
                t = _time(seq_step(sc, n), 1, max(1, args.iters - 1))
                row = {"passes": n, "checkpoint": ckpt, "step_s": t, "tok_s": n_tok / t,
                       "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
            except torch.OutOfMemoryError:
                row = {"passes": n, "checkpoint": ckpt, "oom": True}
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
            results["passes"].append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    _print_markdown(results)


def _print_markdown(r: dict[str, Any]) -> None:
    print("\n| L | sequential ms | parallel ms | ratio | seq tok/s | GDN | attn | GEMM | other |"
          " peak GiB (seq/par) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for x in r["parallel_vs_sequential"]:
        s = x["seq_kernel_share"]
        print(f"| {x['window']} | {x['sequential_s'] * 1e3:.1f} | {x['parallel_s'] * 1e3:.1f} | "
              f"{x['ratio']:.2f} | {x['seq_tok_s']:.0f} | {s.get('gdn', 0):.0%} | "
              f"{s.get('attention', 0):.0%} | {s.get('gemm', 0):.0%} | {s.get('other', 0):.0%} | "
              f"{x['seq_peak_gib']:.1f} / {x['par_peak_gib']:.1f} |")
    print("\n| N | checkpoint | step ms | tok/s | tok/s x N / tok/s(N=1) | peak GiB |")
    print("|---|---|---|---|---|---|")
    base = {c: next((x["tok_s"] for x in r["passes"] if x["passes"] == 1
                     and x["checkpoint"] == c and "tok_s" in x), math.nan) for c in (False, True)}
    for x in r["passes"]:
        if x.get("oom"):
            print(f"| {x['passes']} | {x['checkpoint']} | OOM | | | |")
            continue
        eff = x["tok_s"] * x["passes"] / base[x["checkpoint"]]
        print(f"| {x['passes']} | {x['checkpoint']} | {x['step_s'] * 1e3:.1f} | "
              f"{x['tok_s']:.0f} | {eff:.2f} | {x['peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
