"""Cross-field checks of the config tree. Every error names the offending key."""

from __future__ import annotations

from typing import Any

from sleeptrain.config.derived import loop_range, model_dims
from sleeptrain.config.schema import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SleepConfig,
)

PATTERN_SYMBOLS = {
    "A": ("attention", True),
    "G": ("gdn", True),
    "a": ("attention", False),
    "g": ("gdn", False),
    "M": (None, True),
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    _need(value in choices, key, f"must be one of {list(choices)}, got {value!r}")


def validate_model(model: ModelConfig, tp: int = 1) -> None:
    """Checks the model section: pattern, loop range, widths, head counts against ``tp``."""
    pat = model.pattern
    _need(isinstance(pat, str) and len(pat) > 0, "model.pattern", "must be a non-empty string")
    for i, s in enumerate(pat):
        _need(
            s in PATTERN_SYMBOLS,
            "model.pattern",
            f"unknown symbol {s!r} at position {i} in {pat!r}; valid symbols: "
            "A (attention+MLP), G (GDN+MLP), a (attention), g (GDN), M (MLP only)",
        )
    a, b = loop_range(model)
    depth = len(pat)
    _need(0 <= a < depth, "model.loop_start",
          f"must be in [0, {depth}) for pattern {pat!r}, got {a}")
    _need(
        a < b <= depth,
        "model.loop_end",
        f"must be in ({a}, {depth}] for pattern {pat!r} and loop_start {a}, got {b}",
    )
    for key in ("vocab_size", "d_model", "n_heads", "gdn_heads", "gdn_head_dim", "conv_kernel"):
        _need(getattr(model, key) >= 1, f"model.{key}", f"must be >= 1, got {getattr(model, key)}")
    _need(model.vocab_size % tp == 0, "model.vocab_size",
          f"{model.vocab_size} is not divisible by tensor-parallel size {tp}")
    dims = model_dims(model)
    if "A" in pat or "a" in pat:
        kv = dims.n_kv_heads
        _need(model.n_heads % kv == 0, "model.n_kv_heads",
              f"n_heads {model.n_heads} is not divisible by n_kv_heads {kv}")
        _need(kv % tp == 0, "model.n_kv_heads" if model.n_kv_heads else "model.n_heads",
              f"{kv} key/value heads are not divisible by tensor-parallel size {tp}")
        hd = dims.head_dim
        _need(model.head_dim is not None or model.d_model % model.n_heads == 0, "model.head_dim",
              f"d_model {model.d_model} is not divisible by n_heads {model.n_heads}; set head_dim")
        _need(hd % 2 == 0, "model.head_dim", f"must be even for RoPE, got {hd}")
    if "G" in pat or "g" in pat:
        hv = dims.gdn_v_heads
        _need(hv % model.gdn_heads == 0, "model.gdn_v_heads",
              f"{hv} value heads are not divisible by gdn_heads {model.gdn_heads}")
        _need(model.gdn_heads % tp == 0, "model.gdn_heads",
              f"{model.gdn_heads} heads are not divisible by tensor-parallel size {tp}")
    ffn = model.ffn_hidden
    _need(ffn is None or ffn % tp == 0, "model.ffn_hidden",
          f"{ffn} is not divisible by tensor-parallel size {tp}")
    _choice(model.attention_backend, "model.attention_backend", ("sdpa", "flash"))
    _choice(model.gdn_backend, "model.gdn_backend",
            ("auto", "fla", "short", "chunked", "recurrent"))
    _choice(model.gdn_inputs, "model.gdn_inputs", ("chain", "triton"))
    _choice(model.params_dtype, "model.params_dtype", ("float32", "float64", "bfloat16"))
    _need(model.gdn_chunk_size >= 1, "model.gdn_chunk_size", "must be >= 1")
    _need(model.fla_chunk_size in (0, 32, 64), "model.fla_chunk_size",
          "must be 32, 64 or 0 (by length; FLA's TileLang backward refuses 16), got "
          f"{model.fla_chunk_size}")


def validate_sleep(sleep: SleepConfig) -> None:
    """Checks the sleep section: window, passes, eviction and gradient-mode settings."""
    _need(sleep.window_len >= 1, "sleep.window_len", f"must be >= 1, got {sleep.window_len}")
    _need(sleep.passes >= 1, "sleep.passes", f"must be >= 1, got {sleep.passes}")
    _choice(sleep.eviction, "sleep.eviction", ("hard", "sliding"))
    _choice(sleep.grad_mode, "sleep.grad_mode", ("full", "truncated", "implicit"))
    _choice(sleep.implicit_method, "sleep.implicit_method", ("neumann", "phantom"))
    _need(sleep.grad_passes >= 1, "sleep.grad_passes", f"must be >= 1, got {sleep.grad_passes}")
    _need(sleep.neumann_terms >= 1, "sleep.neumann_terms",
          f"must be >= 1, got {sleep.neumann_terms}")
    _need(sleep.detach_every >= 0, "sleep.detach_every",
          f"must be >= 0 (0 = never), got {sleep.detach_every}")


def _in_range(value: Any, key: str, lo: float, hi: float | None = None,
              lo_open: bool = False, hi_open: bool = False) -> None:
    ok = (value > lo if lo_open else value >= lo) and (
        hi is None or (value < hi if hi_open else value <= hi))
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    span = f"{left}{lo}, {'inf' if hi is None else hi}{right}"
    _need(ok, key, f"must be in {span}, got {value!r}")


def validate_optim(optim: OptimConfig) -> None:
    """Checks the optimizer section: learning rates, betas, decay, warm-up, clipping."""
    _in_range(optim.muon_lr, "optim.muon_lr", 0.0)
    _in_range(optim.adamw_lr, "optim.adamw_lr", 0.0)
    _in_range(optim.muon_momentum, "optim.muon_momentum", 0.0, 1.0, hi_open=True)
    _need(len(optim.adamw_betas) == 2, "optim.adamw_betas", "must have two values")
    for i, b in enumerate(optim.adamw_betas):
        _in_range(b, f"optim.adamw_betas[{i}]", 0.0, 1.0, hi_open=True)
    _in_range(optim.adamw_eps, "optim.adamw_eps", 0.0, lo_open=True)
    _in_range(optim.weight_decay, "optim.weight_decay", 0.0)
    _in_range(optim.warmup_steps, "optim.warmup_steps", 0)
    _in_range(optim.min_lr_ratio, "optim.min_lr_ratio", 0.0, 1.0)
    _in_range(optim.grad_clip, "optim.grad_clip", 0.0)
    _choice(optim.muon_adjust_lr, "optim.muon_adjust_lr", ("original", "match_rms_adamw"))
    _choice(optim.schedule, "optim.schedule", ("cosine", "linear", "constant"))


def validate_task_args(data: DataConfig) -> None:
    """The task's own schema checks ``data.task`` and ``data.task_args`` (unknown options,
    types and ranges), so a bad option fails before any work."""
    if data.source != "task":
        return
    from sleeptrain.data.tasks import build_config

    try:
        build_config(data.task, **dict(data.task_args))
    except (TypeError, ValueError) as e:
        key = "data.task" if "unknown task" in str(e) else "data.task_args"
        raise ConfigError(f"{key}: {e}") from None


def validate_pipeline(cfg: RunConfig) -> None:
    """Checks ``parallel.pp``, ``parallel.pp_split`` and ``parallel.pp_in_flight`` against the
    pattern (every stage needs a block) and the settings pipeline parallelism refuses."""
    pp, depth = cfg.parallel.pp, len(cfg.model.pattern)
    _need(pp >= 1, "parallel.pp", f"must be >= 1, got {pp}")
    _need(pp <= depth, "parallel.pp",
          f"{pp} pipeline stages need at least as many blocks; model.pattern has {depth}")
    _need(cfg.parallel.pp_in_flight >= 0, "parallel.pp_in_flight",
          f"must be >= 0 (0: all micro-batches of a step), got {cfg.parallel.pp_in_flight}")
    split = list(cfg.parallel.pp_split)
    if split:
        _need(len(split) == pp - 1, "parallel.pp_split",
              f"needs pp - 1 = {pp - 1} stage starts for parallel.pp={pp}, got {split}")
        _need(all(a < b for a, b in zip([0, *split], [*split, depth], strict=True)),
              "parallel.pp_split", f"stage starts must increase strictly inside (0, {depth}) "
              f"for model.pattern of {depth} blocks, got {split}")
    if pp > 1:
        _need(not (cfg.parallel.backend == "gloo" and cfg.train.device == "cuda"),
              "parallel.backend", f"gloo cannot send CUDA tensors between pipeline stages "
              f"(parallel.pp={pp}, train.device=cuda); use parallel.backend=nccl or auto")
        _need(cfg.parallel.cp == 1, "parallel.cp",
              f"pipeline parallelism (parallel.pp={pp}) with context parallelism "
              f"(parallel.cp={cfg.parallel.cp}) is not supported; use one of them")


#: Top-level keys of a DeepSpeed JSON file that sleeptrain sets from its own config: the file
#: may repeat them only with the same value (``deepspeed_file_conflicts``).
DS_OWNED = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "optim.grad_clip",
}
#: Keys a DeepSpeed JSON file must not hold: the optimizer and schedule come from ``optim``,
#: and fp16 loss scaling is not supported (bf16 or fp32 only).
DS_REFUSED = {
    "optimizer": "the optimizer is built from optim.* (Muon + AdamW, docs/design.md)",
    "scheduler": "the learning-rate schedule comes from optim.schedule / optim.warmup_steps",
    "fp16": "fp16 loss scaling is not supported; use deepspeed.bf16_weights or fp32",
}


def read_deepspeed_file(path: str) -> dict[str, Any]:
    """The JSON object of ``deepspeed.config_file``; ConfigError naming the file (and the
    line of a syntax error) otherwise."""
    import json
    from pathlib import Path

    key = "deepspeed.config_file"
    file = Path(path)
    _need(file.is_file(), key, f"{path!r} is not a file")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}: {path}: not valid JSON (line {e.lineno}, column "
                          f"{e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: cannot read {path}: {e}") from None
    _need(isinstance(data, dict), key, f"{path}: must hold a JSON object, got "
          f"{type(data).__name__}")
    return data


def deepspeed_zero(cfg: RunConfig) -> dict[str, Any]:
    """The ``zero_optimization`` settings the ``deepspeed`` section asks for, with those of
    ``deepspeed.config_file`` laid over them (ZeRO-3's null settings are not included: the
    engine chooses them from the loop range)."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "overlap_comm": ds.overlap_comm,
    }
    if ds.stage in (1, 2):
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    for name in ("prefetch_bucket_size", "param_persistence_threshold", "max_live_parameters",
                 "max_reuse_distance"):
        if getattr(ds, name) is not None:
            zero[f"stage3_{name}"] = getattr(ds, name)
    if ds.config_file:
        extra = read_deepspeed_file(ds.config_file).get("zero_optimization", {})
        _need(isinstance(extra, dict), "deepspeed.config_file",
              f"{ds.config_file}: zero_optimization must be a JSON object")
        zero.update(extra)
    return zero


def validate_deepspeed(cfg: RunConfig) -> None:
    """Checks ``train.engine=deepspeed`` against the rest of the config: the ``deepspeed``
    section, its JSON file, and the settings only the megatron engine has (TP / CP / PP, the
    sharded optimizer, CUDA graphs, stages that change the trainable set)."""
    ds = cfg.deepspeed
    for name in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size",
                 "param_persistence_threshold", "max_live_parameters", "max_reuse_distance"):
        value = getattr(ds, name)
        _need(value is None or value >= 0, f"deepspeed.{name}", f"must be >= 0, got {value}")
    zero = deepspeed_zero(cfg)  # reads and checks the JSON file
    where = (f"deepspeed.config_file ({ds.config_file}) zero_optimization.stage"
             if ds.config_file and "stage" in (read_deepspeed_file(ds.config_file)
                                               .get("zero_optimization", {}))
             else "deepspeed.stage")
    _need(zero["stage"] in (0, 1, 2, 3), where, f"must be 0, 1, 2 or 3, got {zero['stage']!r}")
    if "offload_param" in zero:
        _need(zero["stage"] == 3, "deepspeed.offload_params",
              f"parameter offload needs ZeRO stage 3, the stage is {zero['stage']}")
    if "offload_optimizer" in zero:
        _need(zero["stage"] >= 1, "deepspeed.offload_optimizer",
              "optimizer offload needs ZeRO stage 1, 2 or 3, the stage is 0")
    if ds.config_file:
        data = read_deepspeed_file(ds.config_file)
        for k, why in DS_REFUSED.items():
            _need(k not in data, "deepspeed.config_file",
                  f"{ds.config_file}: key {k!r} is not accepted: {why}")
        owned = {"train_micro_batch_size_per_gpu": cfg.data.batch_size,
                 "gradient_accumulation_steps": cfg.train.grad_accum,
                 "gradient_clipping": cfg.optim.grad_clip}
        for k, ours in owned.items():
            _need(k not in data or data[k] == ours, "deepspeed.config_file",
                  f"{ds.config_file}: {k}={data.get(k)!r} disagrees with {DS_OWNED[k]}={ours!r} "
                  f"(set {DS_OWNED[k]} instead)")
        bf16 = data.get("bf16", {})
        _need(not isinstance(bf16, dict) or bf16.get("enabled", ds.bf16_weights)
              == ds.bf16_weights, "deepspeed.config_file",
              f"{ds.config_file}: bf16.enabled disagrees with deepspeed.bf16_weights="
              f"{ds.bf16_weights}")
    for key, value in (("parallel.tp", cfg.parallel.tp), ("parallel.cp", cfg.parallel.cp),
                       ("parallel.pp", cfg.parallel.pp)):
        _need(value == 1, key, f"train.engine=deepspeed is data parallel only (ZeRO); "
              f"{key}={value} needs train.engine=megatron")
    _need(not cfg.parallel.shard_optimizer, "parallel.shard_optimizer",
          "train.engine=deepspeed shards the optimizer with ZeRO (deepspeed.stage); "
          "parallel.shard_optimizer is the megatron engine's")
    _need(cfg.train.cuda_graphs != "on", "train.cuda_graphs",
          "CUDA graphs are the megatron engine's; train.engine=deepspeed runs eagerly")
    _need(cfg.train.optimizer_graph != "on", "train.optimizer_graph",
          "the optimizer graph is the megatron engine's; train.engine=deepspeed steps with "
          "DeepSpeed")
    if cfg.optim.use_muon:
        _need(cfg.optim.muon_adjust_lr == "original", "optim.muon_adjust_lr",
              "train.engine=deepspeed runs DeepSpeed's Muon, whose learning-rate scaling is "
              "the original one; set optim.muon_adjust_lr=original")
    sets = {st.trainable for st in cfg.train.stages}
    _need(len(sets) <= 1, "train.stages",
          f"train.engine=deepspeed builds its ZeRO partitions for one trainable set, the "
          f"stages have {sorted(sets)}; run a warm-up stage as its own run and start the next "
          "from it with train.init_from (configs/gsm_retrofit_ouro_style_sliding.yaml)")


def validate_run(cfg: RunConfig) -> None:
    """Checks the whole tree: each section, then combinations across sections."""
    validate_model(cfg.model, tp=cfg.parallel.tp)
    _in_range(cfg.model.init_std, "model.init_std", 0.0, lo_open=True)
    _in_range(cfg.model.norm_eps, "model.norm_eps", 0.0, lo_open=True)
    _in_range(cfg.model.rope_theta, "model.rope_theta", 0.0, lo_open=True)
    validate_sleep(cfg.sleep)
    for i, n in enumerate(cfg.sleep.random_passes):
        _need(n >= 1, f"sleep.random_passes[{i}]", f"must be >= 1, got {n}")
    validate_optim(cfg.optim)
    validate_task_args(cfg.data)
    _need(cfg.data.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")
    _need(cfg.log.every >= 1, "log.every", f"must be >= 1, got {cfg.log.every}")
    _need(cfg.train.eval_examples >= 1, "train.eval_examples", "must be >= 1")
    _need(cfg.train.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1")
    _need(cfg.train.seed >= 0, "train.seed", f"must be >= 0, got {cfg.train.seed}")
    _need(cfg.train.threads >= 0, "train.threads", "must be >= 0 (0: auto)")
    _in_range(cfg.train.exit_after_minutes, "train.exit_after_minutes", 0.0)
    ps = list(cfg.train.profile_steps)
    _need(not ps or (len(ps) == 2 and all(isinstance(x, int) for x in ps)
                     and 1 <= ps[0] <= ps[1]), "train.profile_steps",
          f"must be empty or [first, last] step numbers with 1 <= first <= last, got {ps}")
    _choice(cfg.data.source, "data.source", ("task", "shards"))
    _need(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    _choice(cfg.data.on_corrupt, "data.on_corrupt", ("error", "skip"))
    _need(cfg.data.workers >= 0, "data.workers", "must be >= 0")
    _need(cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
    _need(cfg.data.epochs >= 0, "data.epochs", "must be >= 0 (0 repeats forever)")
    if cfg.data.source == "shards":
        _need(len(cfg.data.shards) > 0, "data.shards",
              "data.source=shards needs at least one shard path, pattern or dataset directory")
        _need(cfg.data.seq_len >= 2, "data.seq_len", "must be >= 2")
    _need(cfg.train.steps >= 0, "train.steps", "must be >= 0")
    _need(cfg.train.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    _need(cfg.train.keep_last >= 1, "train.keep_last", "must be >= 1")
    _need(cfg.train.ckpt_every >= 1, "train.ckpt_every", "must be >= 1")
    _need(cfg.train.peak_tflops >= 0, "train.peak_tflops",
          f"must be >= 0 (0: from the GPU name), got {cfg.train.peak_tflops}")
    _need(cfg.train.eval_every >= 1, "train.eval_every", "must be >= 1")
    _choice(cfg.train.device, "train.device", ("auto", "cpu", "cuda"))
    _choice(cfg.train.precision, "train.precision", ("auto", "bf16", "fp32"))
    _choice(cfg.train.cuda_graphs, "train.cuda_graphs", ("auto", "on", "off"))
    _choice(cfg.train.compile, "train.compile", ("auto", "on", "off"))
    _choice(cfg.train.grad_accum_fusion, "train.grad_accum_fusion", ("auto", "on", "off"))
    _choice(cfg.train.parallel_n1, "train.parallel_n1", ("auto", "on", "off"))
    _choice(cfg.train.optimizer_graph, "train.optimizer_graph", ("auto", "on", "off"))
    _choice(cfg.train.engine, "train.engine", ("megatron", "deepspeed"))
    if cfg.train.engine == "deepspeed":
        validate_deepspeed(cfg)
    _choice(cfg.log.wandb, "log.wandb", ("disabled", "offline", "online"))
    _choice(cfg.parallel.backend, "parallel.backend", ("auto", "gloo", "nccl"))
    _need(cfg.parallel.tp >= 1, "parallel.tp", "must be >= 1")
    _need(cfg.parallel.cp >= 1, "parallel.cp", f"must be >= 1, got {cfg.parallel.cp}")
    _need(cfg.parallel.cp <= cfg.sleep.window_len, "parallel.cp",
          f"{cfg.parallel.cp} context-parallel ranks need windows of at least as many tokens "
          f"(sleep.window_len={cfg.sleep.window_len})")
    validate_pipeline(cfg)
    total = 0
    for i, st in enumerate(cfg.train.stages):
        key = f"train.stages[{i}]"
        _need(st.steps >= 1, f"{key}.steps", f"must be >= 1, got {st.steps}")
        if st.eviction is not None:
            _choice(st.eviction, f"{key}.eviction", ("hard", "sliding"))
        if st.passes is not None:
            _need(st.passes >= 1, f"{key}.passes", "must be >= 1")
        total += st.steps
    if cfg.train.stages:
        _need(total == cfg.train.steps, "train.stages",
              f"stage steps add up to {total} but train.steps is {cfg.train.steps}")
