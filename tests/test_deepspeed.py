"""The DeepSpeed ZeRO engine (``train.engine=deepspeed``) against the real deepspeed package on
2 CPU ranks with gloo: the config section and its JSON file, the missing-package message, the
engines' parity, reductions per step, kill-and-resume at ZeRO-3, and the conversion of a
ZeRO-3 retrofit fine-tune to a sleeptrain run and a Hugging Face export that ``verify``
accepts. The GPU tests (bf16 parity, peak memory) are in tests/test_deepspeed_gpu.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sleeptrain
from sleeptrain.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DS = ["train.engine=deepspeed"]

#: A tiny fp32 model on the rule110 task (3 sleep passes, 5 windows per row, tied
#: embeddings so the head reuses the embedding's weight) with clipping that is active.
TINY32 = [
    "model.params_dtype=float32", "model.vocab_size=16", "model.d_model=16", "model.n_heads=4",
    "model.n_kv_heads=2", "model.gdn_heads=2", "model.gdn_v_heads=4", "model.gdn_head_dim=8",
    "model.gdn_v_head_dim=4", "model.ffn_hidden=24", "model.tie_embeddings=true",
    "model.init_std=0.2", "train.device=cpu", "data.task=rule110",
    "data.task_args={t_min: 0, t_max: 1}", "sleep.window_len=24", "sleep.passes=3",
    "data.batch_size=2", "train.grad_accum=2", "train.steps=3", "optim.use_muon=false",
    "optim.warmup_steps=1", "log.every=1", "log.progress=false", "train.eval_every=1000",
    "train.ckpt_every=1000", "train.save_at_end=false", "optim.grad_clip=0.5",
    "train.eval_examples=4", "data.eval_batch_size=4",  # the end-of-run evaluation kept small
]
ONE_WINDOW = "data.task_args={t_min: 0, t_max: 0, n_states: 1}"  # 2 windows, the first sleeps
#: A loop range inside the stack: sleep passes repeat blocks 2-5 of 8.
LOOPED = ["model.pattern=AGAGAGAG", "model.loop_start=2", "model.loop_end=6"]


def _cfg(*extra: str):
    return sleeptrain.load_config(None, [*TINY32, *extra])


# --- the config section, the JSON file, the missing package (no process group) ----------------


@pytest.mark.parametrize(("overrides", "key"), [
    (["deepspeed.stage=4"], "deepspeed.stage"),
    (["deepspeed.stage=2", "deepspeed.offload_params=true"], "deepspeed.offload_params"),
    (["deepspeed.stage=0", "deepspeed.offload_optimizer=true"], "deepspeed.offload_optimizer"),
    (["deepspeed.reduce_bucket_size=-1"], "deepspeed.reduce_bucket_size"),
    (["parallel.tp=2"], "parallel.tp"),
    (["parallel.shard_optimizer=true"], "parallel.shard_optimizer"),
    (["train.cuda_graphs=on"], "train.cuda_graphs"),
    (["optim.use_muon=true", "optim.muon_adjust_lr=match_rms_adamw"], "optim.muon_adjust_lr"),
    (["train.stages=[{name: warm, steps: 1, trainable: gdn}, {name: all, steps: 2}]"],
     "train.stages"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        _cfg(*DS, *overrides)


def test_unknown_deepspeed_key_and_engine_are_refused():
    with pytest.raises(Exception, match="bucket_sizes"):
        _cfg(*DS, "deepspeed.bucket_sizes=1")
    with pytest.raises(ConfigError, match="^train.engine:"):
        _cfg("train.engine=zero")


def test_json_file_is_read_checked_and_laid_over(tmp_path):
    """A plain DeepSpeed JSON file: its zero_optimization keys win over the section's, other
    keys reach DeepSpeed's config; bad files and keys sleeptrain owns fail naming the file."""
    from sleeptrain.train.ds_engine import deepspeed_config

    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_max_reuse_distance":
                                                      7}, "gradient_accumulation_steps": 2,
                                "comms_logger": {"enabled": False}}))
    cfg = _cfg(*DS, "deepspeed.stage=1", f"deepspeed.config_file={good}")
    model = sleeptrain.build_model(cfg, device="cpu")
    conf = deepspeed_config(cfg, model, dp=2, cuda=False)
    assert conf["zero_optimization"]["stage"] == 3
    assert conf["zero_optimization"]["stage3_max_reuse_distance"] == 7  # the file's
    assert conf["comms_logger"] == {"enabled": False}
    assert conf["train_batch_size"] == 2 * 2 * 2 and conf["gradient_clipping"] == 0.5
    assert conf["optimizer"]["type"] == "AdamW"
    bad = tmp_path / "bad.json"
    cases = [("{\n  \"zero_optimization\": {\"stage\": 2,}\n}", "not valid JSON \\(line 2"),
             ("[1, 2]", "must hold a JSON object"),
             ('{"optimizer": {"type": "Adam"}}', "key 'optimizer' is not accepted"),
             ('{"gradient_accumulation_steps": 8}', "disagrees with train.grad_accum=2"),
             ('{"zero_optimization": {"stage": 5}}', "zero_optimization.stage: must be")]
    for text, msg in cases:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=msg) as e:
            _cfg(*DS, f"deepspeed.config_file={bad}")
        assert "deepspeed.config_file" in str(e.value)
    with pytest.raises(ConfigError, match="is not a file"):
        _cfg(*DS, f"deepspeed.config_file={tmp_path / 'none.json'}")


def test_zero3_settings_follow_the_loop_range():
    """ZeRO-3's reuse distance is the loop range's parameter count (a loop parameter stays
    gathered through a window's passes), the live limit at least that plus one block."""
    from sleeptrain.train.ds_engine import deepspeed_config, loop_numel

    cfg = _cfg(*DS, "deepspeed.stage=3", "model.pattern=AGAGAG", "model.loop_start=2",
               "model.loop_end=4")
    model = sleeptrain.build_model(cfg, device="cpu")
    loop, block = loop_numel(cfg, model)
    sizes = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    assert loop == sizes[2] + sizes[3] and block == max(sizes)
    zero = deepspeed_config(cfg, model, dp=1, cuda=False)["zero_optimization"]
    assert zero["stage3_max_reuse_distance"] == loop
    assert zero["stage3_max_live_parameters"] >= loop + block
    cfg = _cfg(*DS, "deepspeed.stage=3", "deepspeed.max_reuse_distance=5", "optim.use_muon=true")
    conf = deepspeed_config(cfg, model, dp=1, cuda=False)
    assert conf["zero_optimization"]["stage3_max_reuse_distance"] == 5
    assert conf["zero_optimization"]["reduce_scatter"] is False  # DeepSpeed's Muon needs it
    assert conf["optimizer"]["type"] == "Muon"


def test_megatron_engine_refuses_a_deepspeed_run_dir(tmp_path):
    """A run directory with DeepSpeed checkpoints is not silently restarted by the megatron
    engine: ConfigError naming train.engine and the conversion, nothing written."""
    from sleeptrain.train.trainer import train

    (tmp_path / "ds_checkpoints").mkdir()
    with pytest.raises(ConfigError, match="^train.engine: .* holds DeepSpeed checkpoints"):
        train(_cfg(f"train.run_dir={tmp_path}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds_checkpoints"]


def test_resume_candidates_are_latest_then_older_recorded_tags(tmp_path):
    """Which DeepSpeed tags a resume tries: the one latest names, then older ones newest
    first; never a .tmp-* save or a corrupt-* one; without a readable latest, every tag with
    a digest record."""
    from sleeptrain.train.checkpoint import DIR_DIGESTS_FILE
    from sleeptrain.train.ds_engine import DS_DIR, LATEST, resume_candidates

    ck = tmp_path / DS_DIR
    for name in ["step_00000002", "step_00000004", "step_00000006", ".tmp-step_00000008",
                 "corrupt-step_00000005"]:
        (ck / name).mkdir(parents=True)
    for name in ["step_00000002", "step_00000006"]:
        (ck / name / DIR_DIGESTS_FILE).write_text("{}")
    assert resume_candidates(tmp_path) == ["step_00000006", "step_00000002"]
    (ck / LATEST).write_text("step_00000004\n")
    assert resume_candidates(tmp_path) == ["step_00000004", "step_00000002"]
    (ck / LATEST).write_text("step_00000003\n")  # names a missing tag: the older ones
    assert resume_candidates(tmp_path) == ["step_00000002"]
    (ck / LATEST).write_bytes(b"\xff garbled")
    assert resume_candidates(tmp_path) == ["step_00000006", "step_00000002"]


_NO_DEEPSPEED = "import sys; sys.modules['deepspeed'] = None; sys.argv = {argv!r}; "


@pytest.mark.parametrize("entry", ["train", "convert"])
def test_missing_package_gets_a_clear_message(tmp_path, entry):
    """With deepspeed not importable (sys.modules entry None), train.engine=deepspeed and
    deepspeed-to-run stop with exit status 2 and the install command, before any work."""
    if entry == "train":
        argv = ["sleeptrain", "train", str(ROOT / "configs" / "rule110_tiny.yaml"), *DS,
                f"train.run_dir={tmp_path / 'run'}", "train.device=cpu"]
        code = _NO_DEEPSPEED.format(argv=argv) + "from sleeptrain.cli import main; sys.exit(main())"
    else:
        (tmp_path / "run" / "ds_checkpoints").mkdir(parents=True)
        (tmp_path / "run" / "config.yaml").write_text("{}\n")
        argv = ["convert.py", "deepspeed-to-run", str(tmp_path / "run"), str(tmp_path / "out")]
        code = (_NO_DEEPSPEED.format(argv=argv) + f"sys.path.insert(0, {str(ROOT)!r}); "
                "from tools.convert import main; sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert "needs the deepspeed package" in proc.stderr
    assert 'pip install -e ".[deepspeed]"' in proc.stderr
    assert not (tmp_path / "run" / "config.yaml").exists() or entry == "convert"
    assert not (tmp_path / "out").exists()


# --- 2 ranks, gloo ------------------------------------------------------------------------------


def _torchrun(*args: str, env: dict[str, str] | None = None, check: bool = True
              ) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """One torchrun launch of tests/_ds_worker.py over every case."""
    base = tmp_path_factory.mktemp("ds_engines")
    cases = {
        "megatron": TINY32,
        "zero2": [*TINY32, *DS, "deepspeed.stage=2"],
        "zero3": [*TINY32, *DS, "deepspeed.stage=3", "train.save_at_end=true"],
        "zero3_offload": [*TINY32, *DS, "deepspeed.stage=3", "deepspeed.offload_optimizer=true",
                          "deepspeed.offload_params=true"],
        # window x pass activation checkpointing: ZeRO-3 re-gathers for the recomputation
        "zero3_checkpointed": [*TINY32, *DS, "deepspeed.stage=3", "sleep.checkpoint=true"],
        # ... with a loop range inside the stack: the backward of a checkpointed sleep pass
        # first reaches a GDN mixer, whose parameters the recompute would release
        "megatron_looped": [*TINY32, *LOOPED, "sleep.checkpoint=true"],
        "zero3_checkpointed_looped": [*TINY32, *LOOPED, *DS, "deepspeed.stage=3",
                                      "sleep.checkpoint=true"],
    }
    for stage in (1, 2, 3):  # one step: N=1 over 2 windows vs N=3 over 5 windows
        zs = [*TINY32, *DS, f"deepspeed.stage={stage}", "train.steps=1"]
        if stage > 1:
            cases[f"s{stage}_n1"] = [*zs, "sleep.passes=1", ONE_WINDOW]
        cases[f"s{stage}_n3"] = zs
    cases["s1_accum1"] = [*TINY32, *DS, "deepspeed.stage=1", "train.steps=1",
                          "train.grad_accum=1"]
    gdn_only = "train.stages=[{name: ssm_warmup, steps: 3, trainable: gdn}]"
    cases["megatron_gdn_only"] = [*TINY32, gdn_only]
    cases["zero3_gdn_only"] = [*TINY32, *DS, "deepspeed.stage=3", gdn_only]
    _torchrun("tests/_ds_worker.py", str(base / "out.pt"), json.dumps(cases), str(base))
    return base, torch.load(base / "out.pt", weights_only=False)


@pytest.mark.slow
def test_zero_stages_follow_the_megatron_engine(engines):
    """ZeRO-2, ZeRO-3, ZeRO-3 with optimizer and parameter offload and ZeRO-3 with window x
    pass activation checkpointing against the megatron engine, fp32, AdamW, gradient
    clipping active (norms ~10-20 against a clip of 0.5), 3 steps of 2 micro-batches on 2
    ranks. Tolerance: losses to 1e-5 relative, gradient norms
    to 2e-3 relative, weights to 1e-4 absolute after 3 steps of size ~lr=3e-3. The reductions
    differ only in fp32 summation order (DeepSpeed divides by the world size before summing,
    in flat buckets), ~1e-7 relative in the gradient; Adam's normalized step
    m / (sqrt(v) + eps) magnifies that for elements whose gradient is near zero, and the
    later steps' gradients follow the weights (measured: weights 3.1-5.5e-5, losses <= 1e-6,
    norms <= 7.6e-4 at step 3; a wrong loss scale or a missed reduction is off by 2x). The
    SSM-only warm-up stage (only the GDN mixers train) at ZeRO-3 against the megatron
    engine's: the frozen weights stay exactly at their start. ZeRO-3 with checkpointing and
    a loop range inside the stack against the megatron engine's run of that model (before
    ``HybridModel.recompute_first`` its backward failed: a GDN mixer's parameters were
    released by the recompute before their gradients were accumulated)."""
    _, res = engines
    assert len(res["megatron"]["loss"]) == 3
    refs = {"zero3_gdn_only": "megatron_gdn_only", "zero3_checkpointed_looped": "megatron_looped"}
    for case in ("zero2", "zero3", "zero3_offload", "zero3_checkpointed", "zero3_gdn_only",
                 "zero3_checkpointed_looped"):
        ref = res[refs.get(case, "megatron")]
        got = res[case]
        assert got["steps"] == 3
        for a, b in zip(ref["loss"], got["loss"], strict=True):
            assert abs(a - b) <= 1e-5 * abs(a), (case, ref["loss"], got["loss"])
        for a, b in zip(ref["grad_norm"], got["grad_norm"], strict=True):
            assert abs(a - b) <= 2e-3 * a, (case, ref["grad_norm"], got["grad_norm"])
        assert set(got["weights"]) == set(ref["weights"])
        worst = max((got["weights"][k] - ref["weights"][k]).abs().max().item()
                    for k in ref["weights"])
        assert worst <= 1e-4, (case, worst)
    from sleeptrain.train.stages import trainable_predicate

    start = sleeptrain.build_model(_cfg(), device="cpu").state_dict()
    gdn = trainable_predicate("gdn")
    frozen = [k for k in start if isinstance(start[k], torch.Tensor) and not gdn(k)]
    assert frozen and all(torch.equal(res["zero3_gdn_only"]["weights"][k], start[k])
                          for k in frozen)
    assert not torch.equal(res["zero3_gdn_only"]["weights"]["blocks.1.mixer.out_proj.weight"],
                           start["blocks.1.mixer.out_proj.weight"])


@pytest.mark.slow
def test_gradients_are_reduced_per_step_not_per_window_or_pass(engines):
    """DeepSpeed's logged reduction collectives of one optimizer step do not depend on the
    number of windows or sleep passes (a loop-range parameter used N x W times has its
    gradient reduced once); ZeRO-1 reduces once per step (2 micro-batches as many as 1),
    ZeRO-2 and 3 once per micro-batch (to free the gradient, DeepSpeed's design)."""
    _, res = engines
    for stage in (2, 3):
        n1, n3 = res[f"s{stage}_n1"]["reductions"], res[f"s{stage}_n3"]["reductions"]
        assert n1 and n1 == n3, (stage, n1, n3)
    assert res["s1_accum1"]["reductions"] == res["s1_n3"]["reductions"]
    assert sum(res["s2_n3"]["reductions"].values()) > sum(res["s1_n3"]["reductions"].values())


@pytest.mark.slow
def test_zero3_checkpoint_converts_to_the_trained_weights(engines, tmp_path):
    """deepspeed-to-run of the ZeRO-3 run's final DeepSpeed checkpoint (zero_to_fp32 over
    both ranks' partitions) gives exactly the weights the engine held (gathered in the
    worker)."""
    from sleeptrain.convert import load_run_model
    from sleeptrain.convert.deepspeed import deepspeed_to_run

    base, res = engines
    _, model, step = deepspeed_to_run(base / "zero3", tmp_path / "run")
    assert step == 3
    _, loaded = load_run_model(tmp_path / "run")
    want = res["zero3"]["weights"]
    for name, t in loaded.state_dict().items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, want[name]), name


def _train(run: Path, common: list[str], env: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    return _torchrun("-m", "sleeptrain.cli", "train", *common, f"train.run_dir={run}", env=env,
                     check=check)


def _metrics(run: Path) -> list[tuple[int, float, float]]:
    from sleeptrain.train.logging import read_metrics

    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run) if "loss" in r]


@pytest.mark.slow
def test_zero3_retrofit_kill_resume_convert_and_verify(tmp_path):
    """A tiny Llama retrofitted with an inserted GDN block (import-hf --insert-gdn), fine-tuned
    at ZeRO-3 on 2 ranks through the CLI under torchrun: a run whose rank 1 is SIGKILLed while
    writing its step-4 checkpoint keeps step 2 in force, and resuming it gives the losses and
    gradient norms of the uninterrupted run at steps 3 and 4 exactly, and the same weights.
    The uninterrupted run goes through DeepSpeed's launcher, the others through torchrun. The
    final DeepSpeed checkpoint converts (deepspeed-to-run), exports (export-hf, custom code:
    the pattern has a g block) and passes verify against the converted run (fp32: 1e-4).
    A corrupted checkpoint file is named and skipped (below)."""
    from sleeptrain.convert import import_hf
    from sleeptrain.convert.deepspeed import deepspeed_state_dict
    from sleeptrain.train.ds_engine import DS_DIR, LATEST
    from tests.test_convert import _hf_model

    hf = _hf_model("llama", tmp_path)
    base = tmp_path / "base"
    import_hf(hf, base, insert_gdn=[1], overrides=["sleep.window_len=16", "sleep.passes=2"])
    common = [str(base / "config.yaml"), f"train.init_from={base}", *DS, "deepspeed.stage=3",
              "train.device=cpu", "train.steps=4", "train.ckpt_every=2", "optim.use_muon=false",
              "optim.warmup_steps=1", "data.source=task", "data.task=rule110",
              "data.task_args={width: 8, t_min: 1, t_max: 2}", "data.batch_size=2",
              "train.grad_accum=2", "data.eval_batch_size=4", "train.eval_examples=4",
              "train.eval_every=1000", "log.every=1", "log.progress=false"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    # the uninterrupted run under DeepSpeed's launcher, the others under torchrun
    proc = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2",
                           "--master_port", "29533", "--module", "sleeptrain.cli", "train",
                           *common, f"train.run_dir={full}"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    killed = _train(cut, common, env={"SLEEPTRAIN_FAULT": "after_shards:4:1"}, check=False)
    assert killed.returncode != 0
    assert (cut / DS_DIR / LATEST).read_text().strip() == "step_00000002"
    _train(cut, common)
    want, got = _metrics(full), _metrics(cut)
    assert [m[0] for m in want] == [1, 2, 3, 4]
    assert got[-2:] == want[-2:], (want, got)
    tag, a = deepspeed_state_dict(full)
    _, b = deepspeed_state_dict(cut)
    assert tag == "step_00000004" and all(torch.equal(a[k], b[k]) for k in a)
    from sleeptrain.convert import ConversionError, export_hf, load_run_model, verify
    from sleeptrain.convert.deepspeed import deepspeed_to_run

    deepspeed_to_run(full, tmp_path / "conv")
    cfg, model = load_run_model(tmp_path / "conv")
    export_hf(model, cfg, tmp_path / "hf_out")
    res = verify(tmp_path / "hf_out", tmp_path / "conv", length=30, trust_remote_code=True)
    assert res["max_abs_diff"] <= 1e-4 and res["top1_agreement"] == 1.0, res
    with pytest.raises(ConversionError, match="step_9: no such DeepSpeed checkpoint"):
        deepspeed_to_run(full, tmp_path / "x", tag="step_9")

    # integrity: every DeepSpeed checkpoint has a digest record, checked before DeepSpeed
    # unpickles a file. A flipped byte in step 4 of the resumed run: named by the converter;
    # the trainer skips step 4 (renamed, kept), resumes from step 2 and reproduces steps 3-4.
    from sleeptrain.train.checkpoint import (
        DIR_DIGESTS_FILE,
        CorruptCheckpointError,
        UntrustedCheckpointError,
    )

    step4 = cut / DS_DIR / "step_00000004"
    victim = max((f for f in step4.rglob("*.pt")), key=lambda f: f.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=f"{victim.name} does not match"):
        deepspeed_state_dict(cut)
    proc = _train(cut, common)
    assert "skipping DeepSpeed checkpoint step_00000004" in proc.stdout, proc.stdout[-3000:]
    assert f"{victim.name} does not match its sha256 digest" in proc.stdout
    assert (cut / DS_DIR / "corrupt-step_00000004" / victim.name).is_file()
    assert "resumed from step 2" in proc.stdout
    assert _metrics(cut)[-2:] == want[-2:]
    # a checkpoint without a record (written by another tool) is read only when trusted
    (full / DS_DIR / "step_00000004" / DIR_DIGESTS_FILE).unlink()
    with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint"):
        deepspeed_state_dict(full)
    _, c = deepspeed_state_dict(full, trust=True)
    assert all(torch.equal(a[k], c[k]) for k in a)


# --- the recipe configs -------------------------------------------------------------------------


QWEN15 = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536, "intermediate_size": 8960,
          "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
          "vocab_size": 151936, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
          "tie_word_embeddings": True, "hidden_act": "silu"}
FLA15 = {"architectures": ["GatedDeltaNetForCausalLM"], "hidden_size": 2048,
         "num_hidden_layers": 24, "num_heads": 8, "head_dim": 128, "expand_v": 2.0,
         "vocab_size": 32000, "norm_eps": 1e-6, "tie_word_embeddings": False,
         "attn": {"layers": [5, 11, 17, 23], "num_heads": 16, "num_kv_heads": 4,
                  "rope_theta": 10000.0}}


def _model_matches(cfg, overrides: list[str]) -> None:
    from sleeptrain.config import parse_override

    for item in overrides:
        key, value = parse_override(item)
        ours = cfg.model[key.split(".", 1)[1]]
        assert (ours == float(value) if isinstance(ours, float) else ours == value), item


def test_recipe_configs_are_what_import_hf_writes():
    """The GSM retrofit recipes load (validated), run the DeepSpeed engine at ZeRO-3 with
    offload, and their model sections are the converters' output for the reference models
    (Ouro-style: Qwen2.5-1.5B's shape with g blocks before every 4th layer, the loop over all
    blocks; Jet-style: a 24-layer FLA hybrid looped over its middle half); the sliding variant
    is an SSM-only warm-up under hard eviction, then all parameters under sliding eviction
    starting from the warm-up's converted run."""
    from sleeptrain.config.derived import loop_range
    from sleeptrain.convert import fla_gdn, hf_llama

    load = lambda name: sleeptrain.load_config(ROOT / "configs" / f"{name}.yaml")
    ouro, jet = load("gsm_retrofit_ouro_style"), load("gsm_retrofit_jet_style")
    warm, slide = (load("gsm_retrofit_ouro_style_sliding_warmup"),
                   load("gsm_retrofit_ouro_style_sliding"))
    for cfg in (ouro, jet, warm, slide):
        assert cfg.train.engine == "deepspeed" and cfg.deepspeed.stage == 3
        assert cfg.deepspeed.offload_optimizer and cfg.deepspeed.offload_params
        assert cfg.data.source == "shards"
    _model_matches(ouro, hf_llama.model_overrides(QWEN15, [0, 4, 8, 12, 16, 20, 24])[0])
    _model_matches(jet, fla_gdn.model_overrides(FLA15, 5632)[0])
    depth = len(ouro.model.pattern)
    assert loop_range(ouro.model) == (0, depth) and "G" not in ouro.model.pattern
    assert (ouro.sleep.window_len, ouro.sleep.eviction) == (2000, "hard")
    assert loop_range(jet.model) == (len(jet.model.pattern) // 4, 3 * len(jet.model.pattern) // 4)
    assert warm.model == ouro.model == slide.model
    assert [(s.trainable, s.eviction) for s in warm.train.stages] == [("gdn", "hard")]
    assert (warm.sleep.window_len, slide.sleep.window_len, slide.sleep.eviction) == (
        512, 512, "sliding")
    assert not slide.train.stages
    assert slide.train.init_from == f"{warm.train.run_dir}_final"


def test_gsm_shards_put_the_loss_on_the_answer(tmp_path):
    """tools/make_gsm_shards.py: question-first GSM problems whose mask covers exactly the
    answer and the eos; bad --ops exits 2."""
    sys.path.insert(0, str(ROOT))
    from sleeptrain.data.tokenizers import build_tokenizer
    from sleeptrain.eval.gsm import generate_gsm
    from tools.make_gsm_shards import gsm_docs, main

    tok = build_tokenizer("byte")
    docs = list(gsm_docs(tok, [1, 3], 1200, 2, seed=1))
    samples = [*generate_gsm(1, 1200, tok, 2, 1), *generate_gsm(3, 1200, tok, 2, 1)]
    assert len(docs) == 4
    for (tokens, mask), s in zip(docs, samples, strict=True):
        answer = bytes(int(t) for t, m in zip(tokens, mask, strict=True) if m and t < 256)
        assert answer.decode() == " " + s.outputs[0] and tokens[-1] == tok.eos_id
        text = bytes(int(t) for t in tokens if t < 256).decode()
        assert text.index(s.meta["question"]) < text.index(s.meta["core"][0])
    assert main(["--ops", "1", "--target-len", "1200", "--n", "2", "--out",
                 str(tmp_path / "gsm")]) == 0
    assert (tmp_path / "gsm" / "manifest.json").is_file()
    with pytest.raises(SystemExit) as e:
        main(["--ops", "9", "--target-len", "1200", "--n", "2", "--out", str(tmp_path / "x")])
    assert e.value.code == 2


def test_bench_deepspeed_runs_both_engines_on_the_same_model_and_data():
    """tools/bench_deepspeed.py's two engines (issue #24's side-by-side numbers): one step from
    the same seed-built weights on the same random tokens gives the same loss (fp32 on CPU,
    bound 1e-5 relative: the engines differ only in reduction order) and the same parameter
    count, and each JSON line names its engine."""
    tiny = ["model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_hidden=128",
            "model.vocab_size=128", "train.grad_accum=1", "data.batch_size=1",
            "sleep.window_len=64", "train.device=cpu", "train.precision=fp32"]
    out = {}
    for engine in ("megatron", "deepspeed"):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
             "tools/bench_deepspeed.py", "configs/gsm_retrofit_ouro_style.yaml", "--steps", "1",
             "--warmup", "0", "--seq-len", "128", "--engine", engine, *tiny],
            capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        out[engine] = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    meg, ds = out["megatron"], out["deepspeed"]
    assert (meg["engine"], meg["zero_stage"], ds["engine"]) == ("megatron", None, "deepspeed")
    assert ds["zero_stage"] in (1, 2, 3)
    assert meg["params"] == ds["params"] and meg["tokens_per_step"] == ds["tokens_per_step"] == 128
    assert abs(meg["last_loss"] - ds["last_loss"]) <= 1e-5 * abs(meg["last_loss"])


def test_bench_deepspeed_batch_is_on_the_device():
    # the mask was once made from the host tokens: every GPU run failed in the loss
    # ("found at least two devices"); the meta device stands in for a GPU here
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_deepspeed import random_batch

    tokens, mask, starts = random_batch(2, 8, 32, torch.device("meta"), torch.Generator())
    assert tokens.device.type == mask.device.type == "meta" and starts is None
    assert tokens.shape == mask.shape == (2, 9) and mask.dtype == torch.bool
