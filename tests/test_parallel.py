"""Tensor and data parallelism on CPU (torchrun, 2 gloo processes) against one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sleeptrain.config import load_config
from sleeptrain.train.logging import read_metrics
from sleeptrain.train.optim import TensorParallelMuon
from sleeptrain.train.trainer import train
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(*args: str, timeout: int = 300, nproc: int = 2) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("sleep", [
    ["sleep.eviction=sliding", "sleep.passes=2"],
    ["sleep.eviction=hard", "sleep.passes=3", "sleep.grad_mode=truncated",
     "sleep.grad_passes=2"],
    ["sleep.eviction=sliding", "sleep.passes=2", "parallel.sequence_parallel=true",
     "model.tie_embeddings=true"],
    ["sleep.eviction=hard", "sleep.passes=2", "sleep.grad_mode=implicit",
     "parallel.sequence_parallel=true", "sleep.checkpoint=true"],
    ["sleep.eviction=sliding", "sleep.passes=2", "model.tie_embeddings=true",
     "train.grad_accum_fusion=on"],
    ["sleep.eviction=hard", "sleep.passes=2", "sleep.grad_mode=implicit",
     "parallel.sequence_parallel=true", "sleep.checkpoint=true", "train.grad_accum_fusion=on"],
], ids=["sliding-N2", "hard-N3-truncated", "sp-sliding-N2-tied", "sp-hard-implicit-ckpt",
        "fused-linears-sliding-tied", "fused-linears-sp-implicit-ckpt"])
def test_tp2_loss_and_gradients_equal_tp1(tmp_path, sleep):
    """fp64 weights; megatron-core's vocab-parallel cross-entropy computes in fp32, so the loss
    and the gradients agree to fp32 rounding: |diff| <= 1e-6 * (1 + max|g|)."""
    from tests._tp_worker import run

    over = [*TINY, "sleep.window_len=8", "parallel.backend=gloo", *sleep]
    _torchrun("tests/_tp_worker.py", str(tmp_path / "tp2.pt"), "2", json.dumps(over))
    tp2 = torch.load(tmp_path / "tp2.pt")
    tp1 = run(1, over)
    assert tp2["sp"] == ("parallel.sequence_parallel=true" in sleep)
    assert abs(tp1["loss"].item() - tp2["loss"].item()) <= 1e-6
    assert set(tp1["grads"]) == set(tp2["grads"])
    for name, g1 in tp1["grads"].items():
        g2 = tp2["grads"][name]
        assert g1.shape == g2.shape, name
        tol = 1e-6 * (1 + g1.abs().max().item())
        assert (g1 - g2).abs().max().item() <= tol, name


def test_tensor_parallel_muon_is_torch_muon_without_tp():
    torch.manual_seed(0)
    w = [torch.nn.Parameter(torch.randn(12, 7)), torch.nn.Parameter(torch.randn(5, 9))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in w]
    kw = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9, "adjust_lr_fn": "match_rms_adamw"}
    ours, theirs = TensorParallelMuon(w, **kw), torch.optim.Muon(ref, **kw)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in w]
        for p, q, g in zip(w, ref, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(w, ref, strict=True):
        assert torch.equal(p, q)
    assert torch.equal(ours.state[w[0]]["momentum_buffer"], theirs.state[ref[0]]["momentum_buffer"])


RUN = [
    "model.params_dtype=float64", "model.vocab_size=16", "model.d_model=32",
    "model.pattern=AGAG", "model.n_heads=4", "model.n_kv_heads=2", "model.gdn_heads=2",
    "model.gdn_head_dim=16", "model.ffn_hidden=64", "sleep.window_len=8", "sleep.passes=2",
    "data.task=rule110", "data.task_args={width: 8, t_min: 1, t_max: 2}",
    "data.eval_batch_size=16", "optim.warmup_steps=1", "train.steps=4", "train.ckpt_every=4",
    "train.eval_every=100", "train.eval_examples=16", "train.device=cpu", "log.every=1",
    "log.progress=false", "parallel.backend=gloo",
]


def _losses(run_dir: Path) -> list[tuple[float, float]]:
    recs = [r for r in read_metrics(run_dir) if "loss" in r]
    return [(r["loss"], r["grad_norm"]) for r in recs]


_ONE: dict[bool, list[tuple[float, float]]] = {}


def _one_process(tmp_path_factory, muon: bool) -> list[tuple[float, float]]:
    if muon not in _ONE:
        run = tmp_path_factory.mktemp("one")
        train(load_config(None, [*RUN, "data.batch_size=4", f"optim.use_muon={muon}",
                                 f"train.run_dir={run}"]))
        _ONE[muon] = _losses(run)
    return _ONE[muon]


def test_the_cli_destroys_the_process_groups_it_initialized(tmp_path):
    """A gloo group alive at interpreter exit can abort the process in its threads (seen in CI:
    SIGABRT, "terminate called without an active exception", on one of four ranks after the
    run had finished). main() destroys the groups it initialized and leaves those it found."""
    import torch.distributed as dist

    from sleeptrain.cli import main
    from sleeptrain.parallel import destroy_parallel, init_parallel

    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    argv = ["train", str(empty), *RUN, "train.steps=1", "data.batch_size=2"]
    assert main([*argv, f"train.run_dir={tmp_path / 'a'}"]) == 0
    assert dist.is_initialized()  # this session's group, found: left alone
    destroy_parallel()
    try:
        assert main([*argv, f"train.run_dir={tmp_path / 'b'}"]) == 0
        assert not dist.is_initialized()
    finally:
        init_parallel(tp=1, backend="gloo", device="cpu")


def test_a_group_init_parallel_created_is_destroyed_at_exit():
    """Scripts that build models through the API (torchrun workers) do not destroy the group
    themselves: init_parallel registers that at exit. atexit runs the last registered first, so
    a hook registered before init_parallel sees the state after init_parallel's."""
    code = ("import atexit, torch.distributed as dist\n"
            "atexit.register(lambda: print('alive' if dist.is_initialized() else 'destroyed'))\n"
            "from sleeptrain.parallel import init_parallel\n"
            "init_parallel(tp=1, backend='gloo', device='cpu')\n"
            "assert dist.is_initialized()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "destroyed"


SHARDED = "parallel.shard_optimizer=true"


@pytest.mark.parametrize(("layout", "muon", "rtol", "nproc"), [
    (["parallel.tp=2", "data.batch_size=4"], True, 1e-3, 2),
    (["parallel.tp=1", "data.batch_size=2"], True, 1e-3, 2),
    (["parallel.tp=2", "data.batch_size=4"], False, 1e-6, 2),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "data.batch_size=4"], False, 1e-6, 2),
    (["parallel.tp=1", "data.batch_size=2", SHARDED], False, 1e-6, 2),
    (["parallel.tp=2", "data.batch_size=2", SHARDED], True, 1e-3, 4),
], ids=["tp2", "dp2-half-batch", "tp2-adamw-only", "tp2-sp-adamw-only", "dp2-zero1-adamw-only",
        "tp2-dp2-zero1"])
def test_two_process_training_follows_the_one_process_run(tmp_path, tmp_path_factory, layout,
                                                          muon, rtol, nproc):
    """Four optimizer steps with clipping: losses and gradient norms match the one-process run.

    AdamW alone agrees to fp32 rounding (megatron-core's cross-entropy). Muon orthogonalizes
    in bf16 (as torch.optim.Muon), where the TP gather's row order changes the rounding, so
    later steps agree to rtol 1e-3 (measured: 2e-4 on the gradient norm at step 4; a Muon
    that orthogonalized each rank's slice alone misses by 1.3% already at step 2). With the
    optimizer state sharded over DP (ZeRO-1; TP=2 x DP=2 in four processes with Muon) each
    rank updates its share and broadcasts it: the same steps."""
    ref = _one_process(tmp_path_factory, muon)
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    run = tmp_path / "run"
    proc = _torchrun("-m", "sleeptrain.cli", "train", str(empty), *RUN, *layout,
                     f"optim.use_muon={muon}", f"train.run_dir={run}", nproc=nproc,
                     timeout=600)
    if SHARDED in layout:  # rank 0 keeps the state of about half of the elements
        import re

        mine, total = (int(x.replace(",", "")) for x in re.search(
            r"keeps it for ([\d,]+) of ([\d,]+) parameter elements", proc.stdout).groups())
        assert 0.4 < mine / total < 0.6
    got = _losses(run)
    assert len(got) == len(ref) == 4
    for (l2, g2), (l1, g1) in zip(got, ref, strict=True):
        assert l2 == pytest.approx(l1, rel=rtol)
        assert g2 == pytest.approx(g1, rel=rtol)
    assert got[0][0] == pytest.approx(ref[0][0], rel=1e-6)


@pytest.mark.parametrize(("first", "then", "muon", "rtol"), [
    (2, 1, True, 1e-3), (1, 2, True, 1e-3), (2, 1, False, 1e-6)],
    ids=["tp2-then-tp1", "tp1-then-tp2", "tp2-then-tp1-adamw-only"])
def test_checkpoint_reshards_between_tp_sizes(tmp_path, tmp_path_factory, first, then, muon,
                                              rtol):
    """Two steps at one TP size, resume at the other: steps 3-4 follow the uninterrupted
    one-process run (model and optimizer state resharded). With Muon the tolerance is that of
    TP=2 training (bf16 orthogonalization); AdamW alone pins the resharded moments to 1e-6
    (restoring no optimizer state moves the step-3 loss by 1.5e-3)."""
    ref = _one_process(tmp_path_factory, muon)
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    run = tmp_path / "run"
    common = [*RUN, "data.batch_size=4", f"optim.use_muon={muon}", f"train.run_dir={run}"]
    for tp, extra in ((first, ["--max-steps", "2"]), (then, [])):
        if tp == 2:
            _torchrun("-m", "sleeptrain.cli", "train", str(empty), *common, "parallel.tp=2",
                      *extra)
        else:
            train(load_config(None, [*common, "parallel.tp=1"]),
                  max_steps=2 if extra else None)
    shards = sorted(p.name for p in (run / "checkpoints" / "step_00000002" / "shards").iterdir())
    assert ".metadata" in shards
    got = _losses(run)
    assert len(got) == 4
    for (l2, g2), (l1, g1) in zip(got, ref, strict=True):
        assert l2 == pytest.approx(l1, rel=rtol)
        assert g2 == pytest.approx(g1, rel=rtol)


@pytest.mark.parametrize("first_sharded", [True, False], ids=["zero1-then-one", "one-then-zero1"])
def test_sharded_optimizer_state_resumes_at_another_layout(tmp_path, tmp_path_factory,
                                                           first_sharded):
    """Two steps with the optimizer state sharded over DP=2 (each rank saves its share), two
    more in one process (or the reverse: each rank loads only its share): steps 3-4 follow
    the uninterrupted run to 1e-6 (AdamW alone: the moments must come back exactly; without
    them step 3 moves by 1.5e-3)."""
    ref = _one_process(tmp_path_factory, False)
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    run = tmp_path / "run"
    common = [*RUN, "optim.use_muon=false", f"train.run_dir={run}"]
    for sharded, extra in ((first_sharded, ["--max-steps", "2"]), (not first_sharded, [])):
        if sharded:
            _torchrun("-m", "sleeptrain.cli", "train", str(empty), *common, "data.batch_size=2",
                      SHARDED, *extra)
        else:
            train(load_config(None, [*common, "data.batch_size=4"]),
                  max_steps=2 if extra else None)
    got = _losses(run)
    assert len(got) == 4
    for (l2, g2), (l1, g1) in zip(got, ref, strict=True):
        assert l2 == pytest.approx(l1, rel=1e-6)
        assert g2 == pytest.approx(g1, rel=1e-6)
