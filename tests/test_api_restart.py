"""The Prefect API goes down while a fine-tuning run is in flight, and comes back: the run finishes, and
the server ends up with every state of it, once.

The production path: deployments/prefect.yaml's `gpu` deployment (its deployment concurrency limit
included) on a process pool made from infra/work-pools/process-gpu.json, run by a real process worker,
against a `prefect server start` of the test's own (its own SQLite file and port, so the session's
shared server is left alone) with the server settings production uses (infra/prefect-server.env).

One run is interrupted twice:
- a crash (SIGKILL) once the API shows it training (flow run Running, train task Running, a "checkpoint
  at step N" log); the server stays down OUTAGE_S plus its start-up time, longer than the first client
  retries (2, 4, 8 s backoff) and than the events client's quick reconnections (~10 attempts within a
  few seconds). Training goes on up to step HOLD_STEP, where it waits (tests/flow_run_hooks/), so that
  it is still in flight whatever the machine's speed;
- then a stop (SIGTERM) that outlasts the run: training is released while the server is down, the run
  trains to the end and publishes its model, and the server stays down LONG_OUTAGE_S more, past the
  50-75 s that Prefect's default client retries wait. The pool's PREFECT_CLIENT_MAX_RETRIES=8 makes the
  run's last task states, logs and final state wait for the API (measured with Prefect's default
  instead: the run ended Failed, ConnectError in its report task, one checkpoint log lost).
Each time the server starts again on the same port and database. A second, short run afterwards shows
that the worker and the deployment's concurrency slot survived too.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from conftest import DEMO_DATA
from local_stack import ROOT, TINY_EVALUATION, TINY_TRAINING, RestartableServer, base_env, deploy, \
    start_held_worker
from local_stack import wait_for as wait_showing_logs

pytestmark = pytest.mark.integration

POOL = "restart-gpu"
OUTAGE_S = 5  # the server is down this long after it exited, plus its start-up time (6-30 s here)
# After the run has published its model, the server stays down this long more, plus its start-up time.
LONG_OUTAGE_S = 80
TRAINING = TINY_TRAINING | {"max_steps": 40, "batch_size": 4, "checkpoint_every": 10, "eval_every": 20}
# Training waits in this step until the test releases it (flow_run_hooks/): a step takes 0.03-1.5 s
# here, so without a hold the run could finish during the crash's outage.
HOLD_STEP = 30
# Task runs of flows/finetune.py by name, each exactly once (the published-model evaluation only runs when
# the gate compares with a published model; the cached `validate` runs are left out).
FLOW_TASKS = ["ingest", "plan", "evaluate-base", "train", "export", "evaluate-tuned", "gate", "package", "upload",
              "promote", "report"]


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("api-restart")
    server = RestartableServer(folder)
    server.start()
    env = base_env(folder / "client-home") | {"PREFECT_API_URL": server.api}
    worker = None
    try:
        deploy(env, tiny_model, POOL, str(folder / "unused-output"), folder, keep=("gpu",),
               pool_template=ROOT / "infra" / "work-pools" / "process-gpu.json", training=TRAINING)
        worker = start_held_worker("worker", POOL, env, folder, HOLD_STEP)
        yield {"server": server, "worker": worker, "folder": folder, "model": tiny_model}
    finally:
        if worker:
            worker.stop(signals=(signal.SIGTERM, signal.SIGINT))  # the worker exits on SIGINT after SIGTERM
        server.stop(signal.SIGTERM)


def client(api: str):
    """A new client after each restart: one that saw the server go away may be mid-backoff."""
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api)


def wait_for(what: str, check, timeout_s: float, stack: dict, every_s: float = 0.5):
    return wait_showing_logs(what, check, timeout_s, [stack["worker"], stack["server"].process], every_s)


def run_config(stack: dict, name: str, training: dict) -> dict:
    folder = stack["folder"] / name
    return {"model": str(stack["model"]), "data": str(DEMO_DATA / "train.jsonl"),
            "eval_data": str(DEMO_DATA / "eval.jsonl"), "method": "lora", "output": str(folder / "out"),
            "work_dir": str(folder / "work"), "training": training, "evaluation": TINY_EVALUATION}


def task_runs(api, flow_run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def task_name(task_run) -> str:
    """`train-6d0` -> `train` (Prefect adds 3 random hex digits); `evaluate-base` stays (its task_run_name)."""
    base, _, suffix = task_run.name.rpartition("-")
    return base if len(suffix) == 3 and all(c in "0123456789abcdef" for c in suffix) else task_run.name


def all_logs(api, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    messages, offset = [], 0
    while page := api.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200,
                                 offset=offset):
        messages += [log.message for log in page]
        offset += len(page)
    return messages


def checkpoint_steps(logs: list[str]) -> list[int]:
    return [int(m.split(":")[0].rsplit(" ", 1)[1]) for m in logs if m.startswith("checkpoint at step ")]


def training_in_flight(api, flow_run_id) -> int | None:
    """The newest checkpointed step, once the flow run and its train task are Running and a checkpoint is
    logged (all as the API shows them)."""
    if not api.read_flow_run(flow_run_id).state.is_running():
        return None
    train = [t for t in task_runs(api, flow_run_id) if task_name(t) == "train"]
    if not (train and train[0].state and train[0].state.is_running()):
        return None
    return max(checkpoint_steps(all_logs(api, flow_run_id)), default=None)


def test_a_run_in_flight_survives_an_api_crash_and_a_long_outage(stack):
    started, server = time.monotonic(), stack["server"]
    api = client(server.api)
    deployment = api.read_deployment_by_name("finetune/gpu")
    config = run_config(stack, "interrupted", TRAINING)
    flow_run = api.create_flow_run_from_deployment(deployment.id, parameters={"config": config})

    # The crash, mid-training. Any checkpoint will do: training may already wait at HOLD_STEP.
    step = wait_for("training in flight", lambda: training_in_flight(api, flow_run.id), 300, stack)
    crash = server.interrupt(signal.SIGKILL, OUTAGE_S)
    api = client(server.api)
    # Still training (held at HOLD_STEP at the latest): an outage during a run, not after it.
    running = api.read_flow_run(flow_run.id)
    assert running.state.is_running(), "the run finished before the API came back"
    # The engine renews its deployment concurrency lease (every 225 s; every 15 s here, see
    # flow_run_hooks/) and cancels the run when that fails. Renew it now as the engine will: a lease
    # the crash lost answers 410 Gone.
    api.renew_concurrency_lease(running.state.state_details.deployment_concurrency_lease_id, lease_duration=300)

    # The long outage: the run finishes its work while the server is down.
    wait_for("training in flight after the crash", lambda: training_in_flight(api, flow_run.id), 120, stack)
    down = time.monotonic()
    server.stop(signal.SIGTERM)
    (stack["folder"] / "release").touch()
    published = wait_showing_logs("the model published with the API down", lambda: list(
        Path(config["output"]).glob("runs/*/manifest.json")), 300, [stack["worker"]], 1)
    published_after = time.monotonic() - down
    time.sleep(LONG_OUTAGE_S)
    server.start()
    back = time.monotonic()
    api = client(server.api)

    final = wait_for("the flow run to finish", lambda: (r := api.read_flow_run(flow_run.id)).state.is_final() and r,
                     400, stack, every_s=1)
    finished = time.monotonic()
    assert len(published) == 1
    assert_recorded_once(api, final, config, stack)
    print(f"\ncrash at step {step}: API down {crash:.1f}s; stop: API down {back - down:.1f}s, the model published "
          f"{published_after:.1f}s into it; API back -> run Completed {finished - back:.1f}s")

    # The same worker takes the next run, and the deployment's concurrency slot (limit 1) was given back.
    second = api.create_flow_run_from_deployment(deployment.id, parameters={
        "config": run_config(stack, "after", TINY_TRAINING)})
    after = wait_for("the next run to finish", lambda: (r := api.read_flow_run(second.id)).state.is_final() and r,
                     240, stack, every_s=1)
    assert after.state.is_completed(), f"{after.state.type}: {after.state.message}"
    print(f"next run Completed {time.monotonic() - finished:.1f}s later; test body {time.monotonic() - started:.0f}s")


def assert_recorded_once(api, run, config: dict, stack: dict) -> None:
    assert run.state.is_completed(), f"{run.state.type}: {run.state.message}\n{stack['worker'].tail(80)}"
    assert run.run_count == 1 and run.end_time
    states = [s.type.value for s in api.read_flow_run_states(run.id)]
    assert states.count("RUNNING") == 1 and states[-1] == "COMPLETED", states

    # Task runs are recorded from events; those sent around an outage arrive when the client resends them.
    def recorded():  # every task of the flow, each final (a resent backlog arrives task by task)
        runs = task_runs(api, run.id)
        named = {task_name(t) for t in runs}
        return runs if set(FLOW_TASKS) <= named and all(t.state and t.state.is_final() for t in runs) else None

    runs = wait_for("every task run in a final state", recorded, 60, stack)
    assert all(t.state.is_completed() and t.run_count == 1 for t in runs), [(t.name, t.state.type) for t in runs]
    names = [task_name(t) for t in runs]
    assert {n: names.count(n) for n in FLOW_TASKS} == dict.fromkeys(FLOW_TASKS, 1), sorted(names)

    manifests = list(Path(config["output"]).glob("runs/*/manifest.json"))
    assert len(manifests) == 1, manifests
    manifest = json.loads(manifests[0].read_text())
    assert manifest["run"]["flow_run_id"] == str(run.id)
    training = manifest["training"]
    steps = [r["step"] for r in training["history"]]
    assert training["resumed_from_step"] == 0 and training["steps"] == TRAINING["max_steps"], "trained once, through"
    assert steps == sorted(set(steps)) and steps[-1] == TRAINING["max_steps"]

    # The run's logs, those written while the API was down included, reach the server once each. A log
    # batch that met an outage waits out the client's backoff (retries 2, 4, ... 256 s apart), so it can
    # land after the run shows Completed.
    every = TRAINING["checkpoint_every"]
    expected = list(range(every, TRAINING["max_steps"] + 1, every))
    logged = wait_for("every checkpoint log at the server", lambda: (
        steps if len(steps := checkpoint_steps(all_logs(api, run.id))) >= len(expected) else None), 300, stack, 2)
    assert logged == expected
