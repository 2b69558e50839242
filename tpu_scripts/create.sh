#!/usr/bin/env bash
# create.sh: create the TPU VM pod.
#
# Usage: TPU_NAME=my-pod [TPU_ZONE=us-central2-b] [TPU_ACCELERATOR=v4-32] [TPU_RUNTIME=tpu-ubuntu2204-base] \
#          [TPU_SPOT=1] [TPU_PROJECT=my-project] [DRY_RUN=1] tpu_scripts/create.sh
#
# Runs: gcloud compute tpus tpu-vm create $TPU_NAME --zone=... --accelerator-type=... --version=... [--spot]
# Settings: see tpu_scripts/common.sh or tpu_scripts/README.md.

set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ $# -gt 0 ]]; then
  die "create.sh takes no arguments (settings come from TPU_* environment variables)"
fi

args=("${TPU_VM[@]}" create "$TPU_NAME" "${GCLOUD_FLAGS[@]}"
  --accelerator-type="$TPU_ACCELERATOR" --version="$TPU_RUNTIME")
if [[ "$TPU_SPOT" == 1 ]]; then
  args+=(--spot)
fi
run "${args[@]}"
