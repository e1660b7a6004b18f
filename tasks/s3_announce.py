"""Announce a new S3 object to Prefect: one `s3.object.created` event per (bucket, key, etag).

The Prefect side of the S3 bridge (flows/s3_bridge.py), sensor (flows/s3_sensor.py) and reconciler
(flows/reconcile.py); the parsing, filtering, debouncing and matching they share are pure, in
tasks/data/s3_events.py and tasks/data/s3_reconcile.py.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from tasks.data.s3_events import EVENT_NAME, S3Object
from tasks.data.s3_reconcile import GRACE, MAX_REANNOUNCE, Plan, announced_from, plan, upload_triggers


SEEN_TAG = "s3-seen"
# SQS keeps a message at most 14 days, so no notification older than that can be redelivered: a record
# of having announced it is not needed longer.
KEEP_SEEN_DAYS = 14
SEEN_PAGE = 200  # records read per request when dropping old ones


class SeenObjects:
    """The (bucket, key, etag) already announced: one Prefect Variable each (a value is capped at 5,000
    characters, so one variable per object, not one growing list), dropped after KEEP_SEEN_DAYS."""

    def seen(self, obj: S3Object) -> bool:
        from prefect.variables import Variable

        return Variable.get(obj.dedupe_key, default=None) is not None

    def remember(self, obj: S3Object) -> None:
        # The whole object, so that the reconciler (`reconcile` below) can send its event again.
        self._write(obj.dedupe_key, {"uri": obj.uri, "etag": obj.etag, "announced_at": _now(), "bucket": obj.bucket,
                                     "key": obj.key, "size": obj.size, "event_time": obj.event_time,
                                     "s3_event": obj.event_name})

    def mark_reannounced(self, name: str, record: dict) -> None:
        """Count one more re-announcement of the record `name` (its value `record`), and when."""
        self._write(name, record | {"reannounced": record.get("reannounced", 0) + 1, "reannounced_at": _now()})

    def records(self) -> list[dict]:
        """Every record tagged SEEN_TAG (name, value, created, updated), page after page."""
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            # Newest first: a record written while paging shifts the older ones back, so one is read twice
            # (kept once), never skipped.
            return _pages(client, "/variables/filter", {"variables": {"tags": {"all_": [SEEN_TAG]}},
                                                        "sort": "CREATED_DESC"}, SEEN_PAGE)

    def forget_before(self, cutoff: datetime) -> int:
        """Drop the records last written before `cutoff`; returns how many were dropped."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        stale = [v["name"] for v in self.records() if datetime.fromisoformat(v["updated"]) < cutoff]
        with get_client(sync_client=True) as client:
            for name in stale:
                try:
                    client.delete_variable_by_name(name)
                except ObjectNotFound:  # another bridge dropped it first
                    pass
        return len(stale)

    @staticmethod
    def _write(name: str, value: dict) -> None:
        from prefect.variables import Variable

        Variable.set(name, value, overwrite=True, tags=[SEEN_TAG])


def forget_expired(seen: SeenObjects | None = None) -> int:
    """Drop the records older than KEEP_SEEN_DAYS; returns how many."""
    return (seen or SeenObjects()).forget_before(datetime.now(timezone.utc) - timedelta(days=KEEP_SEEN_DAYS))


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


ACTION_FAILED = "prefect.automation.action.failed"
RETRY_WINDOW = timedelta(days=1)  # how far back failed actions are looked for
EVENTS_PAGE = 50


def reannounce_failed() -> list[str]:
    """Send again each `s3.object.created` event whose automation action Prefect gave up on; returns the
    URIs. The trigger's run-deployment action fails when the API answers it 503 (on SQLite, when another
    write holds the lock), and Prefect never retries an action: without this, that upload gets no run.
    Each failure is handled once (a Variable beside the dedupe records, dropped with them); the copy's id
    comes from the failure's, so a crash between sending and recording sends the same event, which the
    server drops. A copy whose action fails too is a new failure, handled in turn."""
    from prefect.client.orchestration import get_client
    from prefect.variables import Variable

    since = (datetime.now(timezone.utc) - RETRY_WINDOW).isoformat()
    sent = []
    with get_client(sync_client=True) as client:
        for failure in _events(client, {"event": {"name": [ACTION_FAILED]}, "occurred": {"since": since}}):
            marker = f"s3-reannounced-{failure['id']}"
            if failure["payload"].get("action_type") != "run-deployment" or \
                    Variable.get(marker, default=None) is not None:
                continue
            triggering = [r["prefect.resource.id"].removeprefix("prefect.event.") for r in failure["related"]
                          if r.get("prefect.resource.role") == "triggering-event"]
            originals = _events(client, {"id": {"id": triggering}, "occurred": {"since": "2000-01-01T00:00:00Z"}}) \
                if triggering else []
            for original in (e for e in originals if e["event"] == EVENT_NAME):
                copy = {k: v for k, v in original.items() if k != "received"} | {
                    "id": str(uuid.uuid5(uuid.UUID(failure["id"]), original["id"])), "follows": None,
                    "occurred": datetime.now(timezone.utc).isoformat()}
                client.request("POST", "/events", json=[copy]).raise_for_status()
                sent.append(original["resource"]["prefect.resource.id"])
            Variable.set(marker, {"failure": failure["id"], "reannounced_at": _now()}, overwrite=True,
                         tags=[SEEN_TAG])
    return sent


def _events(client, event_filter: dict) -> list[dict]:
    """Every event the filter matches, page after page (the server answers at most EVENTS_PAGE at a time)."""
    events = []
    answer = client.request("POST", "/events/filter", json={"filter": event_filter, "limit": EVENTS_PAGE})
    while True:
        answer.raise_for_status()
        page = answer.json()
        events += page["events"]
        if not page.get("next_page"):
            return events
        answer = client.request("GET", page["next_page"])  # an absolute URL with the server's page token


API_PAGE = 200  # the API's largest page
# Runs are read from this long before the oldest announcement: a run's expected start is when its trigger
# fired, which can be a little before the bridge recorded the upload (it records once the API accepted).
RUNS_SLACK = timedelta(days=1)


def reconcile(grace: timedelta = GRACE, max_reannounce: int = MAX_REANNOUNCE, dry_run: bool = False,
              seen: SeenObjects | None = None) -> Plan:
    """Announce again the uploads that were announced and have no flow run (tasks/data/s3_reconcile.py says
    which, and why a copy never doubles a run): one pass, every record, every page. Unless `dry_run`, each copy
    is counted in its seen record."""
    from prefect.client.orchestration import get_client

    if grace < timedelta(0) or max_reannounce < 0:
        raise ValueError(f"grace={grace}, max_reannounce={max_reannounce}: neither may be negative")
    seen = seen or SeenObjects()
    announced = [a for v in seen.records() if (a := announced_from(v))]
    with get_client(sync_client=True) as client:
        triggers = upload_triggers(_pages(client, "/automations/filter", {}))
        since = min((a.announced_at for a in announced), default=None)
        runs = _pages(client, "/flow_runs/filter", {
            "flow_runs": {"deployment_id": {"any_": sorted({t.deployment_id for t in triggers})},
                          "expected_start_time": {"after_": (since - RUNS_SLACK).isoformat()}},
            # Oldest first: a run created while paging lands on the last page instead of shifting the others.
            "sort": "EXPECTED_START_TIME_ASC"}) if since and triggers else []
    result = plan(announced, triggers, runs, datetime.now(timezone.utc), grace, max_reannounce)
    if not dry_run:
        for upload in result.reannounce:
            emit_created(upload.obj)  # the original's event id: Prefect's trigger drops it if it saw the original
            seen.mark_reannounced(upload.name, upload.record)
    return result


def _pages(client, path: str, body: dict, page_size: int | None = None) -> list[dict]:
    """Every row a /filter endpoint answers, page after page (each has an `id`; a row read twice is kept once)."""
    size = page_size or API_PAGE
    rows, offset = {}, 0
    while True:
        answer = client.request("POST", path, json=body | {"limit": size, "offset": offset})
        answer.raise_for_status()
        page = answer.json()
        rows |= {row["id"]: row for row in page}
        if len(page) < size:
            return list(rows.values())
        offset += size


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
