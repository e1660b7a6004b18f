#!/usr/bin/env bash
# Everything on one machine, for trying the event-driven path: Prefect server (SQLite), moto's S3 + SQS
# with bucket notifications, the work pools, the deployments, a process worker on `gpu` and `cpu`,
# and the bridge. Ctrl-C stops them all (by the PIDs started here). Run it with the venv active
# (`source .venv/bin/activate`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_HOME=${PREFECT_HOME:-$(pwd)/.prefect} PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_API_URL=http://127.0.0.1:${PREFECT_PORT:-4200}/api
export AWS_ENDPOINT_URL=http://127.0.0.1:${S3_PORT:-5000} AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1 FINETUNE_REPO_DIR=$(pwd)
pids=()
stop() {  # newest first (bridge, workers, then the servers they talk to); workers exit on SIGINT after SIGTERM
  for ((i=${#pids[@]}-1; i>=0; i--)); do kill -TERM "${pids[i]}" 2>/dev/null || true; done
  sleep 2
  for ((i=${#pids[@]}-1; i>=0; i--)); do kill -INT "${pids[i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT
infra/start-prefect-server.sh & pids+=($!)
infra/start-s3.sh & pids+=($!)
until curl -sf "$PREFECT_API_URL/health" >/dev/null; do sleep 1; done
until curl -sf "$AWS_ENDPOINT_URL/moto-api/" >/dev/null; do sleep 1; done
QUEUE_URL=$(python - <<'PY'
import json, boto3
s3, sqs = boto3.client("s3"), boto3.client("sqs")
s3.create_bucket(Bucket="my-bucket")
url = sqs.create_queue(QueueName="dataset-uploads")["QueueUrl"]
arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
config = json.load(open("infra/s3-notification.json"))
config["QueueConfigurations"][0]["QueueArn"] = arn
s3.put_bucket_notification_configuration(Bucket="my-bucket", NotificationConfiguration=config)
print(url)
PY
)
echo "bucket my-bucket notifies $QUEUE_URL"
infra/create-work-pools.sh
# The deployments whose pools exist here (the router and its Kubernetes pools need KUBERNETES=1).
prefect --no-prompt deploy --prefect-file deployments/prefect.yaml --name gpu --name on-upload --name on-preference-upload --name nightly --name poll --name every-10-minutes
python infra/apply_automations.py deployments/automations.yaml
POOL=gpu infra/start-worker.sh & pids+=($!)
POOL=cpu infra/start-worker.sh & pids+=($!)
QUEUE_URL=$QUEUE_URL infra/start-s3-bridge.sh & pids+=($!)
echo "UI: http://127.0.0.1:${PREFECT_PORT:-4200}  upload: aws s3 cp data.jsonl s3://my-bucket/datasets/incoming/ (preference pairs: .../incoming/preference/)"
wait
