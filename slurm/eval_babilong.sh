#!/usr/bin/env bash
# Long-context evaluation (sleeptrain eval --suite babilong) of a run's latest checkpoint, with
# the samples of every (task, length) cell split over all GPUs of the allocation. Cells are
# files: a requeued or resubmitted job skips the finished ones.
#
#   RUN_DIR=runs/7b_sleep sbatch slurm/eval_babilong.sh
#   RUN_DIR=runs/7b_sleep LENGTHS=4k,1M N=50 sbatch --nodes=2 slurm/eval_babilong.sh sleep.passes=4
#
# Results: $RUN_DIR/eval_babilong/{results.csv,results.md,heatmap.png}.
#
#SBATCH --job-name=sleeptrain-eval-babilong
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
: "${RUN_DIR:?set RUN_DIR to the run directory to evaluate}"
PYTHON="${PYTHON:-python3}"
NODES="${NODES:-${SLURM_JOB_NUM_NODES:-1}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
PORT="${MASTER_PORT:-29501}"
LENGTHS="${LENGTHS:-4k,8k,16k,32k,64k,128k}"
TASKS="${TASKS:-qa1,qa2,qa3,qa4,qa5}"
N="${N:-20}"
SLURM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# sbatch runs a copy of this script from its spool directory: then take the submit directory's
[[ -f "$SLURM_DIR/env.sh" ]] || SLURM_DIR="${SLURM_SUBMIT_DIR:-$(pwd)}/slurm"
# shellcheck source=slurm/env.sh
source "$SLURM_DIR/env.sh"
mkdir -p logs
HEAD_NODE="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | sed -n 1p)"  # sed reads all: no SIGPIPE under pipefail

args=(--suite babilong --lengths "$LENGTHS" --n "$N")
if [[ -n "$TASKS" ]]; then args+=(--tasks "$TASKS"); fi
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
  "$PYTHON" -m torch.distributed.run \
    --nnodes="$NODES" --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$PORT" \
    --rdzv-id="sleeptrain-eval-${SLURM_JOB_ID:-local}" \
    -m sleeptrain.cli eval "$RUN_DIR" "${args[@]}" "$@"
