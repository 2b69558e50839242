#!/usr/bin/env bash
# setup.sh: put this repository on every worker of the pod and install it into a .venv there.
#
# Usage: TPU_NAME=my-pod [TPU_REPO_URL=https://.../jax_hd.git] [TPU_REPO_DIR=~/jax_hd] [TPU_PYTHON=python3.11] \
#          [DRY_RUN=1] tpu_scripts/setup.sh
#
# On all workers at once:
#   1. code: TPU_REPO_URL set: `git clone` it into TPU_REPO_DIR, or `git pull --ff-only` if already cloned.
#            TPU_REPO_URL empty: pack the local checkout (without .venv, runs, tpu_logs, caches), copy the
#            archive with `gcloud compute tpus tpu-vm scp --worker=all` and unpack it into TPU_REPO_DIR.
#   2. python: install TPU_PYTHON and its venv module with apt if missing (the pinned set needs >= 3.11).
#   3. `TPU_PYTHON -m venv .venv` (kept if present), then `pip install -c constraints.txt -e '.[tpu]'`.
# Safe to run again after changing the code. Settings: see tpu_scripts/common.sh or tpu_scripts/README.md.

set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ $# -gt 0 ]]; then
  die "setup.sh takes no arguments (settings come from TPU_* environment variables)"
fi

repo_dir="$(remote_path "$TPU_REPO_DIR")"
py="$(shell_quote "$TPU_PYTHON")"

# 1. The code.
if [[ -n "$TPU_REPO_URL" ]]; then
  url="$(shell_quote "$TPU_REPO_URL")"
  on_all_workers "if [ -d $repo_dir/.git ]; then git -C $repo_dir pull --ff-only; else git clone $url $repo_dir; fi"
else
  # `tpu-vm scp --recurse` cannot exclude anything, so the checkout travels as one archive without .venv/runs.
  archive_name="jax_hd_src.tar.gz"
  stage="$(mktemp -d)"
  trap 'rm -rf "$stage"' EXIT
  run tar -C "$REPO_ROOT" --exclude=./.venv --exclude=./runs --exclude=./tpu_logs \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache -czf "$stage/$archive_name" .
  run "${TPU_VM[@]}" scp "$stage/$archive_name" "$TPU_NAME:$archive_name" "${GCLOUD_FLAGS[@]}" --worker=all
  on_all_workers "mkdir -p $repo_dir && tar -xzf ~/$archive_name -C $repo_dir && rm -f ~/$archive_name"
fi

# 2 and 3. Python, the venv and the package with its TPU extra, pinned by the repository's constraints.
apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -y -qq"
steps=(
  "if ! $py -c 'import ensurepip, venv' >/dev/null 2>&1; then $apt update && $apt install $py $py-venv; fi"
  "cd $repo_dir"
  "{ [ -x .venv/bin/python ] || $py -m venv .venv; }"
  ".venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip"
  ".venv/bin/python -m pip install --disable-pip-version-check -c constraints.txt -e '.[tpu]'"
  ".venv/bin/python -c 'import jax, jax_hd; print(\"jax\", jax.__version__, \"installed\")'"
)
remote=""
for step in "${steps[@]}"; do
  remote+="${remote:+ && }$step"
done
on_all_workers "$remote"
