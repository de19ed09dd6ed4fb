#!/usr/bin/env bash
# The body of eval_ruler.sh and eval_babilong.sh (sourced by them after env.sh, with SUITE and
# DEFAULT_TASKS set): `sleeptrain eval $RUN_DIR --suite $SUITE` over all GPUs of the
# allocation, with the scripts' trailing key=value overrides.
# shellcheck disable=SC2154  # SUITE, DEFAULT_TASKS: set by the sourcing script
: "${RUN_DIR:?set RUN_DIR to the run directory to evaluate}"
PORT="${MASTER_PORT:-29501}"
LENGTHS="${LENGTHS:-4k,8k,16k,32k,64k,128k}"
TASKS="${TASKS:-$DEFAULT_TASKS}"
N="${N:-20}"

args=(--suite "$SUITE" --lengths "$LENGTHS" --examples "$N")  # not --n: torchrun reads it as its own
if [[ -n "$TASKS" ]]; then args+=(--tasks "$TASKS"); fi
torchrun_on_nodes "$PORT" "sleeptrain-eval-${SLURM_JOB_ID:-local}" \
  -m sleeptrain.cli eval "$RUN_DIR" "${args[@]}" "$@"
