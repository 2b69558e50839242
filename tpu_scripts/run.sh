#!/usr/bin/env bash
# run.sh: run one command on every worker of the pod at the same time, in the checkout with its .venv active.
#
# Usage: TPU_NAME=my-pod [DETACH=1] [TPU_REPO_DIR=~/jax_hd] [TPU_LOG_DIR=~/jax_hd_logs] [DRY_RUN=1] \
#          tpu_scripts/run.sh COMMAND [ARG...]
# e.g.   tpu_scripts/run.sh python -m experiments.igsearch \
#          --config=experiments/configs/igsearch.py:qwen2_5_3b_tpu --workdir=gs://bucket/run1
#
# COMMAND and its arguments reach the workers exactly as given (spaces and quotes intact). `python` is the
# .venv's python. Multi-host JAX needs no extra arguments: jax.distributed.initialize() finds the other hosts.
#   DETACH=1   start the command with nohup and return at once; output goes to $TPU_LOG_DIR/run.log on
#              each worker (fetch with tpu_scripts/copy_logs.sh)
#   otherwise  run in the foreground, every worker's output streamed here, until all of them finish
# Settings: see tpu_scripts/common.sh or tpu_scripts/README.md.

set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ $# -eq 0 ]]; then
  die "no command given. Usage: TPU_NAME=my-pod [DETACH=1] tpu_scripts/run.sh COMMAND [ARG...]"
fi

DETACH="${DETACH:-0}"
user_cmd="$(quote_cmd "$@")"
repo_dir="$(remote_path "$TPU_REPO_DIR")"
log_dir="$(remote_path "$TPU_LOG_DIR")"

enter="cd $repo_dir && . .venv/bin/activate"
if [[ "$DETACH" == 1 ]]; then
  # Only the user's command is backgrounded, with every stream redirected, so ssh returns at once.
  remote="mkdir -p $log_dir && $enter && { nohup $user_cmd > $log_dir/run.log 2>&1 < /dev/null & }"
  # shellcheck disable=SC2016  # $(hostname) and $! are for the worker's shell
  remote+=' && echo "$(hostname): started pid $!, log '"$log_dir"'/run.log"'
else
  remote="$enter && $user_cmd"
fi
on_all_workers "$remote"
