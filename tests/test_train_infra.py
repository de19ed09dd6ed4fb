"""Tests for the training infrastructure: optimizer split, LR schedule, checkpoints, logging."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sleeptrain.train import checkpoint as ck
from sleeptrain.train.logging import MetricsLogger, ProgressBar, deterministic_view, read_metrics
from sleeptrain.train.optim import build_optimizer, is_muon_param
from sleeptrain.train.schedule import apply_lr, lr_multiplier

LOGGING_PY = Path(__file__).resolve().parents[1] / "sleeptrain" / "train" / "logging.py"

# ----------------------------------------------------------------------------- optimizer


class _Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(16, 16, 4, groups=16, padding=3)  # weight is 3-D
        self.A_log = nn.Parameter(torch.zeros(4))
        self.in_proj = nn.Linear(16, 32, bias=False)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.mixer = _Mixer()
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(16, 32)
        self.mlp.fc2 = nn.Linear(32, 16)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(16, 50, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for b in self.blocks:
            h = b.norm(x)
            c = b.mixer.conv1d(h.transpose(1, 2))[..., : h.shape[1]].transpose(1, 2)
            g = b.mixer.in_proj(c)[..., :16] * torch.exp(b.mixer.A_log).mean()
            x = x + g + b.mlp.fc2(torch.relu(b.mlp.fc1(h)))
        return self.head(x)


def _opt_kwargs(**over: object) -> dict:
    kw = dict(
        muon_lr=0.02,
        adamw_lr=1e-3,
        weight_decay=0.1,
        adamw_betas=(0.9, 0.95),
        adamw_eps=1e-8,
        muon_momentum=0.95,
    )
    kw.update(over)
    return kw


def _loss(model: _Tiny, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 50, (2, 12), generator=g)
    return nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten())


def _train(model: _Tiny, opt, seeds) -> None:
    for s in seeds:
        opt.zero_grad(set_to_none=True)
        _loss(model, s).backward()
        opt.step()


def test_is_muon_param_predicate() -> None:
    w2, w1, w3 = torch.zeros(4, 4), torch.zeros(4), torch.zeros(4, 1, 3)
    assert is_muon_param("blocks.0.mlp.fc1.weight", w2)
    assert not is_muon_param("blocks.0.mlp.fc1.bias", w1)
    assert not is_muon_param("blocks.0.mixer.conv1d.weight", w3)
    for name in ("embed.weight", "model.Embedding.weight", "head.weight", "output_layer.weight"):
        assert not is_muon_param(name, w2), name
    assert not is_muon_param("blocks.0.router.weight", w2, exclude=("router",))
    assert is_muon_param("head.weight", w2, exclude=("router",))


def test_param_split_and_weight_decay() -> None:
    model = _Tiny()
    model.blocks[1].mlp.fc2.weight.requires_grad_(False)  # frozen params are still included
    opt = build_optimizer(model.named_parameters(), **_opt_kwargs())
    where = {}
    for g in opt.param_groups:
        assert g["kind"] in ("muon", "adamw")
        assert g["base_lr"] == (0.02 if g["kind"] == "muon" else 1e-3)
        for n in g["param_names"]:
            where[n] = (g["kind"], g["weight_decay"])
    assert set(where) == {n for n, _ in model.named_parameters()}
    assert where["blocks.0.mlp.fc1.weight"] == ("muon", 0.1)
    assert where["blocks.1.mlp.fc2.weight"] == ("muon", 0.1)
    assert where["blocks.0.mixer.in_proj.weight"] == ("muon", 0.1)
    assert where["embed.weight"] == ("adamw", 0.1)
    assert where["head.weight"] == ("adamw", 0.1)
    assert where["blocks.0.mixer.conv1d.weight"] == ("adamw", 0.1)
    for n in (
        "blocks.0.norm.weight",
        "blocks.0.norm.bias",
        "blocks.0.mlp.fc1.bias",
        "blocks.0.mixer.A_log",
        "blocks.0.mixer.conv1d.bias",
    ):
        assert where[n] == ("adamw", 0.0), n
    assert isinstance(opt.muon, torch.optim.Muon) and isinstance(opt.adamw, torch.optim.AdamW)
    summary = opt.param_groups_summary()
    assert summary["muon_decay_tensors"] == 6
    assert summary["total_numel"] == sum(p.numel() for p in model.parameters())

    no_muon = build_optimizer(model.named_parameters(), **_opt_kwargs(use_muon=False))
    assert no_muon.muon is None and {g["kind"] for g in no_muon.param_groups} == {"adamw"}
    only_vec = build_optimizer([("n.weight", nn.Parameter(torch.ones(3)))], **_opt_kwargs())
    assert only_vec.muon is None and len(only_vec.param_groups) == 1
    with pytest.raises(ValueError, match="muon_adjust_lr"):
        build_optimizer(model.named_parameters(), **_opt_kwargs(muon_adjust_lr="bogus"))


def test_step_updates_params_and_skips_frozen() -> None:
    torch.manual_seed(0)
    model = _Tiny()
    frozen = model.blocks[0].mlp.fc1.weight
    frozen.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model.named_parameters(), **_opt_kwargs())
    _train(model, opt, [1])
    for n, p in model.named_parameters():
        if p is frozen:
            assert torch.equal(p, before[n]), n
        else:
            assert not torch.equal(p, before[n]), n
    assert frozen not in opt.muon.state


def test_muon_update_is_orthogonalized() -> None:
    # torch.optim.Muon runs 5 quintic Newton-Schulz steps in bfloat16; per its docs the result is
    # U S' V^T with S' roughly in [0.5, 1.5] rather than exactly 1 (for a rectangular matrix we
    # observe about [0.68, 1.14]). We require all singular values of (update / lr) in [0.5, 1.5]
    # while the gradient's own singular values span a factor of 100.
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(16, 32))
    u, _ = torch.linalg.qr(torch.randn(16, 16))
    v, _ = torch.linalg.qr(torch.randn(32, 16))
    grad = u @ torch.diag(torch.logspace(-1, 1, 16)) @ v.T
    lr = 0.01
    opt = build_optimizer(
        [("blocks.0.fc.weight", w)],
        **_opt_kwargs(muon_lr=lr, weight_decay=0.0, muon_adjust_lr=None),
    )
    before = w.detach().clone()
    w.grad = grad.clone()
    opt.step()
    # adjust_lr_fn=None scales lr by sqrt(max(1, rows/cols)) = 1 here.
    sv = torch.linalg.svdvals((before - w.detach()) / lr)
    assert sv.min() >= 0.5 and sv.max() <= 1.5, sv
    assert torch.linalg.svdvals(grad).max() / torch.linalg.svdvals(grad).min() > 50


def test_optimizer_state_dict_round_trip_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m1 = _Tiny()
    m2 = _Tiny()
    m2.load_state_dict(m1.state_dict())
    o1 = build_optimizer(m1.named_parameters(), **_opt_kwargs())
    _train(m1, o1, [1, 2, 3])
    for g in o1.param_groups:
        g["lr"] = g["base_lr"] * 0.5
    torch.save({"model": m1.state_dict(), "optim": o1.state_dict()}, tmp_path / "s.pt")
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    m2.load_state_dict(saved["model"])
    o2 = build_optimizer(m2.named_parameters(), **_opt_kwargs())
    o2.load_state_dict(saved["optim"])
    assert [g["lr"] for g in o2.param_groups] == [g["lr"] for g in o1.param_groups]
    _train(m1, o1, [4])
    _train(m2, o2, [4])
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_optimizer_load_validates_structure() -> None:
    m1 = _Tiny()
    o1 = build_optimizer(m1.named_parameters(), **_opt_kwargs())
    _train(m1, o1, [1])
    sd = o1.state_dict()

    bigger = _Tiny()
    bigger.extra = nn.Linear(16, 16)
    o2 = build_optimizer(bigger.named_parameters(), **_opt_kwargs())
    with pytest.raises(
        ValueError,
        match=r"muon optimizer group 0: saved state has 6 parameters, this optimizer has 7",
    ):
        o2.load_state_dict(sd)
    o3 = build_optimizer(m1.named_parameters(), **_opt_kwargs(use_muon=False))
    with pytest.raises(ValueError, match="no muon part"):
        o3.load_state_dict(sd)
    with pytest.raises(ValueError, match="keys"):
        o1.load_state_dict({"muon": sd["muon"]})
    renamed = [(n.replace("mlp", "ffn"), p) for n, p in m1.named_parameters()]
    o4 = build_optimizer(renamed, **_opt_kwargs())
    with pytest.raises(ValueError, match="ffn"):
        o4.load_state_dict(sd)


# ----------------------------------------------------------------------------- schedule


def test_schedule_values() -> None:
    kw = dict(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    cos = lambda s: lr_multiplier(s, schedule="cosine", **kw)
    assert cos(0) == pytest.approx(0.1)
    assert cos(4) == pytest.approx(0.5)
    assert cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.55)  # midpoint: 0.1 + 0.9 * 0.5
    assert cos(110) == pytest.approx(0.1)
    assert cos(10_000) == pytest.approx(0.1)
    lin = lambda s: lr_multiplier(s, schedule="linear", **kw)
    assert lin(35) == pytest.approx(0.1 + 0.9 * 0.75)
    assert lin(110) == pytest.approx(0.1)
    assert lr_multiplier(500, schedule="constant", **kw) == 1.0
    assert lr_multiplier(0, warmup_steps=0, total_steps=5, schedule="cosine", min_lr_ratio=0.0) == 1
    assert all(cos(s) >= cos(s + 1) for s in range(10, 120))


@pytest.mark.parametrize(
    ("bad", "arg"),
    [
        (dict(step=-1), "step"),
        (dict(warmup_steps=-2), "warmup_steps"),
        (dict(total_steps=0, warmup_steps=0), "total_steps"),
        (dict(warmup_steps=200), "warmup_steps"),
        (dict(schedule="exp"), "schedule"),
        (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    ],
)
def test_schedule_rejects_bad_args(bad: dict, arg: str) -> None:
    kw = dict(step=0, warmup_steps=10, total_steps=100, schedule="cosine", min_lr_ratio=0.1)
    kw.update(bad)
    with pytest.raises(ValueError, match=arg):
        lr_multiplier(kw.pop("step"), **kw)


def test_apply_lr_sets_lr_from_base_lr() -> None:
    opt = build_optimizer(_Tiny().named_parameters(), **_opt_kwargs())
    apply_lr(opt, 0.25)
    assert {(g["kind"], g["lr"]) for g in opt.param_groups} == {
        ("muon", 0.02 * 0.25),
        ("adamw", 1e-3 * 0.25),
    }
    assert opt.muon.param_groups[0]["lr"] == 0.005
    with pytest.raises(ValueError, match="multiplier"):
        apply_lr(opt, float("nan"))


# ----------------------------------------------------------------------------- checkpoint


def _state(step: int) -> dict:
    return {"step": step, "w": torch.arange(10.0) * step, "nested": {"a": [1, 2.5, "x"]}}


def test_checkpoint_round_trip_latest_and_pruning(tmp_path: Path) -> None:
    assert ck.find_latest_checkpoint(tmp_path) is None
    for step in (10, 20, 30, 40):
        info = ck.save_checkpoint(
            tmp_path, step, _state(step), keep_last=2, extra_files={"config.yaml": "a: 1\n"}
        )
        assert info.path == tmp_path / "checkpoints" / f"step_{step:08d}"
        assert info.bytes > 0 and info.seconds >= 0
    cdir = tmp_path / "checkpoints"
    assert sorted(p.name for p in cdir.iterdir()) == ["latest", "step_00000030", "step_00000040"]
    assert (cdir / "latest").read_text().strip() == "step_00000040"
    meta = json.loads((cdir / "step_00000040" / "meta.json").read_text())
    assert meta["complete"] is True and meta["step"] == 40
    assert meta["format"] == 2 and meta["digests"]["algo"] == "sha256"
    assert set(meta["digests"]["files"]) == set(meta["sizes"]) == {"state.pt", "config.yaml"}
    assert (cdir / "step_00000040" / "config.yaml").read_text() == "a: 1\n"
    latest = ck.find_latest_checkpoint(tmp_path)
    assert latest == cdir / "step_00000040" and ck.checkpoint_step(latest) == 40
    loaded = ck.load_checkpoint(latest)
    assert torch.equal(loaded["w"], _state(40)["w"]) and loaded["nested"] == _state(40)["nested"]
    # Saving the same step again replaces it.
    ck.save_checkpoint(tmp_path, 40, _state(41), keep_last=2)
    assert torch.equal(ck.load_checkpoint(cdir / "step_00000040")["w"], _state(41)["w"])
    assert not [p for p in cdir.iterdir() if p.name.startswith(".tmp-")]


def test_checkpoint_crash_artifacts_never_chosen(tmp_path: Path) -> None:
    cdir = tmp_path / "checkpoints"
    ck.save_checkpoint(tmp_path, 100, _state(100), keep_last=10)
    # A crash while writing step 500: partial temp dir (meta.json written, rename never done).
    ck.save_checkpoint(tmp_path, 500, _state(500), keep_last=10)
    os.rename(cdir / "step_00000500", cdir / ".tmp-step_00000500-999999")
    # Step dir without meta.json.
    (cdir / "step_00000400").mkdir()
    torch.save(_state(400), cdir / "step_00000400" / "state.pt")
    # Step dir whose state.pt was truncated after meta.json recorded its size/hash.
    ck.save_checkpoint(tmp_path, 300, _state(300), keep_last=10)
    f = cdir / "step_00000300" / "state.pt"
    f.write_bytes(f.read_bytes()[:-7])
    # Step dir whose bytes were corrupted without changing the size (caught by sha256 only).
    ck.save_checkpoint(tmp_path, 200, _state(200), keep_last=10)
    g = cdir / "step_00000200" / "state.pt"
    data = bytearray(g.read_bytes())
    data[len(data) // 2] ^= 0xFF
    g.write_bytes(bytes(data))
    # `latest` points at the truncated one.
    (cdir / "latest").write_text("step_00000300\n")

    assert ck.find_latest_checkpoint(tmp_path) == cdir / "step_00000100"
    assert ck.find_latest_checkpoint(tmp_path, verify=False) == cdir / "step_00000200"
    with pytest.raises(ck.CheckpointError, match=r"step_00000300.*state\.pt has"):
        ck.validate_checkpoint(cdir / "step_00000300")
    with pytest.raises(ck.CheckpointError, match=r"step_00000400.*meta\.json is missing"):
        ck.validate_checkpoint(cdir / "step_00000400")
    (cdir / "latest").write_text("garbage")
    assert ck.find_latest_checkpoint(tmp_path) == cdir / "step_00000100"
    (cdir / "latest").unlink()
    assert ck.find_latest_checkpoint(tmp_path) == cdir / "step_00000100"

    live = cdir / f".tmp-step_00000600-{os.getpid()}"
    live.mkdir()
    removed = ck.cleanup_stale_tmp(tmp_path)
    assert removed == [cdir / ".tmp-step_00000500-999999"]
    assert live.exists()
    os.utime(live, (0, 0))  # older than an hour: removed although the pid is alive
    assert ck.cleanup_stale_tmp(tmp_path) == [live]


class _NotAllowed:
    def __init__(self) -> None:
        self.x = 1


def test_load_rejects_disallowed_objects(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"obj": _NotAllowed()}, bad)
    # a .pt file outside a checkpoint directory has no digests: refused unless trusted
    with pytest.raises(ck.UntrustedCheckpointError, match=r"bad\.pt: .*trust=True"):
        ck.load_checkpoint(bad)
    with pytest.raises(ck.CheckpointError, match=r"bad\.pt: cannot load") as ei:
        ck.load_checkpoint(bad, trust=True)
    assert "weights_only" in str(ei.value) or "Unsupported" in str(ei.value)
    with pytest.raises(ck.CheckpointError, match="missing.pt"):
        ck.load_checkpoint(tmp_path / "missing.pt", trust=True)


def _draws() -> tuple:
    return (
        torch.rand(5),
        np.random.rand(5),
        [random.random() for _ in range(5)],
        random.gauss(0, 1),
        np.random.standard_normal(),
    )


def test_rng_capture_restore_reproduces_draws(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    random.gauss(0, 1)  # leaves a cached gauss_next
    np.random.standard_normal()  # leaves a cached numpy gaussian
    ck.save_checkpoint(tmp_path, 1, {"rng": ck.capture_rng_state()}, keep_last=1)
    first = _draws()
    _draws()
    ck.restore_rng_state(ck.load_checkpoint(ck.find_latest_checkpoint(tmp_path))["rng"])
    second = _draws()
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2:] == second[2:]


# ----------------------------------------------------------------------------- logging


def test_metrics_jsonl_and_truncate(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, rank=0) as log:
        for s in range(1, 6):
            log.log(s, {"loss": torch.tensor(1.0 / s), "lr": np.float64(0.5), "z": s})
        with pytest.raises(ValueError, match="step"):
            log.log(6, {"step": 6})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5
    assert lines[1] == json.dumps({"loss": 0.5, "lr": 0.5, "step": 2, "z": 2}, sort_keys=True)
    assert list(json.loads(lines[0])) == ["loss", "lr", "step", "z"]

    # Crash leftovers: a line past the resume point and a half-written line.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"loss": 0.1, "st')
    with MetricsLogger(tmp_path, rank=0) as log:
        assert log.truncate_after(3) == 3
        log.log(4, {"loss": 0.25, "lr": 0.5, "z": 4})
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[3] == {"loss": 0.25, "lr": 0.5, "step": 4, "z": 4}
    assert deterministic_view({"step": 1, "tok_s": 5.0, "time": 1.0}) == {"step": 1}


def test_metrics_nonzero_rank_writes_nothing(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path / "run", rank=1, wandb_cfg={"mode": "online"}) as log:
        log.log(1, {"loss": 1.0})
        assert log.truncate_after(0) == 0
    assert not (tmp_path / "run").exists()


def test_wandb_disabled_does_not_import_wandb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The `sleeptrain` package imports megatron-core, which itself imports wandb, so the module
    # is loaded by file path in a fresh interpreter to see what it imports on its own.
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("st_log", {str(LOGGING_PY)!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        log = mod.MetricsLogger({str(tmp_path)!r}, rank=0, wandb_cfg={{"mode": "disabled"}})
        log.log(1, {{"loss": 1.0}})
        log.close()
        print("wandb" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    # In-process as well: with `import wandb` made to fail, a disabled logger still works.
    monkeypatch.setitem(sys.modules, "wandb", None)
    with MetricsLogger(tmp_path / "b", rank=0, wandb_cfg={"mode": "disabled"}) as log:
        log.log(1, {"loss": 1.0})
    assert read_metrics(tmp_path / "b") == [{"loss": 1.0, "step": 1}]


def test_wandb_missing_gives_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(RuntimeError, match="log.wandb=disabled"):
        MetricsLogger(tmp_path, rank=0, wandb_cfg={"mode": "offline"})


def test_wandb_run_id_persisted_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []

    class _Run:
        def __init__(self, **kw: object) -> None:
            calls.append(kw)
            self.logged: list = []

        def finish(self) -> None:
            pass

    fake = types.ModuleType("wandb")
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    fake.init = lambda **kw: _Run(**kw)
    fake.log = lambda data, step: calls.append({"log": data, "step": step})
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = {"mode": "offline", "project": "p", "name": "n", "config": {"x": 1}}
    with MetricsLogger(tmp_path, rank=0, wandb_cfg=cfg) as log:
        log.log(7, {"loss": 2.0})
    fake.util.generate_id = lambda: "different"
    with MetricsLogger(tmp_path, rank=0, wandb_cfg=cfg):
        pass
    assert (tmp_path / "wandb_run_id.txt").read_text().strip() == "abc123"
    inits = [c for c in calls if "id" in c]
    assert [c["id"] for c in inits] == ["abc123", "abc123"]
    assert all(c["resume"] == "allow" and c["mode"] == "offline" for c in inits)
    assert {"log": {"loss": 2.0}, "step": 7} in calls


def test_progress_bar_plain_lines_when_not_tty() -> None:
    buf = io.StringIO()
    bar = ProgressBar(total=25, initial=5, enabled=True, every=10, stream=buf)
    for s in range(6, 26):
        bar.update(s, loss=2.0, acc=0.5, tok_s=1234.0)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert [ln.split(" | ")[0] for ln in lines] == ["step 10/25", "step 20/25", "step 25/25"]
    assert "loss 2.0000" in lines[0] and "tok/s 1,234" in lines[0] and "eta " in lines[0]
    off = io.StringIO()
    quiet = ProgressBar(total=25, enabled=False, every=1, stream=off)
    quiet.update(1, loss=1.0)
    assert off.getvalue() == ""


def test_progress_bar_uses_tqdm_on_tty() -> None:
    class _Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    buf = _Tty()
    bar = ProgressBar(total=20, initial=5, enabled=True, every=1000, stream=buf)
    assert bar.is_tty
    for s in range(6, 21):
        bar.update(s, loss=1.5, acc=0.25, tok_s=99.0)
    bar.close()
    out = buf.getvalue()
    assert "20/20" in out and "loss=1.5000" in out and "acc=0.250" in out
    assert "step 20/20" not in out  # no plain lines on a TTY
