"""Which GPU work pool a run goes to: the smallest whose GPU fits the plan. Pure.

Decided from the model's config.json and the configured max_seq_len (no weights, no data read), so a
light CPU worker can route; the plan stage on the GPU worker re-plans with the data's real lengths.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from tasks.planning.memory import ModelShape
from tasks.planning.methods import MethodChoice
from tasks.planning.selector import PlanError, TrainingPlan, WorkPoolSpec, select_work_pool
from tasks.planning.settings import PREFERENCE_OBJECTIVES, LoraSettings, TrainingSettings
from tasks.store.base_run import is_run_reference, published_model_config
from tasks.store.hub import HubSettings, hub_config, is_hub_id, resolve_model

FINETUNE_FLOW = "finetune"


class RoutedRun(Protocol):
    """What routing reads of a run's config (tasks.config.FinetuneConfig has it)."""
    model: str
    model_revision: str | None
    hub: HubSettings
    method: MethodChoice
    training: TrainingSettings
    lora: LoraSettings
    output: str
    objective: str


def read_model_shape(model: str, revision: str | None = None, hub: HubSettings | None = None,
                     token: str | None = None, output: str | None = None) -> ModelShape:
    """From config.json alone: a local folder's, or a Hub id's (downloaded alone into the Hub cache with `token`,
    hub.token_secret's, else HF_TOKEN's; with hub.mirror, the commit the mirror pins, from there when it has it,
    with the tokenizer: the one snapshot the whole fleet uses), or a published run's (run:<id> in `output`,
    read in place)."""
    if output is not None and is_run_reference(model):
        return ModelShape.from_config(published_model_config(model, output), source=f"{model} in {output}")
    if is_hub_id(model):
        hub = hub or HubSettings()
        path = (Path(resolve_model(model, revision, hub.cache_dir, token, weights=False, mirror=hub.mirror).path)
                / "config.json") if hub.mirror else hub_config(model, revision, hub.cache_dir, token)
        return ModelShape.from_config(json.loads(path.read_text()), source=f"{model} config.json")
    path = Path(model) / "config.json"
    if not path.is_file():
        raise PlanError(f"{path}: not found; `model` must be a Hugging Face Hub id (org/name) or a local folder "
                        "holding a Hugging Face model (on the routing worker too: mount the same model store there)")
    return ModelShape.from_config(json.loads(path.read_text()), source=str(path))


def choose_work_pool(config: RoutedRun, pools: list[WorkPoolSpec],
                     token: str | None = None) -> tuple[WorkPoolSpec, TrainingPlan]:
    """`token`: the Hugging Face token for a gated or private Hub model (hub.token_secret's, loaded by the caller)."""
    t = config.training
    # Without reading the data, every row is taken as max_seq_len tokens long: the worst case. A preference
    # pair's two sides go through the model together, so its row is twice that.
    row = t.max_seq_len * (2 if config.objective in PREFERENCE_OBJECTIVES else 1)
    return select_work_pool(
        read_model_shape(config.model, config.model_revision, config.hub, token, config.output), pools,
        method=config.method, longest_row=row, largest_step=t.batch_size * row,
        max_rows_per_micro_batch=t.micro_batch_size, gradient_checkpointing=t.gradient_checkpointing,
        lora_r=config.lora.r, lora_targets=config.lora.target_list(), objective=config.objective,
        full_precision=t.full_precision,
    )


def deployment_for(pool: WorkPoolSpec) -> str:
    """The fine-tuning deployment that runs on `pool` (deployments/prefect.yaml names them after the pool)."""
    return f"{FINETUNE_FLOW}/{pool.name}"
