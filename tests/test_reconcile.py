"""Which announced uploads have no flow run (tasks/data/s3_reconcile.py), without a server: seen records, automations
and flow runs in the shapes the Prefect API returns them. tests/test_reconcile_server_kill.py runs the whole
reconciler against a server killed mid-burst."""
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from tasks.data.s3_events import S3Object
from tasks.data.s3_reconcile import UploadTrigger, announced_from, plan, upload_triggers

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
ON_UPLOAD, OTHER = str(uuid.uuid4()), str(uuid.uuid4())
TRIGGER = UploadTrigger(ON_UPLOAD, ("s3.object.created",), {"prefect.resource.id": "s3://b/datasets/incoming/*"})


def record(key: str, etag: str, ago: timedelta = timedelta(hours=1), **extra) -> dict:
    """A seen record as /variables/filter returns it (tasks/s3_announce.SeenObjects.remember wrote it)."""
    obj = S3Object("b", key, etag, 12, "2026-12-01T10:00:00+00:00")
    return {"name": obj.dedupe_key, "tags": ["s3-seen"], "value": {
        "uri": obj.uri, "etag": etag, "announced_at": (NOW - ago).isoformat(), "bucket": "b", "key": key, "size": 12,
        "event_time": obj.event_time, "s3_event": obj.event_name} | extra}


def run(deployment_id: str, key: str, etag: str) -> dict:
    """A flow run the on-upload trigger created: its config names the object and its etag."""
    return {"deployment_id": deployment_id, "parameters": {"config": {
        "model": "/models/m", "data": f"s3://b/{key}", "data_etag": etag, "output": "s3://b/models/incoming"}}}


def keys(uploads) -> list[str]:
    return sorted(u.obj.key for u in uploads)


def test_only_uploads_with_no_run_past_the_grace_period_are_announced_again():
    inc = "datasets/incoming/"
    records = [
        record(inc + "has-run.jsonl", "e1"),
        record(inc + "lost.jsonl", "e2"),
        record(inc + "just-sent.jsonl", "e3", ago=timedelta(seconds=30)),
        record(inc + "overwritten.jsonl", "new"),  # its run is of the older bytes
        record(inc + "other-deployment.jsonl", "e5"),  # a run, but of a deployment whose trigger did not cover it
        record(inc + "split.jsonl", "e6"),  # its URI in one run, its etag in another
        record(inc + "hopeless.jsonl", "e7", reannounced=3, reannounced_at=(NOW - timedelta(hours=1)).isoformat()),
        record(inc + "copy-sent.jsonl", "e8", reannounced=1, reannounced_at=(NOW - timedelta(seconds=5)).isoformat()),
        record("datasets/elsewhere/x.jsonl", "e9"),  # announced, but no trigger matches it: no run expected
        {"name": "s3-reannounced-1234", "tags": ["s3-seen"], "value": {"failure": "1234", "reannounced_at": "x"}},
    ]
    runs = [run(ON_UPLOAD, inc + "has-run.jsonl", "e1"), run(ON_UPLOAD, inc + "overwritten.jsonl", "old"),
            run(OTHER, inc + "other-deployment.jsonl", "e5"), run(ON_UPLOAD, inc + "split.jsonl", "zzz"),
            run(ON_UPLOAD, inc + "not-it.jsonl", "e6"), {"deployment_id": None, "parameters": {}}]
    announced = [a for r in records if (a := announced_from(r))]
    assert len(announced) == len(records) - 1  # the failed-action marker is not an upload

    result = plan(announced, [TRIGGER], runs, NOW, grace=timedelta(minutes=10), max_reannounce=3)

    assert keys(result.reannounce) == [inc + n for n in ("lost.jsonl", "other-deployment.jsonl", "overwritten.jsonl",
                                                         "split.jsonl")]
    assert keys(result.waiting) == [inc + "copy-sent.jsonl", inc + "just-sent.jsonl"]
    assert keys(result.gave_up) == [inc + "hopeless.jsonl"]
    assert (result.with_run, result.no_trigger, result.partial) == (1, 1, [])
    lost = next(u for u in result.reannounce if u.obj.key.endswith("lost.jsonl"))
    # The copy is the original event: same id (Prefect's trigger drops an id it has seen), same payload.
    assert lost.obj == S3Object("b", inc + "lost.jsonl", "e2", 12, "2026-12-01T10:00:00+00:00")
    assert lost.obj.dedupe_key == lost.name


def test_a_run_of_every_covering_deployment_is_needed_and_a_partial_one_is_not_announced_again():
    second = UploadTrigger(OTHER, (), {"prefect.resource.id": ["s3://b/datasets/*", "s3://c/*"]})  # any event
    announced = [announced_from(record("datasets/incoming/a.jsonl", "e1")),
                 announced_from(record("datasets/incoming/b.jsonl", "e2"))]
    runs = [run(ON_UPLOAD, "datasets/incoming/a.jsonl", "e1"), run(OTHER, "datasets/incoming/a.jsonl", "e1"),
            run(OTHER, "datasets/incoming/b.jsonl", "e2")]
    result = plan(announced, [TRIGGER, second], runs, NOW)
    # Announcing b again would give OTHER its second run: reported, not sent.
    assert (result.with_run, keys(result.partial), result.reannounce) == (1, ["datasets/incoming/b.jsonl"], [])


def test_a_record_written_before_objects_were_kept_whole_is_read_from_its_uri():
    old = {"name": "s3-seen-abc", "value": {"uri": "s3://b/datasets/incoming/deep/k.jsonl", "etag": "e",
                                            "announced_at": "2026-11-30T10:00:00+00:00"}}
    upload = announced_from(old)
    assert (upload.obj.bucket, upload.obj.key, upload.obj.etag, upload.attempts) == ("b", "datasets/incoming/deep/k.jsonl",
                                                                                   "e", 0)
    assert announced_from({"name": "s3-seen-x", "value": "not a record"}) is None


def automation(trigger: dict, actions: list[dict], enabled: bool = True) -> dict:
    """As /automations/filter answers: Prefect's own model, with every default it fills in."""
    from prefect.events.schemas.automations import Automation

    return Automation.model_validate({"id": str(uuid.uuid4()), "name": "a", "enabled": enabled, "trigger": trigger,
                                      "actions": actions}).model_dump(mode="json")


def test_upload_triggers_are_the_reactive_run_deployment_ones():
    """As `prefect deploy` registers deployments/prefect.yaml's on-upload trigger, and automations that are not one."""
    run_it = [{"type": "run-deployment", "source": "selected", "deployment_id": ON_UPLOAD, "parameters": {}}]
    on_upload = {"type": "event", "posture": "Reactive", "expect": ["s3.object.created"], "threshold": 1, "within": 0,
                 "match": {"prefect.resource.id": "s3://b/datasets/incoming/*"}}
    automations = [
        automation(on_upload, run_it),
        automation(on_upload, run_it, enabled=False),
        automation(on_upload | {"threshold": 5, "within": 60}, run_it),  # one run per five events
        automation(on_upload | {"match_related": {"prefect.resource.role": "flow"}}, run_it),
        automation({"type": "event", "posture": "Reactive", "expect": ["prefect.flow-run.Crashed"],
                    "match": {"prefect.resource.id": "prefect.flow-run.*"}},
                   [{"type": "change-flow-run-state", "state": "SCHEDULED"}]),
        automation(on_upload, [{"type": "run-deployment", "source": "inferred"}]),
    ]
    triggers = upload_triggers(automations)
    assert triggers == [TRIGGER]
    assert triggers[0].covers(S3Object("b", "datasets/incoming/x.jsonl", "e"))
    assert not triggers[0].covers(S3Object("b", "datasets/other/x.jsonl", "e"))
    assert not UploadTrigger(ON_UPLOAD, ("s3.object.removed",), {}).covers(S3Object("b", "k", "e"))
    assert UploadTrigger(ON_UPLOAD, ("s3.object.*",), {}).covers(S3Object("b", "k", "e"))  # no match: any resource
    not_tmp = UploadTrigger(ON_UPLOAD, (), {"prefect.resource.id": "!s3://b/tmp/*", "s3.bucket": ["a", "b"]})
    assert not_tmp.covers(S3Object("b", "x.jsonl", "e")) and not not_tmp.covers(S3Object("b", "tmp/x.jsonl", "e"))
    assert not not_tmp.covers(S3Object("c", "x.jsonl", "e"))


def test_cli_names_what_is_wrong_before_and_when_the_api_does_not_answer(capsys):
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from tasks.cli import main

    assert main(["reconcile", "--grace", "-5"]) == 1
    assert "neither may be negative" in capsys.readouterr().err
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["reconcile"]) == 1
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err
    # Nothing listens on the discard port.
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_CLIENT_MAX_RETRIES: 0}):
        assert main(["reconcile", "--dry-run"]) == 1
    assert "the Prefect API at http://127.0.0.1:9/api did not answer: ConnectError" in capsys.readouterr().err


@pytest.mark.integration
def test_a_pass_reads_every_page_of_records_automations_and_runs_from_a_real_api(prefect_api, monkeypatch):
    """tasks/s3_announce.reconcile (and the s3-reconcile flow) against a temporary Prefect server: the shapes the API really answers, paged
    one row at a time; a dry run sends nothing, a real pass counts its copy in the record."""
    from prefect.client.orchestration import get_client
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import AutomationCore, EventTrigger

    from tasks.s3_announce import SeenObjects, reconcile

    bucket = f"b-{uuid.uuid4().hex[:8]}"
    objects = [S3Object(bucket, f"in/{i}.jsonl", f"etag-{i}", 5) for i in range(3)]
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("reconcile-test")
        deployment_id = client.create_deployment(flow_id, name=bucket)
        client.create_automation(AutomationCore(
            name=f"on-upload-{bucket}", trigger=EventTrigger(
                expect={"s3.object.created"}, match={"prefect.resource.id": f"s3://{bucket}/in/*"}, posture="Reactive",
                threshold=1, within=0),
            actions=[RunDeployment(source="selected", deployment_id=deployment_id, parameters={})]))
        client.create_flow_run_from_deployment(deployment_id, parameters={"config": {
            "data": objects[0].uri, "data_etag": objects[0].etag}})
    seen = SeenObjects()
    for obj in objects:
        seen.remember(obj)
    monkeypatch.setattr("tasks.s3_announce.SEEN_PAGE", 1)
    monkeypatch.setattr("tasks.s3_announce.API_PAGE", 1)

    def mine(uploads) -> list[str]:
        return sorted(u.obj.key for u in uploads if u.obj.bucket == bucket)

    dry = reconcile(grace=timedelta(0), dry_run=True)
    assert mine(dry.reannounce) == ["in/1.jsonl", "in/2.jsonl"] and dry.with_run >= 1
    assert "reannounced" not in seen_record(objects[1])
    sent = reconcile(grace=timedelta(0))
    assert mine(sent.reannounce) == ["in/1.jsonl", "in/2.jsonl"]
    assert seen_record(objects[1])["reannounced"] == 1 and seen_record(objects[0]).get("reannounced") is None
    # Just sent: within the (default) grace period now, not sent again; the deployed flow's pass says so too.
    later = reconcile()
    assert mine(later.reannounce) == [] and mine(later.waiting) == ["in/1.jsonl", "in/2.jsonl"]
    from flows.reconcile import reconcile_uploads

    counts = reconcile_uploads()
    assert counts["reannounced"] == 0 and counts["waiting"] >= 2 and counts["with_run"] >= 1


def seen_record(obj: S3Object) -> dict:
    from prefect.variables import Variable

    return Variable.get(obj.dedupe_key)
