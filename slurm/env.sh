#!/usr/bin/env bash
# Environment shared by the sleeptrain SLURM scripts (sourced, not run). Every value can be
# overridden by exporting it before sbatch.
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
