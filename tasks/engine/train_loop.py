"""The training loop: AdamW over packed micro-batches, loss on answer tokens only, checkpoints.

Rows are packed without padding (tasks/engine/packing.py) into micro-batches of at most `token_capacity`
tokens; attention never crosses a row boundary (tasks/engine/attention.py) and the vocabulary projection
is fused with the loss (tasks/engine/loss.py), so the engine computes what a padded batch computes, minus
the padding. Gradient accumulation weighs every trained token equally: each micro-batch's summed
loss is divided by the trainable tokens of the whole optimizer step. The best model by eval loss is
kept as training goes (what gets published), and a checkpoint every `checkpoint_every` steps lets
a killed run continue where it stopped, with the same data order and random state.

With several processes (`parallel`, tasks/engine/distributed.py) each one takes its share of every step's
rows and the gradients, losses and token counts are summed across them, so a step updates the model
exactly as one process would with the same rows; only rank 0 writes the best model and checkpoints.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks.data.tokenization import IGNORE_INDEX, Example
from tasks.engine.attention import PACKING_EXACT, cu_seq_lens
from tasks.engine.checkpoints import load_checkpoint, save_best, save_checkpoint, step_name
from tasks.engine.distributed import ONE_PROCESS, Parallel
from tasks.engine.loss import linear_cross_entropy_sum
from tasks.engine.packing import PackedRows, micro_batches, pack
from tasks.engine.router_balance import add_balance_loss, router_outputs_wanted, step_balance_loss
from tasks.planning.memory import FUSED_LOSS_MODEL_TYPES
from tasks.planning.selector import Attempt, step_down
from tasks.planning.settings import TrainingSettings
from tasks.scoring.overfitting import overfitting_warning


@dataclass
class TrainOutcome:
    steps: int
    best_step: int
    best_eval_loss: float
    stopped_early: bool
    seconds: float
    trained_tokens: int  # answer tokens the loss counted
    processed_tokens: int  # every token through the model (prompts included, no padding)
    peak_memory_bytes: int
    peak_memory_kind: str
    peak_allocated_bytes: int  # CUDA: the allocator's peak allocation (CPU: as peak_memory_bytes)
    resumed_from_step: int = 0
    history: list[dict] = field(default_factory=list)


def _batch_tensors(packed: PackedRows, device: str) -> dict:
    batch = {
        "input_ids": torch.tensor([packed.input_ids], device=device),
        "position_ids": torch.tensor([packed.position_ids], device=device),
    }
    if device == "cuda":  # read by the varlen attention (tasks/engine/attention.py); harmless elsewhere
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_seq_lens(packed.lengths, device)
        batch["max_length_q"] = batch["max_length_k"] = max(packed.lengths)
    return batch


def summed_loss(model, packed: PackedRows, device: str) -> torch.Tensor:
    """Summed cross-entropy over the answer tokens of one packed micro-batch."""
    if len(packed.lengths) > 1 and not getattr(model, PACKING_EXACT, True):
        # packing would let rows see each other in this model (attention.check_packing): one row at a time
        rows = [row for row in _rows_of(packed) if row.trainable_tokens] or _rows_of(packed)[:1]
        return sum(summed_loss(model, row, device) for row in rows)
    batch = _batch_tensors(packed, device)
    targets = torch.tensor(packed.targets, device=device)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    head = model.get_output_embeddings()
    transform = _fused_loss_transform(model, head)
    router = router_outputs_wanted(model)  # a mixture of experts: its balance loss (tasks/engine/router_balance.py)
    if transform is None:
        # a family whose logits the fused loss does not know how to make (or an adapted head): the
        # model's own head makes them, on answer positions only
        with _autocast(device):
            outputs = model(**batch, use_cache=False, logits_to_keep=keep, **router)
        loss = F.cross_entropy(outputs.logits[0].float(), targets[keep], reduction="sum")
    else:
        with _autocast(device):
            outputs = model.get_decoder()(**batch, use_cache=False, **router)
        # bf16 logits on CUDA, and for bf16 weights on the CPU as well (full_precision bf16)
        compute = torch.bfloat16 if device == "cuda" or head.weight.dtype == torch.bfloat16 else torch.float32
        loss = linear_cross_entropy_sum(outputs.last_hidden_state[0][keep], head.weight, targets[keep], compute,
                                        **transform)
    return add_balance_loss(model, outputs, loss, packed.trainable_tokens) if router else loss


def _rows_of(packed: PackedRows) -> list[PackedRows]:
    rows, start = [], 0
    for n in packed.lengths:
        end = start + n
        rows.append(PackedRows(packed.input_ids[start:end], packed.position_ids[start:end], packed.targets[start:end],
                               [n]))
        start = end
    return rows


def _fused_loss_transform(model, head) -> dict | None:
    """The logits transform (scale, soft cap) for the fused loss, or None when the model's own head
    must make the logits: a head with a bias or an adapter, or a family (tasks/planning/memory.py,
    FUSED_LOSS_MODEL_TYPES) whose logits the fused loss is not known to reproduce."""
    config = model.config
    if type(head) is not torch.nn.Linear or head.bias is not None or config.model_type not in FUSED_LOSS_MODEL_TYPES:
        return None
    scale = getattr(config, "logit_scale", None) or 1.0  # Cohere
    if getattr(config, "logits_scaling", None):  # Granite divides
        scale = scale / config.logits_scaling
    return {"scale": float(scale), "softcap": getattr(config, "final_logit_softcapping", None)}


def trainable_tokens(examples: list[Example]) -> int:
    return sum(e.trainable_tokens for e in examples)


@torch.no_grad()
def mean_loss(model, examples: list[Example], token_capacity: int, device: str,
              parallel: Parallel | None = None) -> float:
    """Token-weighted mean loss over the answer tokens of `examples` (shared out across processes)."""
    was_training = model.training
    model.eval()
    total = 0.0
    if parallel is not None and parallel.distributed:
        for packed, weight, _ in parallel.step_micro_batches(examples, token_capacity):
            total += parallel.loss(packed).item() * weight
        total = parallel.sum(total)[0]
    else:
        for rows in micro_batches(examples, token_capacity):
            if trainable_tokens(rows):
                total += summed_loss(model, pack(rows), device).item()
    model.train(was_training)
    return total / max(trainable_tokens(examples), 1)


def accumulate_gradients(model, rows: list[Example], token_capacity: int, device: str,
                         parallel: Parallel | None = None) -> tuple[float, int]:
    """Backward over `rows` in packed micro-batches; gradients equal those of one batch of all rows."""
    if parallel is not None and parallel.distributed:
        return _accumulate_across_processes(rows, token_capacity, parallel)
    step_tokens, loss_sum = trainable_tokens(rows), 0.0
    for chunk in micro_batches(rows, token_capacity):
        if trainable_tokens(chunk) == 0:
            continue  # every answer token was truncated away: nothing to learn from these rows
        loss = summed_loss(model, pack(chunk), device)
        (loss / step_tokens).backward()
        loss_sum += loss.item()
    return loss_sum, step_tokens


def _accumulate_across_processes(rows: list[Example], token_capacity: int, parallel: Parallel) -> tuple[float, int]:
    """This process's share of `rows`. Every process knows the whole step, so each divides by the
    step's trainable tokens; DDP and FSDP2 then average gradients over world_size processes, which the
    world_size factor turns into the sum: the same gradient as one process over all rows."""
    step_tokens, loss_sum = trainable_tokens(rows), 0.0
    if step_tokens == 0:
        return 0.0, 0  # the same decision on every process: none runs a backward
    for packed, weight, last in parallel.step_micro_batches(rows, token_capacity):
        with parallel.gradient_sync(last):
            loss = parallel.loss(packed) * weight
            (loss * (parallel.world_size / step_tokens)).backward()
        loss_sum += loss.item()
    return parallel.sum(loss_sum)[0], step_tokens


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


@dataclass
class Checkpoints:
    """Where and how often to checkpoint, and what to do with each one written."""
    folder: Path  # local; one sub-folder per step
    every: int  # 0: only at the end
    fingerprint: str = ""  # what was trained (tasks/store.checkpoint_uploads.training_fingerprint), kept in the state
    resume_from: Path | None = None
    on_saved: Callable[[Path], None] | None = None  # e.g. copy to the run's output (local or S3)
    keep: int = 1  # local copies kept; the output keeps its own


def train(
    model,
    train_examples: list[Example],
    eval_examples: list[Example],
    settings: TrainingSettings,
    token_capacity: int,
    device: str,
    best_dir: Path,
    log: logging.Logger | logging.LoggerAdapter,
    checkpoints: Checkpoints | None = None,
    progress: bool = True,
    parallel: Parallel = ONE_PROCESS,
    on_step: Callable[[int, int], None] | None = None,
    objective=None,
) -> TrainOutcome:
    """Train up to max_steps; the best model by eval loss is saved to `best_dir`. With several
    processes, every one calls this with its `parallel` (tasks/distributed.join_process_group).
    `on_step(step, max_steps)` is called on the main process after each step (the run's progress).
    `objective`: None trains the answers of `Example` rows (SFT); a PreferenceObjective
    (tasks/engine/preference_training.py) trains DPO or ORPO on `PairExample` pairs, its eval loss
    picking the best model."""
    if objective is not None and parallel.distributed:
        raise ValueError("preference objectives (dpo, orpo) train in one process for now; set training.num_gpus=1")
    if parallel.distributed:  # before the optimizer: FSDP2 swaps in sharded parameters
        parallel.wrap(model, lambda m, packed: summed_loss(m, packed, device))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw_for(parameters, settings, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings))
    stopping = EarlyStopping(settings.early_stopping_patience, settings.early_stopping_min_delta)
    history, start_step, counts = [], 0, {"trained": 0, "processed": 0}
    if checkpoints and checkpoints.resume_from:
        state = load_checkpoint(checkpoints.resume_from, model, optimizer, scheduler, parallel)
        start_step, history, counts = state["step"], state["history"], state["counts"]
        stopping = EarlyStopping(**state["stopping"])
        if parallel.is_main:
            _restore_best(checkpoints.resume_from, best_dir)
        parallel.barrier()
        log.info("resumed from %s at step %d (best eval loss %.4f at step %d)", checkpoints.resume_from,
                 start_step, stopping.best_loss, stopping.best_step)
    else:
        # each process its own dropout draws (the same seed would give every process the same masks)
        torch.manual_seed(settings.seed + parallel.rank)
    batches = _batches(len(train_examples), settings.batch_size, settings.seed)
    for _ in range(start_step):  # the same data order as a run that never stopped
        next(batches)
    log_every, started = max(1, settings.max_steps // 20), time.perf_counter()
    bar = _progress_bar(progress and parallel.is_main, settings.max_steps, start_step)
    model.train()
    with PeakMemory(device) as memory, _states_dropped_on_out_of_memory(optimizer):
        step = start_step
        while step < settings.max_steps and not stopping.should_stop:
            step += 1
            step_started = time.perf_counter()
            rows = [train_examples[i] for i in next(batches)]
            if objective is None:
                loss_sum, step_units = accumulate_gradients(model, rows, token_capacity, device, parallel)
                step_tokens, extra = step_units, {}
            else:  # loss per pair; tokens still count the answers trained on
                loss_sum, step_units, extra = objective.accumulate(model, rows, token_capacity)
                step_tokens = objective.trainable_tokens(rows)
            if step_units:
                torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            seconds = time.perf_counter() - step_started
            processed = objective.tokens(rows) if objective else sum(len(r.input_ids) for r in rows)
            counts["trained"] += step_tokens
            counts["processed"] += processed
            record = {"step": step, "train_loss": loss_sum / max(step_units, 1), "lr": scheduler.get_last_lr()[0],
                      "tokens": processed, "seconds": seconds, "tokens_per_s": processed / seconds,
                      "answer_tokens_per_s": step_tokens / seconds, **extra}
            if (balance := step_balance_loss(model)) is not None:
                record["router_balance_loss"] = balance
            if step % settings.eval_every == 0 or step == settings.max_steps:
                record["eval_loss"] = (objective.eval_loss(model, eval_examples, token_capacity) if objective else
                                       mean_loss(model, eval_examples, token_capacity, device, parallel))
                if stopping.improved(step, record["eval_loss"]):
                    save_best(model, best_dir, step, parallel)
            history.append(record)
            _report(log, bar, record, settings.max_steps, log_every)
            if on_step is not None and parallel.is_main:
                on_step(step, settings.max_steps)
            if "eval_loss" in record:
                _warn_if_overfitting(log, history)
            last = step == settings.max_steps or stopping.should_stop
            if checkpoints and (last or (checkpoints.every and step % checkpoints.every == 0)):
                state = {"step": step, "history": history, "counts": counts, "stopping": vars(stopping),
                         "fingerprint": checkpoints.fingerprint}
                _checkpoint(checkpoints, model, optimizer, scheduler, state, best_dir, log, parallel)
        if stopping.should_stop:
            log.info("early stopping at step %d: no eval-loss gain in %d evaluations; best step %d (%.4f)",
                     step, stopping.evals_without_gain, stopping.best_step, stopping.best_loss)
    bar.close()
    if stopping.best_step == 0:
        losses = [r["eval_loss"] for r in history if "eval_loss" in r]
        raise FloatingPointError(f"eval loss was never finite ({losses}); lower training.learning_rate")
    return TrainOutcome(steps=len(history), best_step=stopping.best_step, best_eval_loss=stopping.best_loss,
                        stopped_early=stopping.should_stop, seconds=time.perf_counter() - started,
                        trained_tokens=counts["trained"], processed_tokens=counts["processed"],
                        # the busiest process's memory: what the plan must fit on every GPU
                        peak_memory_bytes=parallel.max(memory.peak), peak_memory_kind=memory.kind,
                        peak_allocated_bytes=parallel.max(memory.allocated),
                        resumed_from_step=start_step, history=history)


def train_within_memory(load: Callable, run: Callable, attempt: Attempt, *, planned_tokens: int, longest_row: int,
                        method_fixed: bool, log, bf16_allowed: bool = False) -> tuple[TrainOutcome, Attempt, list[dict]]:
    """`run(load(attempt), attempt, restarted)` until it fits: after each out-of-memory error, the next
    leaner attempt (tasks/selector.step_down), recorded and logged. Returns the outcome, the attempt
    that trained, and the record of each step down; fails naming every attempt when none is left."""
    step_downs: list[dict] = []
    while True:
        model = None
        try:
            model = load(attempt)
            return run(model, attempt, bool(step_downs)), attempt, step_downs
        except torch.OutOfMemoryError as error:
            _release(model)
            leaner = step_down(attempt, planned_tokens=planned_tokens, longest_row=longest_row,
                               method_fixed=method_fixed, bf16_allowed=bf16_allowed)
            step_downs.append({"out_of_memory": attempt.model_dump(), "error": str(error).splitlines()[0][:300],
                               "next": leaner.model_dump() if leaner else None})
            if leaner is None:
                raise MemoryError(_out_of_memory_message(step_downs, method_fixed)) from error
            log.warning("out of GPU memory with %s: trying %s", _describe(attempt), _describe(leaner))
            attempt = leaner
        del model  # outside the except block: the traceback no longer holds the failed step's tensors
        gc.collect()  # adapters and hooks make reference cycles
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _states_dropped_on_out_of_memory(optimizer):
    """The optimizer's states freed as an out-of-memory error leaves (see _release)."""
    try:
        yield
    except torch.OutOfMemoryError:
        optimizer.state.clear()
        raise


def _release(model) -> None:
    """Free a model's weights and gradients now. After an out-of-memory error in backward on CUDA,
    something outside our code keeps the model reachable (measured: the whole first attempt, 5 GB,
    still allocated after gc); emptying its tensors gives the memory back whoever holds it."""
    if model is None:
        return
    for parameter in model.parameters():
        parameter.grad = None
        parameter.data = torch.empty(0, dtype=parameter.dtype, device=parameter.device)
    for buffer in model.buffers():
        buffer.data = torch.empty(0, dtype=buffer.dtype, device=buffer.device)


def _describe(attempt: Attempt) -> str:
    weights = f" ({attempt.full_precision} weights)" if attempt.method == "full" else ""
    return (f"{attempt.method}{weights} at {attempt.tokens_per_micro_batch} tokens per micro-batch, gradient "
            f"checkpointing {attempt.checkpointing}")


def _out_of_memory_message(step_downs: list[dict], method_fixed: bool) -> str:
    tried = "; ".join(_describe(Attempt(**down["out_of_memory"])) for down in step_downs)
    hint = "set method to 'auto' to allow LoRA and QLoRA, " if method_fixed else ""
    return f"out of GPU memory in every configuration tried ({tried}); {hint}lower training.max_seq_len, " \
           "or use a GPU with more memory"


def _warn_if_overfitting(log, history: list[dict]) -> None:
    """Log once per run when eval loss climbs while train loss falls; the record keeps the flag."""
    warning = overfitting_warning(history)
    if warning and not any(r.get("overfitting") for r in history):
        history[-1]["overfitting"] = True
        log.warning(warning)


def _checkpoint(checkpoints: Checkpoints, model, optimizer, scheduler, state: dict, best_dir: Path, log,
                parallel: Parallel = ONE_PROCESS) -> None:
    folder = save_checkpoint(checkpoints.folder / step_name(state["step"]), model, optimizer, scheduler, state,
                             best_dir, parallel)
    if not parallel.is_main:  # rank 0 uploads and prunes the (shared) checkpoint folder
        return
    if checkpoints.on_saved:
        checkpoints.on_saved(folder)
    local = sorted(p for p in checkpoints.folder.glob("step-*") if p.is_dir())
    for old in local[:-checkpoints.keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint at step %d: %s", state["step"], folder)


def _restore_best(checkpoint: Path, best_dir: Path) -> None:
    if (checkpoint / "best").is_dir():
        shutil.rmtree(best_dir, ignore_errors=True)
        shutil.copytree(checkpoint / "best", best_dir)


def _progress_bar(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, nothing in a worker's log file
    return tqdm(total=total, initial=initial, unit="step", disable=None if enabled else True, leave=False)


def _report(log, bar, record: dict, max_steps: int, log_every: int) -> None:
    bar.update(1)
    bar.set_postfix(loss=f"{record['train_loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
    if record["step"] % log_every == 0 or "eval_loss" in record:
        log.info("step %d/%d train_loss %.4f%s%s lr %.2e %.0f tok/s (%.0f answer tok/s)", record["step"], max_steps,
                 record["train_loss"],
                 f" eval_loss {record['eval_loss']:.4f}" if "eval_loss" in record else "",
                 f" router_balance_loss {record['router_balance_loss']:.3f}" if "router_balance_loss" in record else "",
                 record["lr"], record["tokens_per_s"], record["answer_tokens_per_s"])


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


def adamw_for(parameters: list, settings: TrainingSettings, device: str) -> torch.optim.Optimizer:
    """AdamW for the weights as loaded: bf16 weights (full fine-tuning, full_precision bf16; any fp32 ones a
    family keeps beside them too) get the stochastically rounding AdamW of tasks/engine/bf16_adamw.py; all-fp32
    weights torch's own (fused on CUDA)."""
    if any(p.dtype == torch.bfloat16 for p in parameters):
        from tasks.engine.bf16_adamw import Bf16AdamW

        return Bf16AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                             fused=device == "cuda")


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
    """Peak memory while training.

    CUDA: what the process holds on the GPU at its peak, the number an out-of-memory error is about:
    the allocator's peak reservation plus what lives outside it (CUDA context, cuBLAS workspaces,
    kernels), read from the driver at the start. The allocator's peak allocation is kept as well.
    CPU: the highest resident set size sampled from /proc/self/statm (the process's lifetime peak
    would include earlier stages).
    """

    def __init__(self, device: str, interval_s: float = 0.02):
        self.device, self.interval_s, self.peak, self.allocated = device, interval_s, 0, 0
        self.kind = ("cuda: peak reserved by PyTorch + CUDA context" if device == "cuda"
                     else "peak resident set size during training (CPU)")
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            self._outside_allocator = max(0, total - free - torch.cuda.memory_reserved())
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            self.allocated = torch.cuda.max_memory_allocated()
            self.peak = torch.cuda.max_memory_reserved() + self._outside_allocator
        else:
            self._stop.set()
            self._thread.join()
            self.allocated = self.peak

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            with open("/proc/self/statm") as statm:
                self.peak = max(self.peak, int(statm.read().split()[1]) * page)
            if self._stop.wait(self.interval_s):
                return
