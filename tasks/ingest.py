"""Stage 1, ingest: read, validate and split the data; fail here, before any model is loaded.

Validation is its own task, cached on the data's content (sha256, or the S3 ETags), the schema
version and the settings that change a verdict, so re-running on the same data skips the checks
and only re-reads the kept rows. The cached verdict goes to `result_storage` (by default an S3 prefix
beside an S3 output), so every worker reuses it, not only the one whose disk holds it. Under
`on_invalid: quarantine` bad rows are written, each with its reasons, to `<run>/quarantine/`, and
`kept + quarantined = read` is checked for every source. A list of sources is validated source by source
(each under the policy on its own), then mixed (tasks/data/mixing.py); a Hub dataset is first read into a
local JSONL file (tasks/data/hub_datasets.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.config import DataSettings, DataSourceSpec, FinetuneConfig
from tasks.data.dataset import Dataset, content_sha256, split_dataset, write_conversations, write_quarantine
from tasks.data.freshness import DataChangedError, etag_mismatch, unchanged_since_published
from tasks.data.hub_datasets import HubSplit, is_hub_dataset, local_copy, resolve_split
from tasks.data.mixing import mix
from tasks.data.schemas import SCHEMA_VERSION, DatasetError
from tasks.data.sources import list_source_files
from tasks.data.tokenization import encoded_split, length_report, require_few_truncated
from tasks.data.validation import Verdict, check_source, enforce, materialise
from tasks.planning.settings import PREFERENCE_OBJECTIVES
from tasks.results import DataSource, IngestResult, RunInfo
from tasks.store.objects import is_s3_uri, join_uri, retry_if_transient, split_s3_uri

VERDICT_SETTINGS = ("max_row_bytes", "duplicates", "leakage")  # the settings that change which rows are bad
RESULTS_FOLDER = "prefect-results"  # under an S3 output: the default result storage


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
    get_run_logger().info(reason or f"{config.data_label}: new data since the last published run (or none published): training")
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


@dataclass
class _Read:
    """One source as validated: its verdict, whether the cache answered, and for a Hub dataset the split read."""
    path: str  # as the config names it
    verdict: Verdict
    validation: str  # "ran" or "cached"
    hub: HubSplit | None = None


@task(name="ingest", cache_policy=NO_CACHE)
def ingest(config: FinetuneConfig, run: RunInfo) -> IngestResult:
    logger = get_run_logger()
    specs = config.data_sources()
    validate = _validator(config, logger)
    reads = [_read(spec, config, None, validate) for spec in specs]  # each source checked and accounted on its own
    held_out_read = None
    if config.eval_data:  # leakage: an eval row found in any training source
        reference = b"".join(read.verdict.kept_hashes for read in reads)
        held_out_read = _read(DataSourceSpec(path=config.eval_data, weight=1.0), config, reference, validate)
    for read in reads + ([held_out_read] if held_out_read else []):
        require_objective_fits(config, read.verdict)
    run_dir = Path(run.run_dir)
    datasets, quarantine_paths = _keep_and_quarantine(reads, "train", run_dir)
    mix_record = None
    if isinstance(config.data, list):
        train, mix_record = mix(datasets, specs, config.training.seed)
        logger.info("mix of %d source(s), seed %d: %s", len(specs), config.training.seed,
                    ", ".join(f"{s['path']} {s['rows_taken']} of {s['usable_rows']}" for s in mix_record["sources"]))
    else:
        train = datasets[0]
    folder = run_dir / "data"
    folder.mkdir(parents=True, exist_ok=True)
    if held_out_read:
        eval_sets, eval_quarantine = _keep_and_quarantine([held_out_read], "eval", run_dir)
        held_out, origin = eval_sets[0], "held-out file"
        quarantine_paths += eval_quarantine
    else:
        train, held_out = split_dataset(train, config.eval_fraction, config.training.seed)
        origin = f"{config.eval_fraction:.0%} of {'the mix' if mix_record else 'data'}, seed {config.training.seed}"
    write_conversations(train, folder / "train.jsonl")
    write_conversations(held_out, folder / "eval.jsonl")
    sources = [_source(read) for read in reads + ([held_out_read] if held_out_read else [])]
    result = IngestResult(
        train_path=str(folder / "train.jsonl"), eval_path=str(folder / "eval.jsonl"),
        train_rows=len(train), eval_rows=len(held_out), eval_origin=origin, sources=sources,
        quarantine_paths=quarantine_paths, mix=mix_record,
        token_lengths={split: _token_lengths(config, folder / f"{split}.jsonl", dataset.conversations)
                       for split, dataset in (("train", train), ("eval", held_out))},
    )
    _report(result, logger)
    return result


def _read(spec: DataSourceSpec, config: FinetuneConfig, reference: bytes | None, validate) -> _Read:
    """Validate one source (a Hub split is first copied to a local JSONL file) and apply the policy to it."""
    checks = config.data_checks
    if not is_hub_dataset(spec.path):
        verdict, validation = _validate(validate, spec.path, config.data_format, checks, reference)
        enforce(verdict, checks)
        return _Read(spec.path, verdict, validation)
    hub = resolve_split(spec.path, spec.config, spec.split or "train", spec.revision, config.hub.cache_dir)
    local = str(local_copy(hub, config.work_dir, checks.max_rows))
    get_run_logger().info("%s: read into %s", hub.label, local)
    with _named(local, hub.label):  # messages name the dataset, config, split and commit, and the row
        verdict, validation = _validate(validate, local, config.data_format, checks, reference)
        enforce(verdict, checks)
    return _Read(spec.path, verdict, validation, hub)


@contextmanager
def _named(local: str, label: str):
    try:
        yield
    except DatasetError as error:
        raise DatasetError(str(error).replace(local, label)) from error


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


def _keep_and_quarantine(reads: list[_Read], split: str, run_dir: Path) -> tuple[list[Dataset], list[str]]:
    """The kept rows of each source, and its bad rows written to <run>/quarantine/<split>.jsonl (one file per
    source of a mix: <split>-<n>-<name>.jsonl)."""
    datasets, paths = [], []
    for number, read in enumerate(reads, start=1):
        dataset, records = materialise(read.verdict)
        datasets.append(dataset)
        if read.hub:  # the record names the Hub split (line N = row N of the split), not the local copy
            records = [{**record, "file": read.hub.label} for record in records]
        if records:
            name = split if len(reads) == 1 else f"{split}-{number}-{_slug(read.path)}"
            paths.append(str(run_dir / "quarantine" / f"{name}.jsonl"))
            write_quarantine(records, Path(paths[-1]))
    return datasets, paths


def _slug(path: str) -> str:
    return re.sub(r"[^\w.-]", "_", path.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0])[:40] or "source"


def result_storage(config: FinetuneConfig):
    """Where the validation verdict is cached: `config.result_storage`, else `<output>/prefect-results` for an S3
    output; None (Prefect's local result storage) for a local output. A block slug is handed to Prefect as is."""
    value = config.result_storage
    if value is None and is_s3_uri(config.output):
        value = join_uri(config.output, RESULTS_FOLDER)
    if value is None:
        return None
    if is_s3_uri(value):
        return _s3_result_storage(value)
    if Path(value).expanduser().is_absolute():
        return Path(value).expanduser()
    return value  # 'block-type/name': Prefect loads the saved block


def _s3_result_storage(uri: str) -> str:
    """A saved prefect-aws S3Bucket block for `uri` (Prefect takes only saved blocks as a task's storage), named by
    what it points at. It holds no keys: they come from the run's environment (boto3's chain, or what an
    aws_credentials_* block put there: tasks/credentials.py), as for every other S3 call of the run."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    bucket, prefix = split_s3_uri(uri)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    # The endpoint and region are spelled out: prefect-aws caches clients by these fields, and a client made for
    # another endpoint must not be reused.
    endpoint, ca_bundle = os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_CA_BUNDLE")
    name = "finetune-results-" + hashlib.sha256(f"{uri}|{endpoint}|{region}|{ca_bundle}".encode()).hexdigest()[:16]
    block = S3Bucket(bucket_name=bucket, bucket_folder=prefix.strip("/"), credentials=AwsCredentials(
        region_name=region, aws_client_parameters=AwsClientParameters(endpoint_url=endpoint,
                                                                      verify_cert_path=ca_bundle)))
    block.save(name, overwrite=True)  # the same content under the same name: concurrent runs agree
    return f"s3-bucket/{name}"


def _validator(config: FinetuneConfig, logger):
    started = time.perf_counter()
    storage = result_storage(config)
    if storage is None:
        return validate_data
    logger.info("validation results are cached in %s (storage ready in %.2f s)",
                config.result_storage or join_uri(config.output, RESULTS_FOLDER), time.perf_counter() - started)
    return validate_data.with_options(result_storage=storage)


def _validate(validate, uri: str, data_format: str, checks: DataSettings,
              reference: bytes | None) -> tuple[Verdict, str]:
    state = validate(uri, content_identity(uri, checks.max_file_bytes), data_format, checks, reference,
                     return_state=True)
    return state.result(), "cached" if state.name == "Cached" else "ran"


def _token_lengths(config: FinetuneConfig, split_file: Path, conversations: list) -> dict:
    """Token lengths with the model's tokenizer and template (no weights are loaded); fails on heavy
    truncation."""
    _, examples = encoded_split(config, split_file, conversations)
    report = length_report(examples, config.training.max_seq_len)
    require_few_truncated(report, config.data_checks.max_truncated_fraction, split_file.name)
    return report


def _source(read: _Read) -> DataSource:
    verdict = read.verdict
    return DataSource(uri=read.path, sha256=verdict.sha256, rows=verdict.kept, data_format=verdict.data_format,
                      format_evidence=verdict.format_evidence, read=verdict.read, quarantined=verdict.quarantined,
                      problems=verdict.rule_counts, validation=read.validation,
                      hub=read.hub.describe() if read.hub else None)


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
