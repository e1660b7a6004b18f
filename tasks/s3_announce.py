"""Announce a new S3 object to Prefect: one `s3.object.created` event per (bucket, key, etag).

The Prefect side of the S3 bridge (flows/s3_bridge.py) and sensor (flows/s3_sensor.py); the
parsing, filtering and debouncing they share is pure, in tasks/s3_events.py.
"""
from __future__ import annotations

from datetime import datetime, timezone

from tasks.s3_events import EVENT_NAME, S3Object


class SeenObjects:
    """The (bucket, key, etag) already announced: one Prefect Variable each (a value is capped at 5,000
    characters, so one variable per object, not one growing list)."""

    def seen(self, obj: S3Object) -> bool:
        from prefect.variables import Variable

        return Variable.get(obj.dedupe_key, default=None) is not None

    def remember(self, obj: S3Object) -> None:
        from prefect.variables import Variable

        Variable.set(obj.dedupe_key, {"uri": obj.uri, "etag": obj.etag, "announced_at": _now()}, overwrite=True,
                     tags=["s3-seen"])


def announce(obj: S3Object, seen: SeenObjects | None = None) -> bool:
    """Emit the event unless this (bucket, key, etag) was announced before; True when emitted."""
    seen = seen or SeenObjects()
    if seen.seen(obj):
        return False
    emit_created(obj)
    seen.remember(obj)  # after the emit: a crash in between re-emits the same event id, which the server drops
    return True


def emit_created(obj: S3Object) -> None:
    """POST the event and wait for the API to accept it. `prefect.events.emit_event` would queue it
    for a background websocket sender and return at once; here the SQS delete waits on delivery."""
    from prefect.client.orchestration import get_client
    from prefect.events import Event

    event = Event(occurred=datetime.now(timezone.utc), event=EVENT_NAME, resource=obj.resource(),
                  payload=obj.payload(), id=obj.event_id)
    with get_client(sync_client=True) as client:
        response = client.request("POST", "/events", json=[event.model_dump(mode="json")])
        response.raise_for_status()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
