"""tools/convert.py reshard: TP=1 -> TP=2 (torchrun, 2 gloo processes) -> TP=1, on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sleeptrain.config import load_config
from sleeptrain.convert import ConversionError
from sleeptrain.convert.reshard import reshard
from sleeptrain.train.logging import read_metrics
from sleeptrain.train.trainer import train
from tests.test_parallel import RUN

ROOT = Path(__file__).resolve().parents[1]


def _opt_state(run: Path) -> dict[str, torch.Tensor]:
    """Model and optimizer tensors of a run's latest checkpoint, loaded at TP=1."""
    import sleeptrain
    from sleeptrain.train.checkpoint import find_latest_checkpoint, load_checkpoint
    from sleeptrain.train.optim import optimizer_for
    from sleeptrain.train.trainer import load_train_state

    cfg = load_config(run / "config.yaml", ["parallel.tp=1"])
    model = sleeptrain.build_model(cfg, device="cpu")
    opt = optimizer_for(cfg, model)
    ckpt = find_latest_checkpoint(run)
    load_train_state(ckpt, load_checkpoint(ckpt), model, opt)
    out = {f"model.{k}": v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    names = {id(p): n for n, p in model.named_parameters()}
    for o in (opt.muon, opt.adamw):
        if o is None:
            continue
        for p, st in o.state.items():
            for key, v in st.items():
                if isinstance(v, torch.Tensor):
                    out[f"optim.{names[id(p)]}.{key}"] = v
    return out


def test_reshard_tp1_tp2_tp1_keeps_logits_state_and_training(tmp_path):
    """Float64 model: the TP=2 logits equal the TP=1 ones to 1e-12 (only the reduction order of
    the row-parallel matmuls differs); the round trip returns every model and optimizer tensor
    bit for bit; training on from the round-tripped run repeats the source run's steps 3-4."""
    common = [*RUN, "data.batch_size=4", "train.steps=4"]
    src = tmp_path / "src"
    train(load_config(None, [*common, f"train.run_dir={src}"]), max_steps=2)

    tp2 = tmp_path / "tp2"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "tools/convert.py", "reshard", str(src), str(tp2), "parallel.tp=2",
         "--logits-out", str(tmp_path / "l2.pt")],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["step"] == 2 and res["tp"] == 2 and res["world_size"] == 2
    assert res["optimizer_state"] and res["readback_max_abs_diff"] == 0.0
    step_dir = tp2 / "checkpoints" / "step_00000002"
    assert len(list((step_dir / "shards").glob("*.distcp"))) == 2  # one file per TP rank
    assert yaml.safe_load((tp2 / "config.yaml").read_text())["parallel"]["tp"] == 2

    back = tmp_path / "back"
    res1 = reshard(tp2, back, ["parallel.tp=1"], logits_out=tmp_path / "l1.pt")
    assert res1["tp"] == 1 and res1["step"] == 2
    l1, l2 = torch.load(tmp_path / "l1.pt"), torch.load(tmp_path / "l2.pt")
    assert l1.dtype == torch.float32 and l1.shape == l2.shape
    assert (l1 - l2).abs().max() <= 1e-12 * max(1.0, float(l1.abs().max()))

    a, b = _opt_state(src), _opt_state(back)
    assert sorted(a) == sorted(b) and any(k.startswith("optim.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    train(load_config(src / "config.yaml", [f"train.run_dir={src}"]))
    train(load_config(back / "config.yaml", [f"train.run_dir={back}"]))
    ls = [r["loss"] for r in read_metrics(src) if "loss" in r]
    lb = [r["loss"] for r in read_metrics(back) if "loss" in r]
    assert len(ls) == 4 and len(lb) == 2
    assert lb == pytest.approx(ls[2:], rel=1e-12)


def test_reshard_refuses_to_overwrite(tmp_path):
    src = tmp_path / "src"
    train(load_config(None, [*RUN, "data.batch_size=4", "train.steps=1",
                             f"train.run_dir={src}"]))
    with pytest.raises(ConversionError, match="is the source run"):
        reshard(src, src, ["parallel.tp=1"])
    reshard(src, tmp_path / "out", ["parallel.tp=1"], check=False)
    with pytest.raises(ConversionError, match="already holds checkpoints"):
        reshard(src, tmp_path / "out", ["parallel.tp=1"])
