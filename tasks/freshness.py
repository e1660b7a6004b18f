"""Prefect tasks: is the data new? (the logic is pure, in tasks/data_change.py)."""
from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.config import FinetuneConfig
from tasks.data_change import DataChangedError, etag_mismatch, unchanged_since_published
from tasks.storage import retry_if_transient


@task(name="check-data-version", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def require_data_version(config: FinetuneConfig) -> None:
    """Fail before any work when the run's object is no longer the version its event announced."""
    reason = etag_mismatch(config)
    if reason:
        raise DataChangedError(reason)
    if config.data_etag:
        get_run_logger().info("%s still has ETag %s, the version this run was started for", config.data,
                              config.data_etag)


@task(name="check-data-changed", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def data_unchanged_reason(config: FinetuneConfig) -> str | None:
    """None when the data differs from what the newest published run trained on (or nothing is published)."""
    reason = unchanged_since_published(config)
    get_run_logger().info(reason or f"{config.data}: new data since the last published run (or none published): training")
    return reason
