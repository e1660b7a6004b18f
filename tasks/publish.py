"""Stage 5, publish: merge, verify, write the manifest, upload the run folder, report.

The run folder is assembled locally first (`adapter/`, `merged/`, `manifest.json`), then copied to
the output so no reader ever sees half a model: a local rename, or S3 uploads with the manifest last.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.config import FinetuneConfig
from tasks.dataset import read_conversations
from tasks.evaluate import EvalResult
from tasks.ingest import IngestResult
from tasks.manifest import build_manifest, file_entries, sha256_file
from tasks.plan import PlanResult
from tasks.report import headline, summary_markdown
from tasks.runs import RunInfo
from tasks.storage import MANIFEST_NAME, is_transient, publish_folder
from tasks.train import TrainResult

PROBE_ROWS = 4  # eval rows whose logits must survive merging and saving
FP32_EXPORT_HEADROOM = 1.5  # an fp32 copy of the model plus probe logits and allocator slack


@task(name="package", cache_policy=NO_CACHE)
def package_run(config: FinetuneConfig, run: RunInfo, data: IngestResult, planned: PlanResult,
                trained: TrainResult, base: EvalResult, tuned: EvalResult) -> dict:
    """Build the complete run folder locally; returns the manifest."""
    from tasks.export import export_model, publish_dtype
    from tasks.tokenization import load_tokenizer, render

    staging = Path(run.run_dir) / "publish"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if trained.is_adapter:
        shutil.copytree(trained.checkpoint_dir, staging / "adapter")
    tokenizer = load_tokenizer(trained.checkpoint_dir)
    _, conversations = read_conversations(data.eval_path)
    probe = [render(tokenizer, c) for c in conversations[:PROBE_ROWS]]
    verification = export_model(config.model, trained.checkpoint_dir, trained.is_adapter, staging / "merged",
                                publish_dtype(config.model, config.publish_dtype), tokenizer, probe,
                                _export_device(planned))
    get_run_logger().info("export verified: %s", verification)
    manifest = build_manifest(
        run=run.model_dump(exclude={"run_dir"}),
        base_model={"path": config.model, "model_type": planned.model_type, "parameters": planned.model_parameters,
                    "config_sha256": sha256_file(Path(config.model) / "config.json")},
        data={**data.model_dump(exclude={"train_path", "eval_path"}), "token_stats": planned.token_stats},
        config=config.model_dump(),
        plan=planned.plan.model_dump(),
        training=trained.model_dump(exclude={"checkpoint_dir"}),
        evaluation={"metric": base.metric, "base": base.model_dump(), "tuned": tuned.model_dump()},
        export=verification,
        files=file_entries(staging),
    )
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return manifest


def _export_device(planned: PlanResult) -> str:
    """Merge on the GPU when an fp32 copy of the model fits its budget, else in CPU RAM."""
    fits = 4 * planned.model_parameters * FP32_EXPORT_HEADROOM <= planned.plan.budget_bytes
    return planned.plan.device if fits else "cpu"


def _transient_storage_error(task, task_run, state) -> bool:
    """Retry uploads only when the store or network hiccuped, never on a user error."""
    try:
        state.result()
    except Exception as error:
        return is_transient(error)
    return False


@task(name="upload", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_transient_storage_error,
      cache_policy=NO_CACHE)
def upload_run(run: RunInfo) -> str:
    staging = Path(run.run_dir) / "publish"
    uri = publish_folder(staging, run.output_uri)
    shutil.rmtree(staging, ignore_errors=True)  # the published copy is the one to keep
    get_run_logger().info("published %s", uri)
    return uri


@task(name="report", cache_policy=NO_CACHE)
def write_report(config: FinetuneConfig, manifest: dict, output_uri: str) -> str:
    create_markdown_artifact(summary_markdown(manifest, output_uri, config.evaluation.examples_in_report),
                             key="finetune-summary", description=headline(manifest))
    return headline(manifest)
