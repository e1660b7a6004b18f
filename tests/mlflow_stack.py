"""A real `mlflow server` process for the tracking tests: SQLite backend store, artifacts proxied by the server
to a bucket on moto's S3 server (the session's `moto_endpoint` process, tests/local_stack.py)."""
from __future__ import annotations

import pytest

from local_stack import PYTHON, Process, aws_env, base_env, free_port, wait_http

MLFLOW_BUCKET = "mlflow-artifacts"


def start_mlflow_server(folder, moto_endpoint: str) -> tuple[Process, str]:
    """`mlflow server` on 127.0.0.1 with its database in `folder`; returns once /health answers."""
    port = free_port()
    env = base_env(folder / "prefect-home") | aws_env(moto_endpoint) | {
        "MLFLOW_S3_ENDPOINT_URL": moto_endpoint,  # where the server writes the artifacts it is sent
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no background job workers: nothing here uses them
    }
    server = Process("mlflow-server", [
        PYTHON, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts"], env, folder)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", server, timeout_s=120)
    except BaseException:
        server.stop()
        raise
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def mlflow_server(moto_endpoint, tmp_path_factory):
    """{"uri": the tracking server, "s3": a boto3 client on the bucket holding its artifacts}."""
    import boto3

    from local_stack import boto_kwargs

    s3 = boto3.client("s3", **boto_kwargs(moto_endpoint))
    s3.create_bucket(Bucket=MLFLOW_BUCKET)
    server, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), moto_endpoint)
    try:
        yield {"uri": uri, "s3": s3, "process": server}
    finally:
        server.stop()
