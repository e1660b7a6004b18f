"""Stage 3, train: full, LoRA or QLoRA as planned; keeps the best model by eval loss, checkpoints to
the output as it goes, and continues from a checkpoint after a retry or with `resume: true`. With more
than one GPU (or `training.num_gpus` > 1), training runs in one process per GPU, started with torchrun
(tasks/engine/launch.py): DDP for adapters, FSDP2 for full fine-tuning (tasks/engine/distributed.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.config import FinetuneConfig
from tasks.data.tokenization import encoded_split, load_tokenizer
from tasks.engine.launch import Nodes
from tasks.planning.memory import GIB
from tasks.planning.methods import Method
from tasks.planning.selector import Attempt
from tasks.planning.settings import PREFERENCE_OBJECTIVES
from tasks.results import IngestResult, PlanResult, RunInfo, TrainResult
from tasks.store.checkpoint_uploads import (candidate_checkpoints, fetch_checkpoint, training_fingerprint,
                                           upload_checkpoint)
from tasks.store.transfer import ChecksumMismatchError

KEEP_IN_OUTPUT = 2  # newest checkpoints kept in the output per run


@task(name="train", cache_policy=NO_CACHE)
def train_model(config: FinetuneConfig, run: RunInfo, data: IngestResult, planned: PlanResult) -> TrainResult:
    # torch, transformers and peft load here, not at import: the flow module stays light for workers
    # and deployment tooling.
    from tasks.engine.hardware import seed
    from tasks.engine.modeling import load_for_training, parameter_counts
    from tasks.engine.train_loop import train, train_within_memory

    logger = get_run_logger()
    plan, settings = planned.plan, config.training
    tokenizer = load_tokenizer(config.model, config.model_loading)
    train_examples, eval_examples = (_encoded(config, path, tokenizer) for path in (data.train_path, data.eval_path))
    checkpoints, resumed_from = _checkpoints(config, run, data, planned, logger)
    best = Path(run.run_dir) / "best"
    attempt = Attempt(method=plan.method, tokens_per_micro_batch=plan.tokens_per_micro_batch,
                      gradient_checkpointing=plan.gradient_checkpointing, checkpointed_layers=plan.checkpointed_layers)
    processes, nodes = processes_per_node(config, plan), Nodes.from_environment()
    if processes * nodes.count > 1 and config.objective in PREFERENCE_OBJECTIVES:
        raise ValueError(f"objective {config.objective!r} trains in one process for now, but this run would start "
                         f"{processes * nodes.count}; set training.num_gpus=1 and run on one machine")
    if processes * nodes.count > 1:
        # No out-of-memory step-down across processes (yet): a process out of memory fails the task.
        outcome, trainable, total, world_size = _train_in_processes(
            config, run, plan, processes, nodes, train_examples, eval_examples, attempt.tokens_per_micro_batch,
            checkpoints, best, logger)
        step_downs = []
    else:
        world_size, sizes, loaded = 1, {}, {}

        def load(attempt: Attempt):
            seed(settings.seed)  # before the model is built: LoRA's initialisation is random too
            model = load_for_training(config.model, attempt.method, plan.device, config.lora,
                                      attempt.gradient_checkpointing, loading=config.model_loading,
                                      checkpointed_layers=attempt.checkpointed_layers)
            sizes["trainable"], sizes["total"] = parameter_counts(model)
            loaded["objective"] = preference_objective(config, attempt.method, plan.device)
            logger.info("training %s on %s: %s of %s parameters trainable; micro-batches of up to %d packed "
                        "tokens; gradient checkpointing %s; attention %s", attempt.method, plan.device,
                        f"{sizes['trainable']:,}", f"{sizes['total']:,}", attempt.tokens_per_micro_batch,
                        attempt.checkpointing, model.config._attn_implementation)
            return model

        def run(model, attempt: Attempt, restarted: bool):
            # A restart begins at step 0: the attempt that ran out of memory may have changed the model.
            resumable = checkpoints if not restarted else dataclasses.replace(checkpoints, resume_from=None)
            return train(model, train_examples, eval_examples, settings, attempt.tokens_per_micro_batch,
                         plan.device, best, logger, resumable, objective=loaded["objective"])

        outcome, attempt, step_downs = train_within_memory(
            load, run, attempt, planned_tokens=plan.tokens_per_micro_batch, longest_row=plan.longest_row,
            method_fixed=config.method.fixed() is not None, log=logger)
        trainable, total = sizes["trainable"], sizes["total"]
    tokenizer.save_pretrained(best)
    logger.info("trained %d steps in %.1f s; best eval loss %.4f at step %d; peak memory %.2f GiB (%s), "
                "estimated %.2f GiB", outcome.steps, outcome.seconds, outcome.best_eval_loss, outcome.best_step,
                outcome.peak_memory_bytes / GIB, outcome.peak_memory_kind, plan.estimate.gib)
    return TrainResult(method=attempt.method, checkpoint_dir=str(best),
                       trainable_parameters=trainable, total_parameters=total, resumed_from=resumed_from,
                       tokens_per_micro_batch=attempt.tokens_per_micro_batch,
                       gradient_checkpointing=attempt.gradient_checkpointing,
                       checkpointed_layers=attempt.checkpointed_layers, memory_step_downs=step_downs,
                       world_size=world_size, **dataclasses.asdict(outcome))


def _encoded(config: FinetuneConfig, split_path: str, tokenizer) -> list:
    """A split as the objective trains on it: answer-masked rows (sft), or pairs (dpo, orpo)."""
    if config.objective in PREFERENCE_OBJECTIVES:
        from tasks.data.preference import encoded_pairs

        return encoded_pairs(config, split_path, tokenizer)
    return encoded_split(config, split_path, tokenizer=tokenizer)[1]


def preference_objective(config: FinetuneConfig, method: Method, device: str):
    """None for sft; else what the train loop runs for dpo or orpo (tasks/engine/preference_training.py)."""
    if config.objective not in PREFERENCE_OBJECTIVES:
        return None
    from tasks.engine.preference_training import build_objective

    return build_objective(config.objective, config.preference, method, device, config.model, config.model_loading)


def processes_per_node(config: FinetuneConfig, plan) -> int:
    """Training processes on this machine: `training.num_gpus` when set, else the plan's (which planned
    for every visible GPU); one process on a CPU unless `training.num_gpus` asks for more."""
    wanted = config.training.num_gpus or plan.num_gpus
    if plan.device != "cuda":
        return wanted
    from tasks.engine.hardware import gpu_count

    visible = gpu_count()
    if wanted > visible:
        raise ValueError(f"training wants {wanted} GPUs but {visible} are visible on this machine; lower "
                         "training.num_gpus or run on a work pool with more GPUs per machine")
    return wanted


def _train_in_processes(config: FinetuneConfig, run: RunInfo, plan, processes: int, nodes, train_examples,
                        eval_examples, capacity: int, checkpoints, best: Path, logger):
    """Train in `processes` torchrun processes (per machine); only rank 0 writes the best model,
    checkpoints (and copies them to the output) and the result read back here."""
    from tasks.engine.hardware import release_cached_memory
    from tasks.engine.launch import TrainingJob, run_training_processes, write_examples
    from tasks.engine.train_loop import TrainOutcome

    folder = nodes.job_dir(Path(run.run_dir))
    if nodes.count > 1 and not Path(run.run_dir).resolve().is_relative_to(Path(nodes.shared_dir).resolve()):
        raise ValueError(f"training on {nodes.count} machines writes checkpoints that every machine reads: set "
                         f"work_dir under the shared volume {nodes.shared_dir} (it is {config.work_dir})")
    job = TrainingJob(
        model=config.model, method=plan.method, device=plan.device, lora=config.lora.model_dump(),
        model_loading=config.model_loading.model_dump(),
        training=config.training.model_dump(), gradient_checkpointing=plan.gradient_checkpointing,
        checkpointed_layers=plan.checkpointed_layers,
        token_capacity=capacity, best_dir=str(best), result=str(folder / "result.json"),
        train_examples=write_examples(train_examples, folder / "train.jsonl"),
        eval_examples=write_examples(eval_examples, folder / "eval.jsonl"),
        checkpoints={"folder": str(checkpoints.folder), "every": checkpoints.every,
                     "fingerprint": checkpoints.fingerprint, "keep": checkpoints.keep,
                     "resume_from": str(checkpoints.resume_from) if checkpoints.resume_from else None},
        upload={"output": config.output, "run_key": run.flow_run_id or run.run_id, "keep": KEEP_IN_OUTPUT},
    )
    release_cached_memory()  # the base model evaluate loaded in this process would sit on GPU 0
    result = run_training_processes(job, folder / "job.json", processes, logger, nodes)
    logger.info("trained %s on %d processes (%s): %s of %s parameters trainable; micro-batches of up to %d packed "
                "tokens per process; attention %s", plan.method, result["world_size"],
                "DDP" if plan.method.trains_adapter else "FSDP2", f"{result['trainable_parameters']:,}",
                f"{result['total_parameters']:,}", capacity, result["attention"])
    fields = {f.name for f in dataclasses.fields(TrainOutcome)}
    outcome = TrainOutcome(**{k: v for k, v in result.items() if k in fields})
    return outcome, result["trainable_parameters"], result["total_parameters"], result["world_size"]


def _objective_identity(config: FinetuneConfig) -> dict:
    """What the objective adds to a checkpoint's identity; nothing for sft, so earlier checkpoints still match."""
    if config.objective not in PREFERENCE_OBJECTIVES:
        return {}
    return {"objective": config.objective, "preference": config.preference.model_dump()}


def _checkpoints(config: FinetuneConfig, run: RunInfo, data: IngestResult, planned: PlanResult, logger):
    """Where checkpoints go, and which one to continue from: this flow run's own (a retry), or with
    `resume`, the newest one in the output that trained the same model, data and settings."""
    from tasks.engine.checkpoints import read_checkpoint_manifest
    from tasks.engine.train_loop import Checkpoints

    run_key = run.flow_run_id or run.run_id
    # num_gpus is left out: adapters resume on any number of processes, FSDP shards on any number above one
    settings = config.training.model_dump(exclude={"max_steps", "eval_every", "checkpoint_every", "num_gpus",
                                                   "early_stopping_patience", "early_stopping_min_delta"})
    identity = training_fingerprint(model=config.model, data=[s.sha256 for s in data.sources],
                                    method=planned.plan.method, lora=config.lora.model_dump(), training=settings,
                                    eval_origin=data.eval_origin, **_objective_identity(config))
    local = Path(run.run_dir) / "checkpoints"
    resume_from = found = None
    for uri in candidate_checkpoints(config.output, run_key, identity if config.resume else None):
        try:
            fetched = fetch_checkpoint(uri, Path(run.run_dir) / "resume-from")
        except ChecksumMismatchError as error:
            logger.warning("skipping checkpoint %s: its files do not match its manifest (%s)", uri,
                           "; ".join(error.problems[:3]) or error)
            continue
        if read_checkpoint_manifest(fetched) is not None:
            resume_from, found = fetched, uri
            logger.info("continuing from checkpoint %s", uri)
            break
        logger.warning("skipping checkpoint %s: its files do not match its manifest (corrupt or partial)", uri)
    if config.resume and found is None:
        logger.warning("resume: no checkpoint in %s matches this model, data and settings; starting afresh",
                       config.output)
    checkpoints = Checkpoints(
        folder=local, every=config.training.checkpoint_every, fingerprint=identity, resume_from=resume_from,
        on_saved=lambda folder: upload_checkpoint(folder, config.output, run_key, KEEP_IN_OUTPUT),
    )
    return checkpoints, found
