"""What the run-page artifacts (progress, loss curve, links) and the S3 result storage cost a run, in seconds.

Runs the pipeline on a tiny random model (tests/tiny_model.py) and the demo data, output on moto's S3 server,
on Prefect's embedded server: alternately with every artifact on and off, `--runs` times each (after a warm-up run), and prints
(1) the time the flow spent in the Prefect API calls that make the artifacts, read from the run's own logs
("artifact ... created in X s", "progress artifact: N update(s), X s ... off the training thread"), and
(2) the flow's wall time on and off (noisy on a shared machine: compare with (1)).

    python benchmarks/artifact_cost.py --runs 2
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def logged_seconds(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    seconds = {}
    for log in logs:
        if match := re.match(r"artifact (\S.*) created in ([\d.]+) s", log.message):
            seconds[match.group(1)] = float(match.group(2))
        if match := re.match(r"progress artifact: (\d+) update\(s\), ([\d.]+) s", log.message):
            seconds["progress (off the training thread)"] = float(match.group(2))
            seconds["progress updates"] = int(match.group(1))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    from conftest import demo_texts, tiny_config
    from tiny_model import build_tiny_model

    from flows.finetune import finetune

    work = Path(tempfile.mkdtemp(prefix="artifact-cost-"))
    model = build_tiny_model(work / "model", demo_texts())
    walls, api = {"on": [], "off": []}, []
    off = {"progress": False, "loss_curve": False, "links": False}
    # A warm-up run first (the embedded server's start, the base score and validation caches), not counted;
    # then on and off alternate, in both orders.
    modes = [("warm-up", "off")] + [(i, m) for i in range(args.runs) for m in (("on", "off") if i % 2 == 0
                                                                               else ("off", "on"))]
    for i, mode in modes:
        config = tiny_config(model, work / f"{mode}-{i}", method="lora", output="s3://bench/models",
                             artifacts={} if mode == "on" else off)
        started = time.perf_counter()
        state = finetune(config, return_state=True)
        assert state.is_completed(), state.message
        if i == "warm-up":
            continue
        walls[mode].append(round(time.perf_counter() - started, 2))
        if mode == "on":
            api.append(logged_seconds(state.state_details.flow_run_id))
    server.stop()
    print(json.dumps({"api_seconds_per_run": api, "wall_s": walls,
                      "wall_median_s": {m: round(statistics.median(v), 2) for m, v in walls.items()}}, indent=1))


if __name__ == "__main__":
    main()
