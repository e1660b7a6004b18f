"""S3 notifications -> new objects: parsing, filtering, identity, debounce, the polling cursor (pure)."""
import json

import pytest

from tasks.data.s3_events import Debouncer, NotificationError, S3Object, new_since, parse_message, skip_reason


def record(key: str, etag: str = "abc", name: str = "ObjectCreated:Put", bucket: str = "b", size: int = 10,
           time: str = "2026-11-29T01:00:00.000Z") -> dict:
    return {"eventVersion": "2.1", "eventSource": "aws:s3", "eventTime": time, "eventName": name,
            "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": size, "eTag": etag}}}


def test_object_created_records_are_parsed_with_decoded_keys():
    body = json.dumps({"Records": [record("data/my+file%281%29.jsonl", '"e1"'),
                                   record("data/x.jsonl", "e2", name="ObjectCreated:CompleteMultipartUpload")]})
    parsed = parse_message(body)
    assert [(o.key, o.etag, o.event_name) for o in parsed.objects] == [
        ("data/my file(1).jsonl", "e1", "ObjectCreated:Put"), ("data/x.jsonl", "e2", "ObjectCreated:CompleteMultipartUpload")]
    assert parsed.objects[0].uri == "s3://b/data/my file(1).jsonl" and parsed.ignored == []


def test_test_events_removals_and_sns_wrapping():
    assert parse_message(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "b"})).objects == []
    removed = parse_message(json.dumps({"Records": [record("a.jsonl", name="ObjectRemoved:Delete")]}))
    assert removed.objects == [] and "ObjectRemoved:Delete" in removed.ignored[0]
    wrapped = json.dumps({"Type": "Notification", "Message": json.dumps({"Records": [record("a.jsonl")]})})
    assert [o.key for o in parse_message(wrapped).objects] == ["a.jsonl"]


@pytest.mark.parametrize("body, words", [("not json", "not JSON"), ("[1]", "not a JSON object"),
                                         ('{"foo": 1}', "no 'Records'")])
def test_bodies_that_are_no_notification_are_refused_with_the_reason(body, words):
    with pytest.raises(NotificationError, match=words):
        parse_message(body)


@pytest.mark.parametrize("key, reason", [
    ("datasets/in/a.jsonl", None), ("datasets/in/sub/a.parquet", None), ("other/a.jsonl", "outside prefix"),
    ("datasets/in/", "folder marker"), ("datasets/in/_temporary/0/a.jsonl", "staging"),
    ("datasets/in/.a.jsonl.swp", "staging"), ("datasets/in/notes.txt", "not a data file"),
    ("datasets/in/a.jsonl.partial", "not a data file"), ("datasets/in/_SUCCESS", "staging"),
])
def test_only_data_files_under_the_prefix_are_wanted(key, reason):
    got = skip_reason(key, "datasets/in/")
    assert got == reason if reason is None else reason in got


def test_identity_is_bucket_key_etag():
    a, same, overwritten = S3Object("b", "k.jsonl", "e1", 1), S3Object("b", "k.jsonl", "e1", 1, "t2"), S3Object("b", "k.jsonl", "e2")
    assert a.dedupe_key == same.dedupe_key and a.event_id == same.event_id
    assert a.dedupe_key != overwritten.dedupe_key and a.event_id != overwritten.event_id
    assert S3Object("b2", "k.jsonl", "e1").dedupe_key != a.dedupe_key
    assert len(a.dedupe_key) <= 255 and a.dedupe_key.replace("-", "").isalnum()  # a valid Prefect Variable name


def test_debounce_waits_for_quiet_then_gives_one_batch_per_object():
    d = Debouncer(window_s=5)
    d.add(S3Object("b", "a.jsonl", "e1"), "m1", now=0)
    d.add(S3Object("b", "a.jsonl", "e1", event_name="ObjectCreated:CompleteMultipartUpload"), "m2", now=1)
    d.add(S3Object("b", "c.jsonl", "e3"), "m3", now=4)
    assert d.due(now=5.9) == [] and d.release() == []  # a.jsonl was notified again at t=1
    assert d.next_due_in(now=5.9) == pytest.approx(0.1)
    [batch] = d.due(now=6)
    assert batch.obj.key == "a.jsonl" and batch.messages == {"m1", "m2"}
    assert sorted(d.release()) == ["m1", "m2"] and d.pending() == 1
    [batch] = d.due(now=9)
    assert batch.obj.key == "c.jsonl" and d.release() == ["m3"] and d.next_due_in(now=9) is None


def test_an_overwrite_within_the_window_announces_the_final_content():
    d = Debouncer(window_s=5)
    d.add(S3Object("b", "a.jsonl", "old"), "m1", now=0)
    d.add(S3Object("b", "a.jsonl", "new"), "m2", now=2)
    [batch] = d.due(now=7)
    assert batch.obj.etag == "new" and batch.messages == {"m1", "m2"}


def test_folder_grouping_lands_a_batch_of_files_as_one_dataset():
    d = Debouncer(window_s=5, group="folder")
    for i, t in enumerate((0, 1, 2)):
        d.add(S3Object("b", f"data/day-7/part-{i}.jsonl", f"e{i}", size=10, event_time=f"t{i}"), f"m{i}", now=t)
    d.add(S3Object("b", "data/day-8/part-0.jsonl", "x"), "m9", now=2)
    batches = {b.obj.key: b for b in d.due(now=7)}
    assert set(batches) == {"data/day-7/", "data/day-8/"}
    day7 = batches["data/day-7/"]
    assert day7.obj.size == 30 and day7.messages == {"m0", "m1", "m2"} and day7.obj.etag.startswith("folder-")
    # The same files give the same folder identity; one changed file gives a new one.
    again = Debouncer(5, "folder")
    for i in (2, 0, 1):
        again.add(S3Object("b", f"data/day-7/part-{i}.jsonl", f"e{i}"), "n", now=0)
    assert again.due(now=5)[0].obj.etag == day7.obj.etag


def test_a_message_is_released_only_when_all_its_objects_were_handled_and_requeue_keeps_it():
    d = Debouncer(window_s=2)
    d.add(S3Object("b", "a.jsonl", "e1"), "m1", now=0)
    d.add(S3Object("b", "c.jsonl", "e2"), "m1", now=1)  # one message, two records
    d.hold("empty")  # nothing wanted in it: released at once
    [first] = d.due(now=2)
    assert d.release() == ["empty"]
    d.requeue(first, now=2)  # its event could not be sent
    [second] = d.due(now=3)
    assert second.obj.key == "c.jsonl" and d.release() == []
    [retried] = d.due(now=4)
    assert retried.obj.key == "a.jsonl" and d.release() == ["m1"]


def test_debounce_group_is_checked():
    with pytest.raises(ValueError, match="'object' or 'folder'"):
        Debouncer(1, group="prefix")


def test_polling_cursor_sees_each_object_once_even_within_one_second():
    t1, t2 = "2026-11-29T01:00:00+00:00", "2026-11-29T01:00:05+00:00"
    listing = [{"Key": "a.jsonl", "LastModified": t1}, {"Key": "b.jsonl", "LastModified": t1}]
    fresh, cursor = new_since(listing, None)
    assert [o["Key"] for o in fresh] == ["a.jsonl", "b.jsonl"] and cursor == {"last_modified": t1, "keys": ["a.jsonl", "b.jsonl"]}
    assert new_since(listing, cursor)[0] == []
    listing.append({"Key": "c.jsonl", "LastModified": t1})  # written in the same second, after the last poll
    fresh, cursor = new_since(listing, cursor)
    assert [o["Key"] for o in fresh] == ["c.jsonl"] and cursor["keys"] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    listing[0] = {"Key": "a.jsonl", "LastModified": t2}  # overwritten: new again
    fresh, cursor = new_since(listing, cursor)
    assert [o["Key"] for o in fresh] == ["a.jsonl"] and cursor == {"last_modified": t2, "keys": ["a.jsonl"]}
    assert new_since([], cursor) == ([], cursor)
