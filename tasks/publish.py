"""Stage 5, publish: merge, verify, write the manifest, upload the run folder, promote, report.

The run folder is assembled locally first (`adapter/` and `merged/`, staged before the tuned model is
scored so that the gate scores what is published; then model cards and `manifest.json`), then
published to `<output>/runs/<run-id>/` so no reader ever sees half a model: a local rename, or S3
uploads with the manifest last. Only then, and only if the promotion gate says so, does
`<output>/latest.json` move to the run (tasks/store/registry.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.config import FinetuneConfig
from tasks.data.dataset import read_conversations
from tasks.reports.delivery import ARTIFACT_DEADLINE_S, send_within
from tasks.reports.loss_curve import LOSS_CURVE_NAME, loss_curve_markdown, plot_loss_curve
from tasks.reports.model_card import base_model_license, model_card
from tasks.reports.summary import headline, metrics_table_rows, summary_markdown
from tasks.results import EvalResult, ExportResult, IngestResult, PlanResult, RunInfo, TrainResult
from tasks.scoring.promotion import GateDecision, ModelScores, promotion_gate
from tasks.store.hub import ResolvedModel
from tasks.store.manifest import build_manifest, file_entries, sha256_file
from tasks.store.objects import MANIFEST_NAME, browser_url, etag_of, join_uri, retry_if_transient
from tasks.store.registry import promote
from tasks.store.transfer import upload_folder
from tasks.store.weight_safety import recorded

PROBE_ROWS = 4  # eval rows whose logits must survive merging and saving
FP32_EXPORT_HEADROOM = 1.5  # an fp32 copy of the model plus probe logits and allocator slack


@task(name="gate", cache_policy=NO_CACHE)
def decide_promotion(config: FinetuneConfig, base: EvalResult, tuned: EvalResult,
                     published: EvalResult | None = None) -> GateDecision:
    """The promotion gate's decision (tasks/scoring/promotion.py), thresholds from `config.publish`."""
    settings = config.publish
    decision = promotion_gate(
        base.metric, ModelScores(score=base.score, loss=base.loss), ModelScores(score=tuned.score, loss=tuned.loss),
        ModelScores(score=published.score, loss=published.loss) if published else None,
        settings.min_improvement, settings.max_regression, settings.max_eval_loss_increase)
    get_run_logger().info("promotion gate: %s", decision.reason)
    return decision


@task(name="export", cache_policy=NO_CACHE)
def export_run(config: FinetuneConfig, run: RunInfo, data: IngestResult, planned: PlanResult,
               trained: TrainResult, model: ResolvedModel | None = None) -> ExportResult:
    """Stage the model as it will be published (the adapter, and its merge into the full-precision base, checked
    and saved in the publish dtype) before it is scored: the tuned evaluation loads this folder, so the gate
    scores what is published. `model`: where the base came from (a Hub id names the adapter's base)."""
    staging = Path(run.run_dir) / "publish"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if trained.method.trains_adapter:
        shutil.copytree(trained.checkpoint_dir, staging / "adapter")
        _name_the_hub_base(staging / "adapter", model)
    if trained.method.trains_adapter and config.publish.adapter_only:
        verification = {"adapter_only": True}  # nothing merged: the consumer applies the adapter to the base
    else:
        verification = _merge_and_verify(config, data, planned, trained, staging / "merged")
        get_run_logger().info("export verified: %s", verification)
    return ExportResult(folder=str(staging), verification=verification)


@task(name="package", cache_policy=NO_CACHE)
def package_run(config: FinetuneConfig, run: RunInfo, data: IngestResult, planned: PlanResult,
                trained: TrainResult, exported: ExportResult, base: EvalResult, tuned: EvalResult,
                decision: GateDecision, published: EvalResult | None = None,
                model: ResolvedModel | None = None) -> dict:
    """Complete the staged run folder (quarantined rows, model cards, the loss-curve PNG, the manifest last);
    returns the manifest. `model`: where the base model came from (a Hub id's repo and commit), when the flow
    resolved it."""
    staging, verification = Path(exported.folder), exported.verification
    for path in map(Path, data.quarantine_paths):  # rows set aside by ingest travel with the model
        (staging / "quarantine").mkdir(exist_ok=True)
        shutil.copy2(path, staging / "quarantine" / path.name)
    base_model = _describe_base(config, planned, model)
    data_record = _describe_data(data, planned)
    evaluation = {"metric": base.metric, "metrics": config.evaluation.metrics, "base": base.model_dump(),
                  "tuned": tuned.model_dump(), "published": published.model_dump() if published else None}
    base_name = (f"run {model.base_run['run_id']}" if model and model.base_run
                 else _base_name(config, model).rstrip('/').rsplit('/', 1)[-1])
    title = f"{base_name} {trained.method}, run {run.run_id}"
    plot_loss_curve(trained.history, staging / LOSS_CURVE_NAME, trained.best_step, title)
    if config.artifacts.loss_curve:  # in the run's page; the PNG itself is published with the run
        markdown = loss_curve_markdown((staging / LOSS_CURVE_NAME).read_bytes(), f"Loss curve: {title}",
                                       join_uri(run.output_uri, LOSS_CURVE_NAME))
        _best_effort("loss curve", create_markdown_artifact, markdown, key="finetune-loss-curve",
                     description=f"Train and eval loss per step of run {run.run_id}; best step {trained.best_step}")
    training = {**trained.model_dump(exclude={"checkpoint_dir"}), "objective": config.objective}
    card = {"run_id": run.run_id, "base_model": base_model, "data": data_record, "method": trained.method,
            "training": training, "evaluation": evaluation, "publish_dtype": verification.get("saved_dtype", "")}
    for folder, as_adapter in ((staging / "merged", False), (staging / "adapter", True)):
        if folder.is_dir():  # the model card, for the people who deploy the folder
            (folder / "README.md").write_text(model_card(**card, adapter_only=as_adapter))
    manifest = build_manifest(
        run=run.model_dump(exclude={"run_dir"}), base_model=base_model, data=data_record,
        config=_config_as_given(config, model), plan=planned.plan.model_dump(), training=training,
        evaluation=evaluation,
        export=verification, files=file_entries(staging), hardware=_hardware(planned),
        promotion=decision.model_dump(),
    )
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return manifest


def _describe_base(config: FinetuneConfig, planned: PlanResult, model: ResolvedModel | None) -> dict:
    # revision: the Hub commit (of a Hub id, or of a folder inside a Hugging Face cache); for a Hub id, also the
    # repo, the revision asked for and the endpoint (a mirror when HF_ENDPOINT names one).
    hub = model.describe() if model else {}
    return {"path": config.model, "revision": hub.get("commit") or _base_revision(config.model), **hub,
            "model_type": planned.model_type, "parameters": planned.model_parameters,
            "config_sha256": sha256_file(Path(config.model) / "config.json"),
            "license": base_model_license(config.model),  # from the base model's card; {} when it states none
            "loading": recorded(config.model_loading)}  # whether code or pickles from the folder were allowed


def _base_name(config: FinetuneConfig, model: ResolvedModel | None) -> str:
    """The base as people name it: the Hub id, the published run's merged folder, else the local folder."""
    if model and model.base_run:
        return join_uri(model.base_run["run_uri"], "merged")
    return model.repo_id if model and model.repo_id else config.model


def _name_the_hub_base(adapter: Path, model: ResolvedModel | None) -> None:
    """peft wrote the folder the base was loaded from (a snapshot in this worker's Hub cache, or a published
    run's download in work_dir) into adapter_config.json; a consumer elsewhere needs the Hub id, pinned to the
    commit trained on (peft's own `revision` field, which PeftModel.from_pretrained passes on when it loads the
    base), or the published run's merged folder."""
    if not (model and (model.repo_id or model.base_run)):
        return
    path = adapter / "adapter_config.json"
    settings = json.loads(path.read_text())
    if model.base_run:
        settings.update(base_model_name_or_path=join_uri(model.base_run["run_uri"], "merged"))
    else:
        settings.update(base_model_name_or_path=model.repo_id, revision=model.commit)
    path.write_text(json.dumps(settings, indent=2, sort_keys=True))


def _config_as_given(config: FinetuneConfig, model: ResolvedModel | None) -> dict:
    """The run's config as the user gave it: `model` is the Hub id or run:<id>, not the folder it resolved to."""
    record = config.model_dump()
    if model and (model.repo_id or model.base_run):
        record.update(model=model.requested, model_revision=model.revision)
    return record


def _describe_data(data: IngestResult, planned: PlanResult) -> dict:
    record = {**data.model_dump(exclude={"train_path", "eval_path"}), "token_stats": planned.token_stats}
    # The ETag lets a consumer tell whether the data changed since training; an object gone since ingest has
    # none (its sha256, recorded at ingest, still identifies the data).
    record["sources"] = [{**s, "etag": s.get("etag") or etag_of(s["uri"])} for s in record["sources"]]
    return record


def _merge_and_verify(config: FinetuneConfig, data: IngestResult, planned: PlanResult, trained: TrainResult,
                      out_dir: Path) -> dict:
    from tasks.data.tokenization import load_tokenizer, render
    from tasks.engine.export import export_model, publish_dtype

    tokenizer = load_tokenizer(trained.checkpoint_dir, config.model_loading)
    _, conversations = read_conversations(data.eval_path)
    probe = [render(tokenizer, c) for c in conversations[:PROBE_ROWS]]
    return export_model(config.model, trained.checkpoint_dir, trained.method.trains_adapter, out_dir,
                        publish_dtype(config.model, config.publish.dtype), tokenizer, probe,
                        _export_device(planned), max_shard_size=f"{config.publish.max_shard_size_mb}MB",
                        loading=config.model_loading)


def _base_revision(model_path: str) -> str | None:
    """The Hub commit of a model from the Hugging Face cache (…/snapshots/<commit>), else None."""
    parts = Path(model_path).resolve().parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def _hardware(planned: PlanResult) -> dict:
    from tasks.engine.hardware import describe

    return describe(planned.plan.device)


def _export_device(planned: PlanResult) -> str:
    """Merge on the GPU when an fp32 copy of the model fits its budget, else in CPU RAM."""
    fits = 4 * planned.model_parameters * FP32_EXPORT_HEADROOM <= planned.plan.budget_bytes
    return planned.plan.device if fits else "cpu"


@task(name="upload", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def upload_run(config: FinetuneConfig, run: RunInfo) -> str:
    """Publish the staged folder to `<output>/runs/<run-id>/`; a retry sends only what is missing."""
    staging = Path(run.run_dir) / "publish"
    stats = upload_folder(staging, run.output_uri, config.publish.multipart_chunk_mb * 2**20,
                          config.publish.max_concurrency)
    get_run_logger().info("uploaded %d file(s), %d bytes; %d file(s), %d bytes already there",
                          stats.files_sent, stats.bytes_sent, stats.files_skipped, stats.bytes_skipped)
    try:
        shutil.rmtree(staging)  # the published copy is the one to keep
    except OSError as error:  # the run is published; a leftover scratch folder is not worth failing it
        get_run_logger().warning("could not remove the staging folder %s: %s", staging, error)
    get_run_logger().info("published %s", run.output_uri)
    return run.output_uri


@task(name="promote", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def promote_run(config: FinetuneConfig, run: RunInfo, decision: GateDecision) -> bool:
    """Move `<output>/latest.json` to this run if the gate said so; a run not promoted stays published."""
    if not decision.promote:
        get_run_logger().info("not promoted, latest.json unchanged: %s", decision.reason)
        return False
    pointer = promote(config.output, run.run_id, decision.model_dump())
    get_run_logger().info("latest.json -> %s (previous: %s)", run.run_id, pointer["previous"])
    return True


@task(name="report", cache_policy=NO_CACHE)
def write_report(config: FinetuneConfig, manifest: dict, output_uri: str, promoted: bool) -> str:
    markdown = summary_markdown(manifest, output_uri, config.evaluation.examples_in_report, promoted)
    create_markdown_artifact(markdown, key="finetune-summary", description=headline(manifest))
    create_table_artifact(metrics_table_rows(manifest), key="finetune-metrics",
                          description=f"Held-out scores of run {manifest['run']['run_id']}, same rows for every model")
    if config.artifacts.links:
        _link_artifacts(manifest, output_uri, config.artifacts.link_expiry_hours * 3600)
    return headline(manifest)


def _link_artifacts(manifest: dict, output_uri: str, expires_s: int) -> None:
    """Links to the published run (its manifest: every file with its checksum) and to the model card."""
    run_id = manifest["run"]["run_id"]
    targets = [("finetune-run", MANIFEST_NAME, f"Run {run_id}: manifest.json")]
    listed = {f["path"] for f in manifest.get("files", [])}
    cards = [path for path in ("merged/README.md", "adapter/README.md") if path in listed]  # the standalone first
    if cards:
        targets.append(("finetune-model-card", cards[0], f"Model card of run {run_id}: {cards[0]}"))
    for key, path, text in targets:
        uri = join_uri(output_uri, path)
        _best_effort(key, lambda: _link(key, uri, text, expires_s))


def _link(key: str, uri: str, text: str, expires_s: int) -> None:
    url = browser_url(uri, expires_s)
    if url is None:  # temporary S3 credentials: no presigned URL (it would carry the session token)
        url, text = uri, f"{text} (not presigned: the run's S3 credentials are temporary)"
    create_link_artifact(url, link_text=uri, key=key, description=text)


def _best_effort(what: str, create, *args, **kwargs) -> None:
    """An artifact the run can do without: a failure to make it is logged, not raised, and the run waits for the
    API at most ARTIFACT_DEADLINE_S (tasks/reports/delivery.py); its time is logged."""
    delivery = send_within(lambda: create(*args, **kwargs))
    if delivery.sent:
        get_run_logger().info("artifact %s created in %.2f s", what, delivery.seconds)
    elif delivery.late:
        get_run_logger().warning("artifact %s: the Prefect API did not answer within %.0f s; the run goes on (the "
                                 "artifact may appear later)", what, ARTIFACT_DEADLINE_S)
    else:
        get_run_logger().warning("artifact %s not created (%s: %s)", what, type(delivery.error).__name__,
                                 str(delivery.error)[:200])