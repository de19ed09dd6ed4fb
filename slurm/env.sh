#!/usr/bin/env bash
# Environment, allocation facts and the launcher shared by the sleeptrain SLURM scripts
# (sourced, not run). Every value can be overridden by exporting it before sbatch.
# shellcheck disable=SC2034

# Megatron-style kernel ordering: one CUDA work queue per device, so that TP communication is
# issued before the computation that overlaps it.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# NCCL: report asynchronous errors as exceptions (a hung collective fails the job instead of
# holding the allocation), and a readable log level on failure.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
# Tracebacks of every thread on a fatal signal or a hang dump.
export PYTHONFAULTHANDLER="${PYTHONFAULTHANDLER:-1}"
export PYTHONUNBUFFERED=1
# Kernel caches per job (Triton for FLA, TileLang for FLA's Hopper backward): no contention
# between jobs on a shared home directory.
JOB_TAG="${SLURM_JOB_ID:-local}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/sleeptrain-triton-${JOB_TAG}}"
export TILELANG_CACHE_DIR="${TILELANG_CACHE_DIR:-${TMPDIR:-/tmp}/sleeptrain-tilelang-${JOB_TAG}}"
# wandb: offline by default (compute nodes often have no network; `wandb sync` later). The
# trainer keeps the run id in the run directory, so a requeued job continues the same run.
export WANDB_MODE="${WANDB_MODE:-offline}"

# The allocation: the Python to run, nodes, GPUs per node, the host of the c10d rendezvous.
PYTHON="${PYTHON:-python3}"
NODES="${NODES:-${SLURM_JOB_NUM_NODES:-1}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
# sed reads all of its input: no SIGPIPE for scontrol under pipefail (head -n 1 would)
HEAD_NODE="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | sed -n 1p)"
mkdir -p logs

# torchrun_on_nodes PORT RDZV_ID ARGS...: one srun task per node, each a torchrun with one
# process per GPU, meeting at $HEAD_NODE:PORT; ARGS follow torchrun's options (-m module ...).
torchrun_on_nodes() {
  local port="$1" rdzv_id="$2"
  shift 2
  srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
    "$PYTHON" -m torch.distributed.run \
      --nnodes="$NODES" --nproc-per-node="$GPUS_PER_NODE" \
      --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$port" --rdzv-id="$rdzv_id" "$@"
}
