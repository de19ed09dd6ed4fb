"""Training throughput, MFU and peak memory of a config at several parallel layouts.

Each layout runs ``sleeptrain train`` under torchrun for ``--steps`` optimizer steps on token
shards (by default byte-level shards of the packaged background text, made once under
``--work``), without the final checkpoint, then summarizes the rank-0 ``perf.jsonl``
(median over the steps after ``--skip``: step seconds, tokens/s, MFU against the GPU's bf16
peak, peak allocated GiB) and the loss of the first and last step. Example (two GPUs):

    python tools/bench_train.py --config configs/7b_sleep.yaml --gpus 2 --layouts tp2 \\
        --steps 8 --override data.seq_len=16384 train.grad_accum=1

Layouts are ``tp<T>`` optionally followed by ``pp<P>`` and/or ``cp<C>`` (``tp2``, ``tp1pp2``,
``tp2cp2``; DP = gpus / (T x P x C)). Results are printed as a markdown table and written
to ``--out`` (JSON). ``--device cpu`` runs the tool itself on gloo (a smoke test, no
numbers worth keeping).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {
    "1.3b": ["model.d_model=2048", "model.pattern=GGGAGGGAGGGAGGGAGGGAGGGA",
             "model.n_heads=16", "model.n_kv_heads=4", "model.gdn_heads=16",
             "model.gdn_head_dim=128", "model.ffn_hidden=5632", "model.vocab_size=32000"],
    "350m": ["model.d_model=1024", "model.pattern=GGGAGGGAGGGAGGGAGGGAGGGA",
             "model.n_heads=16", "model.n_kv_heads=4", "model.gdn_heads=8",
             "model.gdn_head_dim=128", "model.ffn_hidden=2816", "model.vocab_size=32000"],
}


def _shards(work: Path) -> Path:
    out = work / "shards"
    if (out / "manifest.json").is_file():
        return out
    text = ROOT / "sleeptrain" / "eval" / "data" / "background.txt"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "--text", str(text),
                    "--split-blank", "--tokenizer", "byte", "--max-samples", "16", "--out",
                    str(out)], check=True)  # 16 documents per shard: enough readers for 8 ranks
    return out


LAYOUT = re.compile(r"^tp(\d+)(?:pp(\d+))?(?:cp(\d+))?$")


def parse_layout(text: str, gpus: int) -> dict[str, int]:
    """``tp2pp2`` -> {tp: 2, pp: 2, cp: 1, dp: gpus / 4}; ValueError naming the layout."""
    m = LAYOUT.match(text)
    if not m:
        raise ValueError(f"layout {text!r} is not tp<T>[pp<P>][cp<C>] (e.g. tp2, tp1pp2)")
    tp, pp, cp = int(m.group(1)), int(m.group(2) or 1), int(m.group(3) or 1)
    if min(tp, pp, cp) < 1 or gpus % (tp * pp * cp):
        raise ValueError(f"layout {text!r}: tp x pp x cp = {tp * pp * cp} does not divide "
                         f"--gpus {gpus}")
    return {"tp": tp, "pp": pp, "cp": cp, "dp": gpus // (tp * pp * cp)}


def layout_name(r: dict) -> str:
    """``TP2 x PP2 x DP2`` (PP / CP only when > 1)."""
    parts = [f"TP{r['tp']}"] + [f"{k.upper()}{r[k]}" for k in ("pp", "cp") if r[k] > 1]
    return " x ".join([*parts, f"DP{r['dp']}"])


def _median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="", help="YAML config (default: none, use --preset)")
    ap.add_argument("--preset", default="", choices=["", *PRESETS])
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--layouts", default="tp1",
                    help="comma list of tp<T>[pp<P>][cp<C>], e.g. tp1,tp2,tp1pp2,tp1cp2")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of medians")
    ap.add_argument("--shards", default="", help="token shards (default: made from the "
                    "packaged background text with the byte tokenizer)")
    ap.add_argument("--work", default="bench_train_work")
    ap.add_argument("--out", default="bench_train.json")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a gloo smoke run of the tool itself")
    ap.add_argument("--override", nargs="*", default=[], help="extra key=value overrides")
    args = ap.parse_args()
    if args.steps <= args.skip:
        ap.error(f"--steps {args.steps} must exceed --skip {args.skip}")
    try:
        layouts = {name: parse_layout(name, args.gpus) for name in args.layouts.split(",")}
    except ValueError as e:
        ap.error(f"--layouts: {e}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shards = Path(args.shards) if args.shards else _shards(work)
    cfg_file = args.config or str(work / "empty.yaml")
    if not args.config:
        Path(cfg_file).write_text("{}\n")
    results = []
    for layout, dims in layouts.items():
        run = work / f"run_{layout}"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        over = [*PRESETS.get(args.preset, []), "data.source=shards", f"data.shards=[{shards}]",
                "data.eval_shards=[]", f"train.device={args.device}",
                "train.precision=bf16" if args.device == "cuda" else "train.precision=fp32",
                f"train.steps={args.steps}", f"train.ckpt_every={10 ** 9}",
                f"train.eval_every={10 ** 9}", "train.save_at_end=false", "log.every=1",
                "log.progress=false", "optim.warmup_steps=1", f"parallel.tp={dims['tp']}",
                f"parallel.pp={dims['pp']}", f"parallel.cp={dims['cp']}",
                *args.override, f"train.run_dir={run}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.gpus}", "-m", "sleeptrain.cli", "train", cfg_file, *over]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.time() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)
            results.append({"layout": layout, "error": proc.returncode})
            continue
        perf = [json.loads(x) for x in (run / "perf.jsonl").read_text().splitlines()]
        perf = [r for r in perf if "step_s" in r]  # leave out checkpoint lines
        mets = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss"] for m in mets if "loss" in m]
        steady = perf[args.skip:]
        res = {"layout": layout, **dims, "steps": len(perf),
               "step_s": _median(steady, "step_s"), "tok_s": _median(steady, "tok_s"),
               "mfu": _median(steady, "mfu"), "peak_gib": max(r.get("peak_gib", 0) for r in perf),
               "loss_first": losses[0], "loss_last": losses[-1], "wall_s": round(wall, 1)}
        results.append(res)
        print(json.dumps(res), flush=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print("\n| layout | step s | tokens/s | MFU | peak GiB (rank 0) | loss first -> last |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['layout']} | failed (exit {r['error']}) | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {layout_name(r)} | {r['step_s']:.3f} | {r['tok_s']:,.0f} | {mfu} | "
              f"{r['peak_gib']:.1f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |")


if __name__ == "__main__":
    main()
