"""Long-context evaluation harness: suites x tasks x lengths, streamed with sleep.

A *cell* is (task, length): ``n`` generated samples of that length in the model's tokens,
answered by greedy streaming inference (``sleeptrain.infer.generate``: ``batch_size`` samples
of different lengths per batch, the decode step optionally a CUDA graph) and scored by the
suite's scorer (0..100). Cells are written to ``OUT/cells/<task>@<length>.json`` atomically as
they finish; a rerun skips finished cells (resumable). At the end ``results.csv``,
``results.md`` (task x length) and ``heatmap.png`` (when matplotlib is installed) summarize
every cell in ``OUT/cells``.

Under torchrun every data-parallel rank answers the samples ``i`` with
``i % dp_size == dp_rank`` and rank 0 gathers, scores and writes.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from sleeptrain.sleep import SleepModel

SUITES = ("ruler", "babilong", "gsm")
DEFAULT_TASKS = {
    "ruler": ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
              "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery",
              "vt", "cwe", "fwe"],
    "babilong": ["qa1", "qa2", "qa3", "qa4", "qa5"],
    "gsm": [f"ops{k}" for k in range(1, 9)],
}


def parse_lengths(spec: str) -> list[int]:
    """``"4k,8k,1M,3000"`` -> [4096, 8192, 1048576, 3000] (k = 1024 tokens, M = 1024k)."""
    out = []
    for part in str(spec).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", part)
        if not m:
            raise ValueError(f"--lengths: cannot read {part!r} (use e.g. 4k,8k,32k or 3000)")
        mult = {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
        out.append(int(m.group(1)) * mult)
    return out


def _generator(suite: str, task: str) -> tuple[Callable[..., list[Any]], Callable[..., float]]:
    """(generate(target_len, tokenizer, n, seed), score(samples, predictions)) of a task."""
    if suite == "ruler":
        from sleeptrain.eval.ruler import RULER_TASKS, generate_ruler, score_ruler

        if task not in RULER_TASKS:
            raise ValueError(f"--tasks: {task!r} is not a RULER task; one of "
                             f"{', '.join(RULER_TASKS)}")
        return (lambda n_tok, tok, n, seed: generate_ruler(task, n_tok, tok, n, seed),
                lambda samples, preds: score_ruler(task, preds, [s.outputs for s in samples]))
    if suite == "babilong":
        from sleeptrain.eval.babilong import BABILONG_TASKS, generate_babilong, score_babilong

        if task not in BABILONG_TASKS:
            raise ValueError(f"--tasks: {task!r} is not a BABILong task; one of "
                             f"{', '.join(BABILONG_TASKS)}")
        return (lambda n_tok, tok, n, seed: generate_babilong(task, n_tok, tok, n, seed),
                lambda samples, preds: score_babilong(
                    task, preds, [s.outputs for s in samples],
                    [s.meta["question"] for s in samples]))
    if suite == "gsm":
        from sleeptrain.eval.gsm import generate_gsm, score_gsm

        m = re.fullmatch(r"ops([1-8])", task)
        if not m:
            raise ValueError(f"--tasks: {task!r} is not a GSM task; ops1 .. ops8")
        ops = int(m.group(1))
        return (lambda n_tok, tok, n, seed: generate_gsm(ops, n_tok, tok, n, seed),
                lambda samples, preds: score_gsm(preds, [s.outputs for s in samples]))
    raise ValueError(f"--suite: unknown suite {suite!r}; one of {', '.join(SUITES)}")


def _dp() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        from megatron.core import parallel_state as mpu

        return mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    return 0, 1


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as JSON at ``path``, complete or not at all (a temporary file, then a rename):
    a crash never leaves a half-written result under the final name."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def run_cell(model: SleepModel, tokenizer: Any, suite: str, task: str, length: int, n: int,
             seed: int, eos_id: int | None, batch_size: int = 32,
             cuda_graph: bool = False) -> dict[str, Any] | None:
    """Answers and scores one cell (this rank's samples, ``batch_size`` per batch, the decode
    step a CUDA graph with ``cuda_graph``); returns its record on data-parallel rank 0, else
    None."""
    from sleeptrain.infer import generate

    gen, score = _generator(suite, task)
    samples = gen(length, tokenizer, n, seed)
    rank, world = _dp()
    mine = [i for i in range(len(samples)) if i % world == rank]
    t0 = time.perf_counter()
    outs = generate(model, [tokenizer.encode(samples[i].prompt) for i in mine],
                    [samples[i].max_new_tokens for i in mine], eos_id=eos_id,
                    batch_size=batch_size, cuda_graph=cuda_graph)
    preds: dict[int, str] = {i: tokenizer.decode(o) for i, o in zip(mine, outs, strict=True)}
    if world > 1:
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, preds)
        for part in every:
            preds.update(part)
    if rank != 0:
        return None
    ordered = [preds[i] for i in range(len(samples))]
    return {"suite": suite, "task": task, "length": length, "n": len(samples),
            "score": score(samples, ordered), "seconds": round(time.perf_counter() - t0, 2),
            "prompt_tokens": [s.n_tokens for s in samples], "predictions": ordered,
            "references": [s.outputs for s in samples]}


def run_suite(model: SleepModel, tokenizer: Any, suite: str, tasks: list[str], lengths: list[int],
              n: int, out_dir: Path, seed: int = 0, eos_id: int | None = None,
              log: Callable[[str], None] = print, title: str = "",
              batch_size: int = 32, cuda_graph: bool = False) -> list[dict[str, Any]]:
    """Every (task, length) cell not finished yet in ``out_dir``; then the summaries
    (``title`` heads the heatmap). ``batch_size``: samples per inference batch;
    ``cuda_graph``: decode with a CUDA graph (CUDA models)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    for task in tasks:  # fail on a bad task name before any work
        _generator(suite, task)
    cells = out_dir / "cells"
    rank, _ = _dp()
    if rank == 0:
        cells.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        for length in lengths:
            path = cells / f"{task}@{length}.json"
            if path.exists():
                log(f"{suite} {task} @ {length}: done before, skipped")
                continue
            rec = run_cell(model, tokenizer, suite, task, length, n, seed, eos_id, batch_size,
                           cuda_graph)
            if rec is not None:
                write_json_atomic(path, rec)
                log(f"{suite} {task} @ {length}: {rec['score']:.1f} ({rec['n']} samples, "
                    f"{rec['seconds']:.1f} s)")
    if rank != 0:
        return []
    return summarize(out_dir, title)


def _per_hour(n: int, seconds: float) -> str:
    """Samples per hour of wall time (all ranks together), "" without a measured time."""
    return f"{3600 * n / seconds:.0f}" if seconds > 0 else ""


def summarize(out_dir: Path, title: str = "") -> list[dict[str, Any]]:
    """Writes results.csv, results.md and heatmap.png (titled ``title``) from
    ``out_dir/cells``. Throughput is recorded beside the scores: samples per hour of each
    cell (csv) and of each length over its cells (md), from the cells' wall times."""
    recs = [json.loads(p.read_text()) for p in sorted((out_dir / "cells").glob("*.json"))]
    recs.sort(key=lambda r: (r["task"], r["length"]))
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["suite", "task", "length", "n", "score", "seconds", "samples_per_hour"])
        for r in recs:
            w.writerow([r["suite"], r["task"], r["length"], r["n"], f"{r['score']:.2f}",
                        r["seconds"], _per_hour(r["n"], r["seconds"])])
    tasks = sorted({r["task"] for r in recs})
    lengths = sorted({r["length"] for r in recs})
    grid = {(r["task"], r["length"]): r["score"] for r in recs}
    lines = ["| task | " + " | ".join(_fmt_len(n) for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for t in tasks:
        cells = [f"{grid[(t, n)]:.1f}" if (t, n) in grid else "" for n in lengths]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    rates = []
    for n in lengths:
        at = [r for r in recs if r["length"] == n]
        rates.append(_per_hour(sum(r["n"] for r in at), sum(r["seconds"] for r in at)))
    lines.append("| samples / hour | " + " | ".join(rates) + " |")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    _heatmap(out_dir / "heatmap.png", tasks, lengths, grid, title)
    return recs


def _fmt_len(n: int) -> str:
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _heatmap(path: Path, tasks: list[str], lengths: list[int],
             grid: dict[tuple[str, int], float], title: str = "") -> bool:
    """Scores as a task x length heatmap (0-100, numbers in the cells), titled, with labelled
    axes; the figure grows with the number of lengths and tasks and with the longest task
    name, so one length or one task stays readable. Returns whether the file was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"heatmap skipped: matplotlib is not installed (pip install matplotlib); "
              f"the scores are in {path.with_name('results.md')}")
        return False
    import numpy as np

    data = np.array([[grid.get((t, n), np.nan) for n in lengths] for t in tasks])
    name_w = 0.09 * max((len(t) for t in tasks), default=4)
    width = max(5.0, 1.6 + name_w + 0.9 * len(lengths))
    height = max(3.0, 1.6 + 0.42 * len(tasks))
    fig, ax = plt.subplots(figsize=(width, height))
    im = ax.imshow(data, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lengths)), [_fmt_len(n) for n in lengths])
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("task")
    for (i, j), v in np.ndenumerate(data):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center",
                    color="white" if v < 60 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="score (%)", fraction=0.08, pad=0.04)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


__all__ = ["DEFAULT_TASKS", "SUITES", "parse_lengths", "run_cell", "run_suite", "summarize",
           "write_json_atomic"]
