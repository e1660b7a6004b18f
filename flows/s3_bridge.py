"""S3 bucket notifications in SQS -> Prefect `s3.object.created` events (a long-running process).

    python -m flows.s3_bridge --queue-url https://sqs.../datasets --prefix datasets/q7/ --debounce 30

Each pass long-polls SQS, parses the notifications (tasks.data.s3_events), holds new objects for the
debounce window, then for every object not seen before emits one event and records it as seen.
Exactly once, layer by layer:
- an SQS message is deleted only after the event for every object it announced was accepted by the
  Prefect API (a 2xx answer to POST /events), so a crash before that means redelivery, not loss;
- the seen-set is persisted as one Prefect Variable per (bucket, key, etag), so redelivery, a
  second notification for the same object, or a restarted bridge emits nothing new;
- the event id is derived from (bucket, key, etag), so a copy emitted between "accepted" and
  "recorded as seen" (a crash there) is dropped by the server's own seen-event check.
Records older than SQS's longest retention (14 days) are dropped once an hour: no notification
that old can come back, and one Variable per object would otherwise pile up for ever.
The deployment trigger in deployments/prefect.yaml turns each event into one flow run.
"""
from __future__ import annotations

import argparse
import logging
import signal
import time

from tasks.data.s3_events import DATA_SUFFIXES, EVENT_NAME, Debouncer, NotificationError, parse_message, skip_reason
from tasks.s3_announce import KEEP_SEEN_DAYS, SeenObjects, announce, forget_expired, reannounce_failed

log = logging.getLogger("prefect_finetune.s3_bridge")
PRUNE_EVERY_S = 3600
REANNOUNCE_EVERY_S = 30  # how often failed trigger actions are looked for (tasks/s3_announce.reannounce_failed)


def run_bridge(queue_url: str, *, prefix: str = "", suffixes: tuple[str, ...] = DATA_SUFFIXES,
               debounce_s: float = 10.0, wait_s: int = 20, group: str = "object",
               should_stop=lambda: False, seen: SeenObjects | None = None, sqs=None) -> None:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    sqs = sqs or boto3.client("sqs")
    seen = seen or SeenObjects()
    debouncer = Debouncer(debounce_s, group)
    handles: dict[str, str] = {}  # message id -> newest receipt handle (a redelivery gets a new one)
    # Held messages must stay invisible while they wait out the debounce window, or SQS hands them out again.
    visibility = int(debounce_s + wait_s + 60)
    next_prune = next_reannounce = time.monotonic()
    log.info("bridge: polling %s for s3://*/%s* (debounce %.0fs, group by %s)", queue_url, prefix, debounce_s, group)
    while not should_stop():
        if time.monotonic() >= next_prune:
            next_prune = time.monotonic() + PRUNE_EVERY_S
            _prune(seen)
        if time.monotonic() >= next_reannounce:
            next_reannounce = time.monotonic() + REANNOUNCE_EVERY_S
            _reannounce()
        due_in = debouncer.next_due_in(time.monotonic())
        poll_s = wait_s if due_in is None else max(0, min(wait_s, int(due_in + 0.999)))
        try:
            answer = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=poll_s,
                                         VisibilityTimeout=visibility)
        except (BotoCoreError, ClientError) as error:  # SQS or the network hiccuped: held messages stay held
            log.warning("bridge: receiving from SQS failed (%s); retrying in 5s", error)
            time.sleep(5)
            answer = {}
        for message in answer.get("Messages", []):
            handles[message["MessageId"]] = message["ReceiptHandle"]
            _take(message, debouncer, prefix, suffixes)
        for batch in debouncer.due(time.monotonic()):
            try:
                emitted = announce(batch.obj, seen)
            except Exception as error:  # the API is down or restarting: keep the messages, try again later
                log.warning("bridge: could not announce %s (%s); retrying in %.0fs", batch.obj.uri, error, debounce_s)
                debouncer.requeue(batch, time.monotonic())
                continue
            log.info("bridge: %s %s (etag %s)", f"emitted {EVENT_NAME} for" if emitted else "already announced, skipped",
                     batch.obj.uri, batch.obj.etag)
        for message_id in debouncer.release():
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=handles.pop(message_id))


def _prune(seen: SeenObjects) -> None:
    try:
        dropped = forget_expired(seen)
    except Exception as error:  # the API is down: try again at the next hour, announcing goes on
        log.warning("bridge: could not drop old announced-object records (%s)", error)
        return
    if dropped:
        log.info("bridge: dropped %d announced-object records older than %d days", dropped, KEEP_SEEN_DAYS)


def _reannounce() -> None:
    try:
        uris = reannounce_failed()
    except Exception as error:  # the API is down: look again next time
        log.warning("bridge: could not look for failed trigger actions (%s)", error)
        return
    for uri in uris:
        log.warning("bridge: the trigger's action for %s failed in Prefect; announced it again", uri)


def _take(message: dict, debouncer: Debouncer, prefix: str, suffixes: tuple[str, ...]) -> None:
    message_id = message["MessageId"]
    try:
        parsed = parse_message(message["Body"])
    except NotificationError as error:  # never retried: it cannot parse next time either
        log.warning("bridge: dropping message %s: %s", message_id, error)
        debouncer.hold(message_id)
        return
    for reason in parsed.ignored:
        log.info("bridge: ignoring %s", reason)
    wanted = 0
    for obj in parsed.objects:
        reason = skip_reason(obj.key, prefix, suffixes)
        if reason:
            log.info("bridge: ignoring %r: %s", obj.uri, reason)  # repr: a key may hold control characters
            continue
        debouncer.add(obj, message_id, time.monotonic())
        wanted += 1
    if not wanted:
        debouncer.hold(message_id)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue-url", required=True, help="SQS queue that receives the bucket's notifications")
    parser.add_argument("--prefix", default="", help="only keys under this prefix, e.g. datasets/q7/")
    parser.add_argument("--suffixes", default=",".join(DATA_SUFFIXES), help="comma-separated key suffixes")
    parser.add_argument("--debounce", type=float, default=10.0,
                        help="seconds without a new notification for an object (or folder) before it is announced")
    parser.add_argument("--group", choices=("object", "folder"), default="object",
                        help="one event per object, or per folder (a batch of files as one dataset)")
    parser.add_argument("--wait", type=int, default=20, help="SQS long-poll seconds (at most 20)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stopping = []
    for signum in (signal.SIGTERM, signal.SIGINT):  # finish the current pass, then exit
        signal.signal(signum, lambda *_: stopping.append(True))
    run_bridge(args.queue_url, prefix=args.prefix, suffixes=tuple(s for s in args.suffixes.split(",") if s),
               debounce_s=args.debounce, wait_s=min(args.wait, 20), group=args.group,
               should_stop=lambda: bool(stopping))


if __name__ == "__main__":
    main()
