#!/usr/bin/env bash
# delete.sh: delete the TPU VM pod (no confirmation prompt). Copy the logs first: tpu_scripts/copy_logs.sh.
#
# Usage: TPU_NAME=my-pod [TPU_ZONE=us-central2-b] [TPU_PROJECT=my-project] [DRY_RUN=1] tpu_scripts/delete.sh
#
# Runs: gcloud compute tpus tpu-vm delete $TPU_NAME --zone=... --quiet
# Settings: see tpu_scripts/common.sh or tpu_scripts/README.md.

set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ $# -gt 0 ]]; then
  die "delete.sh takes no arguments (settings come from TPU_* environment variables)"
fi

run "${TPU_VM[@]}" delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
