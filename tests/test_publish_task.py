"""The upload and promote tasks under Prefect (real temporary server) with S3 failing in the middle
of a multipart upload: the flow fails with latest.json untouched and no manifest, and the next
attempt finishes the run without sending the files that had already arrived."""
import pytest
from prefect import flow

from tasks.config import FinetuneConfig
from tasks.publish import promote_run, upload_run
from tasks.results import RunInfo
from tasks.scoring.promotion import score_gate
from tasks.store.registry import history, read_latest, run_uri
from test_publish_s3 import BIG, keys, stage_run

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]


@flow
def publish_and_promote(config: FinetuneConfig, run: RunInfo, promote: bool) -> bool:
    upload_run.with_options(retries=1, retry_delay_seconds=0)(config, run)
    return promote_run(config, run, score_gate("exact_match", 0.0, 1.0 if promote else 0.0, 0.5))


def staged_run(tmp_path, config, run_id) -> RunInfo:
    run_dir = tmp_path / "work" / run_id
    stage_run((run_dir / "publish"))
    return RunInfo(run_id=run_id, flow_run_id=None, run_dir=str(run_dir), output_uri=run_uri(config.output, run_id),
                   started_at="2026-11-29T00:00:00+00:00")


def test_failed_upload_changes_nothing_visible_and_the_retry_resends_only_missing_files(proxy, empty_bucket, tmp_path):
    config = FinetuneConfig(model="m", data="d.jsonl", output=f"s3://{empty_bucket}/models",
                            publish={"multipart_chunk_mb": 5})
    old = staged_run(tmp_path, config, "run-old")
    assert publish_and_promote(config, old, promote=True)
    assert read_latest(config.output)["run_id"] == "run-old"

    new = staged_run(tmp_path, config, "run-new")
    fault = proxy.inject("PUT", "run-new/merged/model-00002-of-00002.safetensors&partNumber=2", 503, times=None)
    state = publish_and_promote(config, new, promote=True, return_state=True)
    assert state.is_failed() and fault.hits >= 2  # botocore's retries, then the task's own retry, all failed
    assert read_latest(config.output)["run_id"] == "run-old"
    assert "models/runs/run-new/manifest.json" not in keys(empty_bucket, "models/runs/run-new/")

    proxy.clear()
    assert publish_and_promote(config, new, promote=True)
    assert proxy.bytes_sent_to("run-new/merged/model-00001-of-00002") == 0
    assert proxy.bytes_sent_to("run-new/merged/model-00002-of-00002") == BIG
    latest = read_latest(config.output)
    assert latest["run_id"] == "run-new" and latest["previous"]["run_id"] == "run-old"
    assert [p["run_id"] for p in history(config.output)] == ["run-old"]


def test_a_run_the_gate_rejects_stays_published_without_moving_latest(proxy, empty_bucket, tmp_path):
    config = FinetuneConfig(model="m", data="d.jsonl", output=f"s3://{empty_bucket}/models",
                            publish={"multipart_chunk_mb": 5})
    assert publish_and_promote(config, staged_run(tmp_path, config, "run-1"), promote=True)
    assert not publish_and_promote(config, staged_run(tmp_path, config, "run-2"), promote=False)
    assert "models/runs/run-2/manifest.json" in keys(empty_bucket, "models/runs/run-2/")
    assert read_latest(config.output)["run_id"] == "run-1"
