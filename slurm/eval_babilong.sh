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
SUITE=babilong
DEFAULT_TASKS="qa1,qa2,qa3,qa4,qa5"
SLURM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# sbatch runs a copy of this script from its spool directory: then take the submit directory's
[[ -f "$SLURM_DIR/env.sh" ]] || SLURM_DIR="${SLURM_SUBMIT_DIR:-$(pwd)}/slurm"
# shellcheck source=slurm/env.sh
source "$SLURM_DIR/env.sh"
# shellcheck source=slurm/eval_suite.sh
source "$SLURM_DIR/eval_suite.sh"
