"""The trainer: exact resume after SIGKILL / SIGTERM, stages, guard, CLI errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sleeptrain.config import load_config
from sleeptrain.train.logging import deterministic_view, read_metrics
from sleeptrain.train.trainer import stage_at, train, trainable_predicate

TINY_RUN = [
    "model.vocab_size=16", "model.d_model=32", "model.pattern=AGAG", "model.n_heads=2",
    "model.gdn_heads=2", "model.gdn_head_dim=16", "model.ffn_hidden=64",
    "sleep.window_len=8", "sleep.passes=2",
    "data.task=rule110", "data.task_args={width: 8, t_min: 1, t_max: 2}",
    "data.batch_size=4", "data.eval_batch_size=16",
    "optim.warmup_steps=2", "train.steps=12", "train.ckpt_every=3", "train.eval_every=6",
    "train.eval_examples=16", "train.device=cpu", "log.every=1", "log.progress=false",
]


def _cfg(run_dir: Path, *extra: str):
    return load_config(None, [*TINY_RUN, f"train.run_dir={run_dir}", *extra])


def _view(run_dir: Path) -> list[dict]:
    return [deterministic_view(r) for r in read_metrics(run_dir)]


def _spawn(run_dir: Path, *extra: str) -> subprocess.Popen:
    empty = run_dir.parent / "empty.yaml"
    empty.write_text("{}\n")
    args = [sys.executable, "-m", "sleeptrain.cli", "train", str(empty),
            *TINY_RUN, f"train.run_dir={run_dir}", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> list[dict]:
    run = tmp_path_factory.mktemp("ref")
    summary = train(_cfg(run))
    assert summary["step"] == 12
    view = _view(run)
    assert [r["step"] for r in view if "loss" in r] == list(range(1, 13))
    return view


def test_resume_after_max_steps_interrupt_is_exact(tmp_path, reference_run, capsys):
    run = tmp_path / "run"
    first = train(_cfg(run), max_steps=5)
    assert first["exit"] == "max_steps" and first["step"] == 5
    assert "first step done " in capsys.readouterr().out
    second = train(_cfg(run))
    assert second["step"] == 12
    assert _view(run) == reference_run
    # The restore is timed like the save: a stdout line and a perf.jsonl record.
    out = capsys.readouterr().out
    assert "resumed from step 5: " in out and str(run / "checkpoints" / "step_00000005") in out
    perf = [json.loads(x) for x in (run / "perf.jsonl").read_text().splitlines()]
    saved = [r for r in perf if "ckpt_s" in r and r["step"] == 5]
    restored = [r for r in perf if "restore_s" in r]
    assert len(restored) == 1 and restored[0]["step"] == 5 and restored[0]["restore_s"] >= 0
    assert restored[0]["restore_bytes"] == saved[-1]["ckpt_bytes"] > 0
    # Each process's start is timed once, at its first step (setup + that step); each
    # evaluation (steps 6 and 12, both in the second process) is timed too.
    starts = [r for r in perf if "start_s" in r]
    assert [r["step"] for r in starts] == [1, 6]
    assert all(r["start_s"] >= r["first_step_s"] > 0 for r in starts)
    assert [r["step"] for r in perf if "eval_s" in r] == [6, 12]


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path, reference_run):
    run = tmp_path / "run"
    proc = _spawn(run)
    _wait_for(run / "checkpoints" / "step_00000006" / "meta.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    train(_cfg(run))
    assert _view(run) == reference_run


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero_then_resumes_exactly(tmp_path, reference_run):
    run = tmp_path / "run"
    proc = _spawn(run)
    _wait_for(run / "checkpoints" / "step_00000003" / "meta.json", proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out
    assert "stopped at step" in out
    stopped_at = int(out.split("stopped at step ")[1].split()[0])
    assert (run / "checkpoints" / f"step_{stopped_at:08d}" / "meta.json").exists()
    train(_cfg(run))
    assert _view(run) == reference_run


def test_prefetched_task_batches_train_exactly_as_made_in_their_step(tmp_path,
                                                                     reference_run,
                                                                     monkeypatch):
    # on CUDA the next step's task batches are made during the step (train.trainer
    # _prefetch_next_step); forced on here, the run's metrics equal the reference run's
    # bit for bit and every step after the first used a prefetched batch
    import sleeptrain.train.trainer as tr

    monkeypatch.setattr(tr, "_prefetch_on", lambda *a: True)
    made, taken = [], []
    orig_next, orig_counts = tr.Trainer._prefetch_next_step, tr.Trainer._host_counts

    def next_step(self):
        orig_next(self)
        made.append(self.prefetched[0] if self.prefetched else None)

    def counts(self, batches):
        taken.append(self.prefetched is not None and self.prefetched[1] is batches)
        return orig_counts(self, batches)

    monkeypatch.setattr(tr.Trainer, "_prefetch_next_step", next_step)
    monkeypatch.setattr(tr.Trainer, "_host_counts", counts)
    run = tmp_path / "run"
    train(_cfg(run))
    assert _view(run) == reference_run
    assert made == [*range(1, 12), None] and taken == [False] + [True] * 11


def test_deterministic_mode_holds_inside_the_run_only():
    # train.deterministic: torch's flag, cuDNN, no flash/cuDNN attention, cuBLAS workspace;
    # all restored afterwards (tests run many trainers in one process)
    import torch

    from sleeptrain.train.determinism import deterministic_algorithms

    cuda = torch.backends.cuda
    before = (torch.are_deterministic_algorithms_enabled(), cuda.flash_sdp_enabled(),
              torch.backends.cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert not cuda.flash_sdp_enabled() and not cuda.cudnn_sdp_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", before[3])
    assert (torch.are_deterministic_algorithms_enabled(), cuda.flash_sdp_enabled(),
            torch.backends.cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG")
            ) == before
    with deterministic_algorithms(False):
        assert torch.are_deterministic_algorithms_enabled() == before[0]


def test_stop_file_triggers_save_and_exit(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "STOP").write_text("")
    summary = train(_cfg(run))
    assert summary["exit"] == "stopped" and summary["step"] == 1
    assert (run / "checkpoints" / "step_00000001").is_dir()


@pytest.mark.parametrize("how", ["signal", "file", "time"])
def test_stop_request_at_a_due_evaluation(tmp_path, capsys, monkeypatch, how):
    # a scheduler's stop (SIGTERM/SIGUSR1, or the STOP file its trap writes) gives a grace
    # period: at a step with an evaluation due the run saves and exits without evaluating,
    # and the next start reports the finished run with its final evaluation (eval.json);
    # train.exit_after_minutes sets no deadline: evaluated, then saved
    run = tmp_path / "run"
    run.mkdir()
    extra = ["train.steps=1"]
    if how == "signal":
        from sleeptrain.train.signals import process_stop_flag

        # what its handler does on SIGTERM (undone after the test, whatever happens)
        monkeypatch.setattr(process_stop_flag(), "signal", signal.SIGTERM)
    elif how == "file":
        (run / "STOP").write_text("")
    else:
        extra.append("train.exit_after_minutes=1e-9")
    summary = train(_cfg(run, *extra))
    assert summary["exit"] == "stopped" and summary["step"] == 1
    assert (run / "checkpoints" / "step_00000001").is_dir()
    evaluated = any("eval_token_acc" in r for r in read_metrics(run))
    skipped = "the evaluation at step 1 skipped" in capsys.readouterr().out
    assert (evaluated, skipped) == ((True, False) if how == "time" else (False, True))
    assert not (run / "eval.json").exists()
    assert train(_cfg(run, "train.steps=1"))["exit"] == "done"
    assert json.loads((run / "eval.json").read_text())["n"] == 16


def test_run_dir_holds_config_metrics_checkpoint_eval(tmp_path, reference_run):
    run = tmp_path / "run"
    train(_cfg(run, "train.steps=6", "train.eval_every=6", "train.profile_steps=[2,3]"))
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
    # the profile of steps 2-3: each step's phases timed, the trace readable
    prof = json.loads((run / "profile" / "summary_rank0.json").read_text())
    assert [s["step"] for s in prof["steps"]] == [2, 3]
    from sleeptrain.train.profiling import PHASES

    for s in prof["steps"]:
        assert set(s["phases_ms"]) == set(PHASES) - {"prefetch"}  # prefetch: CUDA only
        assert sum(s["phases_ms"].values()) <= s["wall_ms"]
        assert s["phases_ms"]["forward_backward"] > 0.5 * s["wall_ms"]
    assert prof["top"] and not any(t["name"].startswith("sleeptrain/") for t in prof["top"])
    assert json.loads((run / "profile" / "trace_rank0.json").read_text())["traceEvents"]
    assert (run / "checkpoints" / "latest").is_file()
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["by_depth"]) == {"1", "2"} and ev["n"] == 16
    assert load_config(run / "config.yaml").sleep.passes == 2
    from sleeptrain.cli import main

    (run / "eval.json").unlink()
    assert main(["eval", str(run), "--n", "8", "sleep.passes=1"]) == 0  # override after option
    one = json.loads((run / "eval.json").read_text())
    assert one["n"] == 8
    # several N in one process (the model loaded once), N=2 first: N=1 then equals the
    # separate evaluation above, so any state the first N left behind would show
    tmpl = str(tmp_path / "e_N{passes}.json")
    for bad, msg in ((["--passes", "1,0"], "each N >= 1"), (["--passes", "2,2"], "none twice"),
                     (["--passes", "1,x"], "comma list"),
                     (["--passes", "1,2", "--out", str(tmp_path / "e.json")], "{passes}"),
                     (["--passes", "2", "sleep.passes=1"], "give one"),
                     (["--suite", "ruler", "--passes", "2"], "--passes is for task evaluation")):
        with pytest.raises(SystemExit, match=re.escape(msg)):
            main(["eval", str(run), "--n", "8", *bad])
    assert main(["eval", str(run), "--n", "8", "--passes", "2,1", "--out", tmpl]) == 0
    multi = {m: json.loads((tmp_path / f"e_N{m}.json").read_text()) for m in (1, 2)}
    assert multi[1] == one and multi[2]["passes"] == 2 and multi[2]["n"] == 8


def test_stages_freeze_parameters(tmp_path):
    cfg = _cfg(tmp_path / "run", "train.steps=4",
               "train.stages=[{name: warmup, steps: 2, trainable: gdn, eviction: hard},"
               " {name: full, steps: 2}]")
    assert stage_at(cfg, 1)[1].name == "warmup" and stage_at(cfg, 2)[1].name == "full"
    pred = trainable_predicate("gdn")
    assert pred("blocks.1.mixer.in_proj.weight") and pred("blocks.1.mixer.A_log")
    assert not pred("blocks.0.mixer.qkv.weight") and not pred("blocks.1.mlp.fc1.weight")
    import torch

    import sleeptrain

    model = sleeptrain.build_model(cfg, device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(cfg, max_steps=2)  # the warm-up stage only
    from sleeptrain.train.checkpoint import find_latest_checkpoint
    from sleeptrain.train.dist_ckpt import load_model

    load_model(find_latest_checkpoint(cfg.train.run_dir), model)
    after = dict(model.named_parameters())
    for n, p in before.items():
        changed = not torch.equal(after[n], p)
        assert changed == pred(n), n


def test_nonfinite_guard_stops(tmp_path):
    from sleeptrain.train.trainer import NonFiniteLossError

    cfg = _cfg(tmp_path / "run", "optim.adamw_lr=1e30", "optim.muon_lr=1e30",
               "optim.grad_clip=0", "train.max_nonfinite=2", "optim.warmup_steps=1")
    with pytest.raises(NonFiniteLossError, match="train.max_nonfinite=2"):
        train(cfg)


def test_misspelled_key_fails_before_any_work(tmp_path):
    run = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, "-m", "sleeptrain.cli", "train", "configs/rule110_tiny.yaml",
         "sleep.pases=4", f"train.run_dir={run}"],
        capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert proc.returncode == 2
    assert "sleep.pases" in proc.stderr and "sleep.passes" in proc.stderr
    assert not run.exists()


def test_data_preview_prints_json_lines():
    proc = subprocess.run(
        [sys.executable, "-m", "sleeptrain.cli", "data", "preview", "depo", "n_min=4",
         "n_max=6", "window_len=16", "--n", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(lines) == 2
    for rec in lines:
        assert {"text", "tokens", "loss_mask", "edges", "queries"} <= set(rec)
        assert len(rec["tokens"]) == len(rec["loss_mask"])
