"""Stage 4, evaluate: the base, the tuned and (optionally) the published model on the same held-out
rows, in the same run."""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.config import FinetuneConfig
from tasks.data.tokenization import encoded_split, load_tokenizer
from tasks.planning.settings import PREFERENCE_OBJECTIVES
from tasks.results import EvalResult, ExportResult, IngestResult, PlanResult, RunInfo
from tasks.store.score_cache import base_score_key, base_score_uri, read_base_score, write_base_score
from tasks.store.weight_safety import SAFE


SCORING_HEADROOM = 1.5  # weights plus KV cache, logits and allocator slack while scoring


# log_prints off: dill (under evaluate/datasets) captures `dis` output by swapping sys.stdout, and
# Prefect's print-to-log would turn every captured line into a log line of bytecode.
@task(name="evaluate", task_run_name="evaluate-{label}", cache_policy=NO_CACHE, log_prints=False)
def evaluate(config: FinetuneConfig, data: IngestResult, planned: PlanResult, label: str,
             exported: ExportResult | None = None, reference: EvalResult | None = None) -> EvalResult:
    """The base model, or (given `exported`) the tuned model exactly as it will be published.

    The gate scores what is published: the staged run folder loaded as its consumers load it (merged/ in its
    saved dtype, or the adapter on the base in the publish dtype), and the base in the publish dtype too, so
    base, tuned and published are compared in one precision. A QLoRA run is not scored on the 4-bit base it
    trained on: what it publishes is a merge into the full-precision base (tasks/engine/export.py).
    `reference`: the base's result, whose pair log-probs are the reference of a preference run's rewards."""
    if exported is None:
        return _score_base(config, data, planned, label)
    model, scored_as = _load_run_folder(Path(exported.folder), config.model, config.publish.dtype, planned,
                                        config.model_loading)
    return _score(config, data, label, model, scored_as, reference)


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
    publish_dtype = manifest.get("config", {}).get("publish", {}).get("dtype", "float32")
    model, scored_as = _load_run_folder(local, manifest["base_model"]["path"], publish_dtype, planned,
                                        config.model_loading)
    result = _score(config, data, "published", model, scored_as, reference)
    return result.model_copy(update={"run_id": run_id})


def _score_base(config: FinetuneConfig, data: IngestResult, planned: PlanResult, label: str) -> EvalResult:
    """The base model's score, read from the score cache when an earlier run under the same output scored the
    same base on the same rows the same way; else scored here and stored for the next run."""
    from tasks.engine.export import publish_dtype
    from tasks.engine.modeling import load_for_inference

    logger = get_run_logger()
    dtype = publish_dtype(config.model, config.publish.dtype)
    device = _device_for(planned, dtype)
    try:
        key, identity = base_score_key(config.model, data.eval_path, _base_score_settings(config, device, dtype))
    except OSError as error:  # no local folder to hash (the flow resolves Hub ids first): score without the cache
        logger.warning("base: no score-cache key (%s); scoring the base", error)
        key = identity = None
    if key and config.evaluation.reuse_base_score and (cached := _cached_base_score(config.output, key)):
        logger.info("base: score reused from %s (same model, eval rows, settings and scoring code): %s %.3f, "
                    "eval loss %.4f", cached.from_cache, cached.metric, cached.score, cached.loss)
        return cached
    model = load_for_inference(config.model, device, dtype=dtype, loading=config.model_loading)
    result = _score(config, data, label, model, _scored_as("base", model))
    try:
        if key:
            write_base_score(config.output, key, identity, result.model_dump(mode="json"))
    except Exception as error:  # the score is in hand; a store that refuses the copy only costs a later re-score
        logger.warning("base: could not store the score for later runs (%s)", error)
    return result


def _base_score_settings(config: FinetuneConfig, device: str, dtype) -> dict:
    """What besides the model's files and the eval rows changes the base's score."""
    preference = {"objective": config.objective, "preference": config.preference.model_dump()} \
        if config.objective in PREFERENCE_OBJECTIVES else {}  # nothing added for sft
    return {"evaluation": config.evaluation.model_dump(mode="json", exclude={"reuse_base_score"}),
            "max_seq_len": config.training.max_seq_len,  # eval rows are truncated to it
            "device": device, "dtype": str(dtype).removeprefix("torch."),
            "loading": config.model_loading.model_dump(mode="json"), **preference}


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


def _load_run_folder(folder: Path, base_path: str, publish_dtype_name: str, planned: PlanResult, loading=None):
    """A run folder as its consumers load it, and what was loaded: merged/ in the dtype it was saved in, else
    its adapter on the base in the run's publish dtype (what the adapter's model card tells them to do)."""
    from tasks.engine.export import publish_dtype
    from tasks.engine.modeling import load_for_inference

    merged = folder / "merged"
    if merged.is_dir():
        dtype = publish_dtype(str(merged), "base")  # save_pretrained recorded the dtype it wrote
        model = load_for_inference(str(merged), _device_for(planned, dtype), dtype=dtype, loading=loading or SAFE)
        return model, _scored_as("merged", model)
    dtype = publish_dtype(base_path, publish_dtype_name)
    model = load_for_inference(base_path, _device_for(planned, dtype), adapter=str(folder / "adapter"),
                               dtype=dtype, loading=loading or SAFE)
    return model, _scored_as("base+adapter", model)


def scoring_device(planned: PlanResult, dtype) -> str:
    """The plan's device when the weights in `dtype` fit its memory budget, else the CPU (slow, but the score
    is the published model's: a QLoRA plan often means the full-precision weights do not fit the GPU)."""
    needed = dtype.itemsize * planned.model_parameters * SCORING_HEADROOM
    if planned.plan.device == "cpu" or needed <= planned.plan.budget_bytes:
        return planned.plan.device
    return "cpu"


def _device_for(planned: PlanResult, dtype) -> str:
    device = scoring_device(planned, dtype)
    if device != planned.plan.device:
        get_run_logger().warning("scoring on the CPU: the model in %s needs ~%.1f GiB, over the %.1f GiB budget on %s",
                                 dtype, dtype.itemsize * planned.model_parameters * SCORING_HEADROOM / 2**30,
                                 planned.plan.budget_bytes / 2**30, planned.plan.device)
    return device


def _scored_as(weights: str, model) -> dict:
    return {"weights": weights, "dtype": str(model.dtype).removeprefix("torch.")}


def _score(config: FinetuneConfig, data: IngestResult, label: str, model, scored_as: dict,
           reference: EvalResult | None = None) -> EvalResult:
    from tasks.engine.eval_loop import evaluate_model

    tokenizer = load_tokenizer(config.model, config.model_loading)
    conversations, examples = encoded_split(config, data.eval_path, tokenizer=tokenizer)
    device = str(model.device).split(":")[0]  # where _device_for put it
    # preference pairs: their chosen sides are the rows scored here (loss; generation against the chosen answer)
    result = evaluate_model(model, tokenizer, conversations, examples, config.evaluation, device)
    if config.objective in PREFERENCE_OBJECTIVES:
        result = _with_pair_scores(config, data, device, model, tokenizer, result, reference)
    metric = config.evaluation.metric
    scores = ", ".join(f"{name} {value:.3f}" for name, value in result["scores"].items())
    get_run_logger().info("%s (%s, %s): eval loss %.4f, perplexity %.2f, %s (%d generated answers)", label,
                          scored_as["weights"], scored_as["dtype"], result["loss"], result["perplexity"], scores,
                          result["generated_rows"])
    return EvalResult(label=label, metric=metric, score=result["scores"][metric], scored_as=scored_as, **result)
