"""Load: 50 dataset files landing in S3 within a minute give exactly 50 fine-tuning runs, all completed, none
duplicated or lost, never more running at once than the GPU limit; prints latency percentiles and server errors.

Twice: on SQLite (late-runs service off, infra/prefect-server.env) and on PostgreSQL, the production database, started
by infra/start-postgres.sh with the Prefect server started by infra/start-prefect-server.sh as production starts it
(late-runs service on). On PostgreSQL the API must answer no 503 and no automation action may fail.

The same real stack as tests/test_triggered_runs.py (`prefect server start`, moto S3 -> SQS, the S3 bridge, a
process worker), with its own bucket, queue, bridge, worker, pool and deployment so the shared `finetune/on-upload`
deployment and its counts are untouched. The pool is made by the shipped infra/create-work-pools.sh for a
two-GPU box (GPUS=2: pool concurrency 2), the deployment is on-upload from deployments/prefect.yaml with its
`concurrency_limit` raised to the GPU count as its comment says, and the worker would take twice that (--limit 4),
so only the server-side limits keep the runs at two.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from conftest import DEMO_DATA, SUMMARY_LINES
from local_stack import (PYTHON, ROOT, TINY_EVALUATION, TINY_TRAINING, Api, aws_env, base_env, boto_kwargs, free_port,
                         notification_body, notify_queue, postgres_cluster_folder, prefect_cli,
                         project_file_for_test, queue_empty, require_postgres, start_bridge, start_postgres,
                         start_prefect_server_script, start_worker, stop_stack, wait_for)

pytestmark = [pytest.mark.integration, pytest.mark.load]

GPUS = 2
FILES = 50
BURSTS = 5  # 10 files every 10 s: all 50 land within ~45 s
BURST_GAP_S = 10
BACKENDS = ("sqlite", "postgres")
PREFIX = "datasets/incoming/"
POOL = "gpu"  # the pool name infra/create-work-pools.sh creates and deployments/prefect.yaml uses
DEPLOYMENT = "on-upload-load"
ARTIFACTS = ROOT / "tests" / "artifacts"
# Real runs of the shipped flow, one optimizer step and one generated answer each: on 2 CPU cores most of a run's
# ~20 s is starting its process and importing Prefect, torch and transformers; this trims the rest, faking nothing.
LOAD_TRAINING = TINY_TRAINING | {"max_steps": 1, "eval_every": 1}
LOAD_EVALUATION = TINY_EVALUATION | {"max_new_tokens": 2, "max_generation_rows": 1}


@pytest.fixture(scope="module", params=BACKENDS)
def load_stack(request, moto_endpoint, tiny_model, stack_dir):
    """A Prefect server on the backend, the load deployment, a worker and a bridge on the backend's own bucket and
    queue (moto and the tiny model are shared)."""
    import boto3

    began, backend, folder = time.monotonic(), request.param, stack_dir / f"load-{request.param}"
    commit = commit_label()  # the tree the test starts from, whatever is committed while it runs
    folder.mkdir(exist_ok=True)
    with prefect_server_on(backend, request, moto_endpoint, folder) as (api_url, env, server_log):
        make_gpu_pool(env)
        deploy_load_deployment(env, tiny_model, folder, bucket := f"load-uploads-{backend}")
        s3 = boto3.client("s3", **boto_kwargs(moto_endpoint))
        sqs = boto3.client("sqs", **boto_kwargs(moto_endpoint))
        queue_url = notify_queue(s3, sqs, bucket, bucket)
        worker = start_worker("load-worker", POOL, 2 * GPUS, env, folder)
        bridge = start_bridge("load-bridge", queue_url, PREFIX, env, folder)
        try:
            yield {"backend": backend, "bucket": bucket, "api_url": api_url, "api": Api(api_url), "s3": s3, "sqs": sqs,
                   "queue_url": queue_url, "logs": [worker, bridge], "server_log": server_log,
                   "setup_s": time.monotonic() - began, "commit": commit}
        finally:
            stop_stack(worker, bridge)


@contextmanager
def prefect_server_on(backend: str, request, moto_endpoint: str, folder):
    """(API URL, CLI env, server log): SQLite is the session's server (tests/local_stack.py); PostgreSQL is a real
    server from infra/start-postgres.sh, under a Prefect server from infra/start-prefect-server.sh."""
    if backend == "sqlite":
        api_url = request.getfixturevalue("prefect_server")
        yield api_url, request.getfixturevalue("deployed")["env"], folder.parent / "prefect-server.log"
        return
    require_postgres()
    postgres = server = None
    with postgres_cluster_folder() as cluster:
        try:
            postgres, database_url = start_postgres("postgres", cluster, folder)
            port, home = free_port(), folder / "prefect-home"
            server = start_prefect_server_script("prefect-server", port, database_url, home, folder)
            api_url = f"http://127.0.0.1:{port}/api"
            yield api_url, base_env(home) | aws_env(moto_endpoint) | {"PREFECT_API_URL": api_url}, server.log
        finally:
            if server:
                server.stop(signals=(signal.SIGTERM, signal.SIGINT))
            if postgres:
                postgres.stop(signals=(signal.SIGINT,))  # PostgreSQL's fast shutdown


def make_gpu_pool(env: dict) -> None:
    """The shipped script, for a box with GPUS GPUs (it calls `prefect work-pool set-concurrency-limit`)."""
    script_env = env | {"GPUS": str(GPUS), "PATH": f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"}
    result = subprocess.run(["bash", str(ROOT / "infra" / "create-work-pools.sh")], env=script_env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"create-work-pools.sh failed:\n{result.stdout}\n{result.stderr}"


def deploy_load_deployment(env: dict, model: Path, folder: Path, bucket: str) -> None:
    """on-upload as shipped (trigger, parameters), renamed so the shared test's deployment stays alone, on the
    load bucket and pool, with the deployment concurrency limit set to the GPU count."""
    project = project_file_for_test(bucket, model, POOL, f"s3://{bucket}/models/incoming", LOAD_TRAINING,
                                    LOAD_EVALUATION, folder / "prefect.yaml", keep={"on-upload"})
    spec = yaml.safe_load(project.read_text())
    spec["deployments"][0]["name"] = DEPLOYMENT
    spec["deployments"][0]["concurrency_limit"]["limit"] = GPUS
    project.write_text(yaml.safe_dump(spec, sort_keys=False))
    prefect_cli(["--no-prompt", "deploy", "--prefect-file", str(project), "--all"], env, timeout_s=300)


def dataset_variant(index: int) -> bytes:
    """The demo rows rotated by `index` (reversed from 40 on): 80 distinct files of the same valid rows."""
    rows = (DEMO_DATA / "train.jsonl").read_text().splitlines()
    shift = index % len(rows)
    rows = rows[shift:] + rows[:shift]
    return ("\n".join(rows if index < len(rows) else rows[::-1]) + "\n").encode()


def upload_all(s3, bucket: str) -> dict[str, dict]:
    """FILES distinct objects in BURSTS bursts; key -> etag and when its upload began."""
    uploads, per_burst, began = {}, math.ceil(FILES / BURSTS), time.monotonic()
    for burst in range(BURSTS):
        # Bursts at fixed offsets: slow uploads on a busy machine do not push the later bursts back.
        time.sleep(max(0.0, began + burst * BURST_GAP_S - time.monotonic()))
        for index in range(burst * per_burst, min(FILES, (burst + 1) * per_burst)):
            key, body = f"{PREFIX}load-{index:02d}.jsonl", dataset_variant(index)
            started = datetime.now(timezone.utc)
            etag = s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"].strip('"')
            uploads[key] = {"etag": etag, "uploaded": started, "body": body}
    return uploads


def send_duplicates(s3, sqs, queue_url: str, bucket: str, uploads: dict[str, dict]) -> int:
    """Same bytes re-uploaded (same etag: a new S3 notification for an object already announced) and notifications
    re-sent as SQS would redeliver them. None of it is a new object. Returns how many were sent."""
    keys = sorted(uploads)
    reuploaded, renotified = keys[:3], keys[3:5] + keys[-2:]  # the last two may still be in the debounce window
    for key in reuploaded:
        s3.put_object(Bucket=bucket, Key=key, Body=uploads[key]["body"])
    for key in renotified:
        sqs.send_message(QueueUrl=queue_url, MessageBody=notification_body(
            bucket, key, uploads[key]["etag"], len(uploads[key]["body"])))
    return len(reuploaded) + len(renotified)


def test_fifty_uploads_in_a_minute_give_fifty_runs_within_the_gpu_limit(load_stack, request):
    api, logs, bucket = load_stack["api"], load_stack["logs"], load_stack["bucket"]
    deployment = api.deployment(f"finetune/{DEPLOYMENT}")
    began = time.monotonic()
    with ApiProbe(load_stack["api_url"]) as probe:
        uploads = upload_all(load_stack["s3"], bucket)
        upload_span = (max(u["uploaded"] for u in uploads.values()) - min(u["uploaded"] for u in uploads.values()))
        assert upload_span.total_seconds() < 60 and len({u["etag"] for u in uploads.values()}) == FILES
        duplicates = send_duplicates(load_stack["s3"], load_stack["sqs"], load_stack["queue_url"], bucket, uploads)

        wait_for(f"{FILES} flow runs", lambda: len(api.runs_of(deployment.id)) >= FILES, 600, logs, every_s=2)
        wait_for("the bridge to drain the queue", lambda: queue_empty(load_stack["sqs"], load_stack["queue_url"]),
                 120, logs, every_s=2)
        time.sleep(10)  # time for a (wrong) extra trigger firing to show up as a 51st run
        runs = api.runs_of(deployment.id)
        assert_one_run_per_upload(runs, uploads, bucket)

        runs = wait_for("every run to finish", lambda: all_final(api, deployment.id), 2400, logs, every_s=5)
    failed = [f"{r.name}: {r.state.type.value} {r.state.message}" for r in runs if not r.state.is_completed()]
    assert not failed, "\n".join(failed) + "\n" + "\n".join(p.tail(80) for p in logs)
    assert_one_run_per_upload(runs, uploads, bucket)  # still 50 once the queue has drained: no late extra run
    overlap = max_running(runs)
    figures = load_figures(load_stack, runs, uploads, overlap, duplicates, time.monotonic() - began, probe)
    request.config.stash.setdefault(SUMMARY_LINES, []).extend(report(figures))
    assert overlap <= GPUS, f"{overlap} runs were Running at once; the GPU limit is {GPUS}"
    assert overlap == GPUS, f"at most {overlap} ran at once: the load never reached the limit it is meant to test"
    if load_stack["backend"] == "postgres":
        # The production database: the late-runs service on (it relabelled waiting runs), and still no write refused.
        assert figures["runs_marked_late"] > 0, "no run was marked Late: the late-runs service was not on"
        assert (figures["api_503_logged_by_server"], figures["api_probe"]["503"],
                figures["automation_actions_failed"]) == (0, 0, 0), json.dumps(figures["server_errors"], indent=1)
    else:
        assert figures["runs_marked_late"] == 0, "runs were marked Late: infra/prefect-server.env turns that off"


def assert_one_run_per_upload(runs: list, uploads: dict[str, dict], bucket: str) -> None:
    """Each run's config names one uploaded object at its etag; every object has exactly one run."""
    got = sorted((r.parameters["config"]["data"], r.parameters["config"].get("data_etag")) for r in runs)
    want = sorted((f"s3://{bucket}/{key}", u["etag"]) for key, u in uploads.items())
    missing = sorted(set(want) - set(got))
    twice = sorted({g for g in got if got.count(g) > 1})
    extra = sorted(set(got) - set(want))
    assert (missing, twice, extra, len(runs)) == ([], [], [], FILES), (
        f"{len(runs)} runs; missing {missing}; duplicated {twice}; unexpected {extra}")


def all_final(api: Api, deployment_id) -> list | None:
    runs = api.runs_of(deployment_id)
    return runs if runs and all(r.state and r.state.is_final() for r in runs) else None


def max_running(runs: list) -> int:
    """Most runs whose [start_time, end_time) intervals overlap (an end sorts before a start at the same instant)."""
    edges = sorted([(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def percentiles(values: list[float]) -> dict:
    """Nearest-rank p50/p95/p99/max. With 50 samples p99 is the maximum and p95 the third largest."""
    ordered = sorted(values)

    def rank(p: float) -> float:
        return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 1)

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99), "max": round(ordered[-1], 1), "n": len(ordered)}


class ApiProbe:
    """Times one read (the newest runs) and one write (a Variable's value) against the API every second while the
    load runs, with no retries, so that a 503 counts here (Prefect's own client retries it without a word)."""

    def __init__(self, api_url: str):
        self.api_url, self.read_ms, self.write_ms, self.statuses = api_url, [], [], {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-probe", daemon=True)

    def __enter__(self) -> ApiProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.api_url, timeout=30) as client:
            self._timed(client, "POST", "/variables/", None, json={"name": "load-probe", "value": 0})
            tick = 0
            while not self._stop.wait(1.0):
                tick += 1
                self._timed(client, "POST", "/flow_runs/filter", self.read_ms,
                            json={"limit": 10, "sort": "EXPECTED_START_TIME_DESC"})
                self._timed(client, "PATCH", "/variables/name/load-probe", self.write_ms, json={"value": tick})

    def _timed(self, client, method: str, path: str, into: list | None, **kwargs) -> None:
        began = time.perf_counter()
        try:
            status = str(client.request(method, path, **kwargs).status_code)
        except Exception as error:  # noqa: BLE001 - a timeout or a dropped connection is a figure here, not a crash
            status = type(error).__name__
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if into is not None and status.startswith("2"):
            into.append((time.perf_counter() - began) * 1000)

    def figures(self) -> dict:
        return {"read_ms": percentiles(self.read_ms), "write_ms": percentiles(self.write_ms),
                "503": self.statuses.get("503", 0), "statuses": self.statuses}


def load_figures(stack: dict, runs, uploads, overlap: int, duplicates: int, elapsed_s: float, probe: ApiProbe) -> dict:
    def since_upload(run, moment) -> float:
        key = run.parameters["config"]["data"].split(f"s3://{stack['bucket']}/", 1)[1]
        return (moment - uploads[key]["uploaded"]).total_seconds()

    api = stack["api"]
    state_names = [{s.name for s in api.client.read_flow_run_states(r.id)} for r in runs]
    errors = server_errors(stack["server_log"])
    return {
        "backend": stack["backend"], "commit": stack["commit"], "files": FILES, "duplicates_sent": duplicates,
        "runs": len(runs), "gpu_limit": GPUS, "worker_limit": 2 * GPUS, "max_running_at_once": overlap,
        "runs_sent_to_AwaitingConcurrencySlot": sum("AwaitingConcurrencySlot" in names for names in state_names),
        "runs_marked_late": sum("Late" in names for names in state_names),
        "upload_to_run_created_s": percentiles([since_upload(r, r.created) for r in runs]),
        "run_created_to_running_s": percentiles([(r.start_time - r.created).total_seconds() for r in runs]),
        "run_created_to_completed_s": percentiles([(r.end_time - r.created).total_seconds() for r in runs]),
        "upload_to_running_s": percentiles([since_upload(r, r.start_time) for r in runs]),
        "run_duration_s": percentiles([(r.end_time - r.start_time).total_seconds() for r in runs]),
        "api_probe": probe.figures(),
        "first_upload_to_last_run_done_s": round(max(since_upload(r, r.end_time) for r in runs), 1),
        "setup_s": round(stack["setup_s"], 1),
        "test_body_s": round(elapsed_s, 1),
        "server_errors": errors,
        "database_is_locked": sum(n for message, n in errors.items() if "database is locked" in message),
        "api_503_logged_by_server": sum(n for message, n in errors.items() if message.startswith("503")),
        "automation_actions_failed": failed_actions(api),
        "bridge_announce_retries": stack["logs"][1].log.read_text(errors="replace").count("could not announce"),
    }


def commit_label() -> str:
    """The commit the figures came from, `+changes` when tracked files differed from it."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=30, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return head + ("+changes" if changed else "")


def failed_actions(api: Api) -> int:
    """`prefect.automation.action.failed` events: an action that failed (creating a run got a 503 from a locked
    SQLite) is not retried by Prefect; the bridge announces its upload again (tasks/s3_announce.py)."""
    answer = api.client.request("POST", "/events/filter", json={"filter": {
        "event": {"name": ["prefect.automation.action.failed"]}, "occurred": {"since": "2000-01-01T00:00:00Z"}},
        "limit": 50})
    return len(answer.json()["events"])


def server_errors(server_log: Path) -> dict[str, int]:
    """The server's logged ERROR records, counted by message. A 503 (a request the API refused because the database
    did not take it: SQLite's one write lock; on PostgreSQL a dropped connection or a cancelled query) is logged as
    "Encountered retryable exception" (PREFECT_SERVER_LOG_RETRYABLE_ERRORS, set by the tests) and counted as
    `503: <the database's error> [<the statement>]`; other records by their first line, "database is locked"
    marked. uvicorn's "Exception in ASGI application" is the same exception logged again after the API answered
    it, so it is not counted twice. With the late-runs service on, SQLite's were hundreds per run, and one of them
    cost a run (README)."""
    records = re.split(r"\n(?=\d\d:\d\d:\d\d\.\d+ \| )", server_log.read_text(errors="replace"))
    counts: dict[str, int] = {}
    for record in records:
        first = record.split("\n", 1)[0]
        if "| ERROR" not in first or "Exception in ASGI application" in first:
            continue
        message = re.sub(r"worker_name=.*", "", record.split(" - ", 1)[-1].split("\n", 1)[0]).strip()
        if "Encountered retryable exception" in message:
            errors = re.findall(r"^[\w.]+(?:Error|Exception): (.*)$", record, re.MULTILINE)
            statement = re.search(r"^\[SQL: (\w+(?: INTO| FROM)? \w+)", record, re.MULTILINE)
            message = f"503: {errors[-1][:120] if errors else '?'}" + (f" [{statement[1]}]" if statement else "")
        elif "database is locked" in record:
            message += " (database is locked)"
        message += " (a Late state)" if "'name': 'Late'" in record else ""
        counts[message] = counts.get(message, 0) + 1
    return counts


def report(figures: dict) -> list[str]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    artifact = ARTIFACTS / f"load-test-{figures['backend']}.json"
    artifact.write_text(json.dumps(figures, indent=2) + "\n")
    lines = [(f"\nload on {figures['backend']} ({figures['commit']}): {figures['files']} uploads "
              f"(+{figures['duplicates_sent']} duplicates) -> {figures['runs']} runs, at most "
              f"{figures['max_running_at_once']} running at once (limit {figures['gpu_limit']}); "
              f"{figures['runs_marked_late']} marked Late"),
             f"{'':<28}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}   (of 50 runs, p99 = max)"]
    for name in ("upload_to_run_created_s", "run_created_to_running_s", "run_created_to_completed_s",
                 "upload_to_running_s", "run_duration_s"):
        p = figures[name]
        lines.append(f"{name:<28}{p['p50']:>8}{p['p95']:>8}{p['p99']:>8}{p['max']:>8}")
    for name in ("read_ms", "write_ms"):
        p = figures["api_probe"][name]
        lines.append(f"{'api_' + name:<28}{p['p50']:>8}{p['p95']:>8}{p['p99']:>8}{p['max']:>8}   ({p['n']} requests)")
    lines.append(f"all {figures['runs']} done {figures['first_upload_to_last_run_done_s']}s after the first upload; "
                 f"setup {figures['setup_s']}s, test body {figures['test_body_s']}s; "
                 f"figures in {artifact.relative_to(ROOT)}")
    lines.append(f"errors: {figures['database_is_locked']} 'database is locked', "
                 f"{figures['api_503_logged_by_server']} 503s logged by the server, "
                 f"{figures['api_probe']['503']} seen by the probe, "
                 f"{figures['automation_actions_failed']} failed automation actions, "
                 f"{sum(figures['server_errors'].values())} server ERROR records")
    print("\n".join(lines))
    return lines
