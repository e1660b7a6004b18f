"""The latest.json pointer: moved only to complete runs, conditionally, with history for rollback;
the same rules for a local output folder and for S3 (moto's server on 127.0.0.1)."""
import json
import threading
from pathlib import Path

import pytest

from tasks.scoring.promotion import score_gate
from tasks.store.manifest import file_entries
from tasks.store.objects import StorageNotFoundError, join_uri, read_object, write_if_unchanged
from tasks.store.registry import LATEST, PromotionError, history, promote, read_latest, run_uri
from tasks.store.transfer import upload_folder


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "models")
    return f"s3://{request.getfixturevalue('empty_bucket')}/models"


def publish_run(output, tmp_path, run_id, manifest=True):
    staged = tmp_path / "staging" / run_id
    (staged / "merged").mkdir(parents=True)
    (staged / "merged" / "model.safetensors").write_bytes(run_id.encode() * 100)
    (staged / "manifest.json").write_text(json.dumps({"run": {"run_id": run_id}, "files": file_entries(staged)}))
    upload_folder(staged, run_uri(output, run_id))
    if not manifest:  # as if the publish died just before writing it
        delete(join_uri(run_uri(output, run_id), "manifest.json"))


def is_s3(uri):
    return uri.startswith("s3://")


def delete(uri):
    if is_s3(uri):
        import boto3

        from tasks.store.objects import split_s3_uri

        bucket, key = split_s3_uri(uri)
        boto3.client("s3").delete_object(Bucket=bucket, Key=key)
    else:
        import os

        os.remove(uri)


GO = {"promote": True, "reason": "test"}


def test_promotion_moves_latest_and_keeps_every_replaced_pointer(output, tmp_path):
    for run_id in ("run-a", "run-b"):
        publish_run(output, tmp_path, run_id)
    first = promote(output, "run-a", GO)
    assert read_latest(output) == first and first["previous"] is None and history(output) == []
    second = promote(output, "run-b", GO)
    assert read_latest(output)["run_id"] == "run-b" and second["previous"]["run_id"] == "run-a"
    assert history(output) == [first]
    assert promote(output, "run-b", GO) == second  # promoting the latest again changes nothing
    rollback = promote(output, "run-a", {"promote": True, "reason": "rollback"})
    assert rollback["previous"]["run_id"] == "run-b"
    assert [p["run_id"] for p in history(output)] == ["run-a", "run-b"]


def test_an_incomplete_run_never_becomes_latest(output, tmp_path):
    publish_run(output, tmp_path, "run-a")
    promote(output, "run-a", GO)
    publish_run(output, tmp_path, "no-manifest", manifest=False)
    with pytest.raises(StorageNotFoundError, match="no manifest.json"):
        promote(output, "no-manifest", GO)
    publish_run(output, tmp_path, "lost-a-file")
    delete(join_uri(run_uri(output, "lost-a-file"), "merged/model.safetensors"))
    with pytest.raises(PromotionError, match="lost-a-file is incomplete.*merged/model.safetensors"):
        promote(output, "lost-a-file", GO)
    assert read_latest(output)["run_id"] == "run-a"


def test_a_file_changed_after_publishing_blocks_promotion_even_at_the_same_size(output, tmp_path):
    publish_run(output, tmp_path, "tampered")
    uri = join_uri(run_uri(output, "tampered"), "merged/model.safetensors")
    same_size = b"x" * len(b"tampered" * 100)
    if is_s3(output):
        import boto3

        from tasks.store.objects import split_s3_uri

        bucket, key = split_s3_uri(uri)
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=same_size)
    else:
        Path(uri).write_bytes(same_size)
    with pytest.raises(PromotionError, match="tampered is incomplete.*merged/model.safetensors"):
        promote(output, "tampered", GO)
    assert read_latest(output) is None

def test_concurrent_promotions_serialise_without_losing_the_previous_pointer(tmp_path):
    # Local output only: moto checks If-Match and then writes without a lock, so two truly
    # simultaneous requests can both pass there (S3 itself makes the conditional write atomic).
    # The S3 request is covered deterministically by test_a_stale_pointer_write_is_refused.
    output = str(tmp_path / "models")
    for run_id in ("run-a", "run-b", "run-c"):
        publish_run(output, tmp_path, run_id)
    promote(output, "run-a", GO)
    start = threading.Barrier(2)
    errors = []

    def promote_together(run_id):
        start.wait()
        try:
            promote(output, run_id, GO)
        except Exception as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=promote_together, args=(r,)) for r in ("run-b", "run-c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    latest = read_latest(output)
    other = {"run-b": "run-c", "run-c": "run-b"}[latest["run_id"]]
    # A lost update would leave both promotions claiming run-a as their previous pointer.
    assert latest["previous"]["run_id"] == other
    assert sorted(p["run_id"] for p in history(output)) == ["run-a", other]


def test_a_stale_pointer_write_is_refused(output, tmp_path):
    publish_run(output, tmp_path, "run-a")
    promote(output, "run-a", GO)
    uri = join_uri(output, LATEST)
    seen_version = read_object(uri).version
    assert write_if_unchanged(uri, b'{"run_id": "x"}', seen_version)
    assert not write_if_unchanged(uri, b'{"run_id": "y"}', seen_version)  # someone moved it since
    assert not write_if_unchanged(uri, b'{"run_id": "z"}', None)  # it exists: "create" must fail
    assert read_latest(output) == {"run_id": "x"}


@pytest.mark.parametrize("base,tuned,min_improvement,promoted", [
    (0.5, 0.5, 0.0, True), (0.5, 0.6, 0.1, True), (0.5, 0.59, 0.1, False), (0.5, 0.4, 0.0, False),
])
def test_score_gate(base, tuned, min_improvement, promoted):
    decision = score_gate("exact_match", base, tuned, min_improvement)
    assert decision.promote is promoted
    assert ("promote" if promoted else "keep the current latest") in decision.reason
