"""One training process of a multi-process run: `torchrun ... -m tasks.engine.worker <job.json>`.

Every process loads the model, joins the process group and runs the same trainer
(tasks/engine/train_loop.py) with its `Parallel`; rank 0 logs, writes the best model and checkpoints, copies
each checkpoint to the output, and writes the result file the train task reads back.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from tasks.engine.launch import PROGRESS_MARK


def train_job(job, parallel, log: logging.Logger):
    """Load the model as the plan says, train it with `parallel`; returns (outcome, parameter counts)."""
    import torch

    from tasks.engine.launch import read_examples
    from tasks.engine.modeling import load_for_training, parameter_counts
    from tasks.engine.train_loop import Checkpoints, train
    from tasks.planning.settings import LoraSettings, TrainingSettings
    from tasks.store.checkpoint_uploads import upload_checkpoint
    from tasks.store.weight_safety import ModelLoadingSettings

    settings = TrainingSettings(**job.training)
    torch.manual_seed(settings.seed)  # the same LoRA initialisation on every process, as in one process
    model = load_for_training(job.model, job.method, job.device, LoraSettings(**job.lora),
                              job.gradient_checkpointing, loading=ModelLoadingSettings(**(job.model_loading or {})),
                              checkpointed_layers=job.checkpointed_layers)
    counts = parameter_counts(model)
    checkpoints = None
    if job.checkpoints is not None:
        spec, upload = job.checkpoints, job.upload
        checkpoints = Checkpoints(
            folder=Path(spec["folder"]), every=spec["every"], fingerprint=spec.get("fingerprint", ""),
            keep=spec.get("keep", 1), resume_from=Path(spec["resume_from"]) if spec.get("resume_from") else None,
            on_saved=(lambda folder: upload_checkpoint(folder, upload["output"], upload["run_key"], upload["keep"]))
            if upload else None)
    outcome = train(model, read_examples(job.train_examples), read_examples(job.eval_examples), settings,
                    job.token_capacity, job.device, Path(job.best_dir), log, checkpoints, progress=False,
                    parallel=parallel, on_step=_print_progress)
    return model, outcome, counts


def _print_progress(step: int, total: int) -> None:
    """One line per step on stdout for the train task, which reads it as progress (not as a log line)."""
    print(f"{PROGRESS_MARK} {step} {total}", flush=True)


@record  # torchrun then reports this process's traceback as the run's root cause
def main(job_file: str) -> None:
    from tasks.engine.distributed import join_process_group, leave_process_group
    from tasks.engine.launch import TrainingJob

    job = TrainingJob.load(Path(job_file))
    parallel = join_process_group(job.device)
    log = logging.getLogger(f"finetune.rank{parallel.rank}")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[rank{parallel.rank}] %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO if parallel.is_main else logging.WARNING)  # one copy of every step's log
    try:
        model, outcome, (trainable, total) = train_job(job, parallel, log)
        if parallel.is_main:
            result = {**dataclasses.asdict(outcome), "trainable_parameters": trainable, "total_parameters": total,
                      "world_size": parallel.world_size, "attention": model.config._attn_implementation}
            Path(job.result).write_text(json.dumps(result))
    finally:
        leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
