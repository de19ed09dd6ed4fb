"""Hugging Face Llama / Qwen2 (attention-only) checkpoints -> sleeptrain, with GDN retrofits.

The adapter is a declared mapping from Hugging Face tensor names to sleeptrain's, with the
fusions sleeptrain's TP-size-independent layouts need (docs/design.md, "Tensor-parallel
layouts"):

* ``q_proj``, ``k_proj``, ``v_proj`` (and their biases, Qwen2) -> ``mixer.qkv``: rows grouped
  per key/value head j as ``[q heads j*g .. j*g+g-1, k_j, v_j]`` (g = query heads per kv head,
  Hugging Face's ``repeat_kv`` grouping);
* ``gate_proj``, ``up_proj`` -> ``mlp.fc1`` interleaved per hidden unit ``[g0, u0, g1, ...]``;
* ``o_proj`` -> ``mixer.out``, ``down_proj`` -> ``mlp.fc2``, the norms, the embedding, the head
  (absent when tied).

RoPE is the rotate-half convention with ``rope_theta`` (Llama and Qwen2 share it); configs with
``rope_scaling`` are refused rather than silently changed. Tensors are read one at a time from
the safetensors files (``safe_open``), so memory holds the converted model plus one tensor.

Retrofit (the paper's Ouro recipe): ``insert_gdn=[i, ...]`` inserts a freshly initialized GDN
block before pretrained layer i (``g``: mixer only, ``G``: with its own MLP); its output
projection (and its MLP's down projection) start at zero, so the imported model computes
exactly the pretrained function until training moves them (tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from sleeptrain.convert.common import ConversionError, checked_plan, read_plan

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def model_overrides(hf: dict[str, Any], insert_gdn: list[int] | None = None,
                    gdn_mlp: bool = False, gdn_heads: int | None = None,
                    gdn_head_dim: int | None = None) -> tuple[list[str], list[int]]:
    """sleeptrain ``model.*`` overrides for a Hugging Face config, and, per sleeptrain block,
    the Hugging Face layer it comes from (-1 for an inserted GDN block)."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise ConversionError(f"architecture {arch!r} is not one of {SUPPORTED}")
    theta = rope_theta(hf)
    if hf.get("mlp_bias"):
        raise ConversionError("mlp_bias=true is not supported (the SwiGLU has no biases)")
    if hf.get("use_sliding_window"):
        raise ConversionError("use_sliding_window=true is not supported (Qwen2's sliding-window "
                              "layers have no sleeptrain equivalent)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"hidden_act {act!r} is not supported (SwiGLU uses silu)")
    n = int(hf["num_hidden_layers"])
    d, hq = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    hkv = int(hf.get("num_key_value_heads") or hq)
    hd = int(hf.get("head_dim") or d // hq)
    bias = bool(hf.get("attention_bias", arch == "Qwen2ForCausalLM"))
    inserts = sorted(set(insert_gdn or []))
    bad = [i for i in inserts if not 0 <= i <= n]
    if bad:
        raise ConversionError(f"insert_gdn positions {bad} are outside [0, {n}]")
    pattern, source = [], []
    for layer in range(n + 1):
        if layer in inserts:
            pattern.append("G" if gdn_mlp else "g")
            source.append(-1)
        if layer < n:
            pattern.append("A")
            source.append(layer)
    ov = [f"model.vocab_size={hf['vocab_size']}", f"model.d_model={d}",
          f"model.pattern={''.join(pattern)}", f"model.n_heads={hq}", f"model.n_kv_heads={hkv}",
          f"model.head_dim={hd}", f"model.rope_theta={theta}",
          f"model.qkv_bias={str(bias).lower()}", f"model.ffn_hidden={hf['intermediate_size']}",
          f"model.norm_eps={float(hf.get('rms_norm_eps', 1e-6))}",
          f"model.tie_embeddings={str(bool(hf.get('tie_word_embeddings', False))).lower()}"]
    if inserts:
        gh = gdn_heads or max(1, hkv)
        ov += [f"model.gdn_heads={gh}", f"model.gdn_head_dim={gdn_head_dim or hd}"]
    return ov, source


def rope_theta(hf: dict[str, Any]) -> float:
    """RoPE base of a Hugging Face config: ``rope_parameters`` (transformers >= 5), else the
    top-level ``rope_theta`` (earlier versions), else 10000 (both classes' default). Scaled or
    partial RoPE (``rope_type`` other than default, ``rope_scaling``, partial rotary) is refused:
    sleeptrain applies plain rotate-half RoPE over the whole head."""
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if kind != "default" or (legacy and kind == "default" and legacy.get("factor")):
        raise ConversionError(f"RoPE type {kind!r} ({params or legacy}) is not supported: "
                              "sleeptrain applies plain RoPE with rope_theta")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConversionError(f"partial_rotary_factor {partial} is not supported")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hkv: int) -> torch.Tensor:
    """Fuse per kv-head group: [q of the group's heads, k_j, v_j] for j in kv heads."""
    qs, ks, vs = q.chunk(hkv, 0), k.chunk(hkv, 0), v.chunk(hkv, 0)
    return torch.cat([torch.cat([a, b, c], 0) for a, b, c in zip(qs, ks, vs, strict=True)], 0)


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.stack([gate, up], 1).reshape(-1, gate.shape[-1])


def split_interleaved(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) of an interleaved ``mlp.fc1`` weight: the inverse of :func:`_interleave`."""
    pairs = fc1.reshape(-1, 2, fc1.shape[-1])
    return pairs[:, 0].contiguous(), pairs[:, 1].contiguous()


def _split_qkv(w: torch.Tensor, hq: int, hkv: int, hd: int) -> tuple[torch.Tensor, ...]:
    g = hq // hkv
    groups = w.reshape(hkv, (g + 2) * hd, *w.shape[1:])
    q = groups[:, : g * hd].reshape(hq * hd, *w.shape[1:])
    k = groups[:, g * hd : (g + 1) * hd].reshape(hkv * hd, *w.shape[1:])
    v = groups[:, (g + 1) * hd :].reshape(hkv * hd, *w.shape[1:])
    return q, k, v


def import_plan(names: set[str], hf: dict[str, Any],
                source: list[int]) -> list[tuple[str, list[str], Any]]:
    """(sleeptrain name, Hugging Face names, fuse function) for every converted tensor,
    checked against ``names`` before anything is read: ConversionError lists the Hugging Face
    tensors the mapping needs and does not find, and those it does not use."""
    hq = int(hf["num_attention_heads"])
    hkv = int(hf.get("num_key_value_heads") or hq)

    def one(t: torch.Tensor) -> torch.Tensor:
        return t

    def qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _qkv(q, k, v, hkv)

    plan: list[tuple[str, list[str], Any]] = [
        ("embed.weight", ["model.embed_tokens.weight"], one),
        ("final_norm.weight", ["model.norm.weight"], one),
    ]
    ignored = {n for n in names if n.endswith("rotary_emb.inv_freq")}
    if not hf.get("tie_word_embeddings", False):
        plan.append(("head.weight", ["lm_head.weight"], one))
    elif "lm_head.weight" in names:
        ignored.add("lm_head.weight")  # a saved tied copy: the embedding is used
    for i, layer in enumerate(source):
        if layer < 0:
            continue
        p, b = f"model.layers.{layer}.", f"blocks.{i}."
        plan.append((b + "mixer.qkv.weight", [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
                     qkv))
        if any(p + f"self_attn.{x}_proj.bias" in names for x in "qkv"):
            plan.append((b + "mixer.qkv.bias", [p + f"self_attn.{x}_proj.bias" for x in "qkv"],
                         qkv))
        plan += [
            (b + "mixer.out.weight", [p + "self_attn.o_proj.weight"], one),
            (b + "norm1.weight", [p + "input_layernorm.weight"], one),
            (b + "norm2.weight", [p + "post_attention_layernorm.weight"], one),
            (b + "mlp.fc1.weight", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
             _interleave),
            (b + "mlp.fc2.weight", [p + "mlp.down_proj.weight"], one),
        ]
    return checked_plan(plan, names, ignored, "Hugging Face")


def import_state(read: Any, names: set[str], hf: dict[str, Any],
                 source: list[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """(sleeptrain name, tensor) pairs, reading the Hugging Face tensors ``read(name)`` one
    converted tensor at a time (the plan is checked first, see :func:`import_plan`)."""
    return read_plan(read, import_plan(names, hf, source))


def export_state(state: dict[str, torch.Tensor], hf: dict[str, Any],
                 pattern: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The inverse of :func:`import_state` for attention-only patterns (``A`` blocks)."""
    if set(pattern) != {"A"}:
        raise ConversionError(f"pattern {pattern!r} has blocks a Llama/Qwen2 class cannot hold; "
                              "export with the custom-code model instead")
    hq = int(hf["num_attention_heads"])
    hkv = int(hf.get("num_key_value_heads") or hq)
    hd = int(hf.get("head_dim") or int(hf["hidden_size"]) // hq)
    yield "model.embed_tokens.weight", state["embed.weight"]
    yield "model.norm.weight", state["final_norm.weight"]
    if "head.weight" in state:
        yield "lm_head.weight", state["head.weight"]
    for i in range(len(pattern)):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        for x, t in zip("qkv", _split_qkv(state[b + "mixer.qkv.weight"], hq, hkv, hd),
                        strict=True):
            yield p + f"self_attn.{x}_proj.weight", t.contiguous()
        if b + "mixer.qkv.bias" in state:
            for x, t in zip("qkv", _split_qkv(state[b + "mixer.qkv.bias"], hq, hkv, hd),
                            strict=True):
                yield p + f"self_attn.{x}_proj.bias", t.contiguous()
        yield p + "self_attn.o_proj.weight", state[b + "mixer.out.weight"]
        yield p + "input_layernorm.weight", state[b + "norm1.weight"]
        yield p + "post_attention_layernorm.weight", state[b + "norm2.weight"]
        gate, up = split_interleaved(state[b + "mlp.fc1.weight"])
        yield p + "mlp.gate_proj.weight", gate
        yield p + "mlp.up_proj.weight", up
        yield p + "mlp.down_proj.weight", state[b + "mlp.fc2.weight"]


__all__ = ["SUPPORTED", "export_state", "import_plan", "import_state", "model_overrides",
           "rope_theta"]
