"""The fine-tuning pipeline: fetch the model (a Hub id's config and tokenizer) -> ingest -> fetch its weights
-> plan -> evaluate base -> train -> export (stage the model as it will be published) -> evaluate that staged model
(and the published one) -> gate -> package -> upload -> promote -> report. With `tracking` on, one MLflow run
follows it (tasks/track.py): opened at the start, filled and closed at the end, marked failed if the flow fails."""
from __future__ import annotations

from prefect import flow, get_run_logger
from pydantic import BaseModel

from tasks.base_model import fetch_model
from tasks.config import FinetuneConfig, Method
from tasks.credentials import use_s3_credentials
from tasks.evaluate import evaluate, evaluate_published
from tasks.ingest import ingest, require_data_version
from tasks.plan import plan_training
from tasks.publish import decide_promotion, export_run, package_run, promote_run, upload_run, write_report
from tasks.results import TrackingReport
from tasks.runs import start_run
from tasks.track import end_failed_tracking, start_tracking, track_results
from tasks.train import train_model


class FinetuneResult(BaseModel):
    run_id: str
    output_uri: str
    method: Method
    metric: str
    base_score: float
    tuned_score: float
    base_eval_loss: float
    tuned_eval_loss: float
    published_score: float | None  # the model latest.json pointed at, when the gate compared with it
    scores: dict[str, dict[str, float]]  # every metric, per model: {"base": {...}, "tuned": {...}}
    gate: str  # the gate's reason
    summary: str
    promoted: bool  # whether <output>/latest.json now points at this run
    tracking: TrackingReport | None = None  # with `tracking` on: the MLflow run, what it missed, what it cost


@flow(name="finetune", log_prints=True, on_failure=[end_failed_tracking], on_crashed=[end_failed_tracking])
def finetune(config: FinetuneConfig) -> FinetuneResult:
    use_s3_credentials(config.aws_credentials_secret, get_run_logger(),
                       config.aws_credentials_block)  # before S3
    require_data_version(config)  # event-triggered runs: the object is still the version announced
    run = start_tracking(config, start_run(config))  # an MLflow run when `tracking` is on
    tokenizer_only = fetch_model(config, weights=False)  # a Hub id: what ingest reads, before any weights
    data = ingest(config.with_local_model(tokenizer_only), run)
    # the same commit's (or published run's) weights, once the data is good
    model = fetch_model(config, commit=tokenizer_only.commit, run_id=tokenizer_only.run_id)
    config = config.with_local_model(model)  # every stage reads the model from its local folder
    planned = plan_training(config, data)
    base = evaluate(config, data, planned, label="base")
    trained = train_model(config, run, data, planned)
    exported = export_run(config, run, data, planned, trained, model)  # merged and saved in the publish dtype
    # the gate scores what is published; the base's pair log-probs are a preference run's reference
    tuned = evaluate(config, data, planned, label="tuned", exported=exported, reference=base)
    published = evaluate_published(config, data, planned, run, reference=base)  # None unless the gate compares with it
    decision = decide_promotion(config, base, tuned, published)
    manifest = package_run(config, run, data, planned, trained, exported, base, tuned, decision, published, model)
    output_uri = upload_run(config, run)
    promoted = promote_run(config, run, decision)
    summary = write_report(config, manifest, output_uri, promoted)
    tracking = track_results(config, run, manifest, promoted)
    return FinetuneResult(
        run_id=run.run_id, output_uri=output_uri, method=trained.method, metric=base.metric,
        base_score=base.score, tuned_score=tuned.score, base_eval_loss=base.loss, tuned_eval_loss=tuned.loss,
        published_score=published.score if published else None,
        scores={r.label: r.scores for r in (base, tuned, published) if r}, gate=decision.reason,
        summary=summary, promoted=promoted, tracking=tracking,
    )
