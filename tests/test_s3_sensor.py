"""Announcing objects (one event per bucket, key, etag) and the polling sensor flow, against a real
temporary Prefect server and moto's S3 server."""
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from conftest import DEMO_DATA

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]


def created_events(uri: str, wait_s: float = 0.0, expect: int = 1) -> list[dict]:
    """The s3.object.created events the server stored for `uri`, waiting up to `wait_s` for `expect` of
    them: the server persists events asynchronously, in batches, so two sent together can land apart."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + wait_s
    while True:
        with get_client(sync_client=True) as client:
            answer = client.request("POST", "/events/filter", json={
                "filter": {"event": {"name": ["s3.object.created"]}, "resource": {"id": [uri]},
                           "occurred": {"since": "2000-01-01T00:00:00Z"}}, "limit": 50})
        events = answer.json()["events"]
        if len(events) >= expect or time.monotonic() >= deadline:
            return events
        time.sleep(0.5)


def test_an_object_is_announced_once_per_etag():
    from tasks.data.s3_events import S3Object
    from tasks.s3_announce import announce

    key = f"datasets/{uuid.uuid4().hex}.jsonl"
    obj = S3Object("bucket-a", key, "etag-1", 123)
    assert announce(obj) is True
    assert announce(S3Object("bucket-a", key, "etag-1", 123, event_name="ObjectCreated:CompleteMultipartUpload")) is False
    assert announce(S3Object("bucket-a", key, "etag-2", 124)) is True  # overwritten with new bytes: new data
    created_events(obj.uri, wait_s=30, expect=2)
    time.sleep(6)  # a duplicate would be persisted by now: the persister flushes at least every 5 s
    events = created_events(obj.uri)
    assert sorted(e["payload"]["etag"] for e in events) == ["etag-1", "etag-2"]
    first = next(e for e in events if e["payload"]["etag"] == "etag-1")
    assert first["id"] == str(obj.event_id) and first["payload"]["bucket"] == "bucket-a" and first["payload"]["key"] == key


def failure_of(obj) -> dict:
    """A `prefect.automation.action.failed` event for the run-deployment action `obj`'s event triggered."""
    from tasks.s3_announce import ACTION_FAILED

    return {"id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(), "event": ACTION_FAILED,
            "resource": {"prefect.resource.id": f"prefect.automation.{uuid.uuid4()}"},
            "related": [{"prefect.resource.id": f"prefect.deployment.{uuid.uuid4()}", "prefect.resource.role": "target"},
                        {"prefect.resource.id": f"prefect.event.{obj.event_id}",
                         "prefect.resource.role": "triggering-event"}],
            "payload": {"action_index": 0, "action_type": "run-deployment", "status_code": 503,
                        "reason": "Unexpected status from 'run-deployment' action: 503"}}


def persisted_failures(objects, wait_s: float) -> int:
    """How many failed-action events naming one of `objects`' events the server has stored, waiting up to `wait_s`
    for all of them (counted by the server: no page limit)."""
    from prefect.client.orchestration import get_client

    from tasks.s3_announce import ACTION_FAILED

    related = [f"prefect.event.{obj.event_id}" for obj in objects]
    since = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()  # counts are bucketed by day
    deadline = time.monotonic() + wait_s
    while True:
        with get_client(sync_client=True) as client:
            answer = client.request("POST", "/events/count-by/event", json={"filter": {
                "event": {"name": [ACTION_FAILED]}, "related": {"id": related},
                "occurred": {"since": since}}})
        stored = sum(row["count"] for row in answer.raise_for_status().json())
        if stored >= len(objects) or time.monotonic() >= deadline:
            return stored
        time.sleep(0.5)


def test_more_failed_actions_than_a_page_are_all_announced_again():
    from prefect.client.orchestration import get_client

    from tasks.data.s3_events import S3Object
    from tasks.s3_announce import EVENTS_PAGE, announce, reannounce_failed

    batch = uuid.uuid4().hex
    objects = [S3Object("bucket-p", f"datasets/{batch}/{i}.jsonl", "etag-1", 10) for i in range(EVENTS_PAGE + 10)]
    assert all(announce(obj) for obj in objects)
    with get_client(sync_client=True) as client:
        client.request("POST", "/events", json=[failure_of(obj) for obj in objects]).raise_for_status()
    # Every failure stored before the one call: without paging it reads the first EVENTS_PAGE only. (Called while
    # they were still being persisted, repeated calls used to collect all of them even without paging.)
    assert persisted_failures(objects, wait_s=60) == len(objects)
    sent = [uri for uri in reannounce_failed() if batch in uri]
    assert sorted(sent) == sorted(obj.uri for obj in objects)  # each once, the 51st and later too
    assert [uri for uri in reannounce_failed() if batch in uri] == []  # handled once


def test_an_upload_whose_trigger_action_failed_is_announced_again_once():
    """Prefect reports an action it gave up on as `prefect.automation.action.failed` (seen under load: the
    run-deployment action got a 503 from a locked SQLite); the failure is posted here as the server words it."""
    from prefect.client.orchestration import get_client

    from tasks.data.s3_events import S3Object
    from tasks.s3_announce import announce, reannounce_failed

    obj = S3Object("bucket-r", f"datasets/{uuid.uuid4().hex}.jsonl", "etag-1", 10)
    assert announce(obj)
    failure = failure_of(obj)
    with get_client(sync_client=True) as client:
        client.request("POST", "/events", json=[failure]).raise_for_status()
    created_events(obj.uri, wait_s=30)  # the original, persisted (with the failure: same batch or earlier)
    deadline = time.monotonic() + 30
    while not (sent := reannounce_failed()) and time.monotonic() < deadline:
        time.sleep(1)  # until the failure is persisted
    assert sent == [obj.uri]
    assert reannounce_failed() == []  # handled once
    events = created_events(obj.uri, wait_s=30, expect=2)
    time.sleep(6)  # a third copy would be persisted by now
    events = created_events(obj.uri)
    assert len(events) == 2 and {e["id"] for e in events} == {
        str(obj.event_id), str(uuid.uuid5(uuid.UUID(failure["id"]), str(obj.event_id)))}
    assert events[0]["payload"] == events[1]["payload"] and events[0]["resource"] == events[1]["resource"]


def test_old_announcement_records_are_dropped_and_nothing_else(monkeypatch):
    from datetime import datetime, timedelta, timezone

    from prefect.variables import Variable

    from tasks.data.s3_events import S3Object
    from tasks.s3_announce import SeenObjects

    seen = SeenObjects()
    seen.forget_before(datetime.now(timezone.utc) + timedelta(seconds=1))  # earlier tests' records
    objects = [S3Object("bucket-p", f"datasets/{uuid.uuid4().hex}.jsonl", f"etag-{i}", 1) for i in range(3)]
    for obj in objects:
        seen.remember(obj)
    Variable.set("unrelated-setting", "kept", overwrite=True)
    monkeypatch.setattr("tasks.s3_announce.SEEN_PAGE", 2)  # three records: two pages
    assert seen.forget_before(datetime.now(timezone.utc) - timedelta(hours=1)) == 0  # all are recent
    assert all(seen.seen(obj) for obj in objects)
    assert seen.forget_before(datetime.now(timezone.utc) + timedelta(seconds=1)) == 3
    assert not any(seen.seen(obj) for obj in objects)
    assert Variable.get("unrelated-setting") == "kept"


def test_sensor_announces_new_objects_since_its_cursor(bucket):
    import boto3

    from flows.s3_sensor import s3_sensor
    from prefect.variables import Variable

    s3, run = boto3.client("s3"), uuid.uuid4().hex[:8]
    prefix, cursor = f"incoming-{run}/", f"cursor-{run}"
    data = (DEMO_DATA / "train.jsonl").read_bytes()
    s3.put_object(Bucket=bucket, Key=prefix + "old.jsonl", Body=data)
    # First poll: what is already there is recorded, not announced (turning the sensor on retrains nothing).
    assert s3_sensor(bucket, prefix, cursor_variable=cursor) == 0
    assert Variable.get(cursor)["keys"] == [prefix + "old.jsonl"]

    s3.put_object(Bucket=bucket, Key=prefix + "new.jsonl", Body=data[:-200] + b"\n")
    s3.put_object(Bucket=bucket, Key=prefix + "readme.txt", Body=b"not data")
    assert s3_sensor(bucket, prefix, cursor_variable=cursor) == 1
    assert s3_sensor(bucket, prefix, cursor_variable=cursor) == 0  # nothing new
    time.sleep(1.1)  # a new LastModified second
    s3.put_object(Bucket=bucket, Key=prefix + "new.jsonl", Body=data[:-200] + b"\n")  # same bytes again
    assert s3_sensor(bucket, prefix, cursor_variable=cursor) == 0  # listed as new, but the same (key, etag)
    s3.put_object(Bucket=bucket, Key=prefix + "old.jsonl", Body=data + data[:100])  # new bytes
    assert s3_sensor(bucket, prefix, cursor_variable=cursor) == 1
    created_events(f"s3://{bucket}/{prefix}new.jsonl", wait_s=30)
    time.sleep(6)  # a second event for the same bytes would be persisted by now (see above)
    assert len(created_events(f"s3://{bucket}/{prefix}new.jsonl")) == 1
