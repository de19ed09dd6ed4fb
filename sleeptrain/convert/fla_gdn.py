"""flash-linear-attention ``GatedDeltaNetForCausalLM`` checkpoints <-> sleeptrain.

FLA's Gated DeltaNet models (``model_type: gated_deltanet``) stack pre-norm blocks, each a
mixer and a SwiGLU MLP: the mixer is a Gated DeltaNet layer, or softmax attention for the
layers listed in ``config.attn["layers"]`` (the hybrids). They map to sleeptrain ``G`` and
``A`` blocks. The adapter is a declared mapping of names and shapes; the fusions follow
sleeptrain's TP-size-independent layouts (docs/design.md, "Tensor-parallel layouts"):

* GDN ``q_proj, k_proj, v_proj, g_proj, b_proj, a_proj`` -> ``mixer.in_proj``, rows grouped per
  query/key head h (r = value heads per query/key head, FLA's grouped value heads: value head
  i reads query/key head i // r): ``[q_h, k_h, v of heads h*r..h*r+r-1, the same heads' output
  gate, b, a]``;
* GDN ``q_conv1d, k_conv1d, v_conv1d`` ([C, 1, K] each) -> ``mixer.conv_weight`` [C, K] grouped
  per query/key head the same way ``[q_h, k_h, v of the group]``;
* ``A_log``, ``dt_bias``, ``o_norm.weight`` (-> ``out_norm_weight``), ``o_proj`` (-> ``out_proj``);
* attention ``q_proj, k_proj, v_proj`` (+ biases) -> ``mixer.qkv`` grouped per key/value head,
  ``o_proj`` -> ``mixer.out``; MLP ``gate_proj, up_proj`` -> ``mlp.fc1`` interleaved,
  ``down_proj`` -> ``mlp.fc2``; ``attn_norm`` / ``mlp_norm`` -> ``norm1`` / ``norm2``.

What sleeptrain does not compute is refused by name rather than approximated: no output gate
(``use_gate: false``), no short convolution, negative eigenvalues (``allow_neg_eigval``), a
sigmoid output gate, attention residuals, sliding-window or qk-normed attention layers, and
attention layers with different head layouts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig

from sleeptrain.convert.common import ConversionError, checked_plan, read_plan
from sleeptrain.convert.hf_llama import _interleave, _qkv, _split_qkv, split_interleaved

ARCH = "GatedDeltaNetForCausalLM"


def _attn_spec(hf: dict[str, Any]) -> tuple[set[int], dict[str, Any] | None]:
    """The attention layers of a hybrid and their (single) head layout."""
    attn = hf.get("attn")
    if not attn:
        return set(), None
    specs = [attn] if isinstance(attn, dict) else list(attn)
    layers: set[int] = set()
    keys = ("num_heads", "num_kv_heads", "qkv_bias", "rope_theta")
    first = specs[0]
    for s in specs:
        if s.get("window_size") is not None:
            raise ConversionError(f"attn.window_size={s['window_size']}: sliding-window "
                                  "attention layers are not supported")
        if s.get("qk_norm"):
            raise ConversionError("attn.qk_norm=true is not supported")
        diff = [k for k in keys if s.get(k) != first.get(k)]
        if diff:
            raise ConversionError(f"attention layers with different {diff} are not supported "
                                  "(sleeptrain has one attention layout)")
        layers |= {int(i) for i in s["layers"]}
    return layers, first


def _dims(hf: dict[str, Any]) -> dict[str, int]:
    d = int(hf["hidden_size"])
    h = int(hf["num_heads"])
    hv = int(hf.get("num_v_heads") or h)
    dk = int(hf["head_dim"])
    dv = dk * float(hf.get("expand_v", 2.0))
    if dv != int(dv):
        raise ConversionError(f"head_dim {dk} x expand_v {hf.get('expand_v')} is not an integer")
    return {"d": d, "h": h, "hv": hv, "r": hv // h, "dk": dk, "dv": int(dv)}


def check_supported(hf: dict[str, Any]) -> None:
    arch = (hf.get("architectures") or ["?"])[0]
    if arch != ARCH:
        raise ConversionError(f"architecture {arch!r} is not {ARCH!r}")
    refuse = {"use_gate": (False, "GDN layers without the output gate"),
              "use_short_conv": (False, "GDN layers without the short convolution"),
              "allow_neg_eigval": (True, "negative eigenvalues (beta in [0, 2])")}
    for key, (bad, what) in refuse.items():
        if hf.get(key) == bad:
            raise ConversionError(f"{key}={str(bad).lower()}: {what} is not supported")
    if hf.get("output_gate_activation", "swish") not in ("swish", "silu"):
        raise ConversionError(f"output_gate_activation {hf['output_gate_activation']!r} is not "
                              "supported (sleeptrain gates with silu)")
    if hf.get("hidden_act", "swish") != "swish":
        raise ConversionError(f"hidden_act {hf['hidden_act']!r} is not supported (SwiGLU)")
    if hf.get("attnres_block_size") is not None:
        raise ConversionError("attnres_block_size is set: attention residuals are not supported")


def model_overrides(hf: dict[str, Any], ffn_hidden: int) -> tuple[list[str], list[int]]:
    """sleeptrain ``model.*`` overrides, and per sleeptrain block the FLA layer it comes from."""
    check_supported(hf)
    n = int(hf["num_hidden_layers"])
    dm = _dims(hf)
    attn_layers, spec = _attn_spec(hf)
    bad = sorted(i for i in attn_layers if not 0 <= i < n)
    if bad:
        raise ConversionError(f"attn.layers {bad} are outside [0, {n})")
    pattern = "".join("A" if i in attn_layers else "G" for i in range(n))
    ov = [f"model.vocab_size={hf['vocab_size']}", f"model.d_model={dm['d']}",
          f"model.pattern={pattern}", f"model.gdn_heads={dm['h']}",
          f"model.gdn_v_heads={dm['hv']}", f"model.gdn_head_dim={dm['dk']}",
          f"model.gdn_v_head_dim={dm['dv']}", f"model.conv_kernel={int(hf.get('conv_size', 4))}",
          f"model.ffn_hidden={ffn_hidden}", f"model.norm_eps={float(hf.get('norm_eps', 1e-6))}",
          f"model.tie_embeddings={str(bool(hf.get('tie_word_embeddings', False))).lower()}"]
    if spec is not None:
        hq = int(spec["num_heads"])
        hkv = int(spec.get("num_kv_heads") or hq)
        if dm["d"] % hq:
            raise ConversionError(f"hidden_size {dm['d']} is not divisible by attn.num_heads {hq}")
        ov += [f"model.n_heads={hq}", f"model.n_kv_heads={hkv}",
               f"model.head_dim={dm['d'] // hq}",
               f"model.rope_theta={float(spec.get('rope_theta') or 10000.0)}",
               f"model.qkv_bias={str(bool(spec.get('qkv_bias', False))).lower()}"]
    return ov, list(range(n))


def _gdn_in_proj(dm: dict[str, int]):
    h, r, dk, dv = dm["h"], dm["r"], dm["dk"], dm["dv"]

    def fuse(q, k, v, z, b, a):
        parts = [q.reshape(h, dk, -1), k.reshape(h, dk, -1), v.reshape(h, r * dv, -1),
                 z.reshape(h, r * dv, -1), b.reshape(h, r, -1), a.reshape(h, r, -1)]
        return torch.cat(parts, 1).reshape(-1, q.shape[-1])

    return fuse


def _gdn_conv(dm: dict[str, int]):
    h, r, dk, dv = dm["h"], dm["r"], dm["dk"], dm["dv"]

    def fuse(q, k, v):
        k_size = q.shape[-1]
        parts = [q.reshape(h, dk, k_size), k.reshape(h, dk, k_size),
                 v.reshape(h, r * dv, k_size)]
        return torch.cat(parts, 1).reshape(-1, k_size)

    return fuse


def import_plan(names: set[str], hf: dict[str, Any],
                source: list[int]) -> list[tuple[str, list[str], Any]]:
    """(sleeptrain name, FLA names, fuse function) for every converted tensor, checked
    against ``names`` before anything is read (missing and unmapped tensors are listed)."""
    dm = _dims(hf)
    attn_layers, spec = _attn_spec(hf)
    hkv = int(spec.get("num_kv_heads") or spec["num_heads"]) if spec else 1

    def one(t: torch.Tensor) -> torch.Tensor:
        return t

    def qkv(q, k, v):
        return _qkv(q, k, v, hkv)

    plan: list[tuple[str, list[str], Any]] = [
        ("embed.weight", ["model.embeddings.weight"], one),
        ("final_norm.weight", ["model.norm.weight"], one),
    ]
    ignored: set[str] = set()
    if not hf.get("tie_word_embeddings", False):
        plan.append(("head.weight", ["lm_head.weight"], one))
    elif "lm_head.weight" in names:
        ignored.add("lm_head.weight")
    for i, layer in enumerate(source):
        p, b = f"model.layers.{layer}.", f"blocks.{i}."
        a = p + "attn."
        if layer in attn_layers:
            plan.append((b + "mixer.qkv.weight", [a + f"{x}_proj.weight" for x in "qkv"], qkv))
            if spec and spec.get("qkv_bias"):
                plan.append((b + "mixer.qkv.bias", [a + f"{x}_proj.bias" for x in "qkv"], qkv))
            plan.append((b + "mixer.out.weight", [a + "o_proj.weight"], one))
        else:
            plan += [
                (b + "mixer.in_proj.weight", [a + f"{x}_proj.weight" for x in "qkvgba"],
                 _gdn_in_proj(dm)),
                (b + "mixer.conv_weight", [a + f"{x}_conv1d.weight" for x in "qkv"],
                 _gdn_conv(dm)),
                (b + "mixer.A_log", [a + "A_log"], one),
                (b + "mixer.dt_bias", [a + "dt_bias"], one),
                (b + "mixer.out_norm_weight", [a + "o_norm.weight"], one),
                (b + "mixer.out_proj.weight", [a + "o_proj.weight"], one),
            ]
        plan += [
            (b + "norm1.weight", [p + "attn_norm.weight"], one),
            (b + "norm2.weight", [p + "mlp_norm.weight"], one),
            (b + "mlp.fc1.weight", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
             _interleave),
            (b + "mlp.fc2.weight", [p + "mlp.down_proj.weight"], one),
        ]
    return checked_plan(plan, names, ignored, "FLA")


def import_state(read: Any, names: set[str], hf: dict[str, Any],
                 source: list[int]) -> Iterator[tuple[str, torch.Tensor]]:
    return read_plan(read, import_plan(names, hf, source))


def config_for(cfg: DictConfig) -> dict[str, Any]:
    """An FLA ``gated_deltanet`` config.json for a sleeptrain model of ``G`` and ``A`` blocks."""
    from sleeptrain.config import ffn_hidden

    m = cfg.model
    if not set(m.pattern) <= {"G", "A"} or "G" not in m.pattern:
        raise ConversionError(f"model.pattern {m.pattern!r}: an FLA GatedDeltaNet model holds "
                              "G and A blocks (every block with an MLP) and at least one G")
    dk = int(m.gdn_head_dim)
    dv = int(m.gdn_v_head_dim or dk)
    out: dict[str, Any] = {
        "architectures": [ARCH], "model_type": "gated_deltanet",
        "vocab_size": m.vocab_size, "hidden_size": m.d_model,
        "num_hidden_layers": len(m.pattern), "num_heads": m.gdn_heads,
        "num_v_heads": m.gdn_v_heads or m.gdn_heads, "head_dim": dk, "expand_v": dv / dk,
        "conv_size": m.conv_kernel, "use_gate": True, "use_short_conv": True,
        "allow_neg_eigval": False, "output_gate_activation": "swish",
        "intermediate_size": ffn_hidden(m), "hidden_ratio": None, "hidden_act": "swish",
        "norm_eps": m.norm_eps, "tie_word_embeddings": bool(m.tie_embeddings),
        "max_position_embeddings": 1 << 20, "torch_dtype": "float32", "attn": None}
    attn = [i for i, s in enumerate(m.pattern) if s == "A"]
    if attn:
        hd = m.head_dim or m.d_model // m.n_heads
        if hd * m.n_heads != m.d_model:
            raise ConversionError(f"attention head_dim {hd} x n_heads {m.n_heads} != d_model "
                                  f"{m.d_model}: FLA's attention layers need head_dim = "
                                  "d_model / n_heads")
        out["attn"] = {"layers": attn, "num_heads": m.n_heads,
                       "num_kv_heads": m.n_kv_heads or m.n_heads, "qkv_bias": bool(m.qkv_bias),
                       "window_size": None, "rope_theta": m.rope_theta}
    return out


def export_state(state: dict[str, torch.Tensor], hf: dict[str, Any],
                 pattern: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The inverse of :func:`import_state`."""
    dm = _dims(hf)
    h, r, dk, dv = dm["h"], dm["r"], dm["dk"], dm["dv"]
    yield "model.embeddings.weight", state["embed.weight"]
    yield "model.norm.weight", state["final_norm.weight"]
    if "head.weight" in state:
        yield "lm_head.weight", state["head.weight"]
    attn = hf.get("attn") or {}
    hq = int(attn.get("num_heads", 1))
    hkv = int(attn.get("num_kv_heads") or hq)
    for i, sym in enumerate(pattern):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        a = p + "attn."
        if sym == "A":
            hd = dm["d"] // hq
            for x, t in zip("qkv", _split_qkv(state[b + "mixer.qkv.weight"], hq, hkv, hd),
                            strict=True):
                yield a + f"{x}_proj.weight", t.contiguous()
            if b + "mixer.qkv.bias" in state:
                for x, t in zip("qkv", _split_qkv(state[b + "mixer.qkv.bias"], hq, hkv, hd),
                                strict=True):
                    yield a + f"{x}_proj.bias", t.contiguous()
            yield a + "o_proj.weight", state[b + "mixer.out.weight"]
        else:
            w = state[b + "mixer.in_proj.weight"]
            groups = w.reshape(h, -1, w.shape[-1])
            sizes = [dk, dk, r * dv, r * dv, r, r]
            for x, t in zip("qkvgba", groups.split(sizes, 1), strict=True):
                yield a + f"{x}_proj.weight", t.reshape(-1, w.shape[-1]).contiguous()
            c = state[b + "mixer.conv_weight"]
            cg = c.reshape(h, -1, c.shape[-1])
            for x, t in zip("qkv", cg.split([dk, dk, r * dv], 1), strict=True):
                yield a + f"{x}_conv1d.weight", t.reshape(-1, 1, c.shape[-1]).contiguous()
            yield a + "A_log", state[b + "mixer.A_log"]
            yield a + "dt_bias", state[b + "mixer.dt_bias"]
            yield a + "o_norm.weight", state[b + "mixer.out_norm_weight"]
            yield a + "o_proj.weight", state[b + "mixer.out_proj.weight"]
        yield p + "attn_norm.weight", state[b + "norm1.weight"]
        yield p + "mlp_norm.weight", state[b + "norm2.weight"]
        gate, up = split_interleaved(state[b + "mlp.fc1.weight"])
        yield p + "mlp.gate_proj.weight", gate
        yield p + "mlp.up_proj.weight", up
        yield p + "mlp.down_proj.weight", state[b + "mlp.fc2.weight"]


__all__ = ["ARCH", "check_supported", "config_for", "export_state", "import_plan",
           "import_state", "model_overrides"]
