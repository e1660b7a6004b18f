"""The base model's local folder: a Hub id (`org/name`) is fetched into the shared Hugging Face cache here,
once, before any stage reads the model (tasks/store/hub.py); a published run (`run:<id>`, `run:latest`) is
downloaded from the output's registry into work_dir (tasks/store/base_run.py); a local folder is used as it is."""
from __future__ import annotations

import json

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.config import FinetuneConfig
from tasks.store.base_run import is_run_reference, resolve_base_run
from tasks.store.hub import ResolvedModel, resolve_model


@task(name="fetch-model", cache_policy=NO_CACHE)
def fetch_model(config: FinetuneConfig, weights: bool = True, commit: str | None = None,
                run_id: str | None = None) -> ResolvedModel:
    """`weights=False`: config.json and the tokenizer only (what ingest and plan read), so bad data fails the
    run before gigabytes of weights are downloaded. `commit` pins the weights to the commit that call saw,
    even if the branch moves in between; `run_id`, for run:latest, to the run that call saw, even if another
    run is promoted in between."""
    logger = get_run_logger()
    if is_run_reference(config.model):
        model = resolve_base_run(config.model, config.output, config.work_dir, weights=weights,
                                 concurrency=config.publish.max_concurrency, pinned_run=run_id)
        run = model.base_run
        logger.info("model %s: run %s of %s (%s, from %s), every file's sha256 checked, in %s", config.model,
                    run["run_id"], config.output, run["objective"],
                    run["base_model"].get("repo_id") or run["base_model"].get("path"), model.path)
        return model
    loading = config.model_loading
    model = resolve_model(config.model, config.model_revision, config.hub.cache_dir,
                          hf_token(config.hub.token_secret, logger), weights=weights,
                          allow_pickles=loading.allow_pickle_weights, remote_code=loading.trust_remote_code,
                          mirror=config.hub.mirror, commit=commit)
    if model.repo_id:
        logger.info("model %s%s: commit %s from %s, in %s (%s)", model.repo_id,
                    f"@{model.revision}" if model.revision else "", model.commit, model.mirror or model.endpoint,
                    model.path, "weights and tokenizer" if weights else "config.json and tokenizer")
    if model.published:
        logger.info("published %s at commit %s to the Hub mirror: %s", model.repo_id, model.commit, model.published)
    return model


def hf_token(block_name: str | None, log) -> str | None:
    """The Hugging Face token in the Secret block `block_name` (its value: the token, or JSON with a `token`
    key); None without a name, so huggingface_hub uses HF_TOKEN or a saved login. Loaded inside the task and
    passed to the download calls only: never a task parameter, a result, the environment or a log line."""
    if not block_name:
        return None
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block_name).get()
    except ValueError as error:  # no such block
        raise ValueError(f"hub.token_secret: no Secret block named {block_name!r} ({error}); create it with "
                         f"Secret(value='hf_...').save({block_name!r}) or in the UI under Blocks") from None
    token = _token_in(value)
    if not token:
        raise ValueError(f"hub.token_secret: Secret block {block_name!r} must hold a Hugging Face token, as "
                         "text or as JSON with a `token` key")
    log.info("Hugging Face token from Secret block %r", block_name)  # no part of it: a token is all secret
    return token


def _token_in(value) -> str | None:
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, dict):
        value = value.get("token")
    return value.strip() if isinstance(value, str) and value.strip() else None
