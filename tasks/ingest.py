"""Stage 1, ingest: read, validate and split the data; fail here, before any model is loaded."""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.config import FinetuneConfig
from tasks.dataset import Dataset, read_dataset, split_dataset, write_conversations
from tasks.runs import RunInfo


class DataSource(BaseModel):
    uri: str
    sha256: str
    rows: int
    data_format: str
    format_evidence: str


class IngestResult(BaseModel):
    train_path: str
    eval_path: str
    train_rows: int
    eval_rows: int
    sources: list[DataSource]
    eval_origin: str  # "held-out file" or how the split was made


@task(name="ingest", cache_policy=NO_CACHE)
def ingest(config: FinetuneConfig, run: RunInfo) -> IngestResult:
    logger = get_run_logger()
    train = read_dataset(config.data, config.data_format)
    sources = [_source(train)]
    if config.eval_data:
        held_out = read_dataset(config.eval_data, config.data_format)
        sources.append(_source(held_out))
        origin = "held-out file"
    else:
        train, held_out = split_dataset(train, config.eval_fraction, config.training.seed)
        origin = f"{config.eval_fraction:.0%} of data, seed {config.training.seed}"
    folder = Path(run.run_dir) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    write_conversations(train, folder / "train.jsonl")
    write_conversations(held_out, folder / "eval.jsonl")
    result = IngestResult(
        train_path=str(folder / "train.jsonl"), eval_path=str(folder / "eval.jsonl"),
        train_rows=len(train), eval_rows=len(held_out), eval_origin=origin, sources=sources,
    )
    logger.info("data: %d train rows, %d eval rows (%s); format %s (%s)", result.train_rows, result.eval_rows,
                origin, train.data_format, train.format_evidence)
    return result


def _source(dataset: Dataset) -> DataSource:
    return DataSource(uri=dataset.source, sha256=dataset.sha256, rows=len(dataset),
                      data_format=dataset.data_format, format_evidence=dataset.format_evidence)
