"""flash-linear-attention GatedDeltaNetForCausalLM <-> sleeptrain: logits, round trip, errors.

FLA's model runs on the CPU through ``sleeptrain.convert.fla_reference`` (FLA's own
``naive_recurrent_gated_delta_rule`` and plain-PyTorch conv / norm / rotary / attention in
place of its Triton kernels and flash-attn)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("fla")

from sleeptrain.convert import (  # noqa: E402
    ConversionError,
    export_format,
    export_hf,
    import_hf,
    load_run_model,
    verify,
)
from sleeptrain.convert.fla_reference import reference_ops  # noqa: E402

UNFUSED = {"fuse_norm": False, "fuse_swiglu": False, "fuse_cross_entropy": False}


def _fla_model(tmp: Path, name: str, **kw) -> Path:
    """A tiny FLA model with every parameter redrawn (norm gains, A_log and dt_bias too), so
    that no mapping hides behind ones or zeros; saved with save_pretrained."""
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    args = dict(hidden_size=64, head_dim=16, num_heads=2, num_v_heads=4, expand_v=1.5,
                num_hidden_layers=4, vocab_size=97, intermediate_size=96, conv_size=4,
                norm_eps=1e-6, tie_word_embeddings=False, **UNFUSED)
    args.update(kw)
    with reference_ops():
        model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**args))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("A_log"):
                p.uniform_(-1.0, 1.5)
            else:
                p.normal_(0.0, 0.25)
    out = tmp / name
    model.eval().save_pretrained(out)
    return out


def _fla_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from fla.models import GatedDeltaNetForCausalLM

    with reference_ops(), torch.no_grad():
        m = GatedDeltaNetForCausalLM.from_pretrained(str(path), **UNFUSED).eval()
        return m(ids).logits


HYBRID = {"attn": {"layers": [1, 3], "num_heads": 4, "num_kv_heads": 2, "qkv_bias": True,
                   "window_size": None, "rope_theta": 5e5}}


@pytest.mark.parametrize(("name", "kw", "pattern"), [
    ("gdn", {}, "GGGG"),
    ("gdn_tied", {"tie_word_embeddings": True, "num_v_heads": 2, "expand_v": 2.0}, "GGGG"),
    ("hybrid", HYBRID, "GAGA"),
])
def test_imported_fla_model_gives_fla_logits(tmp_path, name, kw, pattern):
    """fp32, one window covering the prompt. Tolerance 1e-4 on logits of magnitude ~10: the
    two sides run the delta rule in different orders (FLA's token-by-token reference vs
    sleeptrain's chunked form) and normalize q/k with different epsilon placement; measured
    max |diff| ~1e-6."""
    hf = _fla_model(tmp_path, name, **kw)
    cfg, _ = import_hf(hf, tmp_path / "run", overrides=["sleep.window_len=64"])
    assert cfg.model.pattern == pattern
    assert cfg.model.gdn_v_heads == kw.get("num_v_heads", 4)
    res = verify(hf, tmp_path / "run", length=40)
    assert res["max_abs_diff"] <= 1e-4 and res["top1_agreement"] == 1.0, res


def test_fla_round_trip_reloads_with_identical_tensors_and_logits(tmp_path):
    hf = _fla_model(tmp_path, "hybrid", **HYBRID)
    import_hf(hf, tmp_path / "run")
    cfg, model = load_run_model(tmp_path / "run")
    assert export_format(cfg) == "fla"
    with pytest.warns(UserWarning, match="never sleeps"):
        out = export_hf(model, cfg, tmp_path / "back")
    from safetensors.torch import load_file

    a, b = load_file(str(hf / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.randint(0, 97, (2, 29), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_fla_logits(hf, ids), _fla_logits(out, ids))


def test_perturbed_fla_tensor_fails_verify(tmp_path):
    hf = _fla_model(tmp_path, "gdn")
    import_hf(hf, tmp_path / "run")
    from safetensors.torch import load_file, save_file

    f = hf / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.2.attn.v_conv1d.weight"][5, 0, 1] += 0.5
    save_file(sd, str(f), metadata={"format": "pt"})
    assert verify(hf, tmp_path / "run", length=24)["max_abs_diff"] > 1e-3


@pytest.mark.parametrize(("key", "val", "match"), [
    ("use_gate", False, "use_gate=false"),
    ("allow_neg_eigval", True, "allow_neg_eigval=true"),
    ("output_gate_activation", "sigmoid", "output_gate_activation 'sigmoid'"),
    ("attn", {"layers": [1], "num_heads": 4, "num_kv_heads": 2, "window_size": 16},
     "attn.window_size=16"),
    ("attn", [{"layers": [1], "num_heads": 4, "num_kv_heads": 2},
              {"layers": [2], "num_heads": 2, "num_kv_heads": 2}], "different"),
])
def test_unsupported_fla_configs_are_refused_by_name(tmp_path, key, val, match):
    hf = _fla_model(tmp_path, "gdn")
    cfg = json.loads((hf / "config.json").read_text())
    cfg[key] = val
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=match):
        import_hf(hf, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_missing_and_unmapped_fla_tensors_are_listed(tmp_path):
    hf = _fla_model(tmp_path, "gdn")
    from safetensors.torch import load_file, save_file

    f = hf / "model.safetensors"
    sd = load_file(str(f))
    del sd["model.layers.1.attn.b_proj.weight"]
    sd["model.layers.0.attn.extra"] = torch.zeros(1)
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing: \['model.layers.1.attn.b_proj.weight'\]"
                                              r".*unmapped: \['model.layers.0.attn.extra'\]"):
        import_hf(hf, tmp_path / "run")


@pytest.mark.gpu
def test_imported_fla_model_on_gpu_matches_fla_kernels(tmp_path):
    """On a GPU both sides run FLA's Triton kernels (FLA's model with its fused norms, gated
    norm and SwiGLU; sleeptrain with model.gdn_backend=fla), fp32 weights: the kernels multiply
    fp32 in TF32, so the tolerance is 2e-2 on logits of magnitude ~10 (prints the measured
    difference); top-1 agreement >= 0.95."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from fla.models import GatedDeltaNetForCausalLM

    import sleeptrain
    from sleeptrain.convert import compare_logits
    from sleeptrain.train.checkpoint import find_latest_checkpoint
    from sleeptrain.train.dist_ckpt import load_model_weights

    hf = _fla_model(tmp_path, "gdn")
    run = tmp_path / "run"
    import_hf(hf, run, overrides=["sleep.window_len=256"])
    cfg = sleeptrain.load_config(run / "config.yaml", ["model.gdn_backend=fla",
                                                       "train.device=cuda"])
    ours = sleeptrain.build_model(cfg, device="cuda")
    load_model_weights(find_latest_checkpoint(run), ours)
    ref = GatedDeltaNetForCausalLM.from_pretrained(  # the fused norms and SwiGLU
        str(hf), fuse_norm=True, fuse_swiglu=True).cuda().eval()
    ids = torch.randint(0, 97, (1, 200), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        a = ours.eval().forward_parallel(ids, 200)[0].float().cpu()
        b = ref(ids).logits[0].float().cpu()
    res = compare_logits(a, b)
    print(f"FLA kernels vs imported sleeptrain on GPU: {res}")
    assert res["max_abs_diff"] <= 2e-2 and res["top1_agreement"] >= 0.95, res


def test_bench_window_peer_is_fla_model_of_the_same_shapes():
    """tools/bench_window.py --peer fla times FLA's own model of the run's shapes (pure GDN
    here: FLA's attention layers need flash-attn): as many parameters as sleeptrain's model,
    and the same layer count, widths and vocabulary."""
    import sleeptrain
    from sleeptrain.plan import param_count
    from tools.bench_window import PRESETS, fla_peer_model

    cfg = sleeptrain.load_config(None, [*PRESETS["tiny"], "model.pattern=GGGG",
                                        "train.device=cpu"])
    peer = fla_peer_model(cfg)
    ours = sleeptrain.build_model(cfg, device="cpu")
    assert sum(p.numel() for p in peer.parameters()) == sum(p.numel() for p in ours.parameters())
    assert peer.config.num_hidden_layers == 4 and peer.config.attn is None
    assert peer.config.hidden_size == 128 and peer.config.vocab_size == 512
    big = sleeptrain.load_config(None, [*PRESETS["gdn367m"], "train.device=cpu"])
    assert param_count(big.model) == 366_956_928
