"""Route a fine-tuning run to the smallest GPU work pool that fits it, and start it there."""
from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment

from tasks.base_model import hf_token
from tasks.config import FinetuneConfig
from tasks.credentials import use_s3_credentials
from tasks.planning.routing import choose_work_pool, deployment_for
from tasks.planning.selector import WorkPoolSpec

DEFAULT_POOLS = [WorkPoolSpec(name="gpu-24gb", gpu_gib=24), WorkPoolSpec(name="gpu-80gb", gpu_gib=80)]


@task(name="choose-work-pool", cache_policy=NO_CACHE)
def pick_pool(config: FinetuneConfig, pools: list[WorkPoolSpec]) -> str:
    # A gated or private Hub model's config.json needs the same token as the base_model stage's fetch.
    pool, plan = choose_work_pool(config, pools, hf_token(config.hub.token_secret, get_run_logger()))
    get_run_logger().info("work pool %s: %s", pool.name, plan.reason)
    return deployment_for(pool)


@task(name="start-finetune", cache_policy=NO_CACHE)
def start_on(deployment: str, config: FinetuneConfig) -> str:
    # timeout=0: hand the run to the GPU pool and finish; the fine-tuning run is tracked on its own.
    run = run_deployment(deployment, parameters={"config": config.model_dump(mode="json")}, timeout=0,
                         as_subflow=True)
    get_run_logger().info("started %s: flow run %s", deployment, run.id)
    return str(run.id)


@flow(name="finetune-router")
def route_finetune(config: FinetuneConfig, pools: list[WorkPoolSpec] = DEFAULT_POOLS) -> str:
    use_s3_credentials(config.aws_credentials_secret, get_run_logger(),
                       config.aws_credentials_block)  # the plan may read s3://
    deployment = pick_pool(config, pools)
    return start_on(deployment, config)
