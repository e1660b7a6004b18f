from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "demo" / "data"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
if XDIST_WORKER := os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the tests in parallel processes (pytest-xdist). Each has its own Prefect home (profiles and
    # the UI build that every Prefect server copies there), set before anything imports Prefect.
    os.environ["PREFECT_HOME"] = str(Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
                                     / f"xdist-{XDIST_WORKER}")
    # And its share of the cores for torch's threads (inherited by the flow runs, workers and trainers it starts):
    # left to itself, every process starts one OpenMP thread per core, and on a machine the parallel processes
    # already fill, those threads spin waiting for one another instead of computing.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                     // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))


def demo_texts() -> list[str]:
    texts = []
    for name in ("train.jsonl", "eval.jsonl"):
        for line in (DEMO_DATA / name).read_text().splitlines():
            texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts


@pytest.fixture(autouse=True)
def same_random_state_for_every_test():
    """Each test starts from the same seeds, whichever tests ran before it in its process: under
    pytest-xdist the tests a process runs first change from run to run."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), demo_texts())


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from tasks.data.tokenization import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real temporary Prefect server (SQLite) for the session; results kept out of the repo."""
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(results)
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def s3_server(monkeypatch):
    """moto's S3 server on 127.0.0.1 (real HTTP), with boto3 pointed at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield endpoint
    server.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    import boto3

    boto3.client("s3").create_bucket(Bucket="finetune-test")
    return "finetune-test"


@pytest.fixture
def empty_bucket(s3_server) -> str:
    """Like `bucket`, but empty: moto keeps objects in process-wide state that outlives one server."""
    import urllib.request

    import boto3

    urllib.request.urlopen(urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST")).read()
    boto3.client("s3").create_bucket(Bucket="finetune-test")
    return "finetune-test"


@pytest.fixture
def proxy(empty_bucket, s3_server, monkeypatch):
    """boto3 -> fault-injecting proxy (tests/fault_proxy.py) -> moto; the proxy records every request."""
    from fault_proxy import FaultProxy

    fault_proxy = FaultProxy(s3_server).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)
    yield fault_proxy
    fault_proxy.stop()


def tiny_config(model: Path, tmp_path: Path, **overrides):
    """A fast flow configuration on the tiny model and the demo data."""
    from tasks.config import FinetuneConfig

    settings = {
        "model": str(model),
        "data": str(DEMO_DATA / "train.jsonl"),
        "eval_data": str(DEMO_DATA / "eval.jsonl"),
        "output": str(tmp_path / "out"),
        "work_dir": str(tmp_path / "work"),
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"learning_rate": 3e-3, "lr_schedule": "constant", "max_steps": 8, "batch_size": 8,
                     "max_seq_len": 128, "eval_every": 4, "early_stopping_patience": 0},
        "evaluation": {"max_new_tokens": 12, "max_generation_rows": 4},
    }
    settings.update(overrides)
    return FinetuneConfig(**settings)


SUMMARY_LINES = pytest.StashKey[list]()  # figures a test wants shown at the end of every run (tests/test_load.py)
_SUMMARY_PROPERTY = "summary_lines"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test's SUMMARY_LINES travel in its report (user_properties), so that under pytest-xdist they reach the
    controlling process, whose terminal summary prints them; without xdist the same path leads back here."""
    outcome = yield
    lines = item.config.stash.get(SUMMARY_LINES, None)
    if lines:
        outcome.get_result().user_properties.append((_SUMMARY_PROPERTY, list(lines)))
        lines.clear()


def pytest_configure(config):
    global _CONFIG
    _CONFIG = config


def pytest_runtest_logreport(report):
    for name, value in report.user_properties:
        if name == _SUMMARY_PROPERTY and not os.environ.get("PYTEST_XDIST_WORKER"):
            _CONFIG.stash.setdefault(SUMMARY_LINES, []).extend(value)


def pytest_terminal_summary(terminalreporter, config):
    if config.stash.get(SUMMARY_LINES, None):
        terminalreporter.write_sep("=", "figures")
        for line in config.stash[SUMMARY_LINES]:
            terminalreporter.write_line(line)


# Under pytest-xdist (`make test`: --dist loadgroup), each module's tests stay together in one process (its module
# fixtures are built once), and the tests on the shared local stack (a `prefect server start`, moto, deployments:
# tests/local_stack.py) share one process and so one stack. Scopes are handed out in this order, longest first,
# so that the long ones start at once and the short ones fill in around them (--no-loadscope-reorder).
SHARED_STACK = ("test_load.py", "test_triggered_runs.py", "test_ui_run_form.py", "test_ui_artifacts.py")
LONGEST_FIRST = (*SHARED_STACK, "test_e2e.py", "test_api_restart.py", "test_reconcile_server_kill.py",
                 "test_flow_run_crash.py", "test_flow.py", "test_tracking.py", "test_distributed.py")


def xdist_group(item) -> str:
    if item.path.name not in SHARED_STACK:
        return item.path.name
    # tests/test_load.py on PostgreSQL starts its own Prefect server (only moto and the tiny model, one per process,
    # are shared), so it can run in the other process beside the shared stack rather than after it.
    if getattr(item, "callspec", None) and item.callspec.params.get("load_stack") == "postgres":
        return "load-postgres"
    return "local-stack"


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a module, and of the other modules, is kept
    for item in items:
        item.add_marker(pytest.mark.xdist_group(xdist_group(item)))

    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):  # the mark, not any keyword: a test or parameter named "gpu" runs
            item.add_marker(skip)


# The real local stack (prefect server, moto server, worker) for the integration and browser tests.
from local_stack import deployed, moto_endpoint, prefect_server, stack_dir  # noqa: E402,F401
from mlflow_stack import mlflow_server  # noqa: E402,F401
