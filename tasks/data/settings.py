"""What ingest accepts: row formats and the checks' thresholds; tasks/config.py gathers them into the run's config."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DataFormat = Literal["auto", "instruction", "prompt_completion", "chat", "text", "preference"]


class DataSettings(BaseModel):
    """What ingest does with rows that break a rule, and the thresholds of its checks."""

    model_config = ConfigDict(extra="forbid")  # unknown keys are typos (`learning_rte`): rejected
    on_invalid: Literal["fail", "quarantine"] = Field(
        "fail", description="'fail' stops the run on any bad row; 'quarantine' sets bad rows aside, with the "
        "reason for each, in the run's quarantine files, and trains on the rest.",
    )
    max_quarantined_fraction: float = Field(
        0.05, ge=0, le=1, description="With 'quarantine', fail anyway when more than this share of rows is bad.",
    )
    min_rows: int = Field(1, ge=1, description="Fewest usable rows a dataset (each split) must keep.")
    max_row_bytes: int = Field(1_000_000, ge=1, description="Rows larger than this (bytes of text) are rejected.")
    max_file_bytes: int = Field(
        20 * 2**30, ge=1, description="Largest data file accepted (bytes, from its size on disk or in S3, checked "
        "before anything is read): a bound on what an upload can make a run read. Default 20 GiB.",
    )
    max_rows: int = Field(
        50_000_000, ge=1, description="Most rows a dataset (data or eval_data, all its files together) may have; "
        "reading stops, and the run fails, at the block of rows that passes it.",
    )
    duplicates: Literal["reject", "allow"] = Field(
        "reject", description="Exact and normalised (case, whitespace) copies of an earlier row.",
    )
    leakage: Literal["reject", "allow"] = Field(
        "reject", description="Eval rows that also appear (normalised) in the training data.",
    )
    max_truncated_fraction: float = Field(
        1.0, ge=0, le=1, description="Fail when more than this share of rows is longer than max_seq_len tokens.",
    )
