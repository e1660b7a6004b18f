"""A fine-tuning run's own process is killed mid-training (SIGKILL: the kernel's OOM killer, a preempted
node), and the run is retried: the retry continues from the run's newest checkpoint and publishes one model.

On one GPU training runs inside the flow run's process, so killing it takes Prefect's engine with it: no
task retry can happen, and the worker reports the run Crashed. A retry is then `prefect flow-run retry ID`
or the UI's Retry button: both set the same flow run back to Scheduled (forced), and a worker runs it again.
The production path as in tests/test_api_restart.py: the `gpu` deployment on a process pool from
infra/work-pools/process-gpu.json, a real process worker, a `prefect server start` of the test's own.
Training waits inside step HOLD_STEP (tests/flow_run_hooks/) until the test has killed it. The second test
leaves the retry to the automation in deployments/automations.yaml.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO_DATA
from local_stack import ROOT, TINY_EVALUATION, TINY_TRAINING, base_env, deploy, free_port, prefect_cli, \
    start_held_worker, start_prefect_server, wait_for

pytestmark = pytest.mark.integration

POOL = "crash-gpu"
TRAINING = TINY_TRAINING | {"max_steps": 40, "batch_size": 4, "checkpoint_every": 10, "eval_every": 20}
HOLD_STEP = 25  # killed inside step 25: its checkpoints are steps 10 and 20


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flow-run-crash")
    port = free_port()
    server = start_prefect_server("prefect-server", port, folder / "prefect.db", folder / "prefect-home", folder)
    env = base_env(folder / "client-home") | {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    worker = None
    try:
        deploy(env, tiny_model, POOL, str(folder / "unused-output"), folder, keep=("gpu",),
               pool_template=ROOT / "infra" / "work-pools" / "process-gpu.json", training=TRAINING)
        worker = start_held_worker("worker", POOL, env, folder, HOLD_STEP)
        yield {"api": env["PREFECT_API_URL"], "env": env, "worker": worker, "server": server, "folder": folder,
               "model": tiny_model}
    finally:
        if worker:
            worker.stop(signals=(signal.SIGTERM, signal.SIGINT))  # the worker exits on SIGINT after SIGTERM
        server.stop(signals=(signal.SIGTERM, signal.SIGINT))


def worker_done_with(api, flow_run_id) -> bool:
    """Whether the worker has sent its `executed-flow-run` event for the run (sent after its crash report)."""
    answer = api.request("POST", "/events/filter", json={"filter": {
        "event": {"name": ["prefect.worker.executed-flow-run"]}, "related": {"id": [f"prefect.flow-run.{flow_run_id}"]},
        "occurred": {"since": "2000-01-01T00:00:00Z"}}, "limit": 5})
    return bool(answer.json()["events"])


def run_config(stack: dict, output: Path) -> dict:
    folder = stack["folder"]
    return {"model": str(stack["model"]), "data": str(DEMO_DATA / "train.jsonl"),
            "eval_data": str(DEMO_DATA / "eval.jsonl"), "method": "lora", "output": str(output),
            "work_dir": str(folder / "work"), "training": TRAINING, "evaluation": TINY_EVALUATION}


def start_and_kill_in_training(api, stack: dict, output: Path):
    """Start a `gpu` deployment run, SIGKILL its process inside step HOLD_STEP; returns the flow run."""
    folder, logs = stack["folder"], [stack["worker"], stack["server"]]
    for name in ("release", "holding"):  # a fresh hold for this run
        (folder / name).unlink(missing_ok=True)
    deployment = api.read_deployment_by_name("finetune/gpu")
    flow_run = api.create_flow_run_from_deployment(deployment.id, parameters={"config": run_config(stack, output)})
    pid = wait_for("training to reach the step it is killed in", lambda: (
        (p := folder / "holding").exists() and p.read_text().strip()), 300, logs)
    os.kill(int(pid), signal.SIGKILL)
    (folder / "release").touch()  # a retry trains through (it starts seconds later, in a new process)
    return flow_run


def assert_resumed_and_published_once(run, output: Path) -> str:
    manifests = list(output.glob("runs/*/manifest.json"))
    assert len(manifests) == 1, manifests
    manifest = json.loads(manifests[0].read_text())
    training = manifest["training"]
    assert manifest["run"]["flow_run_id"] == str(run.id)
    assert training["resumed_from_step"] == 20 and training["resumed_from"].endswith("step-0000020")
    assert training["steps"] == TRAINING["max_steps"]
    steps = [r["step"] for r in training["history"]]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == TRAINING["max_steps"], steps
    return manifests[0].parent.name


def test_a_killed_run_retried_continues_from_its_newest_checkpoint(stack):
    from prefect.client.orchestration import SyncPrefectClient

    api, logs, output = SyncPrefectClient(stack["api"]), [stack["worker"], stack["server"]], stack["folder"] / "out"
    flow_run = start_and_kill_in_training(api, stack, output)
    # Retry once the worker is done with the run: its crash report would overwrite an earlier retry.
    wait_for("the worker to finish with the run", lambda: worker_done_with(api, flow_run.id), 120, logs, every_s=1)
    crashed = api.read_flow_run(flow_run.id)
    assert crashed.state.is_crashed(), f"{crashed.state.type}: {crashed.state.message}"
    checkpoints = output / "checkpoints" / str(flow_run.id)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000010", "step-0000020"]
    assert not list(output.glob("runs/*/manifest.json")), "a crashed run published nothing"

    prefect_cli(["flow-run", "retry", str(flow_run.id)], stack["env"])
    final = wait_for("the retry to finish", lambda: (r := api.read_flow_run(flow_run.id)).state.is_final() and r,
                     300, logs, every_s=1)
    assert final.state.is_completed(), f"{final.state.type}: {final.state.message}\n{stack['worker'].tail(80)}"
    assert final.run_count == 2  # the same flow run, run twice
    published = assert_resumed_and_published_once(final, output)
    print(f"\nkilled in step {HOLD_STEP}; `prefect flow-run retry` resumed from step 20; published {published}")


def test_the_shipped_automation_retries_a_crashed_run_by_itself(stack):
    """deployments/automations.yaml applied as the README says; nobody retries by hand."""
    from prefect.client.orchestration import SyncPrefectClient

    api, logs = SyncPrefectClient(stack["api"]), [stack["worker"], stack["server"]]
    output = stack["folder"] / "out-auto"
    for _ in range(2):  # applying twice leaves one automation
        subprocess.run([sys.executable, "infra/apply_automations.py", "deployments/automations.yaml"],
                       env=stack["env"], cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert len(api.read_automations_by_name("finetune-retry-crashed-runs")) == 1

    flow_run = start_and_kill_in_training(api, stack, output)
    final = wait_for("the automation's retry to finish", lambda: (
        r := api.read_flow_run(flow_run.id)).state.is_final() and r.run_count == 2 and r, 400, logs, every_s=1)
    assert final.state.is_completed(), f"{final.state.type}: {final.state.message}\n{stack['worker'].tail(80)}"
    states = [(s.type.value, s.name) for s in api.read_flow_run_states(flow_run.id)]
    assert ("CRASHED", "Crashed") in states and ("SCHEDULED", "AwaitingRetry") in states, states
    published = assert_resumed_and_published_once(final, output)
    print(f"killed in step {HOLD_STEP}; the automation retried it, resumed from step 20; published {published}")
