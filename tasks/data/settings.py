"""What ingest accepts: row formats and the checks' thresholds; tasks/config.py gathers them into the run's config."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

HUB_PREFIX = "hf://datasets/"  # a Hugging Face Hub dataset (tasks/data/hub_datasets.py)

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


class DataSourceSpec(BaseModel):
    """One source of a training mix (an entry of `data` when it is a list), with its share of the mix."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(
        description="A local file or folder, s3://bucket/key (or prefix ending in '/'), or a Hugging Face Hub "
        "dataset as hf://datasets/<org>/<name>.",
    )
    weight: float | None = Field(
        None, gt=0, description="This source's share of the weighted part of the mix (weights are relative: "
        "1 and 3 give 25% and 75%). Rows are drawn without replacement, never repeated: the weighted part is as "
        "large as the scarcest source allows. Give weight or max_rows, not both.",
    )
    max_rows: int | None = Field(
        None, ge=1, description="Take this many of the source's usable rows (all of them when it has fewer), drawn "
        "at random with the training seed, on top of the weighted part. Give weight or max_rows, not both.",
    )
    config: str | None = Field(None, description="Hub datasets only: the dataset's config (subset) name; empty: "
                               "its default.")
    split: str | None = Field(None, description="Hub datasets only: the split, e.g. train or train[:10%]; "
                              "empty: train.")
    revision: str | None = Field(None, description="Hub datasets only: branch, tag or commit sha; empty: the "
                                 "default branch. The commit it resolved to is recorded in the manifest.")

    @model_validator(mode="after")
    def _check(self) -> DataSourceSpec:
        problems = []
        if (self.weight is None) == (self.max_rows is None):
            fix = "drop one of them" if self.weight is not None else "add weight: 1 (or max_rows: N)"
            problems.append(f"data source {self.path!r}: give either weight or max_rows: {fix}")
        if not self.path.startswith(HUB_PREFIX):
            given = [name for name in ("config", "split", "revision") if getattr(self, name) is not None]
            if given:
                problems.append(f"data source {self.path!r}: {', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} "
                                "only to a Hub dataset (hf://datasets/<org>/<name>): drop "
                                f"{'them' if len(given) > 1 else 'it'}, or name the dataset as hf://datasets/...")
        for name in ("config", "split", "revision"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                problems.append(f"data source {self.path!r}: {name} is empty: leave it out for the default")
        if problems:
            raise ValueError("; ".join(problems))
        return self
