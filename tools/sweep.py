"""Sweeps over the number of sleep passes N: train, evaluate at several N, summarize, plot.

    python tools/sweep.py run CONFIG --passes 1,2,4 --seeds 0 [--random-passes 1,2,3,4]
        [--concurrent K] --out DIR [key=value ...]
    python tools/sweep.py eval DIR --passes 1,2,4,6 [--n E] [--concurrent K] [--partial]
    python tools/sweep.py summarize DIR

``run`` trains one run per (N, seed), ``DIR/N{N}_s{S}``, with ``sleep.passes=N train.seed=S
train.run_dir=DIR/N{N}_s{S}`` and the given overrides, plus with ``--random-passes`` one run
per seed ``DIR/rand{a-b-..}_s{S}`` with ``sleep.random_passes=[a,b,..]`` (each step draws its
N from the list). Runs are ``python -m sleeptrain.cli train`` subprocesses, K at a time (small
runs share one GPU); their output goes to ``DIR/logs/NAME.train.log``. Re-running the same
command skips finished runs (``eval.json`` present and ``metrics.jsonl`` at ``train.steps``)
and resumes the others (the trainer continues from a run's latest checkpoint). A run that
stops before ``train.steps`` with exit status 0 (``train.exit_after_minutes``, a STOP file, a
signal) has saved a checkpoint: it is reported as stopped, not failed, and the same command
resumes it.

``eval`` evaluates every finished run at each N with one ``python -m sleeptrain.cli eval RUN
--passes M1,M2,.. --out RUN/eval_N{passes}.json [--n E]`` per run (the model loaded and its
kernels compiled once; the trainer's own ``RUN/eval.json`` is left as it is). With
``--partial`` the runs that have not finished are evaluated too, at their newest checkpoint,
into ``eval_N{M}_step{S}.json`` (S: the checkpoint's step; a later checkpoint gets its own
file). Existing result files are kept (delete one to recompute it).
It writes ``DIR/eval_by_passes.csv`` (run x eval N x step: exact-match accuracy, token
accuracy, loss, and the exact-match accuracy per depth).

``summarize`` reads every run's ``metrics.jsonl`` and writes ``DIR/sweep.csv`` (one row per
run x logged evaluation), ``DIR/exact_vs_tokens.png`` (exact-match accuracy vs training
tokens, one line per N: the paper's Figure 2b layout) and, for depo, ``DIR/loss_by_k.png``
(test loss vs tokens, one panel per k, one line per N: Figure 3). Lines average the seeds of
an N. Training tokens come from the metrics' ``tokens`` key; lines without it fall back to
``step * data.batch_size * train.grad_accum * (seq_len - 1)`` from the run's ``config.yaml``
(one data-parallel rank's count; column ``tokens_estimated`` says which).

Exit status: 0 when everything ran, 1 when a subprocess failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVAL_FILE = re.compile(r"^eval_N(\d+)(?:_step(\d+))?\.json$")
DEPTH_KEY = re.compile(r"^eval_(acc|example_acc|loss)_depth(-?\d+)$")
_print_lock = threading.Lock()


def say(msg: str) -> None:
    """One line on stdout (thread-safe)."""
    with _print_lock:
        print(msg, flush=True)


def int_list(text: str) -> list[int]:
    """``'1,2,4'`` -> ``[1, 2, 4]`` (argparse type); each value must be >= 0."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of ints, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative ints, got {text!r}")
    return values


# ----------------------------------------------------------------------------------------------
# Run directories
# ----------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """One training run of a sweep: its directory name and the trainer overrides."""

    name: str
    overrides: list[str] = field(default_factory=list)


def plan_runs(passes: list[int], seeds: list[int], random_passes: list[int] | None,
              out: Path, extra: list[str]) -> list[RunSpec]:
    """The runs of ``run``: per seed one per N, then the random-N run when asked."""
    runs = []
    for seed in seeds:
        for n in passes:
            name = f"N{n}_s{seed}"
            runs.append(RunSpec(name, [f"sleep.passes={n}", f"train.seed={seed}",
                                       f"train.run_dir={out / name}", *extra]))
        if random_passes:
            name = f"rand{'-'.join(map(str, random_passes))}_s{seed}"
            values = ",".join(map(str, random_passes))
            runs.append(RunSpec(name, [f"sleep.random_passes=[{values}]", f"train.seed={seed}",
                                       f"train.run_dir={out / name}", *extra]))
    return runs


def load_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.yaml`` as plain dicts (empty when absent)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def metrics_of(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl lines (a torn last line, from a killed run, is skipped)."""
    from sleeptrain.train.logging import METRICS_FILE, read_metrics

    try:
        return read_metrics(run_dir)
    except json.JSONDecodeError:
        out = []
        for line in (run_dir / METRICS_FILE).read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def run_finished(run_dir: Path) -> bool:
    """True when the run wrote its final ``eval.json`` and its metrics reach train.steps."""
    cfg = load_run_config(run_dir)
    if not cfg or not (run_dir / "eval.json").is_file():
        return False
    steps = int(cfg.get("train", {}).get("steps", 0))
    done = max((int(r.get("step", 0)) for r in metrics_of(run_dir)), default=0)
    return done >= steps


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the run's newest complete checkpoint (None: it has none)."""
    from sleeptrain.train.checkpoint import find_latest_checkpoint

    ckpt = find_latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    return int(json.loads((ckpt / "meta.json").read_text())["step"])


def sweep_runs(out: Path) -> list[Path]:
    """The run directories of a sweep (sub-directories holding ``config.yaml``), sorted."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if (p / "config.yaml").is_file())


def run_label(cfg: dict[str, Any]) -> str:
    """``'rand'`` for a random-N run, else its N."""
    sleep = cfg.get("sleep", {})
    return "rand" if sleep.get("random_passes") else str(sleep.get("passes", ""))


# ----------------------------------------------------------------------------------------------
# Subprocesses
# ----------------------------------------------------------------------------------------------


def run_logged(cmd: list[str], log: Path) -> int:
    """Run ``cmd`` with stdout and stderr appended to ``log``; return its exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                              check=False).returncode


def run_pool(jobs: Iterable[tuple[str, Callable[[], bool]]], concurrent: int) -> list[str]:
    """Run the jobs (name, callable returning success) ``concurrent`` at a time; return the
    names of the failed ones."""
    jobs = list(jobs)
    failed: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, concurrent)) as pool:
        futures = {name: pool.submit(fn) for name, fn in jobs}
        for name, fut in futures.items():
            try:
                ok = fut.result()
            except Exception as e:  # a job's own bug: report it, keep the others
                say(f"{name}: {type(e).__name__}: {e}")
                ok = False
            if not ok:
                failed.append(name)
    return failed


def cli(*args: str) -> list[str]:
    """The command line of ``python -m sleeptrain.cli ARGS``."""
    return [sys.executable, "-m", "sleeptrain.cli", *args]


# ----------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not Path(args.config).is_file():
        raise SystemExit(f"error: config {args.config} does not exist")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise SystemExit(f"error: overrides must be key=value, got {bad[0]!r}")
    runs = plan_runs(args.passes, args.seeds, args.random_passes, out, args.overrides)
    out.mkdir(parents=True, exist_ok=True)

    stopped: list[str] = []

    def job(spec: RunSpec) -> Callable[[], bool]:
        def go() -> bool:
            run_dir = out / spec.name
            if run_finished(run_dir):
                say(f"{spec.name}: finished, skipped")
                return True
            say(f"{spec.name}: training")
            rc = run_logged(cli("train", args.config, *spec.overrides),
                            out / "logs" / f"{spec.name}.train.log")
            if rc == 0 and run_finished(run_dir):
                say(f"{spec.name}: done")
                return True
            step = checkpoint_step(run_dir) if rc == 0 else None
            if step is not None:  # a clean stop (time limit, STOP file, signal): resumable
                say(f"{spec.name}: stopped at step {step} (checkpoint saved; the same command "
                    "resumes it)")
                stopped.append(spec.name)
                return True
            say(f"{spec.name}: FAILED (exit {rc}; see logs/)")
            return False
        return go

    failed = run_pool(((r.name, job(r)) for r in runs), args.concurrent)
    if failed:
        say(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}")
        return 1
    if stopped:
        say(f"{len(stopped)} of {len(runs)} runs stopped before train.steps "
            f"({', '.join(sorted(stopped))}); the same command resumes them")
        return 0
    say(f"{len(runs)} runs finished in {out}")
    return 0


# ----------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------


def eval_run(run_dir: Path, passes: list[int], n: int, log: Path,
             step: int | None = None) -> bool:
    """Evaluate one run at each N not yet done into ``eval_N{M}.json``, all in one process
    (``sleeptrain eval RUN --passes M1,M2,.. --out RUN/eval_N{passes}.json``: the model is
    loaded, and its kernels compiled, once; the trainer's own eval.json is untouched);
    ``step``: an unfinished run's newest checkpoint, into ``eval_N{M}_step{S}.json``."""
    name = "eval_N{passes}.json" if step is None else f"eval_N{{passes}}_step{step}.json"

    def target(m: int) -> Path:
        return run_dir / name.replace("{passes}", str(m))

    todo = [m for m in passes if not target(m).is_file()]
    if not todo:
        return True
    extra = ["--n", str(n)] if n else []
    rc = run_logged(cli("eval", str(run_dir), "--passes", ",".join(map(str, todo)),
                        "--out", str(run_dir / name), *extra), log)
    ok = rc == 0
    at = "" if step is None else f" (step {step})"
    for m in todo:  # the CLI writes each result whole under its final name, or not at all
        if target(m).is_file():
            say(f"{run_dir.name}: eval N={m}{at}: exact "
                f"{json.loads(target(m).read_text())['example_acc']:.3f}")
        else:
            say(f"{run_dir.name}: eval N={m}{at} FAILED (exit {rc}; see logs/)")
            ok = False
    return ok


def eval_rows(out: Path) -> list[dict[str, Any]]:
    """Rows of ``eval_by_passes.csv``: every run x eval N result found in the sweep."""
    rows = []
    for run_dir in sweep_runs(out):
        cfg = load_run_config(run_dir)
        final = int(cfg.get("train", {}).get("steps", 0))
        results = []
        for f in run_dir.iterdir():
            match = EVAL_FILE.match(f.name)
            if match:
                step = int(match.group(2)) if match.group(2) else final
                results.append((int(match.group(1)), step, json.loads(f.read_text())))
        for m, step, res in sorted(results, key=lambda x: (x[0], x[1])):
            row: dict[str, Any] = {
                "run": run_dir.name, "passes": run_label(cfg),
                "seed": cfg.get("train", {}).get("seed", ""), "eval_passes": m, "step": step,
                "eval_example_acc": res.get("example_acc"), "eval_token_acc": res.get("token_acc"),
                "eval_loss": res.get("loss", ""), "n": res.get("n"),
            }
            for d, r in res.get("by_depth", {}).items():
                row[f"eval_example_acc_depth{d}"] = r.get("example_acc")
                row[f"eval_loss_depth{d}"] = r.get("loss", "")
            rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]], first: list[str]) -> None:
    """Write ``rows`` with the columns ``first`` and then every other key (depth-sorted)."""
    rest = {k for r in rows for k in r} - set(first)

    def order(key: str) -> tuple[int, str, int]:
        m = DEPTH_KEY.match(key)
        return (1, m.group(1), int(m.group(2))) if m else (0, key, 0)

    cols = first + sorted(rest, key=order)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


EVAL_COLUMNS = ["run", "passes", "seed", "eval_passes", "step", "eval_example_acc",
                "eval_token_acc", "eval_loss", "n"]


def cmd_eval(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    runs = sweep_runs(out)
    if not runs:
        raise SystemExit(f"error: no runs (directories with config.yaml) in {out}")
    todo: list[tuple[Path, int | None]] = []
    for r in runs:
        if run_finished(r):
            todo.append((r, None))
            continue
        step = checkpoint_step(r) if args.partial else None
        if step is None:
            say(f"{r.name}: not finished, not evaluated"
                + ("" if args.partial else " (--partial: at its newest checkpoint)"))
        else:
            todo.append((r, step))
    jobs = [(r.name, lambda r=r, s=s: eval_run(r, args.passes, args.n,
                                               out / "logs" / f"{r.name}.eval.log", s))
            for r, s in todo]
    failed = run_pool(jobs, args.concurrent)
    write_csv(out / "eval_by_passes.csv", eval_rows(out), EVAL_COLUMNS)
    say(f"wrote {out / 'eval_by_passes.csv'}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# summarize
# ----------------------------------------------------------------------------------------------

SWEEP_COLUMNS = ["run", "passes", "seed", "step", "tokens", "tokens_estimated",
                 "eval_example_acc", "eval_token_acc", "eval_loss"]


def tokens_per_step(cfg: dict[str, Any]) -> int:
    """Training tokens per optimizer step on one data-parallel rank: batch x accumulation x
    (task seq_len - 1)."""
    from sleeptrain.data.tasks import build_task

    data, train = cfg.get("data", {}), cfg.get("train", {})
    task = build_task(data.get("task", "rule110"), **dict(data.get("task_args") or {}))
    return int(data.get("batch_size", 1)) * int(train.get("grad_accum", 1)) * (task.seq_len - 1)


def summary_rows(out: Path) -> tuple[list[dict[str, Any]], str, bool]:
    """(rows of sweep.csv, the sweep's task name, whether any token count was estimated)."""
    rows: list[dict[str, Any]] = []
    task, estimated = "", False
    for run_dir in sweep_runs(out):
        cfg = load_run_config(run_dir)
        task = task or cfg.get("data", {}).get("task", "")
        per_step = None
        for rec in metrics_of(run_dir):
            if "eval_example_acc" not in rec:
                continue
            if "tokens" in rec:
                tokens, est = int(rec["tokens"]), False
            else:
                per_step = per_step if per_step is not None else tokens_per_step(cfg)
                tokens, est = int(rec["step"]) * per_step, True
                estimated = True
            row = {"run": run_dir.name, "passes": run_label(cfg),
                   "seed": cfg.get("train", {}).get("seed", ""), "step": rec["step"],
                   "tokens": tokens, "tokens_estimated": int(est)}
            row.update({k: v for k, v in rec.items() if k.startswith("eval_")})
            rows.append(row)
    return rows, task, estimated


def _label_order(label: str) -> tuple[int, int]:
    return (1, 0) if label == "rand" else (0, int(label) if label.isdigit() else 0)


def curves(rows: list[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per N label: (tokens, mean of ``key`` over the seeds logged at that token count)."""
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        v = r.get(key)
        if v is None or v == "":
            continue
        acc[str(r["passes"])][int(r["tokens"])].append(float(v))
    out = {}
    for label in sorted(acc, key=_label_order):
        xs = sorted(acc[label])
        out[label] = (xs, [sum(acc[label][x]) / len(acc[label][x]) for x in xs])
    return out


def _line_name(label: str, rows: list[dict[str, Any]], out: Path) -> str:
    if label != "rand":
        return f"N={label}"
    for r in rows:
        if r["passes"] == "rand":
            cfg = load_run_config(out / r["run"])
            values = cfg.get("sleep", {}).get("random_passes") or []
            return "N ~ U{" + ",".join(map(str, values)) + "}"
    return "random N"


def plot_exact(rows: list[dict[str, Any]], task: str, path: Path, out: Path) -> None:
    """Exact-match accuracy vs training tokens, one line per N (paper Figure 2b)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, (xs, ys) in curves(rows, "eval_example_acc").items():
        ax.plot(xs, ys, marker="o", markersize=3, label=_line_name(label, rows, out))
    ax.set_title(f"{task or 'task'}: exact-match accuracy vs training tokens")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("exact-match accuracy (test)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title="sleep passes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_by_k(rows: list[dict[str, Any]], task: str, path: Path, out: Path) -> None:
    """Test loss vs training tokens, one panel per k, one line per N (paper Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({int(m.group(2)) for r in rows for k in r
                 if (m := DEPTH_KEY.match(k)) and m.group(1) == "loss"})
    panels = max(1, len(ks))
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4), squeeze=False,
                             sharey=True)
    for ax, k in zip(axes[0], ks or [None], strict=True):
        if k is not None:
            for label, (xs, ys) in curves(rows, f"eval_loss_depth{k}").items():
                ax.plot(xs, ys, marker="o", markersize=3, label=_line_name(label, rows, out))
        ax.set_title(f"k = {k}" if k is not None else "no evaluations yet")
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test loss (answer tokens)")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(title="sleep passes", fontsize="small")
    fig.suptitle(f"{task or 'depo'}: test loss by hop count k vs training tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_summarize(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    if not sweep_runs(out):
        raise SystemExit(f"error: no runs (directories with config.yaml) in {out}")
    rows, task, estimated = summary_rows(out)
    write_csv(out / "sweep.csv", rows, SWEEP_COLUMNS)
    plot_exact(rows, task, out / "exact_vs_tokens.png", out)
    written = ["sweep.csv", "exact_vs_tokens.png"]
    if task == "depo":
        plot_loss_by_k(rows, task, out / "loss_by_k.png", out)
        written.append("loss_by_k.png")
    ev = eval_rows(out)
    if ev:
        write_csv(out / "eval_by_passes.csv", ev, EVAL_COLUMNS)
        written.append("eval_by_passes.csv")
    if estimated:
        say("note: some metrics lines have no 'tokens' key; their token counts are estimated "
            "as step x data.batch_size x train.grad_accum x (seq_len - 1) "
            "(column tokens_estimated=1)")
    say(f"{len(rows)} evaluations of {len(sweep_runs(out))} runs; wrote "
        f"{', '.join(str(out / w) for w in written)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train one run per (N, seed), K at a time, resumably")
    r.add_argument("config")
    r.add_argument("--passes", type=int_list, required=True, help="N values, e.g. 1,2,4")
    r.add_argument("--seeds", type=int_list, default=[0], help="train.seed values, e.g. 0,1")
    r.add_argument("--random-passes", type=int_list, default=None,
                   help="also one run per seed with sleep.random_passes=[these]")
    r.add_argument("--concurrent", type=int, default=1, help="runs at a time (default 1)")
    r.add_argument("--out", required=True, help="sweep directory")
    r.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    r.set_defaults(fn=cmd_run)
    e = sub.add_parser("eval", help="evaluate every finished run (--partial: every "
                       "checkpointed run) at each N")
    e.add_argument("dir")
    e.add_argument("--passes", type=int_list, required=True, help="eval N values")
    e.add_argument("--n", type=int, default=0, help="examples (default train.eval_examples)")
    e.add_argument("--concurrent", type=int, default=1, help="runs evaluated at a time")
    e.add_argument("--partial", action="store_true",
                   help="also evaluate unfinished runs at their newest checkpoint")
    e.set_defaults(fn=cmd_eval)
    s = sub.add_parser("summarize", help="write sweep.csv and the plots")
    s.add_argument("dir")
    s.set_defaults(fn=cmd_summarize)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after options (``run CFG --out D a=b``)
        if args.command != "run" or any("=" not in x or x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command == "run" and min(args.passes) < 1:
        parser.error("--passes values must be >= 1")
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
