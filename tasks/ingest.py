"""Stage 1, ingest: read, validate and split the data; fail here, before any model is loaded.

Validation is its own task, cached on the data's content (sha256, or the S3 ETags), the schema
version and the settings that change a verdict, so re-running on the same data skips the checks
and only re-reads the kept rows. Under `on_invalid: quarantine` bad rows are written, each with
its reasons, to `<run>/quarantine/`, and `kept + quarantined = read` is checked for every source.
"""
from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.config import DataSettings, FinetuneConfig
from tasks.data.dataset import (Dataset, content_sha256, describe, load_kept, quarantine_records, raise_too_many_rows,
                                scan_dataset, split_dataset, to_conversation, write_conversations,
                                write_quarantine)
from tasks.data.freshness import DataChangedError, etag_mismatch, unchanged_since_published
from tasks.data.schemas import SCHEMA_VERSION, DatasetError
from tasks.data.sources import list_source_files
from tasks.data.tokenization import encoded_split
from tasks.results import DataSource, IngestResult, RunInfo
from tasks.store.objects import is_s3_uri, retry_if_transient

VERDICT_SETTINGS = ("max_row_bytes", "duplicates", "leakage")  # the settings that change which rows are bad


class Verdict(BaseModel):
    """Which rows of a source are bad and why; what the validation cache stores."""
    source: str
    sha256: str
    data_format: str
    format_evidence: str
    row_word: str
    read: int
    kept: int
    rule_counts: dict[str, int]
    report: str  # every broken rule with examples; empty when all rows are good
    quarantine: list[dict]  # one record per bad row: file, row, reasons, data
    kept_hashes: bytes  # normalised hashes of the kept rows: the reference for the leakage check

    @property
    def quarantined(self) -> int:
        return len(self.quarantine)


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


def content_identity(uri: str, max_file_bytes: int | None = None) -> str:
    """The content's identity without trusting names or dates: S3 ETags, else sha256 of the bytes.
    Files over `max_file_bytes` are refused here, before their bytes are hashed."""
    files = list_source_files(uri, max_file_bytes)
    if is_s3_uri(uri):
        return "etag:" + hashlib.sha256(" ".join(f"{f.uri}={f.etag}" for f in files).encode()).hexdigest()
    return "sha256:" + content_sha256(files)


def _verdict_key(context, parameters: dict) -> str:
    checks = parameters["checks"]
    settings = json.dumps({name: getattr(checks, name) for name in VERDICT_SETTINGS}, sort_keys=True)
    reference = hashlib.sha256(parameters["reference"] or b"").hexdigest()[:16]
    # The uri is part of the key because the verdict's report and quarantine records name the file.
    parts = f"{parameters['uri']}|{parameters['content']}|{parameters['data_format']}|{settings}|{reference}"
    return f"ingest-verdict-v{SCHEMA_VERSION}-{hashlib.sha256(parts.encode()).hexdigest()}"


@task(name="validate", cache_key_fn=_verdict_key, persist_result=True, cache_expiration=timedelta(days=30))
def validate_data(uri: str, content: str, data_format: str, checks: DataSettings,
                  reference: bytes | None = None) -> Verdict:
    """Every check on every row of `uri`; `content` (its content_identity) is what the cache keys on."""
    # collect=False: only hashes are kept in memory; materialise() fills in the data of duplicate rows.
    scan = scan_dataset(uri, data_format, checks, np.frombuffer(reference, dtype=np.uint64) if reference else None,
                        collect=False)
    counts = scan.accounting()
    sha256 = content.removeprefix("sha256:") if content.startswith("sha256:") else content_sha256(scan.files)
    return Verdict(source=uri, sha256=sha256, data_format=scan.data_format,
                   format_evidence=scan.format_evidence, row_word=scan.word, read=counts["read"],
                   kept=counts["kept"], rule_counts=scan.rule_counts(),
                   report=describe(scan) if scan.problems else "", quarantine=quarantine_records(scan),
                   kept_hashes=scan.kept_normalised.tobytes())


def enforce(verdict: Verdict, checks: DataSettings) -> None:
    """Raise DatasetError when the verdict's bad rows cannot be used under the policy."""
    if verdict.read == 0:
        raise DatasetError(f"{verdict.source}: the dataset has no rows (an empty file, or a header without "
                           "rows); add at least one example")
    if verdict.read > checks.max_rows:  # a verdict cached under a larger limit
        raise_too_many_rows(verdict.source, checks.max_rows)
    if verdict.quarantine:
        if checks.on_invalid == "fail":
            raise DatasetError(verdict.report + "\ndata_checks.on_invalid is 'fail'; fix the rows, or set it to "
                               "'quarantine' to train on the rest")
        if verdict.quarantined > checks.max_quarantined_fraction * verdict.read:
            raise DatasetError(verdict.report + f"\n{verdict.quarantined} of {verdict.read} rows are bad, more "
                               f"than data_checks.max_quarantined_fraction={checks.max_quarantined_fraction}; "
                               "fix the data")
    if verdict.kept < checks.min_rows:
        raise DatasetError(f"{verdict.source}: {verdict.kept} usable row(s) of {verdict.read} read, fewer than "
                           f"data_checks.min_rows={checks.min_rows}; add rows or lower the minimum")


def materialise(verdict: Verdict) -> tuple[Dataset, list[dict]]:
    """The kept rows as conversations, and the quarantine records with every row's data filled in."""
    bad = {(record["file"], record[verdict.row_word]) for record in verdict.quarantine}
    table, rows, values = load_kept(verdict.source, verdict.data_format, bad)
    if len(rows) != verdict.kept or len(rows) + len(bad) != verdict.read:
        raise DatasetError(f"{verdict.source}: {len(rows)} rows kept and {len(bad)} quarantined, but "
                           f"{verdict.read} were read ({verdict.kept} expected kept); the data changed during "
                           "the run, start it again")
    records = [{**r, "data": r["data"] if r["data"] is not None else values.get((r["file"], r[verdict.row_word]))}
               for r in verdict.quarantine]
    dataset = Dataset(source=verdict.source, sha256=verdict.sha256, data_format=verdict.data_format,
                      format_evidence=verdict.format_evidence,
                      conversations=[to_conversation(row, verdict.data_format) for row in table.to_pylist()],
                      rows=rows)
    return dataset, records


@task(name="ingest", cache_policy=NO_CACHE)
def ingest(config: FinetuneConfig, run: RunInfo) -> IngestResult:
    logger = get_run_logger()
    checks = config.data_checks
    verdicts = [_validate(config.data, config.data_format, checks, None)]
    enforce(verdicts[0][0], checks)
    if config.eval_data:
        verdicts.append(_validate(config.eval_data, config.data_format, checks, verdicts[0][0].kept_hashes))
        enforce(verdicts[1][0], checks)
    datasets, quarantine_paths = _keep_and_quarantine([verdict for verdict, _ in verdicts], Path(run.run_dir))
    folder = Path(run.run_dir) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    train = datasets[0]
    if config.eval_data:
        held_out, origin = datasets[1], "held-out file"
    else:
        train, held_out = split_dataset(train, config.eval_fraction, config.training.seed)
        origin = f"{config.eval_fraction:.0%} of data, seed {config.training.seed}"
    write_conversations(train, folder / "train.jsonl")
    write_conversations(held_out, folder / "eval.jsonl")
    sources = [_source(verdict, state) for verdict, state in verdicts]
    result = IngestResult(
        train_path=str(folder / "train.jsonl"), eval_path=str(folder / "eval.jsonl"),
        train_rows=len(train), eval_rows=len(held_out), eval_origin=origin, sources=sources,
        quarantine_paths=quarantine_paths,
        token_lengths={split: _token_lengths(config, folder / f"{split}.jsonl", dataset.conversations)
                       for split, dataset in (("train", train), ("eval", held_out))},
    )
    _report(result, logger)
    return result


def _keep_and_quarantine(verdicts: list[Verdict], run_dir: Path) -> tuple[list[Dataset], list[str]]:
    """The kept rows of each source, and its bad rows written to <run>/quarantine/<split>.jsonl."""
    datasets, paths = [], []
    for split, verdict in zip(("train", "eval"), verdicts):
        dataset, records = materialise(verdict)
        datasets.append(dataset)
        if records:
            paths.append(str(run_dir / "quarantine" / f"{split}.jsonl"))
            write_quarantine(records, Path(paths[-1]))
    return datasets, paths


def _validate(uri: str, data_format: str, checks: DataSettings, reference: bytes | None) -> tuple[Verdict, str]:
    state = validate_data(uri, content_identity(uri, checks.max_file_bytes), data_format, checks, reference,
                          return_state=True)
    return state.result(), "cached" if state.name == "Cached" else "ran"


def _token_lengths(config: FinetuneConfig, split_file: Path, conversations: list) -> dict:
    """Token lengths with the model's tokenizer and template (no weights are loaded); fails on heavy
    truncation."""
    from tasks.data.tokenization import length_report

    max_seq_len = config.training.max_seq_len
    _, examples = encoded_split(config, split_file, conversations)
    report = length_report(examples, max_seq_len)
    limit = config.data_checks.max_truncated_fraction
    if report["share_truncated"] > limit:
        raise DatasetError(
            f"{split_file.name}: {report['share_truncated']:.1%} of rows are longer than training.max_seq_len="
            f"{max_seq_len} tokens (limit data_checks.max_truncated_fraction={limit}); {report['tokens_lost']:,} of "
            f"{report['tokens_total']:,} tokens would be cut (lengths: {report['histogram']}). Raise max_seq_len "
            "or shorten the rows")
    return report


def _source(verdict: Verdict, validation: str) -> DataSource:
    return DataSource(uri=verdict.source, sha256=verdict.sha256, rows=verdict.kept, data_format=verdict.data_format,
                      format_evidence=verdict.format_evidence, read=verdict.read, quarantined=verdict.quarantined,
                      problems=verdict.rule_counts, validation=validation)


def _report(result: IngestResult, logger) -> None:
    for source in result.sources:
        logger.info("%s: %d read = %d kept + %d quarantined; format %s (%s); validation %s", source.uri,
                    source.read, source.rows, source.quarantined, source.data_format, source.format_evidence,
                    source.validation)
        if source.quarantined:
            logger.warning("%s: %d row(s) quarantined (%s); see %s", source.uri, source.quarantined,
                           ", ".join(f"{rule} {n}" for rule, n in source.problems.items()),
                           ", ".join(result.quarantine_paths))
    logger.info("data: %d train rows, %d eval rows (%s)", result.train_rows, result.eval_rows, result.eval_origin)
    for split, report in result.token_lengths.items():
        logger.info("%s tokens per row %s; %.1f%% longer than max_seq_len=%d (%d of %d tokens cut)", split,
                    report["histogram"], 100 * report["share_truncated"], report["max_seq_len"],
                    report["tokens_lost"], report["tokens_total"])
    table = [{"source": s.uri, "format": s.data_format, "read": s.read, "kept": s.rows,
              "quarantined": s.quarantined, "problems": ", ".join(f"{k} {v}" for k, v in s.problems.items()) or "none",
              "validation": s.validation, "sha256": s.sha256[:16], "format evidence": s.format_evidence}
             for s in result.sources]
    table += [{"source": f"{split} split (tokens)", "format": f"max_seq_len {r['max_seq_len']}", "read": r["rows"],
               "kept": r["rows"], "quarantined": 0,
               "problems": f"{r['share_truncated']:.1%} truncated, {r['tokens_lost']:,} of {r['tokens_total']:,} tokens cut",
               "validation": "", "sha256": "", "format evidence": f"token lengths {r['histogram']}"}
              for split, r in result.token_lengths.items()]
    create_table_artifact(table, key="finetune-data",
                          description=f"Data checks: {result.train_rows} train rows, {result.eval_rows} eval rows "
                          f"({result.eval_origin}); kept + quarantined = read for every source.")
