"""The long-context eval harness: cells, scoring plumbing, resumability, summaries."""

from __future__ import annotations

import csv
import json

import pytest

from sleeptrain.data.tokenizers import ByteTokenizer
from sleeptrain.eval import harness
from sleeptrain.eval.harness import parse_lengths, run_suite
from tests.conftest import tiny_model


def test_parse_lengths():
    assert parse_lengths("4k, 8K,1M,3000") == [4096, 8192, 1 << 20, 3000]
    with pytest.raises(ValueError, match="cannot read '4g'"):
        parse_lengths("4k,4g")


@pytest.fixture
def byte_model():
    return tiny_model("model.vocab_size=258", "sleep.window_len=64", "sleep.passes=2",
                      "model.params_dtype=float32")[1]


def _oracle(monkeypatch, tok, answers):
    """Replaces generation by the reference answer of the prompt it is given."""
    def fake(model, prompts, max_new_tokens, eos_id=None, **options):
        return [tok.encode(answers[tok.decode(p)]) for p in prompts]

    monkeypatch.setattr("sleeptrain.infer.generate", fake)


@pytest.mark.parametrize("suite, task", [("ruler", "niah_single_1"), ("ruler", "vt"),
                                         ("babilong", "qa1"), ("gsm", "ops2")])
def test_a_perfect_answerer_scores_100(tmp_path, monkeypatch, byte_model, suite, task):
    tok = ByteTokenizer()
    gen, _ = harness._generator(suite, task)
    samples = gen(1024, tok, 3, 0)
    prefix = {"gsm": "", "babilong": " ", "ruler": " "}[suite]
    _oracle(monkeypatch, tok, {s.prompt: prefix + ", ".join(s.outputs) for s in samples})
    recs = run_suite(byte_model, tok, suite, [task], [1024], 3, tmp_path, log=lambda m: None)
    assert [r["score"] for r in recs] == [100.0]


def test_real_model_cells_resume_and_summaries(tmp_path, byte_model):
    tok = ByteTokenizer()
    logs: list[str] = []
    recs = run_suite(byte_model, tok, "ruler", ["niah_single_1"], [512, 1024], 2, tmp_path,
                     eos_id=tok.eos_id, log=logs.append)
    assert [(r["task"], r["length"]) for r in recs] == [("niah_single_1", 512),
                                                        ("niah_single_1", 1024)]
    for r in recs:
        assert 0.0 <= r["score"] <= 100.0 and len(r["predictions"]) == 2
        assert all(n <= r["length"] for n in r["prompt_tokens"])
    cell = tmp_path / "cells" / "niah_single_1@1024.json"
    before = cell.read_text()
    logs.clear()
    run_suite(byte_model, tok, "ruler", ["niah_single_1"], [512, 1024], 2, tmp_path,
              eos_id=tok.eos_id, log=logs.append)
    assert all("skipped" in m for m in logs) and cell.read_text() == before
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0] == "| task | 512 | 1k |" and md[2].startswith("| niah_single_1 |")
    rows = list(csv.DictReader((tmp_path / "results.csv").read_text().splitlines()))
    assert len(rows) == 2
    for r, rec in zip(rows, recs, strict=True):  # the throughput beside each score
        assert float(r["samples_per_hour"]) == pytest.approx(3600 * 2 / rec["seconds"], rel=1e-3)
    per_length = md[3].split("|")[2:-1]
    assert md[3].startswith("| samples / hour |") and len(per_length) == 2
    assert float(per_length[1]) == pytest.approx(3600 * 2 / recs[1]["seconds"], abs=1)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "heatmap.png").stat().st_size > 1000
    json.loads(cell.read_text())


def test_unknown_task_is_named_before_any_work(tmp_path, byte_model):
    with pytest.raises(ValueError, match="'niah_single_9' is not a RULER task"):
        run_suite(byte_model, ByteTokenizer(), "ruler", ["vt", "niah_single_9"], [512], 1,
                  tmp_path)
    assert not (tmp_path / "cells").exists() or not any((tmp_path / "cells").iterdir())


def test_two_data_parallel_ranks_give_the_single_process_cells(tmp_path, byte_model):
    # torchrun with 2 gloo processes: each answers half of the samples, rank 0 gathers; the
    # cell equals the one a single process writes.
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    from tests.conftest import TINY

    root = Path(__file__).resolve().parents[1]
    over = [*TINY, "model.vocab_size=258", "sleep.window_len=64", "sleep.passes=2",
            "model.params_dtype=float32"]
    script = tmp_path / "dp_eval.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(root)!r})
        from pathlib import Path
        import sleeptrain
        from sleeptrain.data.tokenizers import ByteTokenizer
        from sleeptrain.eval.harness import run_suite
        cfg = sleeptrain.load_config(None, {over!r})
        model = sleeptrain.build_model(cfg, device="cpu", seed=0)
        tok = ByteTokenizer()
        run_suite(model, tok, "ruler", ["niah_single_1"], [512], 3, Path({str(tmp_path)!r}) /
                  "dp", eos_id=tok.eos_id, log=lambda m: None)
    """))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = ByteTokenizer()
    run_suite(byte_model, tok, "ruler", ["niah_single_1"], [512], 3, tmp_path / "one",
              eos_id=tok.eos_id, log=lambda m: None)
    dp = json.loads((tmp_path / "dp" / "cells" / "niah_single_1@512.json").read_text())
    one = json.loads((tmp_path / "one" / "cells" / "niah_single_1@512.json").read_text())
    assert dp["predictions"] == one["predictions"] and dp["score"] == one["score"]


def test_batched_cell_answers_equal_one_stream_per_sample(tmp_path):
    """The harness answers a cell's samples (prompts of different lengths, several windows
    each) in batches of 2 through the batched engine; every prediction equals greedy decoding
    of that sample alone with the unbatched ``Stream`` (fp64 model: the logits agree to
    float64 rounding, so the argmax tokens are the same)."""
    import torch

    from sleeptrain.infer import Stream

    model = tiny_model("model.vocab_size=258", "sleep.window_len=64", "sleep.passes=2",
                       "sleep.eviction=sliding")[1]
    tok = ByteTokenizer()
    rec = harness.run_cell(model, tok, "ruler", "niah_single_1", 600, 3, 0, tok.eos_id,
                           batch_size=2)
    samples = harness._generator("ruler", "niah_single_1")[0](600, tok, 3, 0)
    assert len({len(tok.encode(s.prompt)) for s in samples}) > 1  # lengths differ
    for s, pred in zip(samples, rec["predictions"], strict=True):
        st = Stream(model, 1)
        with torch.no_grad():
            out = st.generate(s.max_new_tokens, st.feed(torch.tensor([tok.encode(s.prompt)])),
                              tok.eos_id)[0].tolist()
        if tok.eos_id in out:
            out = out[: out.index(tok.eos_id)]
        assert pred == tok.decode(out)
    with pytest.raises(ValueError, match="--batch-size must be >= 1, got 0"):
        run_suite(model, tok, "ruler", ["vt"], [600], 1, tmp_path, batch_size=0)


def test_cli_names_a_bad_batch_size(tmp_path):
    from sleeptrain.cli import main

    with pytest.raises(SystemExit, match="--batch-size must be >= 1, got 0"):
        main(["eval", str(tmp_path), "--suite", "ruler", "--batch-size", "0"])


def test_cli_suite_names_the_weights_dtype_and_takes_another(tmp_path, capsys):
    """``sleeptrain eval --suite`` end to end on a one-step run: the closing line names the
    dtype the suite ran in (the parameters': a suite has no autocast), and
    ``model.params_dtype=bfloat16`` evaluates the fp32 checkpoint in bf16, as
    docs/design.md (Long-context evaluation) advises."""
    from pathlib import Path

    from sleeptrain.cli import main

    run = tmp_path / "run"
    cfg = Path(__file__).resolve().parents[1] / "configs" / "rule110_tiny.yaml"
    assert main(["train", str(cfg), "model.vocab_size=258", "train.steps=1",
                 f"train.run_dir={run}", "data.tokenizer=byte", "train.device=cpu",
                 "data.batch_size=4", "data.eval_batch_size=4", "train.eval_examples=8"]) == 0
    capsys.readouterr()
    for dtype in ("float32", "bfloat16"):
        over = [] if dtype == "float32" else [f"model.params_dtype={dtype}"]
        assert main(["eval", str(run), "--suite", "ruler", "--tasks", "niah_single_1",
                     "--lengths", "2k", "--n", "1", "--out", str(tmp_path / dtype),
                     "sleep.window_len=512", *over]) == 0
        assert f"window 512, weights {dtype}" in capsys.readouterr().out
        assert (tmp_path / dtype / "results.csv").is_file()
