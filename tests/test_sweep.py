"""Tests of tools/sweep.py: run planning, finished-run detection, summaries and plots, and a
tiny end-to-end CPU sweep (train with a resume, eval at several N, summarize)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "tools" / "sweep.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["model.d_model=16", "model.n_heads=2", "model.n_kv_heads=1", "model.gdn_heads=1",
        "model.gdn_head_dim=8", "model.ffn_hidden=16", "data.batch_size=4", "train.steps=4",
        "train.eval_every=2", "train.eval_examples=8", "train.device=cpu", "log.progress=false",
        "train.ckpt_every=2"]


def load_sweep():
    """tools/sweep.py as a module (registered, so that its dataclasses resolve)."""
    if "sweep_tool" not in sys.modules:
        spec = importlib.util.spec_from_file_location("sweep_tool", SWEEP)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["sweep_tool"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["sweep_tool"]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100


def fake_run(root: Path, name: str, task: str, passes: int, seed: int, evals: list[dict],
             random_passes: list[int] | None = None, task_args: dict | None = None,
             steps: int = 4, final_eval: bool = True) -> Path:
    """A run directory with config.yaml, metrics.jsonl (a training line per step and the given
    eval lines) and, when finished, eval.json."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {"data": {"task": task, "task_args": task_args or {}, "batch_size": 4},
           "train": {"steps": steps, "seed": seed, "grad_accum": 2},
           "sleep": {"passes": passes, "random_passes": random_passes or []}}
    (run / "config.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    lines = [{"step": s, "loss": 1.0 / s} for s in range(1, steps + 1)] + evals
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if final_eval:
        (run / "eval.json").write_text("{}")
    return run


def test_plan_runs_and_arguments() -> None:
    """Run names and overrides per (N, seed) plus the random-N run; bad lists are refused."""
    sw = load_sweep()
    runs = sw.plan_runs([1, 4], [0, 3], [1, 2, 3], Path("out"), ["a.b=1"])
    assert [r.name for r in runs] == ["N1_s0", "N4_s0", "rand1-2-3_s0", "N1_s3", "N4_s3",
                                      "rand1-2-3_s3"]
    assert runs[1].overrides == ["sleep.passes=4", "train.seed=0", "train.run_dir=out/N4_s0",
                                 "a.b=1"]
    assert runs[2].overrides[0] == "sleep.random_passes=[1,2,3]"
    assert sw.int_list("1, 2,4") == [1, 2, 4]
    for bad in ("", "a", "-1"):
        with pytest.raises(Exception, match="ints"):
            sw.int_list(bad)
    with pytest.raises(SystemExit):
        sw.main(["run", "cfg.yaml", "--passes", "0", "--out", "x"])


def test_run_finished(tmp_path: Path) -> None:
    """Finished = eval.json written and the metrics reach train.steps."""
    sw = load_sweep()
    done = fake_run(tmp_path, "a", "rule110", 1, 0, [])
    short = fake_run(tmp_path, "b", "rule110", 1, 0, [], steps=4)
    (short / "config.yaml").write_text(json.dumps({"train": {"steps": 8}}))
    no_eval = fake_run(tmp_path, "c", "rule110", 1, 0, [], final_eval=False)
    with open(done / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a torn last line (killed writer) is skipped
    assert sw.run_finished(done)
    assert not sw.run_finished(short) and not sw.run_finished(no_eval)
    assert not sw.run_finished(tmp_path / "missing")
    assert [p.name for p in sw.sweep_runs(tmp_path)] == ["a", "b", "c"]


def test_summarize_csv_and_plots(tmp_path: Path) -> None:
    """sweep.csv has a row per run x eval line with N, seed, tokens (from the metrics, or
    estimated when absent) and per-depth columns; the plots are PNGs; depo adds loss_by_k."""
    sw = load_sweep()
    args = {"n_min": 3, "n_max": 6, "n_names": 10, "K": 4, "test_k": [1, 4], "window_len": 8,
            "n_queries": 2}
    seq_len = 16 + 10  # context 2 * n_max = 12 -> query_start 16, then 2 queries of 5 tokens

    def ev(step: int, acc: float, tokens: int | None) -> dict:
        rec = {"step": step, "eval_example_acc": acc, "eval_token_acc": acc + 0.1,
               "eval_loss": 2 - acc, "eval_acc_depth1": acc, "eval_acc_depth4": acc / 2,
               "eval_example_acc_depth1": acc, "eval_example_acc_depth4": acc / 3,
               "eval_loss_depth1": 1 - acc, "eval_loss_depth4": 3 - acc}
        return rec if tokens is None else {**rec, "tokens": tokens}

    fake_run(tmp_path, "N1_s0", "depo", 1, 0, [ev(2, 0.1, 100), ev(4, 0.2, 200)],
             task_args=args)
    fake_run(tmp_path, "N4_s0", "depo", 4, 0, [ev(2, 0.3, None), ev(4, 0.5, None)],
             task_args=args)
    fake_run(tmp_path, "rand1-4_s1", "depo", 1, 1, [ev(4, 0.4, 200)], random_passes=[1, 4],
             task_args=args)
    (tmp_path / "N4_s0" / "eval_N2.json").write_text(json.dumps(
        {"example_acc": 0.7, "token_acc": 0.8, "loss": 0.5, "n": 8,
         "by_depth": {"1": {"example_acc": 0.9, "loss": 0.1}}}))
    assert sw.main(["summarize", str(tmp_path)]) == 0
    cols, rows = read_csv(tmp_path / "sweep.csv")
    assert cols[:9] == sw.SWEEP_COLUMNS
    assert cols[9:] == ["eval_acc_depth1", "eval_acc_depth4", "eval_example_acc_depth1",
                        "eval_example_acc_depth4", "eval_loss_depth1", "eval_loss_depth4"]
    got = [(r["run"], r["passes"], r["seed"], r["step"], r["tokens"], r["tokens_estimated"])
           for r in rows]
    per_step = 4 * 2 * (seq_len - 1)  # batch x accumulation x (seq_len - 1)
    assert got == [("N1_s0", "1", "0", "2", "100", "0"), ("N1_s0", "1", "0", "4", "200", "0"),
                   ("N4_s0", "4", "0", "2", str(2 * per_step), "1"),
                   ("N4_s0", "4", "0", "4", str(4 * per_step), "1"),
                   ("rand1-4_s1", "rand", "1", "4", "200", "0")]
    assert float(rows[3]["eval_example_acc"]) == 0.5
    assert float(rows[3]["eval_loss_depth4"]) == 2.5
    for png in ("exact_vs_tokens.png", "loss_by_k.png"):
        assert_png(tmp_path / png)
    cols, rows = read_csv(tmp_path / "eval_by_passes.csv")
    assert cols[:len(sw.EVAL_COLUMNS)] == sw.EVAL_COLUMNS
    assert [(r["run"], r["eval_passes"], r["eval_example_acc"], r["eval_example_acc_depth1"])
            for r in rows] == [("N4_s0", "2", "0.7", "0.9")]
    curves = sw.curves(sw.summary_rows(tmp_path)[0], "eval_example_acc")
    assert list(curves) == ["1", "4", "rand"]
    assert curves["4"] == ([2 * per_step, 4 * per_step], [0.3, 0.5])


@pytest.mark.slow
def test_tiny_cpu_sweep_end_to_end(tmp_path: Path) -> None:
    """run (one run interrupted beforehand, evaluated at that checkpoint with --partial, then
    stopped again by a time limit inside the sweep, which reports it as stopped, not failed,
    and resumed by the next sweep command; the other fresh, 2 at a time), run again (all
    skipped), eval at N = 1, 2 and summarize, on a tiny CPU config."""
    out = tmp_path / "sweep"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    config = str(ROOT / "configs" / "rule110_tiny.yaml")

    def call(*args: str) -> subprocess.CompletedProcess:
        res = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        return res

    # an interrupted run: 2 of 4 steps, checkpointed
    call("-m", "sleeptrain.cli", "train", config, *TINY, "sleep.passes=1", "train.seed=0",
         f"train.run_dir={out / 'N1_s0'}", "--max-steps", "2")
    first = call(str(SWEEP), "eval", str(out), "--passes", "1")
    assert "N1_s0: not finished, not evaluated" in first.stdout
    assert not (out / "N1_s0" / "eval_N1_step2.json").exists()
    call(str(SWEEP), "eval", str(out), "--passes", "1", "--partial")
    assert json.loads((out / "N1_s0" / "eval_N1_step2.json").read_text())["passes"] == 1
    # a time limit already spent at start-up: the run stays at its checkpoint, reported as
    # stopped (resumable, exit 0), not failed
    stop = call(str(SWEEP), "run", config, "--passes", "1", "--out", str(out), *TINY,
                "train.exit_after_minutes=1e-6")
    assert "N1_s0: stopped at step 2" in stop.stdout and "FAILED" not in stop.stdout
    call(str(SWEEP), "run", config, "--passes", "1,2", "--seeds", "0", "--concurrent", "2",
         "--out", str(out), *TINY)
    assert "resum" in (out / "logs" / "N1_s0.train.log").read_text().lower()
    again = call(str(SWEEP), "run", config, "--passes", "1,2", "--out", str(out), *TINY)
    assert again.stdout.count("finished, skipped") == 2
    for run in ("N1_s0", "N2_s0"):
        steps = [r["step"] for r in map(json.loads, (out / run / "metrics.jsonl").open())
                 if "eval_example_acc" in r]
        assert steps == [2, 4]  # one eval line per eval step, also across the resume
    trainer_eval = json.loads((out / "N2_s0" / "eval.json").read_text())
    call(str(SWEEP), "eval", str(out), "--passes", "1,2", "--concurrent", "2")
    assert json.loads((out / "N2_s0" / "eval.json").read_text()) == trainer_eval  # untouched
    assert json.loads((out / "N2_s0" / "eval_N2.json").read_text())["example_acc"] == \
        trainer_eval["example_acc"]  # the trained N evaluated again: the same result
    assert json.loads((out / "N2_s0" / "eval_N1.json").read_text())["passes"] == 1
    call(str(SWEEP), "summarize", str(out))
    cols, rows = read_csv(out / "sweep.csv")
    assert cols[:9] == ["run", "passes", "seed", "step", "tokens", "tokens_estimated",
                        "eval_example_acc", "eval_token_acc", "eval_loss"]
    assert {"eval_example_acc_depth0", "eval_loss_depth1"} <= set(cols)
    assert [(r["run"], r["passes"], r["step"]) for r in rows] == [
        ("N1_s0", "1", "2"), ("N1_s0", "1", "4"), ("N2_s0", "2", "2"), ("N2_s0", "2", "4")]
    assert all(r["tokens_estimated"] == "0" for r in rows)
    assert int(rows[1]["tokens"]) == 4 * 4 * 103  # steps x batch x (seq_len - 1)
    cols, rows = read_csv(out / "eval_by_passes.csv")
    assert [(r["run"], r["eval_passes"], r["step"]) for r in rows] == [
        ("N1_s0", "1", "2"), ("N1_s0", "1", "4"), ("N1_s0", "2", "4"), ("N2_s0", "1", "4"),
        ("N2_s0", "2", "4")]
    assert_png(out / "exact_vs_tokens.png")
    assert not (out / "loss_by_k.png").exists()  # rule110: no per-k panels
