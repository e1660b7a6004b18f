"""Identity and scratch space of one fine-tuning run."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel

from tasks.config import FinetuneConfig
from tasks.registry import run_uri


class RunInfo(BaseModel):
    run_id: str
    flow_run_id: str | None
    run_dir: str  # local scratch: data splits, checkpoints, the staged run folder
    output_uri: str  # where the finished run folder is published: <output>/runs/<run-id>
    started_at: str


def start_run(config: FinetuneConfig) -> RunInfo:
    from prefect.runtime import flow_run

    flow_run_id = flow_run.id
    now = datetime.now(timezone.utc)
    # Sortable by time, unique by the flow run id (or a random id outside a flow).
    run_id = f"{now:%Y%m%d-%H%M%S}-{(flow_run_id or uuid.uuid4().hex)[:8]}"
    run_dir = Path(config.work_dir).resolve() / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    return RunInfo(run_id=run_id, flow_run_id=flow_run_id, run_dir=str(run_dir),
                   output_uri=run_uri(config.output, run_id), started_at=now.isoformat(timespec="seconds"))
