#!/usr/bin/env bash
# Start a process worker on this machine for POOL (default gpu). One run at a time per GPU: --limit.
# Runs execute this checkout (FINETUNE_REPO_DIR, read by prefect.yaml's pull step).
set -euo pipefail
cd "$(dirname "$0")/.."
export FINETUNE_REPO_DIR=${FINETUNE_REPO_DIR:-$(pwd)}
export PREFECT_HOME=${PREFECT_HOME:-$(pwd)/.prefect}
: "${PREFECT_API_URL:?export PREFECT_API_URL=http://<server>:4200/api first (infra/start-prefect-server.sh prints it)}"
exec prefect worker start --pool "${POOL:-gpu}" --type process --limit "${GPUS:-1}"
