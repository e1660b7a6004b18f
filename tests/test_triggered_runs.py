"""Uploads start fine-tuning runs, exactly once, through the real stack.

`prefect server start` on 127.0.0.1, deployments/prefect.yaml registered with `prefect deploy` (its
trigger, templates and schedule as shipped; pool, bucket, model and run size swapped for the test's),
a real process worker, moto's server with S3 -> SQS bucket notifications, and the S3 bridge process.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from conftest import DEMO_DATA
from local_stack import (BUCKET, POOL, ROOT, Api, assert_trained_with_dpo, boto_kwargs, notification_body,
                         notify_queue, published_manifests, queue_empty, start_bridge, start_worker, stop_stack)
from local_stack import wait_for as stack_wait_for

pytestmark = pytest.mark.integration

PREFIX = "datasets/incoming/"


@pytest.fixture(scope="module")
def stack(prefect_server, moto_endpoint, deployed, stack_dir):
    import boto3

    env = deployed["env"]
    s3 = boto3.client("s3", **boto_kwargs(moto_endpoint))
    sqs = boto3.client("sqs", **boto_kwargs(moto_endpoint))
    queue_url = notify_queue(s3, sqs, BUCKET, "dataset-uploads")
    worker = start_worker("worker", POOL, 1, env, stack_dir)
    bridge = start_bridge("s3-bridge", queue_url, PREFIX, env, stack_dir)
    try:
        yield {"api": prefect_server, "s3": s3, "sqs": sqs, "queue_url": queue_url, "logs": [worker, bridge]}
    finally:
        stop_stack(worker, bridge)


def wait_for(what: str, check, timeout_s: float, stack: dict, every_s: float = 0.5):
    return stack_wait_for(what, check, timeout_s, stack["logs"], every_s)


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
    wait_for("the bridge to drain the queue", lambda: queue_empty(sqs, stack["queue_url"]), 60, stack)
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


def test_nightly_retraining_schedule_is_registered(stack):
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    expected = next(d for d in spec["deployments"] if d["name"] == "nightly")["schedules"][0]
    deployment = Api(stack["api"]).deployment("retrain/nightly")
    # Registered paused by the tests (local_stack.project_file_for_test); test_deployments checks it ships active.
    schedules = [s.schedule for s in deployment.schedules]
    assert [(s.cron, s.timezone) for s in schedules] == [(expected["cron"], expected["timezone"])]
    assert deployment.work_pool_name == POOL


def test_a_preference_upload_starts_one_dpo_run_and_no_sft_run(stack):
    """A file of preference pairs under incoming/preference/ starts exactly one run, of on-preference-upload
    (objective dpo), and none of on-upload, whose trigger watches the rest of incoming/."""
    s3, api = stack["s3"], Api(stack["api"])
    dpo, sft = api.deployment("finetune/on-preference-upload"), api.deployment("finetune/on-upload")
    sft_runs = len(api.runs_of(sft.id))
    key = PREFIX + "preference/pairs.jsonl"
    etag = s3.put_object(Bucket=BUCKET, Key=key, Body=(DEMO_DATA / "preference_train.jsonl").read_bytes())["ETag"]
    runs = wait_for("a flow run for the preference upload", lambda: api.runs_of(dpo.id), 90, stack)
    run = finish(api, runs[0].id, stack)
    config = run.parameters["config"]
    assert config["data"] == f"s3://{BUCKET}/{key}" and config["data_etag"] == etag.strip('"')
    assert config["objective"] == "dpo" and config["evaluation"]["metric"] == "preference_accuracy"
    [manifest] = [m for m in published_manifests(s3, BUCKET, "models/incoming")
                  if m["run"]["flow_run_id"] == str(run.id)]
    assert_trained_with_dpo(manifest)
    # By the time the run has finished, a trigger that wrongly matched the event would have made its run long ago.
    assert len(api.runs_of(dpo.id)) == 1 and len(api.runs_of(sft.id)) == sft_runs


def test_the_nightly_schedule_runs_retraining_with_dpo(stack):
    """retrain/nightly as registered from prefect.yaml, with `objective: dpo` and a prefix of preference files in
    its config (what a user edits there): its cron schedule's run trains with DPO and publishes. The run is made
    by the server's own scheduling code (POST /deployments/<id>/schedule, the models.deployments.schedule_runs
    the scheduler service calls) for the schedule's last 03:00 slot, rather than waiting for the next one."""
    s3, api = stack["s3"], Api(stack["api"])
    nightly = api.deployment("retrain/nightly")
    [schedule] = nightly.schedules
    for key, demo in (("datasets/pairs/train/pairs.jsonl", "preference_train.jsonl"),
                      ("datasets/pairs/eval.jsonl", "preference_eval.jsonl")):
        s3.put_object(Bucket=BUCKET, Key=key, Body=(DEMO_DATA / demo).read_bytes())
    config = {**nightly.parameters["config"], "objective": "dpo", "data": f"s3://{BUCKET}/datasets/pairs/train/",
              "eval_data": f"s3://{BUCKET}/datasets/pairs/eval.jsonl", "output": f"s3://{BUCKET}/models/nightly-dpo"}
    slot = datetime.now(timezone.utc).replace(hour=3, minute=0, second=0, microsecond=0)
    slot -= timedelta(days=1) if slot > datetime.now(timezone.utc) else timedelta(0)
    client = api.client
    client.request("PATCH", f"/deployments/{nightly.id}", json={"parameters": {"config": config}})
    client.update_deployment_schedule(nightly.id, schedule.id, active=True)
    try:
        around_slot = {"start_time": (slot - timedelta(seconds=1)).isoformat(),
                       "end_time": (slot + timedelta(seconds=1)).isoformat()}
        client.request("POST", f"/deployments/{nightly.id}/schedule",
                       json=around_slot | {"min_time": 0, "min_runs": 1, "max_runs": 1})
        runs = wait_for("the scheduled run", lambda: [r for r in api.runs_of(nightly.id)
                                                     if r.expected_start_time == slot], 30, stack)
        assert len(runs) == 1 and runs[0].created_by.type == "SCHEDULE" and runs[0].created_by.id == schedule.id
        run = finish(api, runs[0].id, stack)
    finally:
        client.update_deployment_schedule(nightly.id, schedule.id, active=False)  # as registered (and its runs gone)
        client.request("PATCH", f"/deployments/{nightly.id}", json={"parameters": nightly.parameters})
    assert run.parameters["config"]["objective"] == "dpo"
    [manifest] = published_manifests(s3, BUCKET, "models/nightly-dpo")
    assert_trained_with_dpo(manifest)
