"""GPU tests of the trainer's speed paths: compiled chains resume exactly in a new process,
the one-call N=1 step follows the window-by-window one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sleeptrain.train.logging import deterministic_view, read_metrics

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
BASE = ["model.d_model=128", "model.pattern=AGAG", "model.n_heads=4", "model.n_kv_heads=2",
        "model.gdn_heads=2", "model.gdn_head_dim=64", "model.vocab_size=16",
        "sleep.window_len=24", "data.task=rule110", "data.batch_size=32", "train.device=cuda",
        "log.every=1", "log.progress=false", "train.eval_every=4", "train.eval_examples=64",
        "train.ckpt_every=4", "optim.warmup_steps=2"]


def _train(run: Path, *extra: str) -> None:
    empty = run.parent / "empty.yaml"
    empty.write_text("{}\n")
    # Kernel caches of this test's own (shared by its runs, written by no other process):
    # FLA's Triton kernels pick their tiling by timing the candidates and cache the choice
    # (FLA_CACHE_RESULTS), and another tiling sums in another order. Run beside four other
    # GPU test processes sharing the default caches, the resume test below differed at step
    # 2 by 1e-4 relative (H200, 2026-12-02; cause not established: a kernel choice written by
    # another process is the likely one). docs/design.md, "Exact resume".
    caches = run.parent / "kernel-caches"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_CACHE_DIR": str(caches / "triton"),
           "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor")}
    proc = subprocess.run([sys.executable, "-m", "sleeptrain.cli", "train", str(empty), *BASE,
                           f"train.run_dir={run}", *extra], capture_output=True, text=True,
                          cwd=ROOT, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_compiled_training_resumes_exactly_in_a_new_process(tmp_path):
    # train.compile=on (static shapes, deterministic inductor) with CUDA graphs and
    # train.deterministic (without it two uninterrupted runs already differ from step 2 on:
    # attention's backward accumulates with atomics; sleeptrain.train.determinism): a run
    # interrupted after 4 steps and resumed by a second process (which compiles its own
    # kernels) logs exactly the metrics of the uninterrupted run. The GDN kernel is the
    # PyTorch one: FLA's Triton kernels are outside torch's deterministic flag (with it, two
    # 8-step runs of this config were identical on an H100, 2026-12-06, compile on and off).
    common = ["train.compile=on", "train.cuda_graphs=on", "sleep.passes=2", "train.steps=8",
              "train.deterministic=true", "model.gdn_backend=chunked"]
    _train(tmp_path / "whole", *common)
    _train(tmp_path / "parts", *common, "--max-steps", "4")
    _train(tmp_path / "parts", *common)
    whole = [deterministic_view(r) for r in read_metrics(tmp_path / "whole")]
    parts = [deterministic_view(r) for r in read_metrics(tmp_path / "parts")]
    assert len([r for r in whole if "loss" in r]) == 8
    assert parts == whole


def test_one_call_n1_step_follows_the_windowed_step(tmp_path):
    # N=1: train.parallel_n1 on (one call per layer) vs off (window by window), graphs and
    # compile on in both. bf16 activations and the GDN kernel's other chunking give
    # differences of bf16 size that the optimizer carries: 2e-2 relative per step over 8
    # steps bounds them (the losses move by far more than that over the run).
    common = ["train.compile=on", "train.cuda_graphs=on", "sleep.passes=1", "train.steps=8",
              "train.eval_every=1000"]
    _train(tmp_path / "one", *common, "train.parallel_n1=on")
    _train(tmp_path / "win", *common, "train.parallel_n1=off")
    one = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    win = [r["loss"] for r in read_metrics(tmp_path / "win") if "loss" in r]
    assert len(one) == len(win) == 8
    assert max(abs(a - b) / abs(b) for a, b in zip(one, win, strict=True)) <= 2e-2
    assert abs(win[0] - win[-1]) / abs(win[0]) > 5e-2
