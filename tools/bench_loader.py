"""Benchmark of the shard loader: its throughput alone, and its share of a training step.

    # loader alone (CPU), on a synthetic dataset it writes first:
    python tools/bench_loader.py --workers 2
    # share of step time in a training run on those shards (GPU: train.device=cuda):
    python tools/bench_loader.py --train configs/shards_350m.yaml --steps 30 train.device=cuda

Synthetic documents have log-normal lengths (median ``--doc-median`` tokens) over a 32k
vocabulary. Throughput counts row tokens (padding included) and reports the padding share
that window alignment costs. The training mode reads ``perf.jsonl``: time spent waiting for
the step's batches over the step time, excluding the first ``--skip`` steps (start-up, kernel
compilation).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_dataset(out: Path, n_docs: int, median: int, vocab: int, per_shard: int) -> Path:
    from sleeptrain.data.writer import write_shards

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(median), 1.0, n_docs), 8, 64 * median).astype(int)
    docs = ((rng.integers(0, vocab, n, dtype=np.uint32), None) for n in lengths)
    write_shards(docs, out, "shard", {"kind": "synthetic", "vocab_size": vocab, "eos_id": None,
                                      "pad_id": 0}, per_shard, 1 << 40, {"kind": "synthetic"},
                 progress=False, total=n_docs)
    return out


def bench_loader(shards: Path, args) -> dict:
    from sleeptrain.data.shards import ShardLoader

    ld = ShardLoader([str(shards)], seq_len=args.seq_len, window_len=args.window_len,
                     batch_size=args.batch_size, workers=args.workers, seed=0,
                     shuffle_buffer=args.shuffle_buffer, allow_pipe=args.allow_pipe)
    it = iter(ld)
    for _ in itertools.islice(it, args.warmup):
        pass
    t0 = time.perf_counter()
    tokens = targets = 0
    for b in itertools.islice(it, args.batches):
        tokens += b.tokens[:, :-1].numel()
        targets += int(b.mask.sum())
    dt = time.perf_counter() - t0
    return {"mode": "loader", "workers": args.workers, "seq_len": args.seq_len,
            "window_len": args.window_len, "batch_size": args.batch_size,
            "batches": args.batches, "seconds": round(dt, 3),
            "row_tokens_per_s": round(tokens / dt), "target_share": round(targets / tokens, 4)}


def bench_train(shards: Path, args, overrides: list[str]) -> dict:
    from sleeptrain.config import load_config
    from sleeptrain.train.trainer import train

    run = Path(tempfile.mkdtemp(prefix="bench_loader_run_"))
    cfg = load_config(args.train, [f"data.shards=[{shards}]", f"train.run_dir={run}",
                                   f"train.steps={args.steps}", "log.every=1",
                                   f"train.ckpt_every={args.steps}",
                                   f"train.eval_every={args.steps}", *overrides])
    train(cfg)
    rows = [json.loads(x) for x in (run / "perf.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] > args.skip and "step_s" in r]  # not checkpoint lines
    step_s = sum(r["step_s"] for r in rows)
    data_s = sum(r["data_s"] for r in rows)
    return {"mode": "train", "config": args.train, "overrides": overrides,
            "steps_timed": len(rows), "step_s_mean": round(step_s / len(rows), 4),
            "data_s_mean": round(data_s / len(rows), 5),
            "data_share": round(data_s / step_s, 5),
            "tok_s_mean": round(sum(r["tok_s"] for r in rows) / len(rows))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", help="an existing dataset directory (default: write one)")
    ap.add_argument("--allow-pipe", action="store_true",
                    help="accept a pipe: --shards spec (it runs a shell command)")
    ap.add_argument("--docs", type=int, default=20000, help="synthetic documents to write")
    ap.add_argument("--doc-median", type=int, default=600)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--window-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--train", help="a config to train on the shards (measures data share)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=5)
    args, overrides = ap.parse_known_args()
    bad = [o for o in overrides if "=" not in o]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are key=value)")
    if args.shards:
        shards = Path(args.shards)
    else:
        shards = Path(tempfile.mkdtemp(prefix="bench_loader_")) / "data"
        t0 = time.perf_counter()
        make_dataset(shards, args.docs, args.doc_median, args.vocab, args.per_shard)
        print(json.dumps({"mode": "write", "docs": args.docs,
                          "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
    out = bench_train(shards, args, overrides) if args.train else bench_loader(shards, args)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
