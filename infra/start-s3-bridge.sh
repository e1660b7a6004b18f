#!/usr/bin/env bash
# Start the S3 -> Prefect bridge: long-polls the SQS queue that receives the bucket's notifications
# (infra/s3-notification.json) and emits one s3.object.created event per new (bucket, key, etag).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${QUEUE_URL:?export QUEUE_URL=<the SQS queue URL>}"
: "${PREFECT_API_URL:?export PREFECT_API_URL=http://<server>:4200/api}"
exec python -m flows.s3_bridge --queue-url "$QUEUE_URL" --prefix "${PREFIX:-datasets/incoming/}" \
  --debounce "${DEBOUNCE:-10}" --group "${GROUP:-object}"
