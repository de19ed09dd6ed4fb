"""The typed configuration tree: dataclasses turned into an OmegaConf structured config.

Every field has a default so that ``OmegaConf.structured(RunConfig)`` is a complete config;
YAML files and ``key=value`` overrides only change what they name. Cross-field checks live in
``sleeptrain.config.validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """The hybrid stack: layer pattern, widths and kernel backends.

    ``pattern`` has one symbol per block: ``A`` attention + MLP, ``G`` gated DeltaNet + MLP,
    ``a`` attention without MLP, ``g`` gated DeltaNet without MLP (Ouro-style inserted layers),
    ``M`` an MLP-only block. The loop range ``[loop_start, loop_end)`` is what sleep repeats;
    ``loop_end: null`` means the end of the stack.
    """

    vocab_size: int = 32
    d_model: int = 64
    pattern: str = "AGAG"
    loop_start: int = 0
    loop_end: int | None = None
    # attention
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    # gated DeltaNet: qk heads, value heads (GQA-style grouping: gdn_v_heads % gdn_heads == 0)
    gdn_heads: int = 2
    gdn_v_heads: int | None = None
    gdn_head_dim: int = 32
    gdn_v_head_dim: int | None = None
    conv_kernel: int = 4
    # MLP (SwiGLU); null: 8/3 * d_model rounded up to a multiple of 64
    ffn_hidden: int | None = None
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    params_dtype: str = "float32"
    attention_backend: str = "sdpa"  # sdpa | flash
    gdn_backend: str = "auto"  # auto | fla | short | chunked | recurrent
    # the GDN input chain (conv, SiLU, q/k norms, gates): chain (fused.gdn_inputs, compiled
    # with train.compile) | triton (sleeptrain.model.kernels.gdn_inputs, CUDA)
    gdn_inputs: str = "chain"
    gdn_chunk_size: int = 32  # chunk length of the PyTorch reference (chunked backend)
    # FLA's chunk length (fla backend): 32 | 64, or 0: the smallest of those that holds the
    # call's tokens (a 24-token window in one 32-row chunk); FLA's TileLang backward refuses 16
    fla_chunk_size: int = 64


@dataclass
class SleepConfig:
    """Windows, eviction, sleep passes and the gradient mode (DESIGN.md section 1).

    ``passes`` is N: the wake pass plus N-1 sleep passes over the loop range at every eviction.
    ``grad_mode``: ``full`` (BPTT through everything), ``truncated`` (only the last
    ``grad_passes`` sleep passes of a window carry gradient; the state is also detached every
    ``detach_every`` windows when > 0) or ``implicit`` (``implicit_method`` ``neumann`` with
    ``neumann_terms`` terms, or ``phantom`` unrolling the last ``grad_passes`` passes).
    ``checkpoint``: activation checkpointing per window-pass.
    """

    window_len: int = 24
    passes: int = 1
    eviction: str = "hard"  # hard | sliding
    grad_mode: str = "full"  # full | truncated | implicit
    grad_passes: int = 1
    detach_every: int = 0
    implicit_method: str = "neumann"  # neumann | phantom
    neumann_terms: int = 4
    checkpoint: bool = False
    # randomized sleep depth (training only): when non-empty, each optimizer step draws its N
    # uniformly from this list, seeded by train.seed and the step (stage overrides of
    # ``passes`` still win); evaluation and inference use ``passes``.
    random_passes: list[int] = field(default_factory=list)


@dataclass
class DataConfig:
    """Where training examples come from.

    ``source: task``: a procedural generator (``task``, ``task_args``). ``source: shards``:
    tokenized WebDataset shards written by ``tools/make_shards.py`` (``shards``: dataset
    directories, manifest files, glob/brace patterns or ``pipe:`` commands), packed into rows of
    ``seq_len`` input tokens with every document starting at a window boundary.
    """

    source: str = "task"  # task | shards
    task: str = "rule110"
    task_args: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    eval_batch_size: int = 64
    shards: list[str] = field(default_factory=list)
    eval_shards: list[str] = field(default_factory=list)  # held-out loss (empty: no eval)
    seq_len: int = 2048  # input tokens per packed row (shards)
    workers: int = 2  # DataLoader worker processes per rank (0: read in the main process)
    shuffle_buffer: int = 1000  # documents shuffled within a shard
    epochs: int = 0  # 0: repeat the shards forever; E > 0: stop after E epochs (all ranks)
    on_corrupt: str = "error"  # error | skip (count and skip an unreadable shard)
    tokenizer: str = ""  # "byte" or a local HF tokenizer dir (decoding in previews / eval)
    # ``pipe:`` shard URLs run a shell command: accepted only with this explicit opt-in, and
    # only from the config itself (never from a shard manifest)
    allow_pipe: bool = False


@dataclass
class OptimConfig:
    """Muon for hidden matrices plus AdamW for the rest, with warm-up and decay."""

    use_muon: bool = True
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    # torch.optim.Muon's lr scaling: "original" (Keller Jordan's, muon_lr ~0.02) or
    # "match_rms_adamw" (update RMS matched to AdamW's: use an AdamW-sized muon_lr)
    muon_adjust_lr: str = "original"
    adamw_lr: float = 3e-3
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adamw_eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class StageConfig:
    """One training stage: which parameters train, for how many steps, with what overrides.

    ``trainable``: ``all``, ``gdn`` (the gated DeltaNet mixers only: the paper's SSM-only
    warm-up) or a regular expression matched against parameter names. ``eviction`` and
    ``passes`` override ``sleep.*`` during the stage when set.
    """

    name: str = "main"
    steps: int = 0
    trainable: str = "all"
    eviction: str | None = None
    passes: int | None = None


@dataclass
class TrainConfig:
    """The loop: steps, accumulation, precision, checkpoints and evaluation cadence."""

    steps: int = 200
    grad_accum: int = 1
    seed: int = 0
    run_dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    ckpt_every: int = 100
    keep_last: int = 3
    eval_every: int = 100
    eval_examples: int = 256
    max_nonfinite: int = 5
    stages: list[StageConfig] = field(default_factory=list)
    # stop (checkpoint saved, exit 0) once this many minutes of wall-clock have passed since the
    # trainer was created: set-up, resume and compilation count, as they do in a job's limit
    exit_after_minutes: float = 0.0
    peak_tflops: float = 0.0  # per-GPU bf16 peak for MFU (0: from the GPU's name)
    save_at_end: bool = True  # checkpoint after the last step (benchmarks turn it off)
    init_from: str = ""  # a run dir or checkpoint dir: its model weights start a new run
    # micro-batch forward+backward as CUDA graphs (sleeptrain.train.step): auto (on for
    # CUDA at TP=1) | on | off (docs/design.md, "CUDA graphs and compiled elementwise chains").
    cuda_graphs: str = "auto"
    # torch.compile of the layers' elementwise chains (sleeptrain.model.kernels.fused): auto
    # (on for CUDA) | on | off. Static shapes and inductor's deterministic mode: a resumed
    # process compiles the same kernels as the uninterrupted one (docs/design.md).
    compile: str = "auto"
    # linears with bf16 weight copies made once per micro-batch and weight gradients added
    # into the fp32 .grad by the GEMM (sleeptrain.model.kernels.linear): auto (on for CUDA)
    # | on | off.
    grad_accum_fusion: str = "auto"
    # the optimizer step (Muon + AdamW on device learning rates) replayed as one CUDA graph
    # (sleeptrain.train.optim_step): auto (on for CUDA where micro-batch graphs are used) |
    # on | off. Its GPU test (tests/test_graphs_gpu.py, 20 trainer steps that replay it 18
    # times) passed on an H200 on 2026-12-02.
    optimizer_graph: str = "auto"
    # N=1 steps (no window sleeps, no document resets, no state detaching or checkpointing)
    # as one call per layer over the whole row (sleeptrain.sleep.runner.parallel_loss): auto
    # (on for CUDA) | on | off. Same loss and gradients up to float rounding.
    parallel_n1: str = "auto"
    # which engine runs the step: megatron (megatron-core layers, DDP / distributed optimizer,
    # TP / CP / PP) or deepspeed (DeepSpeed ZeRO 1-3 with CPU offload, for fine-tuning
    # pretrained models retrofitted with sleep; the ``deepspeed`` section, docs/design.md)
    engine: str = "megatron"
    # CPU threads for torch (intra-op) on a CPU run: 0 = auto (OMP_NUM_THREADS if set; else 1
    # for d_model < 1024, else the usable cores, at most 8, shared by the node's ranks);
    # printed at start-up
    threads: int = 0
    # torch.profiler over steps [first, last] (metrics.jsonl step numbers, inclusive): traces,
    # kernel tables and a per-phase summary in RUN_DIR/profile/ (sleeptrain.train.profiling);
    # empty: off
    profile_steps: list[int] = field(default_factory=list)
    # deterministic kernels (torch's deterministic algorithms, cuBLAS workspace, no flash /
    # cuDNN attention): bitwise-repeatable GPU runs and exact resume, at some speed
    # (sleeptrain.train.determinism); CPU runs are repeatable without it
    deterministic: bool = False


@dataclass
class LogConfig:
    """Logging: progress bar, metrics.jsonl cadence, wandb mode."""

    every: int = 10
    progress: bool = True
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "sleeptrain"
    wandb_name: str | None = None


@dataclass
class ParallelConfig:
    """Process-group layout. TP is tensor parallelism over megatron-core's parallel layers;
    CP (context parallelism) splits every training window's tokens over ``cp`` ranks; PP
    (pipeline parallelism) gives each of ``pp`` stages a contiguous range of blocks and runs
    the step's micro-batches through the sleep loop's visit schedule
    (``sleeptrain.parallel.schedule``)."""

    tp: int = 1
    cp: int = 1  # context parallelism: world = tp x cp x pp x dp
    pp: int = 1  # pipeline stages
    # where stages 1..pp-1 start (block indices, increasing); empty: balanced by the FLOP
    # model (a loop-range block counts N times per sleeping window), `sleeptrain plan` prints it
    pp_split: list[int] = field(default_factory=list)
    # micro-batches whose forward may have started before the oldest one's backward is done
    # (0: all of the step's); bounds the boundary tensors a stage holds
    pp_in_flight: int = 0
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    sequence_parallel: bool = False  # split training windows' residual stream over TP ranks
    # ZeRO-1: each data-parallel rank keeps the optimizer state of its share of the parameters
    shard_optimizer: bool = False


@dataclass
class DeepSpeedSection:
    """The DeepSpeed ZeRO engine (``train.engine=deepspeed``; docs/design.md, "DeepSpeed
    engine"). Batch size, accumulation, clipping, the optimizer and its learning rates come
    from ``data``, ``train`` and ``optim``; this section sets ZeRO. ``config_file``: a plain
    DeepSpeed JSON file whose keys are laid over the ones built here (a key sleeptrain also
    sets must agree with it). ZeRO-3 parameter settings left at null are chosen from the sleep
    loop (the loop range's parameters are used N times per window)."""

    stage: int = 2  # ZeRO stage: 0 (plain data parallel), 1, 2 or 3
    offload_optimizer: bool = False  # optimizer state (and its step) on the CPU
    offload_params: bool = False  # parameters on the CPU between uses (stage 3 only)
    bf16_weights: bool = False  # DeepSpeed's bf16 mode: bf16 weights and gradients, fp32 master
    reduce_bucket_size: int = 50_000_000  # elements per gradient reduction bucket
    allgather_bucket_size: int = 50_000_000  # elements per all-gather bucket (stages 1, 2)
    overlap_comm: bool = False  # overlap gradient reduction with the backward
    # stage 3 (null: from the loop range, docs/design.md)
    prefetch_bucket_size: int | None = None
    param_persistence_threshold: int | None = None
    max_live_parameters: int | None = None
    max_reuse_distance: int | None = None
    config_file: str = ""


@dataclass
class RunConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sleep: SleepConfig = field(default_factory=SleepConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
