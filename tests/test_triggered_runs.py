"""Uploads start fine-tuning runs, exactly once, through the real stack.

`prefect server start` on 127.0.0.1, deployments/prefect.yaml registered with `prefect deploy` (its
trigger, templates and schedule as shipped; pool, bucket, model and run size swapped for the test's),
a real process worker, moto's server with S3 -> SQS bucket notifications, and the S3 bridge process.
"""
from __future__ import annotations

import json
import signal
import time
from datetime import datetime, timezone

import pytest
import yaml

from conftest import DEMO_DATA
from local_stack import BUCKET, POOL, PYTHON, ROOT, Process

pytestmark = pytest.mark.integration

PREFIX = "datasets/incoming/"


@pytest.fixture(scope="module")
def stack(prefect_server, moto_endpoint, deployed, stack_dir):
    import boto3

    env = deployed["env"]
    s3 = boto3.client("s3", **_boto(moto_endpoint))
    sqs = boto3.client("sqs", **_boto(moto_endpoint))
    s3.create_bucket(Bucket=BUCKET)
    queue_url = sqs.create_queue(QueueName="dataset-uploads")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    # The notification config the README gives for production (infra/s3-notification.json), on moto.
    config = json.loads((ROOT / "infra" / "s3-notification.json").read_text())
    config["QueueConfigurations"][0]["QueueArn"] = queue_arn
    s3.put_bucket_notification_configuration(Bucket=BUCKET, NotificationConfiguration=config)

    worker_env = env | {"FINETUNE_REPO_DIR": str(ROOT), "PREFECT_WORKER_QUERY_SECONDS": "1",
                        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(stack_dir / "results")}
    worker = Process("worker", [PYTHON, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
                                "--limit", "1"], worker_env, stack_dir)
    bridge = Process("s3-bridge", [PYTHON, "-m", "flows.s3_bridge", "--queue-url", queue_url, "--prefix", PREFIX,
                                   "--debounce", "2", "--wait", "1"], env, stack_dir)
    try:
        yield {"api": prefect_server, "s3": s3, "sqs": sqs, "queue_url": queue_url, "logs": [worker, bridge]}
    finally:
        bridge.stop()
        worker.stop(signals=(signal.SIGTERM, signal.SIGINT))  # the worker exits on SIGINT after SIGTERM


def _boto(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
            "region_name": "us-east-1"}


class Api:
    def __init__(self, api: str):
        from prefect.client.orchestration import SyncPrefectClient

        self.client = SyncPrefectClient(api)

    def deployment(self, name: str):
        return self.client.read_deployment_by_name(name)

    def runs_of(self, deployment_id) -> list:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.client.schemas.sorting import FlowRunSort

        return self.client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                          sort=FlowRunSort.EXPECTED_START_TIME_ASC)


def wait_for(what: str, check, timeout_s: float, stack: dict, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    logs = "\n\n".join(f"--- {p.name} ---\n{p.tail(60)}" for p in stack["logs"])
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{logs}")


def notification_body(bucket: str, key: str, etag: str, size: int) -> str:
    """What S3 puts in SQS for a PUT, as a redelivery or a second notification would carry it."""
    return json.dumps({"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
                                    "eventTime": datetime.now(timezone.utc).isoformat(), "eventName": "ObjectCreated:Put",
                                    "s3": {"bucket": {"name": bucket},
                                           "object": {"key": key, "size": size, "eTag": etag}}}]})


def finish(api: Api, run_id, stack: dict):
    def final():
        run = api.client.read_flow_run(run_id)
        return run if run.state and run.state.is_final() else None

    run = wait_for(f"flow run {run_id} to finish", final, 300, stack, every_s=2)
    assert run.state.is_completed(), f"{run.state.type}: {run.state.message}\n" + "\n".join(
        p.tail(60) for p in stack["logs"])
    return run


def test_each_new_upload_starts_exactly_one_run(stack):
    s3, sqs, api = stack["s3"], stack["sqs"], Api(stack["api"])
    deployment = api.deployment("finetune/on-upload")
    first = (DEMO_DATA / "train.jsonl").read_bytes()

    uploaded = datetime.now(timezone.utc)
    put = s3.put_object(Bucket=BUCKET, Key=PREFIX + "first.jsonl", Body=first)
    etag = put["ETag"].strip('"')
    runs = wait_for("a flow run for the upload", lambda: api.runs_of(deployment.id), 90, stack)
    created = runs[0].created
    running = wait_for("the run to start", lambda: api.client.read_flow_run(runs[0].id).start_time, 120, stack)
    print(f"\nupload -> flow run created {(created - uploaded).total_seconds():.1f}s, "
          f"-> running {(running - uploaded).total_seconds():.1f}s (bridge debounce 2s, worker poll 1s)")
    run = finish(api, runs[0].id, stack)
    config = run.parameters["config"]
    assert config["data"] == f"s3://{BUCKET}/{PREFIX}first.jsonl" and config["data_etag"] == etag

    published = s3.list_objects_v2(Bucket=BUCKET, Prefix="models/incoming/runs/")["Contents"]
    manifests = [o["Key"] for o in published if o["Key"].endswith("/manifest.json")]
    assert len(manifests) == 1
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=manifests[0])["Body"].read())
    assert manifest["run"]["flow_run_id"] == str(run.id)
    assert manifest["data"]["sources"][0]["etag"] == etag

    # The same object again: re-uploaded with the same bytes (same etag), a redelivered notification,
    # S3's test event, and keys that are no dataset files. None of it gives a run.
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "first.jsonl", Body=first)
    sqs.send_message(QueueUrl=stack["queue_url"],
                     MessageBody=notification_body(BUCKET, PREFIX + "first.jsonl", etag, len(first)))
    sqs.send_message(QueueUrl=stack["queue_url"], MessageBody=json.dumps(
        {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": BUCKET}))
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "notes.txt", Body=b"not data")
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "_temporary/part-0.jsonl", Body=first)
    wait_for("the bridge to drain the queue", lambda: _queue_empty(sqs, stack["queue_url"]), 60, stack)
    time.sleep(5)  # time for a (wrong) second trigger to fire and a run to be created
    assert len(api.runs_of(deployment.id)) == 1

    # A second, new file: a second run.
    second = b"\n".join(reversed(first.strip().split(b"\n"))) + b"\n"
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "second.jsonl", Body=second)
    runs = wait_for("a second flow run", lambda: (r := api.runs_of(deployment.id)) and len(r) >= 2 and r, 90, stack)
    assert len(runs) == 2
    run = finish(api, runs[1].id, stack)
    assert run.parameters["config"]["data"] == f"s3://{BUCKET}/{PREFIX}second.jsonl"
    assert len(api.runs_of(deployment.id)) == 2


def _queue_empty(sqs, queue_url: str) -> bool:
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return all(v == "0" for v in attributes.values())


def test_nightly_retraining_schedule_is_registered(stack):
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    expected = next(d for d in spec["deployments"] if d["name"] == "nightly")["schedules"][0]
    deployment = Api(stack["api"]).deployment("retrain/nightly")
    schedules = [s.schedule for s in deployment.schedules if s.active]
    assert [(s.cron, s.timezone) for s in schedules] == [(expected["cron"], expected["timezone"])]
    assert deployment.work_pool_name == POOL
