"""Stage 3, train: full, LoRA or QLoRA as planned; keeps the best model by eval loss, checkpoints to
the output as it goes, and continues from a checkpoint after a retry or with `resume: true`. With more
than one GPU (or `training.num_gpus` > 1), training runs in one process per GPU, started with torchrun
(tasks/engine/launch.py): DDP for adapters, FSDP2 for full fine-tuning (tasks/engine/distributed.py)."""
from __future__ import annotations

import contextvars
import dataclasses
import threading
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from tasks.config import FinetuneConfig
from tasks.data.tokenization import encoded_split, load_tokenizer
from tasks.engine.launch import Nodes
from tasks.planning.memory import GIB
from tasks.planning.methods import Method
from tasks.planning.selector import Attempt
from tasks.reports.delivery import ARTIFACT_DEADLINE_S
from tasks.reports.settings import ArtifactSettings
from tasks.planning.settings import PREFERENCE_OBJECTIVES
from tasks.results import IngestResult, PlanResult, RunInfo, TrainResult
from tasks.store.checkpoint_uploads import (candidate_checkpoints, fetch_checkpoint, training_fingerprint,
                                           upload_checkpoint)
from tasks.store.transfer import ChecksumMismatchError

KEEP_IN_OUTPUT = 2  # newest checkpoints kept in the output per run
PROGRESS_KEY = "finetune-training-progress"
PROGRESS_CLOSE_TIMEOUT_S = ARTIFACT_DEADLINE_S  # the last update's wait at the end of training (an API outage must not hold the run)


@task(name="train", cache_policy=NO_CACHE)
def train_model(config: FinetuneConfig, run: RunInfo, data: IngestResult, planned: PlanResult) -> TrainResult:
    logger = get_run_logger()
    plan = planned.plan
    tokenizer = load_tokenizer(config.model, config.model_loading)
    train_examples, eval_examples = (_encoded(config, path, tokenizer) for path in (data.train_path, data.eval_path))
    checkpoints, resumed_from = _checkpoints(config, run, data, planned, logger)
    best = Path(run.run_dir) / "best"
    attempt = Attempt(method=plan.method, tokens_per_micro_batch=plan.tokens_per_micro_batch,
                      gradient_checkpointing=plan.gradient_checkpointing, checkpointed_layers=plan.checkpointed_layers,
                      full_precision=plan.estimate.full_precision)
    processes, nodes = processes_per_node(config, plan), Nodes.from_environment()
    progress = TrainingProgress(config.artifacts, logger)
    try:
        outcome, attempt, step_downs, trainable, total, world_size = _train(
            config, run, plan, attempt, processes, nodes, train_examples, eval_examples, checkpoints, best, logger,
            progress)
    finally:
        progress.close()
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


def _train(config: FinetuneConfig, run: RunInfo, plan, attempt: Attempt, processes: int, nodes: Nodes,
           train_examples, eval_examples, checkpoints, best: Path, logger, progress: TrainingProgress):
    """Train in this process (stepping down on out-of-memory errors) or in torchrun processes."""
    # torch, transformers and peft load here, not at import: the flow module stays light for workers
    # and deployment tooling.
    from tasks.engine.hardware import seed
    from tasks.engine.modeling import load_for_training, parameter_counts
    from tasks.engine.train_loop import train, train_within_memory

    settings = config.training
    if processes * nodes.count > 1 and config.objective in PREFERENCE_OBJECTIVES:
        raise ValueError(f"objective {config.objective!r} trains in one process for now, but this run would start "
                         f"{processes * nodes.count}; set training.num_gpus=1 and run on one machine")
    if processes * nodes.count > 1 and attempt.method == "full" and attempt.full_precision == "bf16":
        raise ValueError(f"full fine-tuning in bf16 trains in one process for now, but this run would start "
                         f"{processes * nodes.count}; set training.full_precision to 'fp32', or run on one GPU")
    if processes * nodes.count > 1:
        # No out-of-memory step-down across processes (yet): a process out of memory fails the task.
        outcome, trainable, total, world_size = _train_in_processes(
            config, run, plan, processes, nodes, train_examples, eval_examples, attempt.tokens_per_micro_batch,
            checkpoints, best, logger, progress)
        return outcome, attempt, [], trainable, total, world_size
    world_size, sizes, loaded = 1, {}, {}

    def load(attempt: Attempt):
        seed(settings.seed)  # before the model is built: LoRA's initialisation is random too
        model = load_for_training(config.model, attempt.method, plan.device, config.lora,
                                  attempt.gradient_checkpointing, loading=config.model_loading,
                                  checkpointed_layers=attempt.checkpointed_layers,
                                  full_precision=attempt.full_precision)
        sizes["trainable"], sizes["total"] = parameter_counts(model)
        loaded["objective"] = preference_objective(config, attempt.method, plan.device, attempt.full_precision)
        logger.info("training %s on %s: %s of %s parameters trainable; micro-batches of up to %d packed "
                    "tokens; gradient checkpointing %s; attention %s", attempt.method, plan.device,
                    f"{sizes['trainable']:,}", f"{sizes['total']:,}", attempt.tokens_per_micro_batch,
                    attempt.checkpointing, model.config._attn_implementation)
        if loaded["objective"] is not None:
            logger.info("preference pairs: %s", loaded["objective"].layout(model))
        return model

    def run_attempt(model, attempt: Attempt, restarted: bool):
        # A restart begins at step 0: the attempt that ran out of memory may have changed the model.
        resumable = checkpoints if not restarted else dataclasses.replace(checkpoints, resume_from=None)
        return train(model, train_examples, eval_examples, settings, attempt.tokens_per_micro_batch,
                     plan.device, best, logger, resumable, on_step=progress, objective=loaded["objective"])

    outcome, attempt, step_downs = train_within_memory(
        load, run_attempt, attempt, planned_tokens=plan.tokens_per_micro_batch, longest_row=plan.longest_row,
        method_fixed=config.method.fixed() is not None, log=logger,
        bf16_allowed=settings.full_precision == "auto" and plan.device == "cuda")
    return outcome, attempt, step_downs, sizes["trainable"], sizes["total"], world_size


def _encoded(config: FinetuneConfig, split_path: str, tokenizer) -> list:
    """A split as the objective trains on it: answer-masked rows (sft), or pairs (dpo, orpo)."""
    if config.objective in PREFERENCE_OBJECTIVES:
        from tasks.data.preference import encoded_pairs

        return encoded_pairs(config, split_path, tokenizer)
    return encoded_split(config, split_path, tokenizer=tokenizer)[1]


def preference_objective(config: FinetuneConfig, method: Method, device: str, full_precision: str = "fp32"):
    """None for sft; else what the train loop runs for dpo or orpo (tasks/engine/preference_training.py)."""
    if config.objective not in PREFERENCE_OBJECTIVES:
        return None
    from tasks.engine.preference_training import build_objective

    return build_objective(config.objective, config.preference, method, device, config.model, config.model_loading,
                           full_precision)


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
                        eval_examples, capacity: int, checkpoints, best: Path, logger, progress=None):
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
    result = run_training_processes(job, folder / "job.json", processes, logger, nodes, on_progress=progress)
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
    # num_gpus is left out: adapters resume on any number of processes, FSDP shards on any number above one;
    # full_precision as the plan resolved it (below), not as asked: auto and fp32 train alike where auto picks fp32
    settings = config.training.model_dump(exclude={"max_steps", "eval_every", "checkpoint_every", "num_gpus",
                                                   "early_stopping_patience", "early_stopping_min_delta",
                                                   "full_precision"})
    identity = training_fingerprint(model=config.model, data=[s.sha256 for s in data.sources],
                                    method=planned.plan.method, lora=config.lora.model_dump(), training=settings,
                                    eval_origin=data.eval_origin, **_objective_identity(config),
                                    **({"mix": data.mix} if data.mix else {}),  # other weights: other rows
                                    **({"full_precision": "bf16"} if planned.plan.estimate.full_precision == "bf16" else {}))
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


class TrainingProgress:
    """The run's progress artifact (steps done of the total), called as `progress(step, max_steps)` after each
    step, here or from the torchrun processes' progress lines. A background thread sends the newest value at
    most every `progress_every_s`, so training never waits on the Prefect API (whose client retries for
    minutes through an outage), and an API error only costs the artifact, never the run."""

    def __init__(self, settings: ArtifactSettings, logger):
        self._every, self._log = settings.progress_every_s, logger
        self._latest: tuple[int, int] | None = None
        self._sent: tuple[int, int] | None = None
        self._done, self._thread, self.artifact_id = threading.Event(), None, None
        self.updates, self.api_seconds, self._warned = 0, 0.0, False
        if not settings.progress:
            return
        # Prefect's settings (the API URL among them) live in context variables: the thread needs this context.
        # The artifact is created there too: with the API down, its client retries for minutes.
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name="progress-artifact", daemon=True)
        self._thread.start()

    def __call__(self, step: int, total: int) -> None:
        self._latest = (step, total)

    def close(self) -> None:
        """Send the last step and stop (waiting at most PROGRESS_CLOSE_TIMEOUT_S for the API)."""
        if self._thread is None:
            return
        self._done.set()
        self._thread.join(PROGRESS_CLOSE_TIMEOUT_S)
        self._log.info("progress artifact: %d update(s), %.2f s in Prefect API calls (off the training thread)",
                       self.updates, self.api_seconds)

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            self.artifact_id = create_progress_artifact(0.0, key=PROGRESS_KEY, description="training: starting")
        except Exception as error:  # noqa: BLE001 - the UI's progress is not worth failing a run
            self._warn(error)
            return
        self.api_seconds += time.perf_counter() - started
        while True:
            finished = self._done.wait(self._every)
            self._send()
            if finished:
                return

    def _send(self) -> None:
        latest = self._latest
        if latest is None or latest == self._sent:
            return
        step, total = latest
        started = time.perf_counter()
        try:
            update_progress_artifact(self.artifact_id, 100.0 * step / max(total, 1),
                                     description=f"training: {step} of {total} steps")
        except Exception as error:  # noqa: BLE001 - as above: the next update may get through
            self._warn(error)
            return
        self._sent, self.updates = latest, self.updates + 1
        self.api_seconds += time.perf_counter() - started

    def _warn(self, error: Exception) -> None:
        if not self._warned:  # once: an API outage would otherwise log every few seconds
            self._warned = True
            self._log.warning("progress artifact %s could not be sent (%s: %s); training goes on", PROGRESS_KEY,
                              type(error).__name__, str(error)[:200])
