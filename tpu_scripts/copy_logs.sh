#!/usr/bin/env bash
# copy_logs.sh: copy TPU_LOG_DIR from every worker of the pod to ./tpu_logs/$TPU_NAME/worker-<i>/.
#
# Usage: TPU_NAME=my-pod [TPU_LOG_DIR=~/jax_hd_logs] [TPU_NUM_WORKERS=4] [DRY_RUN=1] tpu_scripts/copy_logs.sh
#
# The number of workers is TPU_NUM_WORKERS when set, else asked from
#   gcloud compute tpus tpu-vm describe $TPU_NAME --format='value(networkEndpoints.len())'
# (under DRY_RUN=1, where nothing is asked, it is 4). Each worker's directory is copied with
#   gcloud compute tpus tpu-vm scp --recurse --worker=<i> $TPU_NAME:<log dir> ./tpu_logs/$TPU_NAME/worker-<i>/
# so worker i's run.sh log ends up in ./tpu_logs/$TPU_NAME/worker-<i>/<basename of TPU_LOG_DIR>/run.log.
# Settings: see tpu_scripts/common.sh or tpu_scripts/README.md.

set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ $# -gt 0 ]]; then
  die "copy_logs.sh takes no arguments (settings come from TPU_* environment variables)"
fi

num_workers="$TPU_NUM_WORKERS"
if [[ -z "$num_workers" ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then
    num_workers=4
    echo "# DRY_RUN=1: assuming 4 workers (set TPU_NUM_WORKERS to choose)" >&2
  else
    num_workers="$(run "${TPU_VM[@]}" describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
      --format='value(networkEndpoints.len())')"
  fi
fi
if ! [[ "$num_workers" =~ ^[1-9][0-9]*$ ]]; then
  die "could not tell the number of workers of $TPU_NAME (got '$num_workers'); set TPU_NUM_WORKERS"
fi

dest_root="tpu_logs/$TPU_NAME"
src="$TPU_NAME:$(scp_path "$TPU_LOG_DIR")"
for ((i = 0; i < num_workers; i++)); do
  dest="$dest_root/worker-$i"
  run mkdir -p "$dest"
  run "${TPU_VM[@]}" scp --recurse "$src" "$dest/" "${GCLOUD_FLAGS[@]}" --worker="$i"
done
echo "logs of $num_workers workers in ./$dest_root/" >&2
