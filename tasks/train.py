"""Stage 3, train: full, LoRA or QLoRA as planned; keeps the best checkpoint by eval loss."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.config import FinetuneConfig
from tasks.dataset import read_conversations
from tasks.ingest import IngestResult
from tasks.memory import GIB
from tasks.plan import PlanResult
from tasks.runs import RunInfo
from tasks.tokenization import encode_all, load_tokenizer


class TrainResult(BaseModel):
    """What the train task hands on: the engine's TrainOutcome (tasks/trainer.py, which imports
    torch and so cannot be imported here) plus where the checkpoint is and what it holds."""
    method: str
    checkpoint_dir: str  # the best checkpoint: a peft adapter, or a whole model for full fine-tuning
    is_adapter: bool
    steps: int
    best_step: int
    best_eval_loss: float
    stopped_early: bool
    seconds: float
    trained_tokens: int
    trainable_parameters: int
    total_parameters: int
    peak_memory_bytes: int
    peak_memory_kind: str
    history: list[dict]


@task(name="train", cache_policy=NO_CACHE)
def train_model(config: FinetuneConfig, run: RunInfo, data: IngestResult, planned: PlanResult) -> TrainResult:
    # torch, transformers and peft load here, not at import: the flow module stays light for workers
    # and deployment tooling.
    import torch

    from tasks.modeling import load_for_training, parameter_counts
    from tasks.trainer import train

    logger = get_run_logger()
    plan, settings = planned.plan, config.training
    tokenizer = load_tokenizer(config.model)
    train_examples = encode_all(tokenizer, read_conversations(data.train_path)[1], settings.max_seq_len)
    eval_examples = encode_all(tokenizer, read_conversations(data.eval_path)[1], settings.max_seq_len)
    torch.manual_seed(settings.seed)  # before the model is built: LoRA's initialisation is random too
    model = load_for_training(config.model, plan.method, plan.device, config.lora, plan.gradient_checkpointing)
    trainable, total = parameter_counts(model)
    logger.info("training %s on %s: %s of %s parameters trainable, micro-batch %d x %d accumulation",
                plan.method, plan.device, f"{trainable:,}", f"{total:,}", plan.micro_batch_size,
                plan.gradient_accumulation)
    checkpoint = Path(run.run_dir) / "checkpoints" / "best"
    outcome = train(model, train_examples, eval_examples, settings, plan.micro_batch_size,
                    tokenizer.pad_token_id, plan.device, checkpoint, logger)
    tokenizer.save_pretrained(checkpoint)
    logger.info("trained %d steps in %.1f s; best eval loss %.4f at step %d; peak memory %.2f GiB (%s), "
                "estimated %.2f GiB", outcome.steps, outcome.seconds, outcome.best_eval_loss, outcome.best_step,
                outcome.peak_memory_bytes / GIB, outcome.peak_memory_kind, plan.estimate.gib)
    return TrainResult(method=plan.method, checkpoint_dir=str(checkpoint), is_adapter=plan.method != "full",
                       trainable_parameters=trainable, total_parameters=total, **dataclasses.asdict(outcome))
