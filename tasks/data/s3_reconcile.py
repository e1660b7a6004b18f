"""Which announced uploads never got a flow run. Pure: seen records, automations and flow runs in, as the
Prefect API returns them (JSON); the reading and the sending are tasks/s3_announce.reconcile.

The Prefect server keeps an accepted event, its trigger and the trigger's action in memory until the
run is created. A server that dies in between (SIGKILL, OOM, a node lost) loses them, and nothing in
Prefect sends them again; the bridge has already deleted the SQS message and recorded the upload as
announced. So the reconciler compares what is durable on both sides:

- the announced uploads: the `s3-seen-...` Variables (tasks/s3_announce.SeenObjects), each holding
  the object (bucket, key, etag, ...);
- the deployments whose trigger an `s3.object.created` event of that object fires (the server's
  automations, matched by Prefect's label rules);
- those deployments' flow runs, whose parameters name the object's URI and etag (the on-upload
  trigger renders `config.data` and `config.data_etag` from the event).

An upload covered by a trigger with no run of any covered deployment is announced again, with the
same event id as the original. Prefect's trigger service drops an event id it evaluated in the last
30 minutes (prefect.server.events.ordering: in memory, so empty after a restart), so a copy of an event
that is still on its way to a run is dropped, and a copy of one the dead server lost fires its trigger
once. On top, an upload is left alone for GRACE after it was (re-)announced, so a run about to be
created is not chased, and it is announced again at most MAX_REANNOUNCE times (one still without a run
after that is reported, not sent again for ever).

An action the server ran and that failed (a 503 from a locked SQLite) is answered by
tasks/s3_announce.reannounce_failed within a minute (the bridge looks every 30 s, the sensor every
poll), with a copy under a new id. The trigger has seen the original, so the reconciler's same-id copy
is dropped for 30 minutes, well past GRACE; once the run exists, the reconciler sends nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from tasks.data.s3_events import EVENT_NAME, S3Object

GRACE = timedelta(minutes=10)  # < the trigger service's 30-minute memory of event ids, see above
MAX_REANNOUNCE = 3
SEEN_PREFIX = "s3-seen-"


@dataclass(frozen=True)
class Announced:
    """One seen record: the Variable's name and value, and the object it announced."""
    name: str
    record: dict
    obj: S3Object

    @property
    def announced_at(self) -> datetime:
        return datetime.fromisoformat(self.record["announced_at"])

    @property
    def last_sent(self) -> datetime:
        return datetime.fromisoformat(self.record.get("reannounced_at") or self.record["announced_at"])

    @property
    def attempts(self) -> int:
        return int(self.record.get("reannounced", 0))


def announced_from(variable: dict) -> Announced | None:
    """A seen record (a Variable as /variables/filter returns it), or None for another `s3-seen` Variable
    (the failed-action markers of tasks/s3_announce.reannounce_failed share the tag)."""
    value = variable.get("value")
    if not variable["name"].startswith(SEEN_PREFIX) or not isinstance(value, dict) or \
            not {"uri", "etag", "announced_at"} <= value.keys():
        return None
    # Records written before the object was kept whole have its URI only: bucket and key come from it.
    bucket, _, key = value["uri"].removeprefix("s3://").partition("/")
    obj = S3Object(bucket=value.get("bucket", bucket), key=value.get("key", key), etag=value["etag"],
                   size=int(value.get("size") or 0), event_time=value.get("event_time", ""),
                   event_name=value.get("s3_event", "ObjectCreated:Put"))
    return Announced(variable["name"], value, obj)


@dataclass(frozen=True)
class UploadTrigger:
    """A reactive trigger that runs deployment `deployment_id` once per event it matches."""
    deployment_id: str
    expect: tuple[str, ...]
    match: dict

    def covers(self, obj: S3Object) -> bool:
        if self.expect and not any(label_matches(pattern, EVENT_NAME) for pattern in self.expect):
            return False
        resource = obj.resource()
        return all(any(label_matches(p, resource.get(label)) for p in ([want] if isinstance(want, str) else want))
                   for label, want in self.match.items())


def label_matches(expected: str, value: str | None) -> bool:
    """Prefect's rule for a label or event name (prefect.events.schemas.events.matches): a trailing `*` matches
    any rest, a leading `!` negates."""
    if value is None:
        return False
    negate = expected.startswith("!")
    expected = expected.removeprefix("!")
    found = value.startswith(expected[:-1]) if expected.endswith("*") else value == expected
    return found != negate


def upload_triggers(automations: list[dict]) -> list[UploadTrigger]:
    """The one-run-per-event triggers among `automations` (as /automations/filter returns them): enabled,
    reactive, threshold 1, no `after`, and no `match_related` (an upload event has no related resources, so
    such a trigger never fires for one), each with its run-deployment actions of a selected deployment."""
    found = []
    for automation in automations:
        trigger = automation.get("trigger") or {}
        related = trigger.get("match_related") or {}
        if not (automation.get("enabled") and trigger.get("type") == "event" and trigger.get("posture") == "Reactive"
                and trigger.get("threshold", 1) == 1 and not trigger.get("after")
                and all(not spec for spec in (related if isinstance(related, list) else [related]))):
            continue
        found += [UploadTrigger(str(action["deployment_id"]), tuple(sorted(trigger.get("expect") or [])),
                                dict(trigger.get("match") or {}))
                  for action in automation.get("actions", [])
                  if action.get("type") == "run-deployment" and action.get("source", "selected") == "selected"
                  and action.get("deployment_id")]
    return found


@dataclass
class Plan:
    """What one pass found, record by record."""
    reannounce: list[Announced] = field(default_factory=list)  # covered, no run, past the grace period
    waiting: list[Announced] = field(default_factory=list)  # no run yet, but (re-)announced within the grace period
    gave_up: list[Announced] = field(default_factory=list)  # no run after the last copy allowed
    partial: list[Announced] = field(default_factory=list)  # a run of some covered deployments, not all
    with_run: int = 0
    no_trigger: int = 0  # announced, but no upload trigger matches it: no run expected

    def counts(self) -> dict[str, int]:
        return {"with_run": self.with_run, "reannounced": len(self.reannounce), "waiting": len(self.waiting),
                "gave_up": len(self.gave_up), "partial": len(self.partial), "no_trigger": self.no_trigger}

    def summary(self) -> str:
        return (f"{self.with_run} upload(s) have their run, {len(self.reannounce)} to announce again, "
                f"{len(self.waiting)} within the grace period, {len(self.gave_up)} given up on (no run after "
                f"every copy), {len(self.partial)} with runs of only some of their deployments, "
                f"{self.no_trigger} matched by no trigger")


def plan(announced: list[Announced], triggers: list[UploadTrigger], runs: list[dict], now: datetime,
         grace: timedelta = GRACE, max_reannounce: int = MAX_REANNOUNCE) -> Plan:
    """Sort the seen records by what they need. `runs`: flow runs (deployment_id, parameters); a run is the
    upload's when its deployment is covered and its parameters hold the upload's URI and etag."""
    by_text: dict[tuple[str, str], list[set[str]]] = {}  # (deployment, a string) -> the runs' strings
    for run in runs:
        texts = set(_texts(run.get("parameters")))
        for text in texts:
            by_text.setdefault((run.get("deployment_id"), text), []).append(texts)
    result = Plan()
    for upload in announced:
        covering = {t.deployment_id for t in triggers if t.covers(upload.obj)}
        if not covering:
            result.no_trigger += 1
            continue
        # One run whose parameters hold both the URI and the etag (an older upload of the key has the URI only).
        ran = {d for d in covering if any(upload.obj.uri in texts for texts in by_text.get((d, upload.obj.etag), []))}
        if ran == covering:
            result.with_run += 1
        elif ran:  # announcing again would run the others twice
            result.partial.append(upload)
        elif now - upload.last_sent < grace:
            result.waiting.append(upload)
        elif upload.attempts >= max_reannounce:
            result.gave_up.append(upload)
        else:
            result.reannounce.append(upload)
    return result


def _texts(value) -> list[str]:
    """Every string in a parameters tree."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [text for item in value for text in _texts(item)] if isinstance(value, list) else []
