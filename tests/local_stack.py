"""The real local stack as processes: `prefect server start`, moto's server (S3 + SQS), a process worker,
the S3 bridge. Each is started in its own process group and stopped by its PID (never by name).

Imported by conftest; the fixtures are session-scoped so the integration and browser tests share one
server (startup and migrations cost ~15-30 s on a 2-core machine).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
POOL = "test-gpu"
BUCKET = "uploads"
TINY_TRAINING = {"learning_rate": 3e-3, "lr_schedule": "constant", "max_steps": 2, "batch_size": 8,
                 "max_seq_len": 128, "eval_every": 2, "early_stopping_patience": 0}
TINY_EVALUATION = {"max_new_tokens": 4, "max_generation_rows": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child process in its own session (so the worker's flow-run children go with it), logging to a file."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_dir: Path, cwd: Path = ROOT):
        self.name, self.log = name, log_dir / f"{name}.log"
        self._log_file = open(self.log, "w")
        self.popen = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, signals=(signal.SIGTERM,), grace_s: float = 10) -> None:
        """Each signal in turn to the process group led by our PID, then SIGKILL."""
        for signum in (*signals, signal.SIGKILL):
            if self.popen.poll() is not None:
                break
            try:
                os.killpg(self.pid, signum)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                continue
        try:  # children of the group that outlived their leader (a flow run of the worker)
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log_file.close()


def wait_http(url: str, process: Process, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status < 500:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{process.name}: {url} did not answer in {timeout_s:.0f}s:\n{process.tail()}")


def base_env(prefect_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update({
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PYTHONPATH": str(ROOT),  # the worktree's tasks/ and flows/, not an installed copy
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    return env


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stack")


def server_settings() -> dict:
    """The server settings production uses (infra/prefect-server.env, read by infra/start-prefect-server.sh)."""
    settings = {}
    for line in (ROOT / "infra" / "prefect-server.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def start_prefect_server(name: str, port: int, db: Path, prefect_home: Path, log_dir: Path) -> Process:
    """`prefect server start` on 127.0.0.1:`port` with its SQLite database at `db`; returns once it answers.
    Starting it again with the same port, database and home is a restart of the same server."""
    api = f"http://127.0.0.1:{port}/api"
    env = base_env(prefect_home) | server_settings() | {
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}",
        "PREFECT_UI_API_URL": api,  # the UI's browser calls go here, not to the default port 4200
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true",  # each 503 the API answers is logged: test_load counts them
    }
    server = Process(name, [PYTHON, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                            "--port", str(port)], env, log_dir)
    return answering(server, f"{api}/health", timeout_s=180)


class RestartableServer:
    """One Prefect server (port, SQLite file, home) that can be stopped and started again as itself."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.starts = folder, free_port(), 0
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.process: Process | None = None

    def start(self) -> None:
        self.starts += 1
        self.process = start_prefect_server(f"prefect-server-{self.starts}", self.port, self.folder / "prefect.db",
                                            self.folder / "prefect-home", self.folder)

    def stop(self, signum: int) -> None:
        """`signum` to the server's process group (SIGKILL alone: a crash, no shutdown code runs)."""
        self.process.stop(signals=(signum, signal.SIGINT) if signum != signal.SIGKILL else ())

    def interrupt(self, signum: int, outage_s: float) -> float:
        """Stop, stay down `outage_s`, start again; returns how long the API did not answer."""
        down = time.monotonic()
        self.stop(signum)
        time.sleep(outage_s)
        self.start()
        return time.monotonic() - down


def postgres_missing() -> str | None:
    """Why infra/start-postgres.sh cannot start PostgreSQL here (its own message), or None when it can."""
    check = subprocess.run(["bash", str(ROOT / "infra" / "start-postgres.sh"), "--check"], capture_output=True,
                           text=True, timeout=30, check=False)
    return None if check.returncode == 0 else (check.stderr or check.stdout).strip()


def require_postgres() -> None:
    """Skip, saying why, when PostgreSQL cannot start here; under `make test` (which installs it,
    FINETUNE_REQUIRE_POSTGRES=1) fail instead, so that CI never passes without it."""
    if missing := postgres_missing():
        if os.environ.get("FINETUNE_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL is required (FINETUNE_REQUIRE_POSTGRES): {missing}")
        pytest.skip(f"PostgreSQL: {missing}")


@contextmanager
def postgres_cluster_folder():
    """A folder for a cluster that the `postgres` user can enter when the tests run as root (pytest's temporary
    folders are private to the user that runs them); removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="finetune-pg-"))
    folder.chmod(0o711)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def start_postgres(name: str, folder: Path, log_dir: Path) -> tuple[Process, str]:
    """infra/start-postgres.sh: a real PostgreSQL server on a free port, its cluster in `folder` (which must be one
    the `postgres` user may enter when this runs as root); returns it and the connection URL it prints."""
    env = base_env(folder) | {"PGDATA": str(folder / "data"), "PG_PORT": str(free_port())}
    server = Process(name, ["bash", str(ROOT / "infra" / "start-postgres.sh")], env, log_dir)
    try:
        log = wait_for_log(server, "database system is ready to accept connections", timeout_s=180)
    except BaseException:
        server.stop(signals=(signal.SIGINT,))
        raise
    export = next(line for line in log.splitlines() if line.startswith("export PREFECT_API_DATABASE_CONNECTION_URL="))
    # Evaluated as the README says to: the line reads the password from its file.
    url = subprocess.run(["bash", "-c", 'eval "$1" && printf %s "$PREFECT_API_DATABASE_CONNECTION_URL"', "_", export],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return server, url


def start_prefect_server_script(name: str, port: int, database_url: str, prefect_home: Path, log_dir: Path) -> Process:
    """infra/start-prefect-server.sh, as production starts it, on `database_url`; returns once the API answers."""
    env = base_env(prefect_home) | {
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url, "PREFECT_PORT": str(port),
        "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the script runs `prefect`
        "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true",
    }
    server = Process(name, ["bash", str(ROOT / "infra" / "start-prefect-server.sh")], env, log_dir)
    return answering(server, f"http://127.0.0.1:{port}/api/health", timeout_s=240)


def answering(server: Process, health_url: str, timeout_s: float) -> Process:
    """`server` once `health_url` answers; stopped (SIGTERM, then SIGINT) if it never does."""
    try:
        wait_http(health_url, server, timeout_s=timeout_s)
    except BaseException:
        server.stop(signals=(signal.SIGTERM, signal.SIGINT))
        raise
    return server


def wait_for_log(process: Process, text: str, timeout_s: float) -> str:
    """The process's log once it contains `text`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = process.log.read_text(errors="replace")
        if text in log:
            return log
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")
        time.sleep(0.5)
    raise TimeoutError(f"{process.name}: no '{text}' in {timeout_s:.0f}s:\n{process.tail()}")


@pytest.fixture(scope="session")
def prefect_server(stack_dir):
    """`prefect server start` on 127.0.0.1 (SQLite in a temp dir); yields its API URL."""
    port = free_port()
    server = start_prefect_server("prefect-server", port, stack_dir / "prefect.db", stack_dir / "prefect-home",
                                  stack_dir)
    try:
        yield f"http://127.0.0.1:{port}/api"
    finally:
        server.stop(signals=(signal.SIGTERM, signal.SIGINT))


@pytest.fixture(scope="session")
def moto_endpoint(stack_dir):
    """moto's server (S3 and SQS in one process, so S3 can notify SQS) as a child process."""
    port = free_port()
    moto = Process("moto", [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                   base_env(stack_dir / "prefect-home"), stack_dir)
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", moto, timeout_s=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        moto.stop()


@pytest.fixture(scope="session")
def deployed(prefect_server, moto_endpoint, tiny_model, stack_dir) -> dict:
    """deployments/prefect.yaml (tiny runs, the test's pool and bucket) registered with `prefect deploy`."""
    env = base_env(stack_dir / "prefect-home") | aws_env(moto_endpoint) | {"PREFECT_API_URL": prefect_server}
    project = deploy(env, tiny_model, POOL, f"s3://{BUCKET}/models/incoming", stack_dir,
                     keep=("gpu", "on-upload", "on-preference-upload", "nightly"))
    return {"env": env, "project": project}


def deploy(env: dict, model: Path, pool: str, output: str, folder: Path, keep: tuple[str, ...],
           pool_template: Path | None = None, training: dict = TINY_TRAINING) -> Path:
    """Create `pool` (a process pool, from `pool_template` when given) and register the `keep` deployments of
    deployments/prefect.yaml on it with `prefect deploy`, against the server env's PREFECT_API_URL names."""
    template = ["--base-job-template", str(pool_template)] if pool_template else []
    prefect_cli(["work-pool", "create", pool, "--type", "process", *template], env)
    project = project_file_for_test(BUCKET, model, pool, output, training, TINY_EVALUATION,
                                    folder / "prefect.yaml", keep=set(keep))
    prefect_cli(["--no-prompt", "deploy", "--prefect-file", str(project), "--all"], env, timeout_s=300)
    return project


def aws_env(endpoint: str) -> dict:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


def prefect_cli(args: list[str], env: dict, timeout_s: float = 180) -> str:
    result = subprocess.run([PYTHON, "-m", "prefect", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout_s)
    if result.returncode:
        raise RuntimeError(f"prefect {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def project_file_for_test(bucket: str, model: Path, pool: str, output: str, training: dict, evaluation: dict,
                          dest: Path, keep: set[str]) -> Path:
    """deployments/prefect.yaml with the test's pool, bucket, model and a tiny run; triggers, schedules (paused)
    and templates as shipped."""
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    spec["deployments"] = [d for d in spec["deployments"] if d["name"] in keep]
    for deployment in spec["deployments"]:
        deployment["work_pool"] = {"name": pool}
        configs = [deployment["parameters"]["config"]] + [t["parameters"]["config"] for t in deployment.get("triggers", [])]
        for config in configs:
            # A tiny run, over what the deployment sets (on-preference-upload's gate metric stays)
            config.update(model=str(model), output=output, training={**config.get("training", {}), **training},
                          evaluation={**config.get("evaluation", {}), **evaluation}, work_dir=str(dest.parent / "work"))
            for name in ("data", "eval_data"):
                if name in config:
                    config[name] = config[name].replace("s3://my-bucket/", f"s3://{bucket}/")
        for schedule in deployment.get("schedules", []):
            schedule["active"] = False  # registered as shipped, but a 03:00 run must not take a test's worker
        for trigger in deployment.get("triggers", []):
            trigger["match"]["prefect.resource.id"] = trigger["match"]["prefect.resource.id"].replace(
                "s3://my-bucket/", f"s3://{bucket}/")
    dest.write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest


# --- Pieces the integration tests share: S3 -> SQS wiring, a worker, the bridge, reading runs back ---

def boto_kwargs(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
            "region_name": "us-east-1"}


def notify_queue(s3, sqs, bucket: str, queue_name: str) -> str:
    """Create `bucket` and a queue, and point the bucket's notifications at it with the config the README gives
    for production (infra/s3-notification.json); returns the queue URL."""
    import json

    ensure_bucket(s3, bucket)
    queue_url = sqs.create_queue(QueueName=queue_name)["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    config = json.loads((ROOT / "infra" / "s3-notification.json").read_text())
    config["QueueConfigurations"][0]["QueueArn"] = queue_arn
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=config)
    return queue_url


def start_worker(name: str, pool: str, limit: int, env: dict, log_dir: Path) -> Process:
    """A process worker running this checkout's flows; polls every second so latency figures are not poll-bound."""
    worker_env = env | {"FINETUNE_REPO_DIR": str(ROOT), "PREFECT_WORKER_QUERY_SECONDS": "1",
                        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(log_dir / "results")}
    return Process(name, [PYTHON, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                          "--limit", str(limit)], worker_env, log_dir)


def start_held_worker(name: str, pool: str, env: dict, folder: Path, hold_step: int) -> Process:
    """start_worker (limit 1) whose flow runs import tests/flow_run_hooks/: training waits inside step
    `hold_step` until `folder`/release exists, and writes its process id to `folder`/holding meanwhile."""
    hooks = Path(__file__).with_name("flow_run_hooks")
    return start_worker(name, pool, 1, env | {
        "PYTHONPATH": f"{ROOT}:{hooks}", "FINETUNE_TEST_HOLD_STEP": str(hold_step),
        "FINETUNE_TEST_RELEASE": str(folder / "release"), "FINETUNE_TEST_HOLDING": str(folder / "holding")}, folder)


def start_bridge(name: str, queue_url: str, prefix: str, env: dict, log_dir: Path, debounce_s: float = 2) -> Process:
    return Process(name, [PYTHON, "-m", "flows.s3_bridge", "--queue-url", queue_url, "--prefix", prefix,
                          "--debounce", str(debounce_s), "--wait", "1"], env, log_dir)


def stop_stack(worker: Process, bridge: Process) -> None:
    bridge.stop()
    worker.stop(signals=(signal.SIGTERM, signal.SIGINT))  # the worker exits on SIGINT after SIGTERM


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


def wait_for(what: str, check, timeout_s: float, logs: list[Process], every_s: float = 0.5):
    """Poll `check` until it returns something truthy; on timeout fail with the tails of `logs`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    tails = "\n\n".join(f"--- {p.name} ---\n{p.tail(60)}" for p in logs)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{tails}")


def notification_body(bucket: str, key: str, etag: str, size: int) -> str:
    """What S3 puts in SQS for a PUT, as a redelivery or a second notification would carry it."""
    import json
    from datetime import datetime, timezone

    return json.dumps({"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
                                    "eventTime": datetime.now(timezone.utc).isoformat(), "eventName": "ObjectCreated:Put",
                                    "s3": {"bucket": {"name": bucket},
                                           "object": {"key": key, "size": size, "eTag": etag}}}]})


def queue_empty(sqs, queue_url: str) -> bool:
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return all(v == "0" for v in attributes.values())


def published_manifests(s3, bucket: str, output_prefix: str) -> list[dict]:
    """The manifests of the runs published under s3://bucket/<output_prefix>/runs/."""
    import json

    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{output_prefix}/runs/").get("Contents", [])
    return [json.loads(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
            for o in listed if o["Key"].endswith("/manifest.json")]


def assert_trained_with_dpo(manifest: dict) -> None:
    """The published run trained on preference pairs with DPO: the objective recorded, and the preference
    loss's reward accuracy logged in its history (an SFT run logs none)."""
    training = manifest["training"]
    assert training["objective"] == "dpo", training["objective"]
    assert any("reward_accuracy" in step for step in training["history"]), training["history"]


def ensure_bucket(s3, bucket: str) -> None:
    """`bucket`, created unless an earlier test on the shared moto server made it."""
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        s3.create_bucket(Bucket=bucket)
