"""Announce again the uploads that were announced but never got a flow run (tasks/data/s3_reconcile.py).

Deployed as `s3-reconcile/every-10-minutes` (deployments/prefect.yaml); `prefect-finetune reconcile` runs
the same pass from a shell.
"""
from __future__ import annotations

from datetime import timedelta

from prefect import flow, get_run_logger

from tasks.data.s3_reconcile import GRACE, MAX_REANNOUNCE
from tasks.s3_announce import reconcile

__all__ = ["reconcile", "reconcile_uploads"]  # `reconcile` for tasks/cli.py, which imports no stage itself


@flow(name="s3-reconcile")
def reconcile_uploads(grace_minutes: float = GRACE.total_seconds() / 60, max_reannounce: int = MAX_REANNOUNCE,
                      dry_run: bool = False) -> dict:
    """Returns the pass's counts. An upload is left alone for `grace_minutes` after it was announced, and
    announced again at most `max_reannounce` times."""
    logger = get_run_logger()
    result = reconcile(timedelta(minutes=grace_minutes), max_reannounce, dry_run=dry_run)
    for upload in result.reannounce:
        logger.warning("%s %s (etag %s): announced %s, no flow run", "would announce again" if dry_run else
                       "announced again", upload.obj.uri, upload.obj.etag, upload.record["announced_at"])
    for upload in result.gave_up + result.partial:
        logger.error("%s (etag %s): %s", upload.obj.uri, upload.obj.etag, "runs of only some of its deployments"
                     if upload in result.partial else f"no flow run after {upload.attempts} announcements")
    logger.info(result.summary())
    return result.counts()
