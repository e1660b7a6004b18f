"""Stage 4, evaluate: the base, the tuned and (optionally) the published model on the same held-out
rows, in the same run."""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.config import FinetuneConfig
from tasks.data.tokenization import encoded_split, load_tokenizer
from tasks.planning.settings import PREFERENCE_OBJECTIVES
from tasks.results import EvalResult, IngestResult, PlanResult, RunInfo, TrainResult
from tasks.store.score_cache import base_score_key, base_score_uri, read_base_score, write_base_score
from tasks.store.weight_safety import SAFE


# log_prints off: dill (under evaluate/datasets) captures `dis` output by swapping sys.stdout, and
# Prefect's print-to-log would turn every captured line into a log line of bytecode.
@task(name="evaluate", task_run_name="evaluate-{label}", cache_policy=NO_CACHE, log_prints=False)
def evaluate(config: FinetuneConfig, data: IngestResult, planned: PlanResult, label: str,
             trained: TrainResult | None = None, reference: EvalResult | None = None) -> EvalResult:
    """`reference`: the base's result, whose pair log-probs are the reference of a preference run's rewards."""
    from tasks.engine.modeling import load_for_inference

    # Evaluate in the precision the run trained in: a QLoRA plan means a bf16 base may not fit.
    quantized = (trained.method if trained else planned.plan.method).quantized  # after any memory step-down
    device = planned.plan.device
    if trained is None:
        return _score_base(config, data, device, quantized, label)
    if trained.method.trains_adapter:
        model = load_for_inference(config.model, device, adapter=trained.checkpoint_dir, quantized=quantized,
                                   loading=config.model_loading)
    else:
        model = load_for_inference(trained.checkpoint_dir, device, loading=config.model_loading)
    return _score(config, data, device, label, model, reference)


@task(name="evaluate-published", cache_policy=NO_CACHE, log_prints=False)
def evaluate_published(config: FinetuneConfig, data: IngestResult, planned: PlanResult,
                       run: RunInfo, reference: EvalResult | None = None) -> EvalResult | None:
    """The model `<output>/latest.json` points at, on the same rows; None when the gate does not
    compare against it (`publish.max_regression` empty) or nothing is published yet."""
    from tasks.store.registry import fetch_run, read_latest

    logger = get_run_logger()
    if config.publish.max_regression is None:
        return None
    pointer = read_latest(config.output)
    if pointer is None:
        logger.info("no published model in %s yet: the gate compares with the base model only", config.output)
        return None
    local = Path(run.run_dir) / "published"
    run_id, manifest = fetch_run(config.output, pointer["run_id"], local, config.publish.max_concurrency)
    model = _load_published(local, manifest, planned.plan.device, config.model_loading)
    result = _score(config, data, planned.plan.device, "published", model, reference)
    return result.model_copy(update={"run_id": run_id})


def _score_base(config: FinetuneConfig, data: IngestResult, device: str, quantized: bool, label: str) -> EvalResult:
    """The base model's score, read from the score cache when an earlier run under the same output scored the
    same base on the same rows the same way; else scored here and stored for the next run."""
    from tasks.engine.modeling import load_for_inference

    logger = get_run_logger()
    try:
        key, identity = base_score_key(config.model, data.eval_path, _base_score_settings(config, device, quantized))
    except OSError as error:  # no local folder to hash (the flow resolves Hub ids first): score without the cache
        logger.warning("base: no score-cache key (%s); scoring the base", error)
        key = identity = None
    if key and config.evaluation.reuse_base_score and (cached := _cached_base_score(config.output, key)):
        logger.info("base: score reused from %s (same model, eval rows, settings and scoring code): %s %.3f, "
                    "eval loss %.4f", cached.from_cache, cached.metric, cached.score, cached.loss)
        return cached
    model = load_for_inference(config.model, device, quantized=quantized, loading=config.model_loading)
    result = _score(config, data, device, label, model)
    try:
        if key:
            write_base_score(config.output, key, identity, result.model_dump(mode="json"))
    except Exception as error:  # the score is in hand; a store that refuses the copy only costs a later re-score
        logger.warning("base: could not store the score for later runs (%s)", error)
    return result


def _base_score_settings(config: FinetuneConfig, device: str, quantized: bool) -> dict:
    """What besides the model's files and the eval rows changes the base's score."""
    preference = {"objective": config.objective, "preference": config.preference.model_dump()} \
        if config.objective in PREFERENCE_OBJECTIVES else {}  # nothing added for sft: earlier keys still match
    return {"evaluation": config.evaluation.model_dump(mode="json", exclude={"reuse_base_score"}),
            "max_seq_len": config.training.max_seq_len,  # eval rows are truncated to it
            "device": device, "quantized": quantized, "loading": config.model_loading.model_dump(mode="json"),
            **preference}


def _cached_base_score(output: str, key: str) -> EvalResult | None:
    try:
        entry = read_base_score(output, key)
        if entry is None:
            return None
        return EvalResult.model_validate(entry["result"]).model_copy(update={"from_cache": base_score_uri(output, key)})
    except Exception as error:  # unreadable or damaged: scoring again is always safe
        get_run_logger().warning("base: stored score %s unusable, scoring again (%s)", base_score_uri(output, key), error)
        return None


def _with_pair_scores(config: FinetuneConfig, data: IngestResult, device: str, model, tokenizer, result: dict,
                      reference: EvalResult | None) -> dict:
    """The held-out pairs' log-probs and scores (tasks/scoring/preference.py), the base being the
    reference; the base scores itself against itself (its rewards are 0)."""
    from tasks.data.preference import encoded_pairs
    from tasks.engine.eval_loop import pair_log_probs
    from tasks.engine.preference_training import pair_tokens
    from tasks.scoring.preference import pair_scores

    pairs = encoded_pairs(config, data.eval_path, tokenizer)[: config.evaluation.max_eval_rows]
    capacity = config.evaluation.batch_size * max(pair_tokens(p) for p in pairs)
    logps = pair_log_probs(model, pairs, capacity, device)
    if reference is not None and reference.pair_logps is None:
        raise ValueError(f"the {reference.label} model's result has no pair log-probs to be the reference")
    scores = pair_scores(logps, reference.pair_logps if reference else logps, config.preference.beta)
    return {**result, "scores": {**result["scores"], **scores}, "pair_logps": logps}


def _load_published(folder: Path, manifest: dict, device: str, loading=None):
    """The merged model when it was published, else its adapter on the base it was trained from."""
    from tasks.engine.modeling import load_for_inference

    if (folder / "merged").is_dir():
        return load_for_inference(str(folder / "merged"), device, loading=loading or SAFE)
    return load_for_inference(manifest["base_model"]["path"], device, adapter=str(folder / "adapter"),
                              loading=loading or SAFE)


def _score(config: FinetuneConfig, data: IngestResult, device: str, label: str, model,
           reference: EvalResult | None = None) -> EvalResult:
    from tasks.engine.eval_loop import evaluate_model

    tokenizer = load_tokenizer(config.model, config.model_loading)
    conversations, examples = encoded_split(config, data.eval_path, tokenizer=tokenizer)
    # preference pairs: their chosen sides are the rows scored here (loss; generation against the chosen answer)
    result = evaluate_model(model, tokenizer, conversations, examples, config.evaluation, device)
    if config.objective in PREFERENCE_OBJECTIVES:
        result = _with_pair_scores(config, data, device, model, tokenizer, result, reference)
    metric = config.evaluation.metric
    scores = ", ".join(f"{name} {value:.3f}" for name, value in result["scores"].items())
    get_run_logger().info("%s: eval loss %.4f, perplexity %.2f, %s (%d generated answers)", label,
                          result["loss"], result["perplexity"], scores, result["generated_rows"])
    return EvalResult(label=label, metric=metric, score=result["scores"][metric], **result)
