"""Identity and scratch space of one fine-tuning run."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

from tasks.config import FinetuneConfig
from tasks.results import RunInfo
from tasks.store.registry import run_uri


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
