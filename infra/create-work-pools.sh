#!/usr/bin/env bash
# Create (or update) the work pools deployments/prefect.yaml uses. Run with the venv active and
# PREFECT_API_URL set.
#   gpu                  process pool for a single GPU box (infra/work-pools/process-gpu.json);
#                        pool concurrency = GPUS: one run per GPU
#   cpu                  process pool for light flows: the pool router and the S3 sensor
#   gpu-24gb, gpu-80gb   (KUBERNETES=1) Kubernetes pools, one per GPU size, from
#                        infra/work-pools/kubernetes-gpu.json; needs `pip install prefect-kubernetes`
#                        here and where the Kubernetes worker runs
set -euo pipefail
cd "$(dirname "$0")"
GPUS=${GPUS:-1}
prefect work-pool create gpu --type process --base-job-template work-pools/process-gpu.json --overwrite
prefect work-pool set-concurrency-limit gpu "$GPUS"
prefect work-pool create cpu --type process --overwrite
if [ "${KUBERNETES:-0}" = 1 ]; then
  for pool in gpu-24gb gpu-80gb; do
    prefect work-pool create "$pool" --type kubernetes --base-job-template work-pools/kubernetes-gpu.json --overwrite
  done
  echo "now set each pool's node_selector to its GPU nodes' labels (UI: Work Pools > pool > Edit)"
fi
