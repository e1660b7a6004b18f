"""The Prefect server is killed (SIGKILL) in the middle of a burst of 50 uploads and restarted on the same
database; the reconciler (`prefect-finetune reconcile`, tasks/data/s3_reconcile.py) then gives every upload its run:
exactly 50 runs, one per (key, etag), none twice.

The real path: moto's S3 notifying SQS, the S3 bridge process, a `prefect server start` of the test's own
(its own SQLite file and port, killed and started again as itself), deployments/prefect.yaml's `on-upload`
deployment and its trigger registered with `prefect deploy`. No worker: a run counts once the trigger has
created it (Scheduled), which is what the server can lose; running it is tests/test_load.py's business.
The kill lands while events the bridge has had accepted have no run yet, so the crash loses them.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from local_stack import (PYTHON, ROOT, TINY_EVALUATION, TINY_TRAINING, Api, RestartableServer, aws_env, base_env,
                         boto_kwargs, notify_queue, prefect_cli, project_file_for_test, queue_empty, start_bridge,
                         wait_for)

pytestmark = pytest.mark.integration

FILES = 50
KILL_AFTER = 10  # uploads announced before the kill (the bridge's log says so)
BUCKET = "kill-uploads"
PREFIX = "datasets/incoming/"
POOL = "kill-gpu"
OUTAGE_S = 3  # down this long, plus the server's start-up time
GRACE_S = 15  # the reconciler leaves an upload alone this long after it was announced


@pytest.fixture(scope="module")
def stack(moto_endpoint, tmp_path_factory):
    import boto3

    folder = tmp_path_factory.mktemp("server-kill")
    server = RestartableServer(folder)
    server.start()
    env = base_env(folder / "client-home") | aws_env(moto_endpoint) | {"PREFECT_API_URL": server.api}
    bridge = None
    try:
        prefect_cli(["work-pool", "create", POOL, "--type", "process"], env)
        # No run is executed, so the model is only a name in the run's config.
        project = project_file_for_test(BUCKET, folder / "model", POOL, f"s3://{BUCKET}/models/incoming", TINY_TRAINING,
                                        TINY_EVALUATION, folder / "prefect.yaml", keep={"on-upload"})
        prefect_cli(["--no-prompt", "deploy", "--prefect-file", str(project), "--all"], env, timeout_s=300)
        s3, sqs = boto3.client("s3", **boto_kwargs(moto_endpoint)), boto3.client("sqs", **boto_kwargs(moto_endpoint))
        queue_url = notify_queue(s3, sqs, BUCKET, "kill-uploads")
        bridge = start_bridge("kill-bridge", queue_url, PREFIX, env, folder, debounce_s=1)
        yield {"server": server, "env": env, "s3": s3, "sqs": sqs, "queue_url": queue_url, "bridge": bridge}
    finally:
        if bridge:
            bridge.stop()
        server.stop(signal.SIGTERM)


def announced(bridge) -> int:
    return bridge.log.read_text(errors="replace").count("bridge: emitted s3.object.created")


def reconcile(env: dict) -> dict:
    result = subprocess.run([PYTHON, "-m", "tasks.cli", "reconcile", "--grace", str(GRACE_S), "--json"], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"reconcile failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.splitlines()[-1])


def test_uploads_lost_by_a_killed_server_get_one_run_each(stack):
    began = time.monotonic()
    server, bridge, s3 = stack["server"], stack["bridge"], stack["s3"]
    logs = [bridge, server.process]
    api = Api(server.api)
    deployment_id = api.deployment("finetune/on-upload").id
    uploads = {}

    def upload(index: int) -> None:
        key = f"{PREFIX}kill-{index:02d}.jsonl"
        body = json.dumps({"text": f"upload {index}"}).encode() + b"\n"
        uploads[f"s3://{BUCKET}/{key}"] = s3.put_object(Bucket=BUCKET, Key=key, Body=body)["ETag"].strip('"')

    for index in range(FILES // 2):
        upload(index)
    # The crash: once KILL_AFTER uploads are announced (accepted by the API) and fewer of them have a run.
    def in_flight() -> tuple[int, int] | None:
        sent = announced(bridge)
        runs = len(api.runs_of(deployment_id)) if sent >= KILL_AFTER else sent
        return (sent, runs) if runs < sent else None

    announced_before, runs_before = wait_for(f"{KILL_AFTER} uploads announced, one without its run yet", in_flight,
                                             120, logs, every_s=0.1)
    server.stop(signal.SIGKILL)
    for index in range(FILES // 2, FILES):  # the rest of the burst lands while the server is down
        upload(index)
    time.sleep(OUTAGE_S)
    server.start()
    api = Api(server.api)
    wait_for("the bridge to announce every upload", lambda: queue_empty(stack["sqs"], stack["queue_url"]), 300, logs,
             every_s=2)
    time.sleep(GRACE_S)  # the runs of the last events the bridge sent are created by now, as the first pass assumes

    passes, sent = [], 0
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        counts = reconcile(stack["env"])
        passes.append(counts)
        sent += counts["reannounced"]
        if counts["with_run"] == FILES:
            break
        time.sleep(3)
    assert passes[-1]["with_run"] == FILES, f"{passes}\n{bridge.tail(60)}"
    time.sleep(8)  # time for a (wrong) copy of an event to fire its trigger a second time
    runs = api.runs_of(deployment_id)
    got = sorted((r.parameters["config"]["data"], r.parameters["config"]["data_etag"]) for r in runs)
    twice = sorted({g for g in got if got.count(g) > 1})
    assert (sorted(set(got) ^ set(uploads.items())), twice, len(runs)) == ([], [], FILES), (
        f"{len(runs)} runs for {FILES} uploads; duplicated {twice}; passes {passes}")
    first = passes[0]
    print(f"\nserver killed after {announced_before} uploads announced and {runs_before} runs created; after the "
          f"restart and the bridge's retries {first['with_run']} of {FILES} uploads had their run; the reconciler "
          f"sent {sent} event(s) again ({', '.join(u.rsplit('/', 1)[1] for u in first['reannounced_uris'])}) in "
          f"{len(passes)} pass(es); then {len(runs)} runs, 0 duplicated; test body {time.monotonic() - began:.0f}s")
    assert first["with_run"] < FILES and sent > 0, "the kill lost no run, so the reconciler was not tested"
