"""Scheduled retraining: train only when the data changed since the newest published run."""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import Completed

from flows.finetune import FinetuneResult, finetune
from tasks.config import FinetuneConfig
from tasks.credentials import use_s3_credentials
from tasks.ingest import data_unchanged_reason


@flow(name="retrain", log_prints=True)
def retrain(config: FinetuneConfig) -> FinetuneResult | None:
    use_s3_credentials(config.aws_credentials_secret, get_run_logger(),
                       config.aws_credentials_block)
    unchanged = data_unchanged_reason(config)
    if unchanged:
        return Completed(message=unchanged)  # nothing to do is a success, not a failure
    return finetune(config)
