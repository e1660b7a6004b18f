"""The training loop: AdamW, padding per micro-batch, loss on assistant tokens only, early stopping.

Gradient accumulation weighs every trained token equally: each micro-batch's summed loss is divided
by the trainable tokens of the whole optimizer step, not averaged per micro-batch. The best
checkpoint by eval loss is saved as training goes, so what gets published is the best, not the last.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks.config import TrainingSettings
from tasks.tokenization import IGNORE_INDEX, Example


@dataclass
class TrainOutcome:
    steps: int
    best_step: int
    best_eval_loss: float
    stopped_early: bool
    seconds: float
    trained_tokens: int
    peak_memory_bytes: int
    peak_memory_kind: str
    history: list[dict] = field(default_factory=list)


def collate(examples: list[Example], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row of this micro-batch."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def predicted_tokens(examples: list[Example]) -> int:
    return sum(e.trainable_tokens for e in examples)


def summed_loss(model, batch: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    # Project to the vocabulary only where some row has an answer token to predict: prompts are
    # most of a chat row, and the vocabulary projection is a large share of the compute and memory.
    positions = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    with _autocast(device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=positions).logits
    labels = targets[:, positions]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def mean_loss(model, examples: list[Example], batch_size: int, pad_id: int, device: str) -> float:
    """Token-weighted mean loss over the assistant tokens of `examples`."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        total += summed_loss(model, collate(chunk, pad_id, device), device).item()
        tokens += predicted_tokens(chunk)
    model.train(was_training)
    return total / max(tokens, 1)


def accumulate_gradients(model, rows: list[Example], micro_batch_size: int, pad_id: int,
                         device: str) -> tuple[float, int]:
    """Backward over `rows` in micro-batches; gradients equal those of one batch of all rows."""
    step_tokens, loss_sum = predicted_tokens(rows), 0.0
    for start in range(0, len(rows), micro_batch_size):
        chunk = rows[start:start + micro_batch_size]
        if predicted_tokens(chunk) == 0:
            continue  # every answer token was truncated away: nothing to learn from these rows
        loss = summed_loss(model, collate(chunk, pad_id, device), device)
        (loss / step_tokens).backward()
        loss_sum += loss.item()
    return loss_sum, step_tokens


@dataclass
class EarlyStopping:
    """Tracks the best eval loss; says when `patience` evaluations in a row brought no gain."""
    patience: int  # 0: never stop early
    min_delta: float = 0.0
    best_loss: float = math.inf
    best_step: int = 0
    evals_without_gain: int = 0

    def improved(self, step: int, loss: float) -> bool:
        if loss < self.best_loss - self.min_delta:  # NaN compares False: never "best"
            self.best_loss, self.best_step, self.evals_without_gain = loss, step, 0
            return True
        self.evals_without_gain += 1
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.evals_without_gain >= self.patience


def train(
    model,
    train_examples: list[Example],
    eval_examples: list[Example],
    settings: TrainingSettings,
    micro_batch_size: int,
    pad_id: int,
    device: str,
    checkpoint_dir: Path,
    log: logging.Logger | logging.LoggerAdapter,
) -> TrainOutcome:
    """Train up to max_steps; the best checkpoint by eval loss is saved to `checkpoint_dir`."""
    torch.manual_seed(settings.seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                  fused=device == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings))
    batches = _batches(len(train_examples), settings.batch_size, settings.seed)
    stopping = EarlyStopping(settings.early_stopping_patience, settings.early_stopping_min_delta)
    log_every, history, trained_tokens = max(1, settings.max_steps // 20), [], 0
    started = time.perf_counter()
    model.train()
    with PeakMemory(device) as memory:
        for step in range(1, settings.max_steps + 1):
            step_started = time.perf_counter()
            rows = [train_examples[i] for i in next(batches)]
            loss_sum, step_tokens = accumulate_gradients(model, rows, micro_batch_size, pad_id, device)
            if step_tokens:
                torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            trained_tokens += step_tokens
            record = {"step": step, "train_loss": loss_sum / max(step_tokens, 1),
                      "lr": scheduler.get_last_lr()[0],
                      "tokens_per_s": step_tokens / (time.perf_counter() - step_started)}
            if step % settings.eval_every == 0 or step == settings.max_steps:
                record["eval_loss"] = mean_loss(model, eval_examples, micro_batch_size, pad_id, device)
                if stopping.improved(step, record["eval_loss"]):
                    model.save_pretrained(checkpoint_dir)
            history.append(record)
            if step % log_every == 0 or "eval_loss" in record:
                log.info("step %d/%d train_loss %.4f%s lr %.2e %.0f answer tok/s", step, settings.max_steps,
                         record["train_loss"],
                         f" eval_loss {record['eval_loss']:.4f}" if "eval_loss" in record else "",
                         record["lr"], record["tokens_per_s"])
            if stopping.should_stop:
                log.info("early stopping at step %d: no eval-loss gain in %d evaluations; best step %d (%.4f)",
                         step, stopping.evals_without_gain, stopping.best_step, stopping.best_loss)
                break
    if stopping.best_step == 0:
        losses = [r["eval_loss"] for r in history if "eval_loss" in r]
        raise FloatingPointError(f"eval loss was never finite ({losses}); lower training.learning_rate")
    return TrainOutcome(steps=len(history), best_step=stopping.best_step, best_eval_loss=stopping.best_loss,
                        stopped_early=stopping.should_stop, seconds=time.perf_counter() - started,
                        trained_tokens=trained_tokens, peak_memory_bytes=memory.peak,
                        peak_memory_kind=memory.kind, history=history)


def _batches(n_rows: int, batch_size: int, seed: int):
    """Endless stream of row-index batches: a fresh shuffle each epoch, every row once per epoch."""
    rng, pending = random.Random(seed), []
    while True:
        while len(pending) < batch_size:
            epoch = list(range(n_rows))
            rng.shuffle(epoch)
            pending.extend(epoch)
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _schedule(settings: TrainingSettings):
    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        if settings.lr_schedule == "constant":
            return 1.0
        progress = (step - settings.warmup_steps) / max(1, settings.max_steps - settings.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def _autocast(device: str):
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class PeakMemory:
    """Peak memory while training: CUDA's allocator peak, or on CPU the highest resident set size
    sampled from /proc/self/statm (the process's lifetime peak would include earlier stages)."""

    def __init__(self, device: str, interval_s: float = 0.02):
        self.device, self.interval_s, self.peak = device, interval_s, 0
        self.kind = ("cuda max_memory_allocated during training" if device == "cuda"
                     else "peak resident set size during training (CPU)")
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            with open("/proc/self/statm") as statm:
                self.peak = max(self.peak, int(statm.read().split()[1]) * page)
            if self._stop.wait(self.interval_s):
                return
