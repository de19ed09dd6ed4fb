"""sleeptrain -> custom-code Hugging Face model: streaming sleep inference equals sleeptrain's.

The exported directory is loaded with ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` and compared with ``sleeptrain.infer.Stream`` / ``generate`` on
prompts of several windows (so the windows sleep and are evicted).

Tolerances: fp32 logits within 1e-4 (measured 1e-6 to 1e-5 with weights of std 0.2: the same
operations, but the custom code's chunked delta rule, attention and fused projections run in a
different order and through different kernels than megatron-core's layers and sleeptrain's
reference); fp64 within 1e-10 (measured ~1e-14), which shows the computation is the same and
not merely close. Greedy tokens must be equal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sleeptrain.convert.common import ConversionError  # noqa: E402
from sleeptrain.convert.hf_custom import AUTO_MAP, REMOTE_FILES, export_custom  # noqa: E402
from sleeptrain.infer import Stream, generate  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

L = 8
FP32_TOL = 1e-4
FP64_TOL = 1e-10

# (pattern, loop range, eviction, passes, extra overrides): G/g, A/a and M blocks, loop ranges
# inside the stack, tied and untied heads, qkv biases, GQA in attention and in the GDN values.
CASES = {
    "hard-3": ("GaMgA", 1, 4, "hard", 3, []),
    "sliding-2": ("AGgAM", 1, 3, "sliding", 2,
                  ["model.tie_embeddings=true", "model.qkv_bias=true"]),
    "sliding-3": ("gAGa", 0, 3, "sliding", 3, ["model.n_kv_heads=1"]),
    "hard-2": ("AGgAM", 2, 5, "hard", 2, ["model.tie_embeddings=true"]),
}


def _model(case: str, dtype: str = "float32", **over):
    pattern, a, b, eviction, passes, extra = CASES[case]
    ov = {"model.pattern": pattern, "model.loop_start": a, "model.loop_end": b,
          "sleep.eviction": eviction, "sleep.passes": passes, "sleep.window_len": L,
          "model.params_dtype": dtype, **over}
    return tiny_model(*[f"{k}={v}" for k, v in ov.items()], *extra, seed=3)


def _load(path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True)
    return model.eval()


def _tokens(b: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 16, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case -> (sleeptrain model, exported directory), built once per case."""
    cache: dict[str, tuple] = {}

    def get(case: str):
        if case not in cache:
            cfg, model = _model(case)
            out = export_custom(model, cfg, tmp_path_factory.mktemp(case) / "hf")
            cache[case] = (model, out)
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_one_call_over_several_windows_equals_stream(exported, case):
    model, out = exported(case)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    ids = _tokens(2, 3 * L + L // 2, seed=1)  # 3.5 windows: three sleeps
    with torch.no_grad():
        ref = Stream(model, 2).feed(ids, want="all")
        res = hf.eval()(ids)
    assert res.logits.shape == ref.shape and res.logits.dtype == torch.float32
    assert (res.logits - ref).abs().max().item() <= FP32_TOL
    assert res.cache.windows_slept == 3 and res.cache.position == ids.shape[1]


@pytest.mark.parametrize("case", ["hard-3", "sliding-2"])
def test_uneven_incremental_feeding_equals_one_call(exported, case):
    model, out = exported(case)
    hf = _load(out)
    ids = _tokens(2, 3 * L + L // 2, seed=2)
    cuts = [0, 3, 4, 13, 16, 17, 27, ids.shape[1]]  # inside windows and on their edges
    with torch.no_grad():
        ref = Stream(model, 2).feed(ids, want="all")
        whole = hf(ids).logits
        cache, parts = None, []
        for s, e in zip(cuts[:-1], cuts[1:], strict=True):
            res = hf(ids[:, s:e], past_key_values=cache) if s else hf(ids[:, s:e])
            cache = res.cache
            parts.append(res.logits)
    got = torch.cat(parts, 1)
    assert (got - whole).abs().max().item() <= FP32_TOL
    assert (got - ref).abs().max().item() <= FP32_TOL
    assert cache.windows_slept == 3


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generate_equals_sleeptrain_generate(exported, case):
    """13-token prompts, 12 new tokens: generation crosses the window ends at 16 and 24."""
    model, out = exported(case)
    hf = _load(out)
    prompts = _tokens(2, 13, seed=4)
    got = hf.generate(prompts, max_new_tokens=12, do_sample=False)
    want = generate(model, prompts.tolist(), 12)
    assert got[:, 13:].tolist() == want
    # without the cache (the whole sequence again every step) the tokens are the same
    again = hf.generate(prompts, max_new_tokens=12, do_sample=False, use_cache=False)
    assert again.tolist() == got.tolist()


def test_beam_search_reorders_the_streaming_state(exported):
    """Beam scores (sum of token log-probabilities, length_penalty 0) equal those of the
    returned sequences recomputed from scratch: reordering the state kept each beam's own."""
    _, out = exported("sliding-3")
    hf = _load(out)
    prompts = _tokens(2, 13, seed=9)
    res = hf.generate(prompts, max_new_tokens=12, do_sample=False, num_beams=3,
                      length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        logp = hf(res.sequences).logits.double().log_softmax(-1)
    new = res.sequences[:, 13:]
    score = logp[:, 12:-1].gather(-1, new[..., None]).squeeze(-1).sum(-1)
    assert torch.allclose(score, res.sequences_scores.double(), atol=1e-4)


def test_float64_export_is_the_same_computation(tmp_path):
    cfg, model = _model("sliding-3", dtype="float64")
    hf = _load(export_custom(model, cfg, tmp_path / "hf"))
    assert hf.dtype == torch.float64
    ids = _tokens(1, 3 * L + L // 2, seed=5)
    with torch.no_grad():
        diff = (hf(ids).logits - Stream(model, 1).feed(ids, want="all")).abs().max().item()
    assert diff <= FP64_TOL


def _window_diffs(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [(a[:, s : s + L] - b[:, s : s + L]).abs().max().item()
            for s in range(0, a.shape[1], L)]


def test_the_comparison_can_fail(tmp_path, exported):
    """A perturbed tensor, one pass fewer or the other eviction policy change the logits
    far beyond the tolerance; sleep and eviction only change windows after the first."""
    from safetensors.torch import load_file, save_file

    model, out = exported("hard-3")
    ids = _tokens(1, 3 * L + L // 2, seed=6)
    with torch.no_grad():
        ref = Stream(model, 1).feed(ids, want="all")
    # a perturbed tensor: the loop range's GDN decay bias
    bad = tmp_path / "perturbed"
    bad.mkdir()
    for f in (*REMOTE_FILES, "config.json"):
        (bad / f).write_bytes((out / f).read_bytes())
    tensors = load_file(str(out / "model.safetensors"))
    tensors["blocks.3.mixer.dt_bias"] = tensors["blocks.3.mixer.dt_bias"] + 0.5
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with torch.no_grad():
        assert (_load(bad)(ids).logits - ref).abs().max().item() > 100 * FP32_TOL
    cfg, _ = _model("hard-3")
    for name, kw in (("passes-1", {"passes": 1}), ("passes-2", {"passes": 2})):
        hf = _load(export_custom(model, cfg, tmp_path / name, **kw))
        with torch.no_grad():
            d = _window_diffs(hf(ids).logits, ref)
        assert d[0] <= FP32_TOL and min(d[1:]) > 100 * FP32_TOL, (name, d)
    cfg_s, _ = _model("hard-3", **{"sleep.eviction": "sliding"})
    hf = _load(export_custom(model, cfg_s, tmp_path / "sliding"))
    with torch.no_grad():
        d = _window_diffs(hf(ids).logits, ref)
    assert d[0] <= FP32_TOL and min(d[1:]) > 100 * FP32_TOL, d


def test_directory_contents_and_self_contained_code(exported, tmp_path):
    """config.json names the remote classes; the weights are the state dict unchanged; the
    custom code runs in a process where sleeptrain (and megatron) cannot be imported."""
    from safetensors.torch import load_file

    model, out = exported("sliding-2")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*REMOTE_FILES, "config.json", "model.safetensors"])
    conf = json.loads((out / "config.json").read_text())
    assert conf["auto_map"] == AUTO_MAP and conf["architectures"] == ["SleeptrainForCausalLM"]
    assert conf["model_type"] == "sleeptrain" and conf["eviction"] == "sliding"
    assert (conf["window_len"], conf["sleep_passes"], conf["pattern"]) == (L, 2, "AGgAM")
    tensors = load_file(str(out / "model.safetensors"))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert sorted(tensors) == sorted(state) and "head.weight" not in tensors  # tied
    assert all(torch.equal(tensors[k], state[k]) for k in state)

    ids = _tokens(1, 3 * L + 3, seed=7)
    with torch.no_grad():
        ref = Stream(model, 1).feed(ids, want="all")
    torch.save({"ids": ids, "ref": ref}, tmp_path / "ref.pt")
    script = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sleeptrain", "megatron"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import torch, transformers
d = torch.load({str(tmp_path / 'ref.pt')!r})
m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
assert not any(k.split(".")[0] in ("sleeptrain", "megatron") for k in sys.modules)
with torch.no_grad():
    print("DIFF", (m(d["ids"]).logits - d["ref"]).abs().max().item())
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    diff = float(res.stdout.split("DIFF")[-1])
    assert diff <= FP32_TOL


def test_cache_misuse_and_padding_are_refused(exported):
    _, out = exported("hard-3")
    hf = _load(out)
    ids = _tokens(2, 5, seed=8)
    mask = torch.ones_like(ids)
    hf(ids, attention_mask=mask)  # all ones: fine
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padding"):
        hf(ids, attention_mask=mask)
    cache = hf(ids).cache
    with pytest.raises(ValueError, match="2 sequences"):
        hf(ids[:1], cache=cache)


def test_unsupported_configs_are_refused(tmp_path):
    from omegaconf import OmegaConf

    cfg, model = _model("hard-3")

    def variant(**changes):
        tree = OmegaConf.to_container(cfg)
        for key, value in changes.items():
            section, field = key.split(".")
            tree[section][field] = value
        return OmegaConf.create(tree)

    cases = [
        (variant(**{"model.mixer_kind": "mamba"}), "model.mixer_kind"),
        (variant(**{"sleep.consolidate": True}), "sleep.consolidate"),
        (variant(**{"sleep.eviction": "soft"}), "sleep.eviction"),
        (variant(**{"model.pattern": "GaXgA"}), "model.pattern"),
        (variant(**{"model.ffn_hidden": 32}), "mlp.fc1.weight"),  # not this model's config
        (variant(**{"model.loop_end": 9}), "loop_end"),
    ]
    for bad_cfg, name in cases:
        with pytest.raises(ConversionError, match=name):
            export_custom(model, bad_cfg, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    model.tp = 2
    try:
        with pytest.raises(ConversionError, match="parallel.tp"):
            export_custom(model, cfg, tmp_path / "out")
    finally:
        model.tp = 1
    assert list(tmp_path.iterdir()) == []


def test_export_never_overwrites_or_leaves_a_partial_directory(tmp_path, monkeypatch):
    import sleeptrain.convert.hf_custom as hf_custom

    cfg, model = _model("hard-3")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not an empty directory"):
        export_custom(model, cfg, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    def broken(path, tensors, metadata=None):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(hf_custom, "write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        export_custom(model, cfg, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the old directory, untouched
    with pytest.raises(OSError, match="disk full"):
        export_custom(model, cfg, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no partial or temp dirs
    monkeypatch.undo()

    export_custom(model, cfg, out, overwrite=True)  # replaced once complete
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*REMOTE_FILES, "config.json", "model.safetensors"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_custom(model, cfg, empty)  # an existing empty directory is fine
    assert (empty / "model.safetensors").is_file()
