"""Checkpoint conversion: Hugging Face models in and out, GDN retrofits, verification.

``import_hf`` turns a Hugging Face directory into a sleeptrain run directory (``config.yaml``
+ a step-0 sharded checkpoint): Llama / Qwen2 attention-only models (optionally inserting new
GDN blocks) and flash-linear-attention ``GatedDeltaNetForCausalLM`` models (pure GDN and
hybrids with attention layers). ``export_hf`` writes a sleeptrain model back: as a Llama /
Qwen2 directory (attention-only patterns), an FLA Gated DeltaNet directory (``G``/``A``
patterns), or otherwise (or when asked) a self-contained custom-code model that runs the same
window/sleep inference. ``verify`` runs one prompt through both and reports the largest logit
difference and the top-k agreement. ``tools/convert.py`` is the command line.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from sleeptrain.convert import fla_gdn, hf_llama
from sleeptrain.convert.common import (
    ConversionError,
    SafetensorsReader,
    read_hf_config,
    save_run,
    write_safetensors,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _is_fla(hf: dict[str, Any]) -> bool:
    return (hf.get("architectures") or ["?"])[0] == fla_gdn.ARCH or \
        hf.get("model_type") == "gated_deltanet"


def import_hf(hf_dir: str | Path, out_dir: str | Path, insert_gdn: list[int] | None = None,
              gdn_mlp: bool = False, dtype: str = "float32", overrides: list[str] | None = None,
              seed: int = 0) -> tuple[Any, torch.nn.Module]:
    """Converts ``hf_dir`` into the sleeptrain run directory ``out_dir``; returns
    (config, model). ``overrides`` are extra config keys (``sleep.window_len=2048``,
    ``model.loop_start=4``, ...). Inserted GDN blocks (before the given Hugging Face layers,
    Llama / Qwen2 only) start with zero output projections, so the model's function is the
    pretrained one."""
    import sleeptrain

    if dtype not in _DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    hf = read_hf_config(hf_dir)
    reader = SafetensorsReader(hf_dir)
    if _is_fla(hf):
        if insert_gdn:
            raise ConversionError("insert_gdn applies to attention-only (Llama / Qwen2) "
                                  "models; this one already has GDN layers")
        fla_gdn.check_supported(hf)
        ffn = reader.shape("model.layers.0.mlp.gate_proj.weight")[0]
        ov, source = fla_gdn.model_overrides(hf, ffn)
        adapter: Any = fla_gdn
    else:
        ov, source = hf_llama.model_overrides(hf, insert_gdn, gdn_mlp)
        adapter = hf_llama
    cfg = sleeptrain.load_config(None, [*ov, f"model.params_dtype={dtype}",
                                        f"train.run_dir={out_dir}", *(overrides or [])])
    model = sleeptrain.build_model(cfg, device="cpu", seed=seed)
    ours = model.state_dict()
    filled: set[str] = set()
    for name, t in adapter.import_state(reader, reader.names(), hf, source):
        if name not in ours:
            raise ConversionError(f"converted tensor {name!r} has no place in the model")
        if tuple(ours[name].shape) != tuple(t.shape):
            raise ConversionError(f"{name}: converted shape {tuple(t.shape)}, the model's "
                                  f"{tuple(ours[name].shape)}")
        with torch.no_grad():
            ours[name].copy_(t.to(ours[name].dtype))
        filled.add(name)
    new_blocks = {i for i, s in enumerate(source) if s < 0}
    unfilled = sorted(n for n in ours if n not in filled and not n.endswith("_extra_state")
                      and not (n.startswith("blocks.") and int(n.split(".")[1]) in new_blocks))
    if unfilled:
        raise ConversionError(f"model tensors without a source: {unfilled[:10]}")
    with torch.no_grad():
        for i in new_blocks:
            blk = model.blocks[i]
            blk.mixer.out_proj.weight.zero_()
            if blk.mlp is not None:
                blk.mlp.fc2.weight.zero_()
    save_run(Path(out_dir), cfg, model, {"from": str(hf_dir), "insert_gdn": insert_gdn or [],
                                          "gdn_mlp": gdn_mlp})
    return cfg, model


def hf_config_for(cfg: DictConfig) -> dict[str, Any]:
    """A Llama (no qkv bias) or Qwen2 (qkv bias) config.json for an attention-only model."""
    m = cfg.model
    if set(m.pattern) != {"A"}:
        raise ConversionError(f"model.pattern {m.pattern!r} is not attention-only")
    from sleeptrain.config import ffn_hidden

    arch = "Qwen2ForCausalLM" if m.qkv_bias else "LlamaForCausalLM"
    out = {"architectures": [arch], "model_type": "qwen2" if m.qkv_bias else "llama",
           "vocab_size": m.vocab_size, "hidden_size": m.d_model,
           "num_hidden_layers": len(m.pattern), "num_attention_heads": m.n_heads,
           "num_key_value_heads": m.n_kv_heads or m.n_heads,
           "head_dim": m.head_dim or m.d_model // m.n_heads,
           "intermediate_size": ffn_hidden(m), "rms_norm_eps": m.norm_eps,
           "rope_theta": m.rope_theta,
           "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
           "tie_word_embeddings": bool(m.tie_embeddings),
           "hidden_act": "silu", "max_position_embeddings": 1 << 20,
           "torch_dtype": "float32"}
    if not m.qkv_bias:
        out["attention_bias"] = False
    return out


def export_format(cfg: DictConfig) -> str:
    """The Hugging Face form a model exports to by default: ``llama`` (attention-only),
    ``fla`` (G and A blocks: FLA's GatedDeltaNetForCausalLM) or ``custom`` (anything else:
    the custom-code model)."""
    pat = set(cfg.model.pattern)
    if pat == {"A"}:
        return "llama"
    if pat <= {"G", "A"} and "G" in pat:
        m = cfg.model
        if "A" not in pat or (m.head_dim or m.d_model // m.n_heads) * m.n_heads == m.d_model:
            return "fla"
    return "custom"


def export_hf(model: torch.nn.Module, cfg: DictConfig, out_dir: str | Path,
              form: str | None = None) -> Path:
    """Writes a sleeptrain model as a Hugging Face directory. ``form``: ``llama`` (Llama /
    Qwen2 class, attention-only), ``fla`` (FLA GatedDeltaNetForCausalLM), ``custom``
    (self-contained ``modeling_sleeptrain.py``, loaded with trust_remote_code, running
    sleeptrain's window/sleep inference); default :func:`export_format`. The first two run
    one pass over the whole context (no eviction, no sleep): they agree with sleeptrain on
    prompts of at most one window, and a warning says so."""
    form = form or export_format(cfg)
    if form not in ("llama", "fla", "custom"):
        raise ConversionError(f"export form must be llama, fla or custom, got {form!r}")
    out = Path(out_dir)
    if form == "custom":
        from sleeptrain.convert.hf_custom import export_custom

        return export_custom(model, cfg, out)
    hf = hf_config_for(cfg) if form == "llama" else fla_gdn.config_for(cfg)
    adapter: Any = hf_llama if form == "llama" else fla_gdn
    out.mkdir(parents=True, exist_ok=True)
    warnings.warn(
        f"the exported model attends over its whole context and never sleeps; the sleeptrain "
        f"model evicts every {cfg.sleep.window_len} tokens ({cfg.sleep.eviction} eviction) and "
        f"sleeps {cfg.sleep.passes - 1} pass(es), so the two agree on prompts of at most "
        f"{cfg.sleep.window_len} tokens (export with form='custom' for sleep inference)",
        stacklevel=2)
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    write_safetensors(out / "model.safetensors",
                      adapter.export_state(state, hf, cfg.model.pattern))
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    return out


def load_run_model(run_dir: str | Path, *, trust: bool = False) -> tuple[Any, torch.nn.Module]:
    """(config, model) of a sleeptrain run directory's newest intact checkpoint, on the CPU
    (verified against its digests; one without digests needs ``trust``)."""
    from sleeptrain.api import load_run

    cfg, model, _ = load_run(run_dir, ["train.device=cpu"], device="cpu", trust=trust)
    return cfg, model


@torch.no_grad()
def compare_logits(a: torch.Tensor, b: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Largest absolute difference, top-1 agreement and mean top-k overlap of two [T, V]."""
    ta, tb = a.topk(k, -1).indices, b.topk(k, -1).indices
    overlap = torch.tensor([len(set(x.tolist()) & set(y.tolist())) / k
                            for x, y in zip(ta, tb, strict=True)])
    return {"max_abs_diff": float((a.double() - b.double()).abs().max()),
            "top1_agreement": float((ta[:, 0] == tb[:, 0]).double().mean()),
            f"top{k}_overlap": float(overlap.mean())}


@torch.no_grad()
def verify(hf_dir: str | Path, run_dir: str | Path, tokens: list[int] | None = None,
           length: int = 32, seed: int = 0, trust_remote_code: bool = False,
           k: int = 5, *, trust_checkpoint: bool = False) -> dict[str, float]:
    """Logits of one prompt (``tokens``, or ``length`` seeded random ids) through the Hugging
    Face model and through the sleeptrain run, with one window covering the prompt; a
    custom-code export (which streams with sleep) is compared with sleeptrain's streaming
    inference over the run's windows instead. ``trust_checkpoint``: accept a run checkpoint
    without digests (see ``load_run_model``)."""
    cfg, model = load_run_model(run_dir, trust=trust_checkpoint)
    if tokens is None:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, cfg.model.vocab_size, (length,), generator=gen).tolist()
    ids = torch.tensor([tokens])
    hf = read_hf_config(hf_dir)
    custom = hf.get("model_type") == "sleeptrain"
    if custom and not trust_remote_code:
        raise ConversionError(f"{hf_dir} is a custom-code (modeling_sleeptrain.py) model: "
                              "running it needs trust_remote_code (--trust-remote-code)")
    with _hf_runtime(hf) as load_kw:
        hf_model = _load_hf(hf_dir, model.dtype, trust_remote_code, load_kw)
        ref = hf_model(ids).logits[0]
    if custom:  # it streams with sleep: compare with sleeptrain's streaming inference
        from sleeptrain.infer.engine import Stream

        ours = Stream(model, 1).feed(ids, want="all")[0]
    else:
        ours = model.forward_parallel(ids, ids.shape[1], "hard")[0]
    return compare_logits(ours, ref, k)


def _load_hf(hf_dir: str | Path, dtype: torch.dtype, trust_remote_code: bool,
             load_kw: dict[str, Any]) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=dtype, trust_remote_code=trust_remote_code, **load_kw).eval()


@contextlib.contextmanager
def _hf_runtime(hf: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """What loading and running a Hugging Face model needs: FLA models register their classes
    on ``import fla`` and, without a GPU, run on FLA's reference operators with the unfused
    norms and MLP (``sleeptrain.convert.fla_reference``)."""
    if not _is_fla(hf):
        yield {}
        return
    try:
        import fla  # noqa: F401  (registers the gated_deltanet auto classes)
    except ImportError as e:
        raise ConversionError(f"flash-linear-attention is needed to load this model: {e}") from e
    if torch.cuda.is_available():
        yield {}
        return
    from sleeptrain.convert.fla_reference import reference_ops

    with reference_ops():
        yield {"fuse_norm": False, "fuse_swiglu": False, "fuse_cross_entropy": False}


__all__ = ["ConversionError", "compare_logits", "export_format", "export_hf", "hf_config_for",
           "import_hf", "load_run_model", "verify"]
