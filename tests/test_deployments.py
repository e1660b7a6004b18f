"""deployments/prefect.yaml points at the real flows, and every parameter set it holds (the deployments'
and the triggers', with the event templates filled in) passes the flow's schema."""
import re

import pytest
import yaml

from conftest import ROOT

SPEC = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in SPEC["deployments"]}
EVENT = {"bucket": "my-bucket", "key": "datasets/incoming/new.jsonl", "etag": "9b2cf535f27731c974343645a3985328"}


def fill_event_templates(value):
    """What the server's trigger renders: `{{ event.payload.X }}` -> the event's payload value."""
    if isinstance(value, dict):
        return {k: fill_event_templates(v) for k, v in value.items()}
    if isinstance(value, str):
        return re.sub(r"{{\s*event\.payload\.(\w+)\s*}}", lambda m: EVENT[m.group(1)], value)
    return value


# ids: a bare "gpu" id would read as the `gpu` marker keyword and be skipped without CUDA
@pytest.mark.parametrize("name", sorted(DEPLOYMENTS), ids=lambda n: f"deployment-{n}")
def test_deployment_entrypoint_and_parameters_are_valid(name):
    from prefect.flows import load_flow_from_entrypoint

    deployment = DEPLOYMENTS[name]
    flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
    flow.validate_parameters(deployment["parameters"])
    for trigger in deployment.get("triggers", []):
        validated = flow.validate_parameters(fill_event_templates(trigger["parameters"]))
        assert validated["config"].data == "s3://my-bucket/datasets/incoming/new.jsonl"
        assert validated["config"].data_etag == EVENT["etag"]


def test_every_fine_tuning_deployment_runs_one_at_a_time_on_a_gpu_pool():
    finetuning = [d for d in DEPLOYMENTS.values() if d["entrypoint"] in ("flows/finetune.py:finetune",
                                                                        "flows/retrain.py:retrain")]
    assert {d["name"] for d in finetuning} == {"gpu", "gpu-24gb", "gpu-80gb", "nightly", "on-upload",
                                               "on-preference-upload"}
    for d in finetuning:
        assert d["work_pool"]["name"].startswith("gpu") and d["concurrency_limit"]["limit"] == 1
        assert d["concurrency_limit"]["collision_strategy"] == "ENQUEUE" and d["enforce_parameter_schema"]


def test_router_pools_each_have_a_deployment():
    from tasks.planning.routing import deployment_for
    from tasks.planning.selector import WorkPoolSpec

    for pool in DEPLOYMENTS["auto"]["parameters"]["pools"]:
        name = deployment_for(WorkPoolSpec(**pool))
        assert name == f"finetune/{pool['name']}" and DEPLOYMENTS[pool["name"]]["work_pool"]["name"] == pool["name"]


def test_nightly_schedule_and_upload_trigger():
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    [schedule] = DEPLOYMENTS["nightly"]["schedules"]
    assert schedule["cron"] == "0 3 * * *" and schedule["timezone"] == "UTC" and schedule["active"]
    [trigger] = DEPLOYMENTS["on-upload"]["triggers"]
    parsed = DeploymentEventTrigger(**{k: v for k, v in trigger.items() if k != "type"})
    assert parsed.expect == {"s3.object.created"}
    assert parsed.match.model_dump()["prefect.resource.id"] == "s3://my-bucket/datasets/incoming/*"
    # the prefix the bucket notification config (infra/s3-notification.json) sends is the one the trigger matches
    import json

    notification = json.loads((ROOT / "infra" / "s3-notification.json").read_text())["QueueConfigurations"][0]
    assert notification["Filter"]["Key"]["FilterRules"][0]["Value"] == "datasets/incoming/"
    assert notification["Events"] == ["s3:ObjectCreated:*"]


@pytest.mark.parametrize("key, deployments", [
    ("datasets/incoming/new.jsonl", {"on-upload"}),
    ("datasets/incoming/q7/rows.parquet", {"on-upload"}),
    ("datasets/incoming/preference/pairs.jsonl", {"on-preference-upload"}),
    ("datasets/incoming/preference/2026-12/pairs.jsonl", {"on-preference-upload"}),
    ("datasets/incoming/q7/preference/pairs.jsonl", {"on-upload"}),  # only the folder right under incoming/
    ("datasets/other/preference/pairs.jsonl", set()),
])
def test_each_upload_matches_one_trigger_and_preference_pairs_get_dpo(key, deployments):
    """Matched as the server matches (prefect.server.events: every label, `*` and a leading `!`), and as the
    reconciler does (tasks/data/s3_reconcile.py): an upload starts one run at most, and pairs start a DPO run."""
    from prefect.server.events.schemas.events import Resource, ResourceSpecification

    from tasks.data.s3_events import S3Object
    from tasks.data.s3_reconcile import UploadTrigger

    upload = S3Object(bucket="my-bucket", key=key, etag=EVENT["etag"])
    matched = set()
    for name, deployment in DEPLOYMENTS.items():
        for trigger in deployment.get("triggers", []):
            by_server = ResourceSpecification(trigger["match"]).matches(Resource.model_validate(upload.resource()))
            assert by_server == UploadTrigger(name, tuple(trigger["expect"]), trigger["match"]).covers(upload)
            matched |= {name} if by_server else set()
    assert matched == deployments
    if deployments == {"on-preference-upload"}:
        [trigger] = DEPLOYMENTS["on-preference-upload"]["triggers"]
        config = trigger["parameters"]["config"]
        assert config["objective"] == "dpo" and config["evaluation"]["metric"] == "preference_accuracy"
