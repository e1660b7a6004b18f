"""Stage 2, plan: estimate memory for each method and pick what fits, before loading any weights."""
from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.config import FinetuneConfig
from tasks.data.dataset import read_conversations
from tasks.data.schemas import DatasetError
from tasks.data.tokenization import encoded_split, length_stats, load_tokenizer
from tasks.planning.memory import GIB, ModelShape
from tasks.planning.selector import GPU_SAFETY, select_measured_plan, select_plan, step_tokens
from tasks.planning.settings import PREFERENCE_OBJECTIVES
from tasks.results import IngestResult, PlanResult
from tasks.store.weight_safety import require_safe_weights

RAM_SAFETY = 0.8  # share of available RAM we plan to use on CPU


@task(name="plan", cache_policy=NO_CACHE)
def plan_training(config: FinetuneConfig, data: IngestResult) -> PlanResult:
    logger = get_run_logger()
    shape = ModelShape.from_config(_read_model_config(config.model), source=f"{config.model}/config.json")
    # Refused here, before any token is counted, rather than when training loads the weights.
    require_safe_weights(config.model, config.model_loading)
    tokenizer = load_tokenizer(config.model, config.model_loading)
    settings = config.training
    stats = _check_lengths(config, tokenizer, data.train_path, config.data_label, logger)
    _check_lengths(config, tokenizer, data.eval_path, config.eval_data or config.data_label, logger)
    if config.objective in PREFERENCE_OBJECTIVES:  # a pair's sides go through the model together
        stats = _pair_lengths(config, tokenizer, data.train_path, stats)
    from tasks.engine.hardware import pick_device
    from tasks.engine.kernels import fused_kernels_available  # torch loads here, not when the flow is imported

    device = pick_device()
    gpus = _gpus(config, device)
    budget, source = _memory_budget(config, device)
    if device == "cpu" and gpus > 1:  # each process holds its own copy in the same RAM
        budget, source = budget // gpus, f"{source}, shared by {gpus} processes"
    longest_row = stats.get("pair_tokens_max") or min(settings.max_seq_len, stats["tokens_max"])
    plan_kwargs = dict(
        budget_bytes=budget, budget_source=source, device=device, method=config.method,
        longest_row=longest_row, largest_step=stats["tokens_largest_step"],
        typical_step=stats["tokens_typical_step"],
        max_rows_per_micro_batch=settings.micro_batch_size, gradient_checkpointing=settings.gradient_checkpointing,
        lora_r=config.lora.r, lora_targets=config.lora.target_list(),
        fused_kernels=fused_kernels_available(shape.model_type, device), num_gpus=gpus,
        objective=config.objective, full_precision=settings.full_precision,
    )
    if device == "cuda" and not shape.verified:
        # No formula for this family: measure it on this GPU (seconds) rather than plan conservatively.
        from tasks.engine.memory_probe import probe_memory

        def measure(method):
            return probe_memory(config.model, method, config.lora, config.model_loading, longest_row, log=logger)

        plan = select_measured_plan(shape, measure, **plan_kwargs)
    else:
        plan = select_plan(shape, **plan_kwargs)
    logger.info("plan: %s", plan.reason)
    create_table_artifact(plan.table(), key="finetune-plan", description=f"Memory plan. {plan.reason}")
    return PlanResult(plan=plan, token_stats=stats, model_parameters=shape.parameters, model_type=shape.model_type)


def _check_lengths(config: FinetuneConfig, tokenizer, split_path: str, source: str, logger) -> dict:
    """Token-length statistics of a split; fails when truncation leaves no answer to learn or score."""
    max_seq_len = config.training.max_seq_len
    rows, conversations = read_conversations(split_path)
    _, examples = encoded_split(config, split_path, conversations, tokenizer)
    stats = length_stats(examples, max_seq_len)
    # The largest optimizer step the data can make (its batch_size longest rows), and an average one
    stats["tokens_largest_step"], stats["tokens_typical_step"] = step_tokens(
        [min(len(e.input_ids), max_seq_len) for e in examples], config.training.batch_size)
    if stats["trainable_tokens"] == 0:
        raise DatasetError(f"{source}: no answer token survives truncation to {max_seq_len} tokens "
                           f"(longest row: {stats['tokens_max']}); raise training.max_seq_len")
    truncated = [row for row, example in zip(rows, examples) if example.truncated]
    if truncated:
        logger.warning("%s: %d of %d rows are longer than max_seq_len=%d and are truncated (rows %s); "
                       "%d lose every answer token", source, len(truncated), len(rows), max_seq_len,
                       ", ".join(map(str, truncated[:10])) + (" ..." if len(truncated) > 10 else ""),
                       stats["rows_without_trainable_tokens"])
    return stats


def _pair_lengths(config: FinetuneConfig, tokenizer, split_path: str, stats: dict) -> dict:
    """Preference pairs: the plan's rows are pairs (chosen and rejected packed together), so the
    longest row and the steps are measured in pairs' tokens; `stats` keeps the chosen sides' figures."""
    from tasks.data.preference import encoded_pairs

    lengths = [len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in encoded_pairs(config, split_path, tokenizer)]
    largest, typical = step_tokens(lengths, config.training.batch_size)
    return {**stats, "pair_tokens_max": max(lengths), "tokens_largest_step": largest, "tokens_typical_step": typical}


def _read_model_config(model: str) -> dict:
    path = Path(model) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; `model` must be a local folder holding a Hugging Face "
                                "model (config.json, safetensors weights, tokenizer)")
    return json.loads(path.read_text())


def _gpus(config: FinetuneConfig, device: str) -> int:
    """Training processes the run gets: `training.num_gpus`, else every visible GPU (one on CPU);
    one for preference objectives (they train in one process for now)."""
    if config.objective in PREFERENCE_OBJECTIVES:
        return 1
    if config.training.num_gpus:
        return config.training.num_gpus
    if device == "cuda":
        from tasks.engine.hardware import gpu_count

        return gpu_count()
    return 1


def _memory_budget(config: FinetuneConfig, device: str) -> tuple[int, str]:
    if config.memory_budget_gib:
        return int(config.memory_budget_gib * GIB), "memory_budget_gib"
    if device == "cuda":
        from tasks.engine.hardware import free_gpu_memory

        free, name = free_gpu_memory()
        return int(free * GPU_SAFETY), f"{GPU_SAFETY:.0%} of free memory on {name}"
    return int(_available_ram() * RAM_SAFETY), f"{RAM_SAFETY:.0%} of available RAM"


def _available_ram() -> int:
    """MemAvailable, capped by a cgroup memory limit when the process runs in one."""
    available = None
    if Path("/proc/meminfo").is_file():
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    if available is None:  # not Linux: total physical memory
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit_file = Path("/sys/fs/cgroup/memory.max")
    if limit_file.is_file() and limit_file.read_text().strip().isdigit():
        limit = int(limit_file.read_text())
        usage = int(Path("/sys/fs/cgroup/memory.current").read_text())
        available = min(available, limit - usage)
    return available
