"""deployments/automations.yaml: which events its crash-retry trigger answers, judged by the Prefect server's
own trigger matching (the running automation is in tests/test_flow_run_crash.py)."""
import uuid
from datetime import datetime, timezone

import pytest
import yaml

from conftest import ROOT

AUTOMATIONS = ROOT / "deployments" / "automations.yaml"


def flow_run_event(state: str, run_count: int, flow: str):
    """A flow-run state event as the server emits it (prefect.server.models.events)."""
    from prefect.server.events.schemas.events import ReceivedEvent

    return ReceivedEvent(
        occurred=datetime.now(timezone.utc), event=f"prefect.flow-run.{state}", id=uuid.uuid4(),
        resource={"prefect.resource.id": f"prefect.flow-run.{uuid.uuid4()}", "prefect.resource.name": "some-run",
                  "prefect.run-count": str(run_count), "prefect.state-name": state,
                  "prefect.state-type": state.upper()},
        related=[{"prefect.resource.id": f"prefect.flow.{uuid.uuid4()}", "prefect.resource.role": "flow",
                  "prefect.resource.name": flow},
                 {"prefect.resource.id": f"prefect.deployment.{uuid.uuid4()}", "prefect.resource.role": "deployment",
                  "prefect.resource.name": "gpu"}])


@pytest.mark.parametrize("state, run_count, flow, retried", [
    ("Crashed", 1, "finetune", True),
    ("Crashed", 2, "finetune", True),
    ("Crashed", 3, "finetune", False),  # the third crash in a row: it would crash again
    ("Crashed", 0, "finetune", False),  # never started (a broken image or pool): a retry cannot help
    ("Crashed", 1, "retrain", True),
    ("Crashed", 1, "finetune-router", False),  # only flows that train
    ("Failed", 1, "finetune", False),  # the flow's own error: its retries (if any) already ran
])
def test_crashed_training_runs_are_retried_twice_at_most(state, run_count, flow, retried):
    from prefect.server.events.schemas.automations import AutomationCore

    [spec] = [a for a in yaml.safe_load(AUTOMATIONS.read_text())["automations"]
              if a["name"] == "finetune-retry-crashed-runs"]
    automation = AutomationCore.model_validate(spec)
    assert automation.trigger.covers(flow_run_event(state, run_count, flow)) is retried
    [action] = automation.actions
    assert (action.type, action.state.value, action.name, action.force) == (
        "change-flow-run-state", "SCHEDULED", "AwaitingRetry", True)  # what the UI's Retry sends
