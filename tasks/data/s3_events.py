"""S3 bucket notifications -> "a new dataset object landed", deduplicated and debounced. Pure.

S3 delivers at least once: one upload can give several notifications (moto sends both `Put` and
`CompleteMultipartUpload` for one object, SQS redelivers a message whose delete was lost), so the
identity of "one new object" is (bucket, key, etag): the same content notified again is the same
object; an overwrite with new bytes is a new one. Partial multipart uploads never produce an
ObjectCreated notification (S3 sends one when the upload completes) and never show in a listing,
so nothing here can see half an object; staging names that writers use before a rename
(`_temporary/`, `.hidden`, `*.partial`) are filtered by the key rules.

The debounce window holds an object until no notification for its group (the object, or its
folder) has arrived for `window_s` seconds, so a batch of files, or an object overwritten while
it is being written, gives one event for what finally landed.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

from tasks.data.sources import DATA_SUFFIXES
from tasks.store.objects import key_problem

EVENT_NAME = "s3.object.created"

# A fixed namespace, so the same (bucket, key, etag) always maps to the same Prefect event id and
# the Prefect server's own "seen this event" check drops a re-emitted copy too.
EVENT_NAMESPACE = uuid.UUID("6f1f6c1e-2b1c-4c55-9a47-5a3f3c9d1e01")


class NotificationError(ValueError):
    """A message body that is not an S3 notification (it is dropped, with this reason logged)."""


@dataclass(frozen=True)
class S3Object:
    bucket: str
    key: str
    etag: str
    size: int = 0
    event_time: str = ""
    event_name: str = "ObjectCreated:Put"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def dedupe_key(self) -> str:
        """A short stable name for (bucket, key, etag): safe as a Prefect Variable name."""
        digest = hashlib.sha256(f"{self.bucket}\0{self.key}\0{self.etag}".encode()).hexdigest()
        return f"s3-seen-{digest[:40]}"

    @property
    def event_id(self) -> uuid.UUID:
        return uuid.uuid5(EVENT_NAMESPACE, f"{self.bucket}\0{self.key}\0{self.etag}")

    def payload(self) -> dict:
        return {"bucket": self.bucket, "key": self.key, "etag": self.etag, "size": self.size,
                "uri": self.uri, "event_time": self.event_time, "s3_event": self.event_name}

    def resource(self) -> dict[str, str]:
        return {"prefect.resource.id": self.uri, "prefect.resource.name": self.key, "s3.bucket": self.bucket}


@dataclass(frozen=True)
class ParsedMessage:
    objects: list[S3Object]
    ignored: list[str]  # why records were skipped (test event, object removed, ...), for the log


def parse_message(body: str) -> ParsedMessage:
    """The ObjectCreated records of an SQS message body: an S3 notification, or one wrapped by SNS.

    Raises NotificationError when the body is not an S3 notification at all.
    """
    try:
        message = json.loads(body)
    except json.JSONDecodeError as error:
        raise NotificationError(f"not JSON ({error.msg} at column {error.colno}): {body[:80]!r}") from None
    if not isinstance(message, dict):
        raise NotificationError(f"not a JSON object: {body[:80]!r}")
    if message.get("Type") == "Notification" and isinstance(message.get("Message"), str):
        return parse_message(message["Message"])  # S3 -> SNS -> SQS
    if message.get("Event") == "s3:TestEvent":  # sent once when the notification is configured
        return ParsedMessage([], [f"s3:TestEvent for bucket {message.get('Bucket')}"])
    records = message.get("Records")
    if not isinstance(records, list):
        raise NotificationError(f"no 'Records' list: keys {sorted(message)[:8]}")
    objects, ignored = [], []
    for record in records:
        name = str(record.get("eventName", ""))
        s3 = record.get("s3") or {}
        if record.get("eventSource") != "aws:s3" or not name.startswith("ObjectCreated:"):
            ignored.append(f"{name or 'a record without eventName'} from {record.get('eventSource')}")
            continue
        obj = s3.get("object") or {}
        bucket = (s3.get("bucket") or {}).get("name")
        if not bucket or not obj.get("key") or not obj.get("eTag"):
            ignored.append(f"{name} without bucket, key or eTag")
            continue
        objects.append(S3Object(bucket=bucket, key=unquote_plus(obj["key"]), etag=str(obj["eTag"]).strip('"'),
                                size=int(obj.get("size") or 0), event_time=str(record.get("eventTime", "")),
                                event_name=name))
    return ParsedMessage(objects, ignored)


def skip_reason(key: str, prefix: str = "", suffixes: tuple[str, ...] = DATA_SUFFIXES) -> str | None:
    """Why a key is not a dataset file to train on, or None when it is."""
    if problem := key_problem(key):  # event payloads are data: refuse keys no file could be named after
        return f"an unsafe key: it {problem}"
    if not key.startswith(prefix):
        return f"outside prefix {prefix!r}"
    if key.endswith("/"):
        return "a folder marker"
    parts = key[len(prefix):].split("/")
    if any(part.startswith((".", "_")) for part in parts):  # _temporary/, _SUCCESS, .staging files
        return "a hidden or staging name (a part starts with '.' or '_')"
    if suffixes and not key.lower().endswith(tuple(s.lower() for s in suffixes)):
        return f"not a data file ({', '.join(suffixes)})"
    return None


def folder_of(key: str) -> str:
    return key.rsplit("/", 1)[0] + "/" if "/" in key else ""


@dataclass
class Batch:
    """What one event announces: an object (or a folder of them) and the messages that told of it."""
    obj: S3Object
    messages: set[str] = field(default_factory=set)
    last_seen: float = 0.0
    members: dict[str, S3Object] = field(default_factory=dict)  # key -> latest notification


class Debouncer:
    """Holds objects until their group has been quiet for `window_s` seconds.

    group="object": one event per object (the latest etag wins if it is overwritten in the window).
    group="folder": one event per folder, whose key is the folder (`data/batch-7/`) and whose etag
    combines its members', so a batch of files lands as one dataset.
    A message is released (safe to delete) only once every batch it contributed to was handled.
    """

    def __init__(self, window_s: float, group: str = "object"):
        if group not in ("object", "folder"):
            raise ValueError(f"group={group!r}: use 'object' or 'folder'")
        self.window_s, self.group = window_s, group
        self._batches: dict[tuple[str, str], Batch] = {}
        self._open: dict[str, set[tuple[str, str]]] = {}  # message -> batches still pending

    def add(self, obj: S3Object, message: str, now: float) -> None:
        group = (obj.bucket, obj.key if self.group == "object" else folder_of(obj.key))
        batch = self._batches.setdefault(group, Batch(obj))
        batch.members[obj.key] = obj
        batch.obj = obj if self.group == "object" else _folder_object(obj.bucket, group[1], batch.members)
        batch.messages.add(message)
        batch.last_seen = now
        self._open.setdefault(message, set()).add(group)

    def hold(self, message: str) -> None:
        """Note a message with nothing to announce, so `release` hands it back at once."""
        self._open.setdefault(message, set())

    def due(self, now: float) -> list[Batch]:
        ready = [g for g, b in self._batches.items() if now - b.last_seen >= self.window_s]
        out = []
        for group in ready:
            out.append(self._batches.pop(group))
            for message in out[-1].messages:
                self._open.get(message, set()).discard(group)
        return out

    def requeue(self, batch: Batch, now: float) -> None:
        """Put back a batch whose event could not be sent: it is tried again after the window, and its
        messages stay unreleased (not deleted) meanwhile."""
        group = (batch.obj.bucket, batch.obj.key if self.group == "object" else folder_of(batch.obj.key))
        batch.last_seen = now
        self._batches[group] = batch
        for message in batch.messages:
            self._open.setdefault(message, set()).add(group)

    def next_due_in(self, now: float) -> float | None:
        if not self._batches:
            return None
        return max(0.0, min(b.last_seen for b in self._batches.values()) + self.window_s - now)

    def release(self) -> list[str]:
        """Messages none of whose batches is still pending: delete these from the queue now."""
        done = [m for m, groups in self._open.items() if not groups]
        for message in done:
            del self._open[message]
        return done

    def pending(self) -> int:
        return len(self._batches)


def _folder_object(bucket: str, folder: str, members: dict[str, S3Object]) -> S3Object:
    parts = "\n".join(f"{key}={obj.etag}" for key, obj in sorted(members.items()))
    latest = max(members.values(), key=lambda o: o.event_time)
    return S3Object(bucket=bucket, key=folder, etag="folder-" + hashlib.sha256(parts.encode()).hexdigest()[:32],
                    size=sum(o.size for o in members.values()), event_time=latest.event_time,
                    event_name=latest.event_name)


def new_since(listing: list[dict], cursor: dict | None) -> tuple[list[dict], dict]:
    """Objects of a bucket listing (list_objects_v2 'Contents') that are new since `cursor`, and the
    next cursor. The cursor is the newest LastModified seen plus the keys that carry it, so objects
    written within the same second as the last poll are neither missed nor counted twice.
    LastModified values must be ISO-8601 strings in UTC (as the sensor passes them)."""
    since = (cursor or {}).get("last_modified", "")
    seen_at_since = set((cursor or {}).get("keys", []))
    fresh = [o for o in listing if o["LastModified"] > since or
             (o["LastModified"] == since and o["Key"] not in seen_at_since)]
    newest = max([since, *(o["LastModified"] for o in listing)])
    keys = sorted({o["Key"] for o in listing if o["LastModified"] == newest} |
                  (seen_at_since if newest == since else set()))
    return sorted(fresh, key=lambda o: (o["LastModified"], o["Key"])), {"last_modified": newest, "keys": keys}
