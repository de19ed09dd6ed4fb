"""The trainer on WebDataset shards: packed documents, exact resume mid-epoch with 2 loader
workers, a finite stream that ends the run, and the held-out shard eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sleeptrain.config import load_config
from sleeptrain.config.validate import ConfigError
from sleeptrain.data.writer import write_shards
from sleeptrain.train.logging import deterministic_view, read_metrics
from sleeptrain.train.trainer import train

RUN = [
    "model.vocab_size=64", "model.d_model=32", "model.pattern=AGAG", "model.n_heads=2",
    "model.gdn_heads=2", "model.gdn_head_dim=16", "model.ffn_hidden=64",
    "sleep.window_len=8", "sleep.passes=2", "sleep.eviction=sliding",
    "data.source=shards", "data.seq_len=32", "data.batch_size=2", "data.eval_batch_size=4",
    "data.workers=2", "data.shuffle_buffer=8",
    "optim.warmup_steps=2", "train.steps=10", "train.ckpt_every=4", "train.eval_every=5",
    "train.eval_examples=8", "train.device=cpu", "log.every=1", "log.progress=false",
]


def _write(path: Path, n_docs: int, per_shard: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):  # counting sequences mod 60: learnable, and documents differ
        n, start = int(rng.integers(3, 40)), int(rng.integers(0, 60))
        docs.append((((start + np.arange(n)) % 60 + 2).astype(np.uint32), None))
    write_shards(docs, path, "shard", {"kind": "test", "vocab_size": 64, "eos_id": None,
                                       "pad_id": 0}, per_shard, 1 << 30, {"kind": "test"},
                 progress=False)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    return _write(root / "train", 120, 15, seed=0), _write(root / "eval", 16, 8, seed=1)


def _cfg(run: Path, data: tuple[Path, Path], *extra: str):
    return load_config(None, [*RUN, f"data.shards=[{data[0]}]", f"data.eval_shards=[{data[1]}]",
                              f"train.run_dir={run}", *extra])


def _view(run: Path) -> list[dict]:
    return [deterministic_view(r) for r in read_metrics(run)]


def test_resume_mid_epoch_with_two_workers_is_exact(tmp_path, data):
    ref = tmp_path / "ref"
    assert train(_cfg(ref, data))["step"] == 10
    ref_view = _view(ref)
    assert [r["step"] for r in ref_view if "loss" in r] == list(range(1, 11))
    assert any("eval_loss" in r for r in ref_view)
    run = tmp_path / "run"
    assert train(_cfg(run, data), max_steps=3)["exit"] == "max_steps"  # mid-epoch, step 3
    assert train(_cfg(run, data))["step"] == 10
    assert _view(run) == ref_view


def test_finite_stream_ends_the_run(tmp_path, data):
    out = train(_cfg(tmp_path / "run", data, "data.epochs=1", "train.steps=1000",
                     "data.workers=0"))
    assert out["exit"] == "data_exhausted"
    assert 5 < out["step"] < 1000


def test_vocab_larger_than_model_is_refused(tmp_path, data):
    with pytest.raises(ConfigError, match="model.vocab_size=32 is smaller than the shards'"):
        train(_cfg(tmp_path / "run", data, "model.vocab_size=32"))


def test_too_few_shards_for_workers(tmp_path, data):
    with pytest.raises(ConfigError, match="9 workers"):
        train(_cfg(tmp_path / "run", data, "data.workers=9"))


def test_generate_cli_on_a_trained_run(tmp_path, data, capsys):
    from sleeptrain.cli import main
    from sleeptrain.infer import generate as engine_generate

    run = tmp_path / "run"
    train(_cfg(run, data, "train.steps=2", "data.workers=0"))
    capsys.readouterr()  # the trainer's own output
    prompt = tmp_path / "p.txt"
    prompt.write_text("5 6 7 8 9 10 11 12 13\n2 3 4\n")
    assert main(["generate", str(run), "--prompt-file", str(prompt), "--lines", "--ids",
                 "--max-new-tokens", "5"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["prompt_tokens"] for r in lines] == [9, 3]
    from sleeptrain.api import load_run

    _, model, _ = load_run(str(run))
    expect = engine_generate(model, [list(range(5, 14)), [2, 3, 4]], 5)
    assert [r["output_ids"] for r in lines] == expect
    prompt.write_text("5 99")
    with pytest.raises(SystemExit, match="token id 99 is outside the model's vocabulary"):
        main(["generate", str(run), "--prompt-file", str(prompt), "--ids"])
    with pytest.raises(SystemExit, match="no data.tokenizer"):
        main(["generate", str(run), "--prompt-file", str(prompt)])
