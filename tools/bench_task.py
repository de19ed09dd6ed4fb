"""End-to-end training throughput of a task config (the paper's Rule 110 / Depo models).

For each N in ``--passes`` this runs ``sleeptrain train CONFIG sleep.passes=N`` for
``--steps`` optimizer steps (no evaluation, no checkpoint) in a subprocess, then summarizes
its ``perf.jsonl`` over the steps after ``--skip`` (warm-up, compilation and CUDA-graph
capture): median step time, tokens/s, the data share of the step (``data_s / step_s``), MFU
against the datasheet peak and the measured one, peak memory. Everything the trainer does in
a step is inside the time: data, forward and backward, reductions, clip, optimizer.
``--profile K`` runs K more steps under ``torch.profiler`` (``train.profile_steps``, left out
of the medians) and prints where they spent their time: each phase of the step on the host
and the kernels that took most device time (``RUN/profile/``, sleeptrain.train.profiling).

    python tools/bench_task.py --config configs/rule110_paper.yaml --passes 4,1 \\
        --steps 80 --skip 30 --out bench_task.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# the package from this checkout, installed or not (the summary of --profile imports it and
# the runs are ``python -m sleeptrain.cli`` subprocesses)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def bench_one(config: str, passes: int, steps: int, skip: int, work: Path,
              overrides: list[str], timeout: int, profile: int = 0) -> dict:
    """One run at N=``passes``: the medians of its steady steps (and, with ``profile``, the
    profile summary of ``profile`` more steps)."""
    run = work / f"n{passes}"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    prof = [f"train.profile_steps=[{steps + 1},{steps + profile}]"] if profile else []
    cmd = [sys.executable, "-m", "sleeptrain.cli", "train", config, f"sleep.passes={passes}",
           f"train.steps={steps + profile}", *prof, f"train.eval_every={10 ** 9}",
           f"train.ckpt_every={10 ** 9}",
           "train.save_at_end=false", "log.every=1", "log.progress=false",
           "train.eval_examples=1", *overrides, f"train.run_dir={run}"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1",
                               "PYTHONPATH": os.pathsep.join(
                                   x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)})
    wall = time.time() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n", file=sys.stderr)
        return {"passes": passes, "error": proc.returncode}
    perf = [json.loads(x) for x in (run / "perf.jsonl").read_text().splitlines()]
    steady = [r for r in perf if "step_s" in r][skip:steps]
    step_s = _median(steady, "step_s")
    data_s = _median(steady, "data_s")
    return {"passes": passes, "steps": len(steady), "step_ms": 1e3 * step_s,
            "tok_s": _median(steady, "tok_s"), "data_share": data_s / step_s,
            "mfu": _median(steady, "mfu"), "mfu_measured": _median(steady, "mfu_measured"),
            "peak_gib": max((r.get("peak_gib", 0.0) for r in perf), default=0.0),
            "graph_replays": steady[-1].get("graph_replays") if steady else None,
            "optimizer_replays": steady[-1].get("optimizer_replays") if steady else None,
            "wall_s": round(wall, 1), **_profile(run, profile)}


def _profile(run: Path, profile: int) -> dict:
    """The profile summary of rank 0 (empty without ``--profile``)."""
    if not profile:
        return {}
    from sleeptrain.train.profiling import summary_line

    summary = json.loads((run / "profile" / "summary_rank0.json").read_text())
    return {"profile": summary_line(summary), "profile_top": summary["top"][:15],
            "profile_steps": summary["steps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--passes", default="4,1", help="comma list of N")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--skip", type=int, default=30, help="warm-up steps left out")
    ap.add_argument("--work", default="bench_task_work")
    ap.add_argument("--out", default="bench_task.json")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--profile", type=int, default=0, metavar="K",
                    help="K more steps under torch.profiler after the timed ones")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides")
    args = ap.parse_args()
    if args.steps <= args.skip:
        ap.error(f"--steps {args.steps} must exceed --skip {args.skip}")
    if args.profile < 0:
        ap.error(f"--profile {args.profile}: the number of profiled steps must be >= 0")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in (int(x) for x in args.passes.split(",")):
        res = bench_one(args.config, n, args.steps, args.skip, work, args.overrides,
                        args.timeout, args.profile)
        results.append(res)
        print(json.dumps(res), flush=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results},
                                             indent=1))
    print("\n| N | step ms | tokens/s | data share | MFU (datasheet / measured) | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['passes']} | failed (exit {r['error']}) | | | | |")
            continue
        mfu = (f"{100 * r['mfu']:.1f}% / {100 * r['mfu_measured']:.1f}%"
               if r["mfu"] is not None and r["mfu_measured"] is not None else "n/a")
        print(f"| {r['passes']} | {r['step_ms']:.1f} | {r['tok_s']:,.0f} | "
              f"{100 * r['data_share']:.2f}% | {mfu} | {r['peak_gib']:.2f} |")
    for r in results:
        if "profile" in r:
            print(f"\nN={r['passes']} profile: {r['profile']}")
            for t in r["profile_top"]:
                print(f"  {100 * t['share']:5.1f}%  {t['calls']:6d} x  {t['name'][:110]}")


if __name__ == "__main__":
    main()
