"""What a user sees and what a restart may do: banner, messages, resume rules, STOP files,
wandb offline with the real package, thread defaults, the launcher's exit status, validation
before the run directory is touched, the eval heatmap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sleeptrain.config import ConfigError, load_config
from sleeptrain.train.logging import read_metrics
from sleeptrain.train.trainer import cpu_threads, train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.vocab_size=16", "model.d_model=32", "model.pattern=AGAG", "model.n_heads=2",
    "model.gdn_heads=2", "model.gdn_head_dim=16", "model.ffn_hidden=64",
    "sleep.window_len=8", "sleep.passes=2",
    "data.task=rule110", "data.task_args={width: 8, t_min: 1, t_max: 2}",
    "data.batch_size=4", "data.eval_batch_size=16", "optim.warmup_steps=1",
    "train.steps=4", "train.ckpt_every=2", "train.eval_every=2", "train.eval_examples=16",
    "train.device=cpu", "log.every=1", "log.progress=false",
]


def _cfg(run: Path, *extra: str):
    return load_config(None, [*TINY, f"train.run_dir={run}", *extra])


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sleeptrain.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_banner_step_lines_and_mid_run_eval_are_printed(tmp_path, capsys):
    train(_cfg(tmp_path / "run"), source="my.yaml")
    out = capsys.readouterr().out
    assert f"sleeptrain train: my.yaml -> {tmp_path / 'run'} (fresh start)" in out
    assert "parameters; sleep: window 8, N=2, hard eviction" in out
    assert "device: cpu (float32, 1 CPU thread(s) (auto" in out and "TP1 x DP1" in out
    # log.progress=false: no bar, but a step line at every log.every
    assert "step 1/4 | loss" in out and "step 4/4 | loss" in out
    assert "eval at step 2: exact" in out and "checkpoint step 2:" in out


def test_resume_refuses_shape_changes_and_keeps_the_run(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, "train.steps=2"))
    saved = (run / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match=r"model\.d_model \(32 -> 48\)"):
        train(_cfg(run, "train.steps=2", "model.d_model=48"))
    assert (run / "config.yaml").read_bytes() == saved
    proc = _cli("eval", str(run), "--n", "4")  # still evaluable with its own config
    assert proc.returncode == 0, proc.stderr


def test_resume_prints_what_changed_and_a_finished_run_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(run, "train.steps=2"))
    capsys.readouterr()
    train(_cfg(run, "train.steps=4", "sleep.passes=3"))
    out = capsys.readouterr().out
    assert "changed since the last start: sleep.passes: 2 -> 3" in out
    assert "changed since the last start: train.steps: 2 -> 4" in out
    assert "(resumed from step 2" in out
    summary = train(_cfg(run, "train.steps=4", "sleep.passes=3"))
    out = capsys.readouterr().out
    assert summary["step"] == 4 and summary["exit"] == "done"
    assert "already finished: step 4 of train.steps=4" in out and "eval: exact" in out


def test_stop_file_is_consumed(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "STOP").write_text("")
    assert train(_cfg(run))["exit"] == "stopped"
    assert not (run / "STOP").exists()
    assert "removed" in capsys.readouterr().out
    assert train(_cfg(run))["step"] == 4  # the next start trains on


def test_metrics_are_never_duplicated_after_a_restart_without_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # what a kill before the first checkpoint leaves: metrics lines, no checkpoint
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)))
    train(_cfg(run))
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert all(r["loss"] != 9.0 for r in read_metrics(run) if "loss" in r)
    tokens = [r["tokens"] for r in read_metrics(run) if "loss" in r]
    seq = 4 * 8 + 2 + 2 + 4 - 1  # inputs of a width-8 rule110 row with 4 states
    assert tokens == [s * 4 * seq for s in (1, 2, 3, 4)]  # step x batch x inputs


def test_nonfinite_step_that_ends_the_run_is_logged(tmp_path):
    from sleeptrain.train.trainer import NonFiniteLossError

    run = tmp_path / "run"
    cfg = _cfg(run, "optim.adamw_lr=1e30", "optim.muon_lr=1e30", "optim.grad_clip=0",
               "train.max_nonfinite=2", "log.every=100")
    with pytest.raises(NonFiniteLossError):
        train(cfg)
    recs = [r for r in read_metrics(run) if "loss" in r]
    assert recs[-1]["skipped"] == 1 and recs[-1]["nonfinite_total"] == 2


@pytest.mark.parametrize(("override", "key"), [
    ("log.every=0", "log.every"), ("optim.muon_lr=-1", "optim.muon_lr"),
    ("data.task_args={width: 8, t_mx: 2}", "data.task_args"),
    ("optim.adamw_betas=[0.9,1.5]", "optim.adamw_betas[1]"),
    ("sleep.random_passes=[0,2]", "sleep.random_passes[0]"),
    ("train.eval_examples=0", "train.eval_examples"),
    ("train.profile_steps=[3,2]", "train.profile_steps")])
def test_bad_values_are_refused_by_the_config(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        _cfg(tmp_path / "run", override)


def test_a_failed_start_leaves_the_run_directory_as_it_was(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("old: config\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    proc = _cli("train", str(empty), *TINY, f"train.run_dir={run}", "optim.muon_lr=-1")
    assert proc.returncode == 2, proc.stderr
    assert "optim.muon_lr" in proc.stderr and "Traceback" not in proc.stderr
    assert (run / "config.yaml").read_text() == "old: config\n"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_help_does_not_import_torch():
    code = ("import sys, contextlib, io\n"
            "sys.argv = ['sleeptrain', '--help']\n"
            "from sleeptrain.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['train', '--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'megatron', 'fla') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cpu_threads_default():
    assert cpu_threads(3, 1, 64) == 3
    env = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        assert cpu_threads(0, 1, 64) == 1  # small models: one thread
        assert 1 <= cpu_threads(0, 1, 2048) <= 8
        assert cpu_threads(0, 64, 2048) == 1
        os.environ["OMP_NUM_THREADS"] = "2"
        assert cpu_threads(0, 1, 64) == 2
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        if env is not None:
            os.environ["OMP_NUM_THREADS"] = env


def test_conv_kernels_go_to_adamw_and_muon_takes_linear_weights_only():
    import sleeptrain
    from sleeptrain.model.kernels.linear import matrix_weights
    from sleeptrain.train.optim import optimizer_for

    cfg = load_config(None, [*TINY, "train.run_dir=unused"])
    model = sleeptrain.build_model(cfg, device="cpu")
    opt = optimizer_for(cfg, model)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw_names = {n for g in opt.adamw.param_groups for n in g["param_names"]}
    assert "blocks.1.mixer.conv_weight" in adamw_names
    head_tied = id(model.embed.weight)
    linears = {id(p) for p in matrix_weights(model)} - {head_tied}
    assert muon == linears


def test_wandb_offline_with_the_real_package(tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_DISABLE_CODE": "true",
           "OMP_NUM_THREADS": "1"}
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    args = [sys.executable, "-m", "sleeptrain.cli", "train", str(empty), *TINY,
            "train.steps=2", f"train.run_dir={run}", "log.wandb=offline"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    assert len(run_id) >= 6
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline and any(offline[0].glob("*.wandb"))


@pytest.mark.slow
def test_launcher_turns_sigterm_into_a_clean_stop_with_exit_zero(tmp_path):
    run = tmp_path / "run"
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    args = [sys.executable, "-m", "sleeptrain.launch", "--standalone", "--nproc-per-node=2",
            "-m", "sleeptrain.cli", "train", str(empty), *TINY, "train.steps=400",
            "train.ckpt_every=1000", "train.eval_every=1000", "log.every=50",
            f"train.run_dir={run}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    t0 = time.time()
    while not (run / "metrics.jsonl").is_file() or not read_metrics(run):
        assert proc.poll() is None and time.time() - t0 < 120, proc.stdout.read().decode()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested (signal SIGTERM): saved step" in out
    assert (run / "checkpoints" / "latest").is_file()


def test_every_rank_names_the_signal_that_only_one_rank_has_received(tmp_path):
    # The launcher forwards SIGTERM to the ranks one after the other, so rank 0 can take its
    # stop decision before its own signal arrives: it must still name the signal (CI saw
    # "another rank's stop request" where the log promises the signal).
    script = textwrap.dedent(f"""
        import sys, types, torch, torch.distributed as dist
        from pathlib import Path
        from sleeptrain.train.trainer import Trainer
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=rank,
                                world_size=2)
        me = types.SimpleNamespace(
            stop=types.SimpleNamespace(requested=rank == 1, signal=15 if rank == 1 else None),
            run_dir=Path({str(tmp_path)!r}) / "run{{}}".format(rank), device=torch.device("cpu"),
            cfg=types.SimpleNamespace(train=types.SimpleNamespace(exit_after_minutes=0)))
        me._stop_code = lambda: Trainer._stop_code(me)
        print(Trainer.stop_requested(me))
        me.stop.requested, me.stop.signal = False, None
        print(Trainer.stop_requested(me))
        dist.destroy_process_group()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    assert [o.split("\n")[:2] for o, _ in outs] == [["signal SIGTERM", "None"]] * 2


@pytest.mark.slow
def test_sigterm_during_start_up_is_a_stop_request(tmp_path):
    run = tmp_path / "run"
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    proc = subprocess.Popen([sys.executable, "-m", "sleeptrain.cli", "train", str(empty), *TINY,
                             f"train.run_dir={run}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    time.sleep(0.5)  # the CLI is importing torch and megatron-core now
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested (signal SIGTERM)" in out
    assert (run / "checkpoints" / "step_00000001").is_dir()


def test_heatmap_with_one_length_is_titled_and_readable(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    from sleeptrain.eval.harness import _heatmap

    path = tmp_path / "h.png"
    tasks = ["niah_single_1", "niah_multikey_3", "vt"]
    assert _heatmap(path, tasks, [4096], {(t, 4096): 50.0 for t in tasks},
                    "ruler: run, step 10, N=2, L=64")
    h, w = mpimg.imread(path).shape[:2]
    assert w >= 600 and h >= 360  # 5 x 3 inches at 120 dpi at least


def test_a_stage_n_reaches_training_evaluation_step_window_and_streaming(tmp_path):
    import torch

    from sleeptrain.api import load_run
    from sleeptrain.infer.engine import Stream

    run = tmp_path / "run"
    train(_cfg(run, "sleep.passes=1", "train.steps=2",
               "train.stages=[{name: deep, steps: 2, passes: 3}]"))
    assert [r["passes"] for r in read_metrics(run) if "loss" in r] == [3, 3]
    cfg, model, _ = load_run(run)
    assert cfg.sleep.passes == 3 and model.sleep_cfg.passes == 3  # the stage's N, not 1
    tokens = torch.randint(0, 13, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, by_default = model.step_window(tokens, model.init_state(2))
        _, three = model.step_window(tokens, model.init_state(2), passes=3)
        _, one = model.step_window(tokens, model.init_state(2), passes=1)
    assert all(torch.equal(a, b) for a, b in zip(by_default.fast, three.fast, strict=True)
               if a is not None)
    assert any(not torch.equal(a, b) for a, b in zip(by_default.fast, one.fast, strict=True)
               if a is not None)
    assert Stream(model, 1).passes == 3  # streaming inference's default
    cfg2, model2, _ = load_run(run, ["sleep.passes=2"])  # an explicit N wins
    assert cfg2.sleep.passes == 2 and model2.sleep_cfg.passes == 2
    # the layers' chains compiled as train.compile says (auto: only on CUDA), as in training
    chained = [m for m in model.modules() if hasattr(type(m), "compiled")]
    assert chained and not any(m.compiled for m in chained)
    _, model3, _ = load_run(run, ["train.compile=on"])
    assert all(m.compiled for m in model3.modules() if hasattr(type(m), "compiled"))


def test_a_run_whose_checkpoints_are_all_damaged_stops_with_their_names(tmp_path):
    # subprocess, as a user meets it: before, training silently started again at step 0
    # and appended a second copy of the metrics
    run = tmp_path / "run"
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    proc = _cli("train", str(empty), *TINY, f"train.run_dir={run}")
    assert proc.returncode == 0, proc.stderr
    for state in run.glob("checkpoints/step_*/state.pt"):
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
        state.write_bytes(bytes(data))
    before = (run / "metrics.jsonl").read_text()
    proc = _cli("train", str(empty), *TINY, f"train.run_dir={run}")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "step_00000004" in out and "step_00000002" in out and "Traceback" not in out
    assert (run / "metrics.jsonl").read_text() == before


def test_messages_go_above_a_tty_progress_bar():
    import io

    from sleeptrain.train.logging import ProgressBar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = ProgressBar(10, stream=stream)
    assert bar.is_tty
    bar.update(3, loss=1.0)
    bar.write("checkpoint step 3: saved")
    bar.close()
    text = stream.getvalue()
    assert "checkpoint step 3: saved\n" in text  # a line of its own, not inside the bar
    quiet = ProgressBar(10, stream=Tty(), tty=False)  # log.progress=false on a terminal
    assert not quiet.is_tty
