"""Hugging Face Llama / Qwen2 <-> sleeptrain: logits, retrofits, round trip, verify, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sleeptrain.convert import (  # noqa: E402
    ConversionError,
    export_hf,
    import_hf,
    load_run_model,
    verify,
)

ROOT = Path(__file__).resolve().parents[1]


def _hf_model(kind: str, tmp: Path, **kw) -> Path:
    """A tiny randomly initialized model saved with save_pretrained; every parameter
    (biases and norm gains too) is redrawn so that no mapping hides behind zeros or ones."""
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6)
    # a RoPE base other than the 10000 default, so that a lost theta shows in the logits
    theta = 1e6 if kind == "qwen2" else 5e5
    try:  # transformers >= 5 keeps it in rope_parameters
        common["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        transformers.LlamaConfig(**common)
    except TypeError:
        common.pop("rope_parameters")
        common["rope_theta"] = theta
    common.update(kw)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    out = tmp / f"hf_{kind}"
    model.eval().save_pretrained(out)
    return out


@pytest.mark.parametrize(("kind", "kw"), [
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen2", {"tie_word_embeddings": False, "num_key_value_heads": 1}),
    ("llama", {"tie_word_embeddings": False}),
    ("llama", {"tie_word_embeddings": True, "head_dim": 32, "num_key_value_heads": 4}),
])
def test_imported_model_gives_transformers_logits(tmp_path, kind, kw):
    """fp32, one window covering the prompt: |logit diff| <= 1e-5 (measured ~3e-7)."""
    hf = _hf_model(kind, tmp_path, **kw)
    cfg, _ = import_hf(hf, tmp_path / "run", overrides=["sleep.window_len=64"])
    assert cfg.model.pattern == "AAA" and cfg.model.qkv_bias == (kind == "qwen2")
    assert cfg.model.rope_theta == (1e6 if kind == "qwen2" else 5e5)
    res = verify(hf, tmp_path / "run", length=40)
    assert res["max_abs_diff"] <= 1e-5 and res["top1_agreement"] == 1.0


@pytest.mark.parametrize("gdn_mlp", [False, True])
def test_retrofit_with_zero_output_projections_keeps_the_logits(tmp_path, gdn_mlp):
    hf = _hf_model("llama", tmp_path)
    cfg, model = import_hf(hf, tmp_path / "run", insert_gdn=[0, 2, 3], gdn_mlp=gdn_mlp)
    sym = "G" if gdn_mlp else "g"
    assert cfg.model.pattern == f"{sym}AA{sym}A{sym}"
    for i in (0, 3, 5):
        assert model.blocks[i].mixer.out_proj.weight.abs().sum() == 0
        assert model.blocks[i].mixer.in_proj.weight.abs().sum() > 0  # fresh, not zero
    assert verify(hf, tmp_path / "run", length=40)["max_abs_diff"] <= 1e-5


def test_round_trip_reloads_in_transformers_with_identical_logits(tmp_path):
    hf = _hf_model("qwen2", tmp_path, tie_word_embeddings=False)
    import_hf(hf, tmp_path / "run")
    cfg, model = load_run_model(tmp_path / "run")
    out = export_hf(model, cfg, tmp_path / "back")
    a = transformers.AutoModelForCausalLM.from_pretrained(str(hf)).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, 96, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    sa = dict(a.state_dict())
    for k, v in b.state_dict().items():
        assert torch.equal(v, sa[k]), k


def test_converted_run_fine_tunes_and_generates(tmp_path):
    hf = _hf_model("llama", tmp_path)
    run = tmp_path / "run"
    import_hf(hf, run, insert_gdn=[1], overrides=["sleep.window_len=16", "sleep.passes=2"])
    from sleeptrain.config import load_config
    from sleeptrain.train.trainer import train

    ft = tmp_path / "ft"
    cfg = load_config(run / "config.yaml", [
        f"train.init_from={run}", f"train.run_dir={ft}", "train.device=cpu", "train.steps=2",
        "data.source=task", "data.task=rule110", "data.task_args={width: 8, t_min: 1, t_max: 2}",
        "data.batch_size=2", "data.eval_batch_size=4", "train.eval_examples=4",
        "log.progress=false"])
    assert train(cfg)["step"] == 2
    _, model = load_run_model(ft)
    from sleeptrain.infer import generate

    assert len(generate(model, [[1, 2, 3, 4, 5] * 5], max_new_tokens=4)[0]) == 4


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_verify_cli_fails_when_one_tensor_is_perturbed(tmp_path):
    hf = _hf_model("llama", tmp_path)
    assert _tool("import-hf", str(hf), str(tmp_path / "run")).returncode == 0
    ok = _tool("verify", str(hf), str(tmp_path / "run"))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout.strip().splitlines()[-1])["ok"] is True
    from safetensors.torch import load_file, save_file

    f = hf / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] += 0.5
    save_file(sd, str(f), metadata={"format": "pt"})
    bad = _tool("verify", str(hf), str(tmp_path / "run"))
    assert bad.returncode == 1
    assert json.loads(bad.stdout.strip().splitlines()[-1])["ok"] is False


def test_unmapped_and_unsupported_inputs_are_named(tmp_path):
    hf = _hf_model("llama", tmp_path)
    from safetensors.torch import load_file, save_file

    f = hf / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing: \['model.layers.2.mlp.up_proj.weight'\]"
                                              r".*unmapped: \['model.layers.0.self_attn.extra"):
        import_hf(hf, tmp_path / "run")
    cfg = json.loads((hf / "config.json").read_text())
    for key, val in (("rope_parameters", {"rope_type": "llama3", "factor": 8.0,
                                          "rope_theta": 5e5}),
                     ("rope_scaling", {"type": "linear", "factor": 2.0})):
        bad = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling")}
        bad[key] = val
        (hf / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ConversionError, match="RoPE type"):
            import_hf(hf, tmp_path / "run2")
    assert _tool("import-hf", str(tmp_path / "nothing"), str(tmp_path / "r3")).returncode == 2
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.distcp"))


def test_custom_export_verifies_against_streaming_sleep_inference(tmp_path):
    """A retrofitted run (pattern AgAA: a GDN block has no Llama class) exports as custom code
    by default; verify with trust_remote_code compares it with sleeptrain's streaming inference
    over 3.75 windows with two sleep passes per eviction (fp32: 1e-4; measured ~1e-6)."""
    from sleeptrain.convert.common import save_run

    hf = _hf_model("llama", tmp_path)
    cfg, model = import_hf(hf, tmp_path / "run", insert_gdn=[1], overrides=[
        "sleep.window_len=8", "sleep.passes=3", "model.loop_start=0", "model.loop_end=3"])
    with torch.no_grad():  # the retrofit starts at zero: give the GDN block a real output
        model.blocks[1].mixer.out_proj.weight.normal_(0.0, 0.3)
    run = save_run(tmp_path / "run2", cfg, model, {}).parents[1]
    assert _tool("export-hf", str(run), str(tmp_path / "hf_out")).returncode == 0
    assert json.loads((tmp_path / "hf_out" / "config.json").read_text())[
        "model_type"] == "sleeptrain"
    res = verify(tmp_path / "hf_out", run, length=30, trust_remote_code=True)
    assert res["max_abs_diff"] <= 1e-4 and res["top1_agreement"] == 1.0, res
    with pytest.raises(ConversionError, match="trust_remote_code"):
        verify(tmp_path / "hf_out", run, length=30)
    # the one-window comparison would not hold: sleep changes every later window's logits
    with torch.no_grad():
        ids = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(0))
        one = model.forward_parallel(ids, 30, "hard")[0]
        from sleeptrain.infer.engine import Stream

        streamed = Stream(model.eval(), 1).feed(ids, want="all")[0]
    assert (one[8:] - streamed[8:]).abs().max() > 1e-2
