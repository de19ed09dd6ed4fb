"""Benchmark: window-sequential sleep training steps, eager and CUDA-graphed, vs one parallel call.

Measures, for one model and batch (bf16 autocast, fwd+bwd of the masked LM loss on every
token, no optimizer step), in one process:
  1. at each window length L (N=1): the parallel single-call step (block-diagonal attention +
     conv reset, GDN through the whole sequence), the window-sequential step run eagerly and
     replayed as a CUDA graph (``sleeptrain.train.step``, what the trainer runs);
  2. at L = --passes-window, N in --passes, with and without window x pass checkpointing:
     tokens/s, peak memory, N x tokens/s(N) / tokens/s(1);
  3. MFU with sleep-aware model FLOPs (``train_flops_per_token``) against this GPU's measured
     bf16 matmul peak and against the datasheet peak;
  4. where the GPU time goes (torch.profiler kernel time: GDN / attention / GEMM / other).
Writes a JSON file and prints markdown tables. Example (the numbers in docs/benchmarks.md):

    python tools/bench_window.py --preset 350m --seq 16384 --batch 1 \
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
from omegaconf import DictConfig

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


# the 350m shapes as pure GDN: 366,956,928 parameters, FLA's GatedDeltaNetForCausalLM of the
# same shapes has exactly as many (the peer of --peer fla)
PRESETS["gdn367m"] = [o if not o.startswith("model.pattern=") else "model.pattern=" + "G" * 24
                      for o in PRESETS["350m"]]


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


def _short(name: str, keep: int = 70) -> str:
    """A kernel name cut in the middle (templates hide the functor at the end)."""
    return name if len(name) <= 2 * keep else f"{name[:keep]} ... {name[-keep:]}"


def _kernel_shares(fn, top_n: int = 15) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    buckets: dict[str, float] = {}
    names: dict[str, float] = {}
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
        names[ev.key] = names.get(ev.key, 0.0) + dev_time
    total = sum(buckets.values()) or 1.0
    out: dict[str, Any] = {k: v / total for k, v in sorted(buckets.items())}
    out["gpu_busy_ms"] = total / 1e3
    top = sorted(names.items(), key=lambda kv: -kv[1])[:top_n]
    out["top_kernels"] = [[_short(k), round(v / 1e3, 3), _classify(k)] for k, v in top]
    return out


def fla_peer_model(cfg: DictConfig) -> torch.nn.Module:
    """flash-linear-attention's ``GatedDeltaNetForCausalLM`` with the shapes of ``cfg``'s
    model (G blocks, and A blocks where flash-attn is installed: FLA's attention layer needs
    it; ``sleeptrain.convert.fla_gdn.config_for``), fp32 weights on the CPU: what a user
    would otherwise train. Its fused norm, SwiGLU and cross entropy stay on (FLA's
    defaults)."""
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    from sleeptrain.convert.fla_gdn import config_for

    hf = {k: v for k, v in config_for(cfg).items()
          if k not in ("architectures", "model_type", "torch_dtype")}
    return GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**hf))


def _peer_step(model: torch.nn.Module, ids: torch.Tensor, autocast: bool):
    """One forward+backward of FLA's model through its own loss (``labels=``: it shifts them
    and uses its fused cross entropy), as its users train it."""
    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return run


def peer_rows(cfg: DictConfig, tokens: torch.Tensor, warmup: int, iters: int
              ) -> list[dict[str, Any]]:
    """FLA's model of the same shapes (``fla_peer_model``) on the first T tokens of every row of
    ``tokens`` [B, T+1]: fp32 weights under bf16 autocast (sleeptrain's setting), then bf16
    weights. Seconds per step, peak memory, parameters."""
    peer = fla_peer_model(cfg).cuda()
    ids = tokens[:, :-1].contiguous()
    rows = []
    for weights, autocast in (("fp32+autocast", True), ("bf16", False)):
        peer = peer if autocast else peer.to(torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = _time(_peer_step(peer, ids, autocast), warmup, iters)
        rows.append({"weights": weights, "step_s": t,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                     "params": sum(p.numel() for p in peer.parameters())})
    del peer
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="350m", choices=sorted(PRESETS))
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--windows", default="512,2048,8192")
    ap.add_argument("--eager", default="on", choices=["on", "off"],
                    help="also time the eager window-sequential step at each L")
    ap.add_argument("--passes", default="1,2,4,8")
    ap.add_argument("--passes-window", type=int, default=2048,
                    help="window length of the N-scaling runs")
    ap.add_argument("--checkpoint", default="both", choices=["both", "on", "off"],
                    help="N-scaling runs with window-pass checkpointing on, off or both")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--profile", default="on", choices=["on", "off"],
                    help="kernel-time shares of the graphed and the parallel step")
    ap.add_argument("--top", type=int, default=15, help="kernels listed per profile")
    ap.add_argument("--compile", default="on", choices=["on", "off"],
                    help="torch.compile of the layers' elementwise chains (train.compile)")
    ap.add_argument("--grad-accum-fusion", default="on", choices=["on", "off"],
                    help="fused linears: bf16 weight copies once per micro-batch, weight "
                         "gradients accumulated by the GEMM (train.grad_accum_fusion)")
    ap.add_argument("--peer", default="off", choices=["off", "fla"],
                    help="fla: also time flash-linear-attention's GatedDeltaNetForCausalLM of "
                         "the same shapes (G and A blocks) in this process, and report the "
                         "graphed window-sequential step over it")
    ap.add_argument("--out", default="bench_window.json")
    ap.add_argument("--override", nargs="*", default=[], help="extra key=value config overrides")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_window.py needs a CUDA GPU")

    import sleeptrain
    from sleeptrain.model.kernels import linear as fused_linear
    from sleeptrain.plan import measure_bf16_peak, peak_flops, train_flops_per_token
    from sleeptrain.sleep.runner import window_heads
    from sleeptrain.train.step import MicroBatchGraphs, forward_backward, zero_grads

    fusion = args.grad_accum_fusion == "on"
    windows = [int(x) for x in args.windows.split(",") if x]
    ckpt_modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpoint]
    passes = [int(x) for x in args.passes.split(",") if x]
    base = [*PRESETS[args.preset], "train.device=cuda", *args.override]
    cfg = sleeptrain.load_config(None, base)
    model = sleeptrain.build_model(cfg)
    model.set_kernels(compile=args.compile == "on")
    n_params = sum(p.numel() for p in model.parameters())
    dev = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1),
                           generator=gen).to(dev)
    mask = torch.ones_like(tokens)
    n_tok = args.batch * args.seq
    measured = measure_bf16_peak(dev)
    sheet = peak_flops(torch.cuda.get_device_name())
    params = list(model.parameters())

    def mfu(sc, n, step_s):
        f = train_flops_per_token(cfg, args.seq, passes=n, sleep=sc) * n_tok / step_s
        return f / measured, (f / sheet if sheet else None)

    def eager_step(sc, n):
        heads = window_heads(mask, sc.window_len)

        def run():
            zero_grads(params)
            forward_backward(model, tokens, mask, None, sc, float(n_tok), True, heads,
                             passes=n, fused_linears=fusion)
        return run

    def graphed_step(sc, n):
        graphs = MicroBatchGraphs(model, warmup=1, verbose=False, fused_linears=fusion)
        heads = window_heads(mask, sc.window_len)

        def run():
            zero_grads(params)
            graphs.step(tokens, mask, None, sc, float(n_tok), True, heads, passes=n)
            if graphs.disabled:
                raise RuntimeError(f"CUDA graph capture failed: {graphs.disabled}")
        return run, graphs

    def par_step(window):
        def run():
            zero_grads(params)
            with fused_linear.micro_batch(model, torch.bfloat16, fusion):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits_local = model.logits(model.parallel_hidden(tokens[:, :-1], window))
                    loss = model.cross_entropy(logits_local, tokens[:, 1:]).mean()
                loss.backward()
        return run

    def save():  # after every row: an interrupted run keeps what it measured
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    def measure(fn, warmup):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = _time(fn, warmup, args.iters)
        return t, torch.cuda.max_memory_allocated() / 2**30

    results: dict[str, Any] = {
        "preset": args.preset, "params": n_params, "seq": args.seq, "batch": args.batch,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "compile": args.compile, "grad_accum_fusion": args.grad_accum_fusion,
        "measured_bf16_tflops": measured / 1e12,
        "datasheet_bf16_tflops": sheet / 1e12 if sheet else None,
        "parallel_vs_sequential": [], "passes": [],
    }
    try:
        import fla

        results["fla"] = fla.__version__
    except Exception:  # pragma: no cover
        results["fla"] = None
    print(f"# {args.preset}: {n_params / 1e6:.1f}M params, B={args.batch}, T={args.seq}, "
          f"{results['device']}, measured bf16 peak {measured / 1e12:.0f} TFLOP/s, "
          f"compile {args.compile}, grad_accum_fusion {args.grad_accum_fusion}", flush=True)
    for w in windows:
        sc = cfg.sleep.copy()
        sc.window_len, sc.passes, sc.checkpoint = w, 1, False
        row: dict[str, Any] = {"window": w}
        row["parallel_s"], row["par_peak_gib"] = measure(par_step(w), 2)
        if args.eager == "on":
            row["eager_s"], row["eager_peak_gib"] = measure(eager_step(sc, 1), 1)
            row["eager_ratio"] = row["eager_s"] / row["parallel_s"]
        run, graphs = graphed_step(sc, 1)
        row["graphed_s"], row["graphed_peak_gib"] = measure(run, 2)
        row["graphed_ratio"] = row["graphed_s"] / row["parallel_s"]
        row["graphed_tok_s"] = n_tok / row["graphed_s"]
        row["graphed_mfu"], row["graphed_mfu_sheet"] = mfu(sc, 1, row["graphed_s"])
        row["par_mfu"], _ = mfu(sc, 1, row["parallel_s"])
        if args.profile == "on":
            row["graphed_kernel_share"] = _kernel_shares(run, args.top)
            row["parallel_kernel_share"] = _kernel_shares(par_step(w), args.top)
        del graphs, run
        torch.cuda.empty_cache()
        results["parallel_vs_sequential"].append(row)
        save()
        print(json.dumps(row), flush=True)
    if args.peer == "fla":
        results["peer_fla"] = peer_rows(cfg, tokens, 2, args.iters)
        for row in results["parallel_vs_sequential"]:
            row["graphed_over_fla"] = row["graphed_s"] / results["peer_fla"][0]["step_s"]
        save()
        print(json.dumps(results["peer_fla"]), flush=True)
    for ckpt in ckpt_modes:
        for n in passes:
            sc = cfg.sleep.copy()
            sc.window_len, sc.passes, sc.checkpoint = args.passes_window, n, ckpt
            row = {"passes": n, "checkpoint": ckpt, "window": args.passes_window}
            try:
                run, graphs = graphed_step(sc, n)
                t, mem = measure(run, 2)
                row.update(step_s=t, tok_s=n_tok / t, peak_gib=mem,
                           reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
                row["mfu"], row["mfu_sheet"] = mfu(sc, n, t)
                del graphs, run
            except torch.OutOfMemoryError:
                row["oom"] = True
            zero_grads(params)
            torch.cuda.empty_cache()
            results["passes"].append(row)
            save()
            print(json.dumps(row), flush=True)
    save()
    _print_markdown(results)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1%}"


def _print_markdown(r: dict[str, Any]) -> None:
    print("\n| L | parallel ms | eager ms | graphed ms | eager / par | graphed / par | "
          "graphed tok/s | MFU (measured / sheet) | GDN | attn | GEMM | other | "
          "peak GiB (par / eager / graphed) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for x in r["parallel_vs_sequential"]:
        s = x.get("graphed_kernel_share", {})
        eager = f"{x['eager_s'] * 1e3:.1f}" if "eager_s" in x else ""
        eratio = f"{x['eager_ratio']:.2f}" if "eager_ratio" in x else ""
        emem = f"{x['eager_peak_gib']:.1f}" if "eager_peak_gib" in x else "-"
        print(f"| {x['window']} | {x['parallel_s'] * 1e3:.1f} | {eager} | "
              f"{x['graphed_s'] * 1e3:.1f} | {eratio} | {x['graphed_ratio']:.2f} | "
              f"{x['graphed_tok_s']:.0f} | {_pct(x['graphed_mfu'])} / "
              f"{_pct(x['graphed_mfu_sheet'])} | {s.get('gdn', 0):.0%} | "
              f"{s.get('attention', 0):.0%} | {s.get('gemm', 0):.0%} | {s.get('other', 0):.0%} | "
              f"{x['par_peak_gib']:.1f} / {emem} / {x['graphed_peak_gib']:.1f} |")
    if "peer_fla" in r:
        fla32, fla16 = r["peer_fla"]
        print(f"\nFLA GatedDeltaNetForCausalLM, same shapes ({fla32['params']:,} parameters): "
              f"{fla32['step_s'] * 1e3:.1f} ms (fp32 weights, bf16 autocast; peak "
              f"{fla32['peak_gib']:.1f} GiB), {fla16['step_s'] * 1e3:.1f} ms (bf16 weights)")
        print("\n| L | graphed ms | graphed / FLA (fp32 + autocast) | graphed / FLA (bf16) |")
        print("|---|---|---|---|")
        for x in r["parallel_vs_sequential"]:
            print(f"| {x['window']} | {x['graphed_s'] * 1e3:.1f} | "
                  f"{x['graphed_s'] / fla32['step_s']:.3f} | "
                  f"{x['graphed_s'] / fla16['step_s']:.3f} |")
    print("\n| N | checkpoint | graphed step ms | tok/s | tok/s x N / tok/s(N=1) | "
          "MFU (measured / sheet) | peak GiB | mem / mem(N=1) |")
    print("|---|---|---|---|---|---|---|---|")
    base = {c: next((x for x in r["passes"] if x["passes"] == 1 and x["checkpoint"] == c
                     and "tok_s" in x), None) for c in (False, True)}
    for x in r["passes"]:
        if x.get("oom"):
            print(f"| {x['passes']} | {x['checkpoint']} | OOM | | | | | |")
            continue
        b = base[x["checkpoint"]]
        eff = x["tok_s"] * x["passes"] / b["tok_s"] if b else math.nan
        mem = x["peak_gib"] / b["peak_gib"] if b else math.nan
        print(f"| {x['passes']} | {x['checkpoint']} | {x['step_s'] * 1e3:.1f} | "
              f"{x['tok_s']:.0f} | {eff:.2f} | {_pct(x['mfu'])} / {_pct(x['mfu_sheet'])} | "
              f"{x['peak_gib']:.1f} | {mem:.2f} |")


if __name__ == "__main__":
    main()
