#!/usr/bin/env bash
# shellcheck shell=bash
#
# common.sh: shared settings and helpers for the tpu_scripts/*.sh pod scripts. Not run directly:
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#
# Settings (environment variables):
#   TPU_NAME         name of the TPU VM / pod (required)
#   TPU_ZONE         zone (default us-central2-b)
#   TPU_ACCELERATOR  accelerator type (default v4-32)
#   TPU_RUNTIME      TPU VM software version (default tpu-ubuntu2204-base)
#   TPU_PROJECT      GCP project; adds --project=... to every gcloud call when set
#   TPU_SPOT         1: create the pod as a Spot VM (--spot)
#   TPU_REPO_URL     git URL of this repository to clone on the workers; empty: copy the local checkout
#   TPU_REPO_DIR     checkout on each worker (default ~/jax_hd; keep the ~ quoted so the worker expands it)
#   TPU_PYTHON       interpreter that creates the workers' .venv (default python3.11)
#   TPU_LOG_DIR      log directory on each worker (default ~/jax_hd_logs)
#   TPU_NUM_WORKERS  number of hosts in the pod (default: asked with describe; 4 under DRY_RUN=1)
#   DRY_RUN          1: print every command (to stderr, prefixed "+ ") instead of running it
#
# Helpers: run CMD...          print CMD shell-quoted, then run it unless DRY_RUN=1
#          on_all_workers CMD  run the remote shell command string CMD on every worker at the same time
#          shell_quote / quote_cmd / remote_path   quoting for commands that a remote shell parses

set -euo pipefail

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  echo "common.sh is sourced by the other tpu_scripts/*.sh; run one of those instead." >&2
  exit 2
fi

die() {
  echo "error: $*" >&2
  exit 1
}

if [[ -z "${TPU_NAME:-}" ]]; then
  die "TPU_NAME is not set: export the name of the TPU VM pod first, e.g. TPU_NAME=my-pod $0"
fi

TPU_ZONE="${TPU_ZONE:-us-central2-b}"
TPU_ACCELERATOR="${TPU_ACCELERATOR:-v4-32}"
TPU_RUNTIME="${TPU_RUNTIME:-tpu-ubuntu2204-base}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_SPOT="${TPU_SPOT:-0}"
TPU_REPO_URL="${TPU_REPO_URL:-}"
TPU_REPO_DIR="${TPU_REPO_DIR:-~/jax_hd}"
# The constraints pin jax 0.10.x and numpy 2.4, which need Python >= 3.11; Ubuntu 22.04's python3 is 3.10.
TPU_PYTHON="${TPU_PYTHON:-python3.11}"
TPU_LOG_DIR="${TPU_LOG_DIR:-~/jax_hd_logs}"
TPU_NUM_WORKERS="${TPU_NUM_WORKERS:-}"
DRY_RUN="${DRY_RUN:-0}"

# The checkout these scripts live in (what setup.sh copies when TPU_REPO_URL is empty).
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Flags every `gcloud compute tpus tpu-vm` call takes.
GCLOUD_FLAGS=(--zone="$TPU_ZONE")
if [[ -n "$TPU_PROJECT" ]]; then
  GCLOUD_FLAGS+=(--project="$TPU_PROJECT")
fi
TPU_VM=(gcloud compute tpus tpu-vm)

if [[ "$DRY_RUN" != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found on PATH: install the Google Cloud CLI (or set DRY_RUN=1 to only print the commands)"
fi

# shell_quote WORD: WORD as one shell word (left bare when it is plainly safe, else single-quoted).
shell_quote() {
  local s="$1" sq="'" esc="'\\''"
  if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//$sq/$esc}"
  fi
}

# quote_cmd ARG...: the arguments as one command line that a shell splits back into the same ARGs
# (--flag=VALUE is written --flag='VALUE' rather than '--flag=VALUE', which reads better).
quote_cmd() {
  local out="" arg word
  for arg in "$@"; do
    if [[ "$arg" =~ ^(--[A-Za-z0-9_-]+=)(.*)$ ]]; then
      word="${BASH_REMATCH[1]}$(shell_quote "${BASH_REMATCH[2]}")"
    else
      word="$(shell_quote "$arg")"
    fi
    out+="${out:+ }$word"
  done
  printf '%s' "$out"
}

# remote_path PATH: PATH quoted for the worker's shell, a leading ~/ left unquoted so the worker expands it.
remote_path() {
  local p="$1"
  if [[ "$p" == "~" ]]; then
    printf '%s' "~"
  elif [[ "$p" == \~/* ]]; then
    printf '%s/%s' "~" "$(shell_quote "${p#"~/"}")"
  else
    shell_quote "$p"
  fi
}

# scp_path PATH: PATH for the remote side of scp, which starts in the home directory (no ~ needed).
scp_path() {
  local p="$1"
  if [[ "$p" == "~" ]]; then
    printf '.'
  elif [[ "$p" == \~/* ]]; then
    printf '%s' "${p#"~/"}"
  else
    printf '%s' "$p"
  fi
}

# run CMD...: print the command (stderr, "+ " prefix, shell-quoted), then run it unless DRY_RUN=1.
run() {
  printf '+ %s\n' "$(quote_cmd "$@")" >&2
  if [[ "$DRY_RUN" == 1 ]]; then
    return 0
  fi
  "$@"
}

# on_all_workers COMMAND_STRING: run a remote shell command on every worker of the pod simultaneously.
on_all_workers() {
  run "${TPU_VM[@]}" ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$1"
}
