#!/usr/bin/env bash
# A local S3 endpoint for trying the s3:// paths without AWS: moto's server (installed with the
# test extras). Point boto3 at it with the printed variables.
set -euo pipefail
PORT=${S3_PORT:-5000}
echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1"
exec moto_server -H 127.0.0.1 -p "$PORT"
