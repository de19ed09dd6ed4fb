#!/usr/bin/env bash
# Train configs/7b_sleep.yaml (or $CONFIG) on a SLURM allocation, surviving preemption and time
# limits by itself:
#
#   sbatch slurm/train_7b_sleep.sh                               # 2 nodes x 8 GPUs, TP=2
#   CONFIG=configs/lm_350m_shards.yaml sbatch --nodes=1 slurm/train_7b_sleep.sh \
#       data.shards=[data/corpus] train.run_dir=runs/350m          # trailing key=value overrides
#   CONFIG=configs/30b_sleep.yaml sbatch --nodes=2 slurm/train_7b_sleep.sh   # 30B, TP=8 x PP=2
#   CONFIG=configs/30b_sleep.yaml sbatch --nodes=4 slurm/train_7b_sleep.sh \
#       parallel.pp=4 parallel.pp_in_flight=8                        # 4 nodes: TP=8 x PP=4
#
# The pre-flight `sleeptrain plan CONFIG --gpus WORLD --preflight` checks the TP x CP x PP x DP
# layout against the allocation (and prints the pipeline stages and bubble) before torchrun.
#
# One srun task per node runs torchrun (c10d rendezvous on the allocation's first host), which
# starts one training process per GPU. The script runs srun in the background and waits, so
# that its signal trap fires: SLURM sends SIGUSR1 (--signal=B:USR1@300, five minutes before
# the time limit) or SIGTERM (preemption); the trap writes STOP into the run directory, which
# every rank checks at its next step boundary: all ranks agree, save the same step and exit 0.
# The script then requeues the job (scontrol requeue); the requeued job runs this same command
# and resumes from the newest complete checkpoint (an interrupted write is never chosen).
# Dry run of the allocation itself: sbatch --test-only slurm/train_7b_sleep.sh
#
#SBATCH --job-name=sleeptrain-7b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
CONFIG="${CONFIG:-configs/7b_sleep.yaml}"
PORT="${MASTER_PORT:-29500}"
REQUEUE="${REQUEUE:-1}"
SLURM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# sbatch runs a copy of this script from its spool directory: then take the submit directory's
[[ -f "$SLURM_DIR/env.sh" ]] || SLURM_DIR="${SLURM_SUBMIT_DIR:-$(pwd)}/slurm"
# shellcheck source=slurm/env.sh
source "$SLURM_DIR/env.sh"

WORLD=$((NODES * GPUS_PER_NODE))
echo "[$(date -u +%FT%TZ)] job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}:" \
     "$NODES nodes x $GPUS_PER_NODE GPUs, config $CONFIG"
# Preflight: layout vs world size, head/vocab divisibility, memory, shards vs readers,
# writable run directory. Fails here, before any node starts a GPU job. It also resolves the
# run directory from the config and the overrides.
run_dir_file="$(mktemp)"
"$PYTHON" -m sleeptrain.cli plan "$CONFIG" --gpus "$WORLD" --preflight \
  --run-dir-file "$run_dir_file" "$@"
RUN_DIR="$(cat "$run_dir_file")"
rm -f "$run_dir_file" "$RUN_DIR/STOP"  # a STOP left by the previous (preempted) job

stop_requested=0
# shellcheck disable=SC2329  # invoked by the trap below
on_signal() {
  echo "[$(date -u +%FT%TZ)] got a stop signal: asking every rank to save and exit"
  stop_requested=1
  touch "$RUN_DIR/STOP"
}
trap on_signal USR1 TERM

torchrun_on_nodes "$PORT" "sleeptrain-${SLURM_JOB_ID:-local}" \
  -m sleeptrain.cli train "$CONFIG" "$@" &
train_pid=$!

# `wait` returns early when a trapped signal arrives; keep waiting for the training to end.
status=0
while true; do
  if wait "$train_pid"; then status=0; else status=$?; fi
  if ! kill -0 "$train_pid" 2>/dev/null; then break; fi
done

if [[ "$stop_requested" == 1 && "$REQUEUE" == 1 && -n "${SLURM_JOB_ID:-}" ]]; then
  echo "[$(date -u +%FT%TZ)] training saved and exited ($status); requeueing ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
