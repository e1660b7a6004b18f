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

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.config import DataSettings, FinetuneConfig
from tasks.data.dataset import Dataset, content_sha256, split_dataset, write_conversations, write_quarantine
from tasks.data.freshness import DataChangedError, etag_mismatch, unchanged_since_published
from tasks.data.schemas import SCHEMA_VERSION, DatasetError
from tasks.data.sources import list_source_files
from tasks.data.tokenization import encoded_split, length_report, require_few_truncated
from tasks.data.validation import Verdict, check_source, enforce, materialise
from tasks.planning.settings import PREFERENCE_OBJECTIVES
from tasks.results import DataSource, IngestResult, RunInfo
from tasks.store.objects import is_s3_uri, retry_if_transient

VERDICT_SETTINGS = ("max_row_bytes", "duplicates", "leakage")  # the settings that change which rows are bad


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
    return check_source(uri, data_format, checks, reference, content)


@task(name="ingest", cache_policy=NO_CACHE)
def ingest(config: FinetuneConfig, run: RunInfo) -> IngestResult:
    logger = get_run_logger()
    checks = config.data_checks
    verdicts = [_validate(config.data, config.data_format, checks, None)]
    enforce(verdicts[0][0], checks)
    if config.eval_data:
        verdicts.append(_validate(config.eval_data, config.data_format, checks, verdicts[0][0].kept_hashes))
        enforce(verdicts[1][0], checks)
    for verdict, _ in verdicts:
        require_objective_fits(config, verdict)
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


def require_objective_fits(config: FinetuneConfig, verdict: Verdict) -> None:
    """Preference rows train only with dpo/orpo, and those train only on preference rows: the fix named."""
    pairs = verdict.data_format == "preference"
    if pairs and config.objective not in PREFERENCE_OBJECTIVES:
        raise DatasetError(f"{verdict.source}: the rows are preference pairs ({verdict.format_evidence}) but objective "
                           "is 'sft'; set objective to 'dpo' or 'orpo' to learn from them, or, to fine-tune on the "
                           "preferred answers alone, write them as chat rows (messages: the prompt, then the chosen "
                           "answer)")
    if not pairs and config.objective in PREFERENCE_OBJECTIVES:
        raise DatasetError(f"{verdict.source}: objective {config.objective!r} learns from preference pairs, but the "
                           f"rows are {verdict.data_format} rows ({verdict.format_evidence}); give rows with a prompt, "
                           "a chosen and a rejected answer (data_format 'preference'), or set objective to 'sft'")


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
    _, examples = encoded_split(config, split_file, conversations)
    report = length_report(examples, config.training.max_seq_len)
    require_few_truncated(report, config.data_checks.max_truncated_fraction, split_file.name)
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
