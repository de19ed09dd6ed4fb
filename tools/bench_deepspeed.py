"""Throughput and memory of the DeepSpeed engine (train.engine=deepspeed) on a config's model:
tokens/s, peak GPU memory (allocated and reserved) and peak host memory (the offloaded
optimizer and parameters live there), from random weights and random tokens with every
target in the loss (speed and memory do not depend on the values).

    torchrun --nproc-per-node 1 tools/bench_deepspeed.py configs/gsm_retrofit_ouro_style.yaml \\
        --steps 6 --warmup 2 [key=value ...]

The config's model, sleep, ZeRO and batch settings are used; ``train.init_from`` and the data
source are not (no checkpoint or shard is read). Prints one JSON line per rank 0 with the
hardware, the settings and the numbers; docs/benchmarks.md is where results go.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any


def random_batch(rows: int, seq: int, vocab: int, device: Any, gen: Any) -> tuple:
    """One micro-batch of random tokens (drawn on the host from ``gen``, so every device
    gets the same ones) with every target in the loss, tokens and mask on ``device``."""
    import torch

    tokens = torch.randint(0, vocab, (rows, seq + 1), generator=gen).to(device)
    return tokens, torch.ones_like(tokens, dtype=torch.bool), None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--engine", choices=("deepspeed", "megatron"), default="deepspeed",
                    help="megatron: the same model, step and data through the megatron engine, "
                    "for the comparison (its ZeRO settings are not used)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: "
                    "data.seq_len)")
    from sleeptrain.cli import parse_with_overrides

    args = parse_with_overrides(ap, argv)
    import torch

    import sleeptrain
    from sleeptrain.parallel.state import init_parallel
    from sleeptrain.train.ds_engine import DeepSpeedTrainer
    from sleeptrain.train.signals import process_stop_flag
    from sleeptrain.train.stages import sleep_for_step, stage_at
    from sleeptrain.train.trainer import Trainer

    cfg = sleeptrain.load_config(args.config, [*args.overrides, f"train.engine={args.engine}",
                                               "train.init_from=''"])
    info = init_parallel(1, cfg.parallel.backend, cfg.train.device)
    deepspeed = args.engine == "deepspeed"
    trainer = (DeepSpeedTrainer if deepspeed else Trainer)(cfg, info, process_stop_flag())
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    trainer._build_model_and_optimizer(trust=False)
    trainer._speed_paths()
    seq = args.seq_len or cfg.data.seq_len
    gen = torch.Generator().manual_seed(0)
    rows = cfg.data.batch_size

    sleep_cfg = sleep_for_step(cfg, stage_at(cfg, 0)[1], 0)
    times = []
    for i in range(args.warmup + args.steps):
        batches = [random_batch(rows, seq, cfg.model.vocab_size, info.device, gen)
                   for _ in range(cfg.train.grad_accum)]
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        t0 = time.perf_counter()
        res = trainer.train_step(batches, sleep_cfg, 0.0)
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    tokens = rows * seq * cfg.train.grad_accum * info.dp_size
    out = {"config": args.config, "overrides": args.overrides, "device": str(info.device),
           "gpu": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else
           None, "world": info.world_size, "engine": args.engine,
           "zero_stage": trainer.engine.zero_optimization_stage() if deepspeed else None,
           "offload_optimizer": deepspeed and bool(cfg.deepspeed.offload_optimizer),
           "offload_params": deepspeed and bool(cfg.deepspeed.offload_params),
           "params": sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters()),
           "seq_len": seq, "window_len": sleep_cfg.window_len, "passes": sleep_cfg.passes,
           "tokens_per_step": tokens, "step_s": [round(t, 3) for t in times],
           "tokens_per_s": round(tokens / (sum(times) / len(times)), 1), "last_loss": res.loss,
           "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                      / 2**20, 3)}
    if info.device.type == "cuda":
        out["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(info.device)
                                              / 2**30, 3)
        out["gpu_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(info.device)
                                             / 2**30, 3)
    if info.rank == 0:
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
