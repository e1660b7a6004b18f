"""Poll a bucket prefix for new dataset objects and announce them, for stores without notifications.

The cursor (newest LastModified seen, and the keys that carry it) is kept in a Prefect Variable, so
each poll lists what is new since the last one; announcing goes through the same (bucket, key, etag)
dedupe as the SQS bridge, so an object both notified and polled still gives one run.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.variables import Variable

from tasks.data.s3_events import DATA_SUFFIXES, S3Object, new_since, skip_reason
from tasks.s3_announce import KEEP_SEEN_DAYS, announce, forget_expired, reannounce_failed
from tasks.store.objects import retry_if_transient


@task(name="list-prefix", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def list_prefix(bucket: str, prefix: str) -> list[dict]:
    from tasks.store.objects import s3_client

    listing = []
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        listing += [{"Key": o["Key"], "ETag": o["ETag"].strip('"'), "Size": o["Size"],
                     "LastModified": o["LastModified"].astimezone(timezone.utc).isoformat()} for o in page.get("Contents", [])]
    return listing


@task(name="announce-new", cache_policy=NO_CACHE)
def announce_new(bucket: str, objects: list[dict], prefix: str, suffixes: list[str]) -> int:
    logger, emitted = get_run_logger(), 0
    for o in objects:
        obj = S3Object(bucket=bucket, key=o["Key"], etag=o["ETag"], size=o["Size"], event_time=o["LastModified"],
                       event_name="ObjectCreated:Listed")
        reason = skip_reason(obj.key, prefix, tuple(suffixes))
        if reason:
            logger.info("ignoring %s: %s", obj.uri, reason)
        elif announce(obj):
            emitted += 1
            logger.info("announced %s (etag %s)", obj.uri, obj.etag)
    return emitted


@task(name="forget-old-announcements", cache_policy=NO_CACHE)
def forget_old_announcements(pruned_variable: str) -> int:
    """At most once an hour (the sensor polls every few minutes): drop the dedupe records older than
    SQS's and any re-poll's horizon (tasks/s3_announce.KEEP_SEEN_DAYS)."""
    last = Variable.get(pruned_variable, default=None)
    now = datetime.now(timezone.utc)
    if last and now - datetime.fromisoformat(last) < timedelta(hours=1):
        return 0
    dropped = forget_expired()
    Variable.set(pruned_variable, now.isoformat(), overwrite=True)
    if dropped:
        get_run_logger().info("dropped %d announced-object records older than %d days", dropped, KEEP_SEEN_DAYS)
    return dropped


@task(name="reannounce-failed-uploads", cache_policy=NO_CACHE)
def reannounce_failed_uploads() -> list[str]:
    """Announce again the uploads whose trigger action Prefect gave up on (tasks/s3_announce.reannounce_failed)."""
    uris = reannounce_failed()
    for uri in uris:
        get_run_logger().warning("the trigger's action for %s failed in Prefect; announced it again", uri)
    return uris


@flow(name="s3-sensor")
def s3_sensor(bucket: str, prefix: str = "", suffixes: list[str] = list(DATA_SUFFIXES),
              cursor_variable: str = "s3-sensor-cursor", announce_existing: bool = False) -> int:
    """Returns how many objects were announced. On the first poll (no cursor), objects already there
    are only recorded unless announce_existing is set, so turning the sensor on does not retrain on history."""
    cursor = Variable.get(cursor_variable, default=None)
    fresh, next_cursor = new_since(list_prefix(bucket, prefix), cursor)
    emitted = announce_new(bucket, fresh, prefix, suffixes) if cursor is not None or announce_existing else 0
    Variable.set(cursor_variable, next_cursor, overwrite=True)
    forget_old_announcements(f"{cursor_variable}-pruned-at")
    reannounce_failed_uploads()
    return emitted
