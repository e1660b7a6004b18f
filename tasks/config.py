"""The fine-tuning run's parameters: one typed pydantic model.

The flow takes a single `FinetuneConfig`, so the Prefect UI renders it as a form (Literal fields
become dropdowns) and the server rejects values outside the JSON schema (types, enums, bounds)
before a run is created; the cross-field checks below run when the flow starts, before any task.
Pure: no Prefect, no torch.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.scoring.metrics import MetricName, ScoreName, module_of
from tasks.store.objects import is_s3_uri, split_s3_uri



class Method(str, Enum):
    """How a run trains, listed by quality: every weight (full), low-rank adapters on the frozen base
    (lora), or those adapters on a 4-bit quantized base (qlora)."""
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"

    def __str__(self) -> str:  # f-strings, logs and tables show "lora", not "Method.LORA"
        return self.value

    @property
    def trains_adapter(self) -> bool:
        return self is not Method.FULL

    @property
    def quantized(self) -> bool:
        return self is Method.QLORA


class MethodChoice(str, Enum):
    """What the config asks for: a method, or "auto" to let the planner pick the best that fits."""
    AUTO = "auto"
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"

    def __str__(self) -> str:
        return self.value

    def fixed(self) -> Method | None:
        """The method forced by the config, or None for auto."""
        return None if self is MethodChoice.AUTO else Method(self.value)


DataFormat = Literal["auto", "instruction", "prompt_completion", "chat", "text"]
PublishDtype = Literal["float32", "bfloat16", "float16", "base"]
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")


def _is_folder(uri: str) -> bool:
    """A folder of data files (or a saved `datasets` folder), or an s3:// prefix ending in '/'."""
    return uri.endswith("/") or (not is_s3_uri(uri) and Path(uri).is_dir())


class _Settings(BaseModel):
    # Unknown keys are typos (e.g. `learning_rte`): reject them instead of silently ignoring.
    model_config = ConfigDict(extra="forbid")


class LoraSettings(_Settings):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str = Field(
        "all-linear",
        description="'all-linear', or a comma-separated list of module names, e.g. 'q_proj,v_proj'.",
    )

    def target_list(self) -> list[str] | str:
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


class TrainingSettings(_Settings):
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate (AdamW).")
    lr_schedule: Literal["constant", "cosine"] = Field("cosine", description="After warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this global norm.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps (at most; early stopping may end sooner).")
    batch_size: int = Field(8, ge=1, description="Rows per optimizer step (micro-batch x accumulation).")
    micro_batch_size: int = Field(
        8, ge=1, description="Largest rows per forward pass; the planner lowers it when memory is short."
    )
    max_seq_len: int = Field(1024, ge=16, le=131072, description="Tokens per row; longer rows are truncated.")
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="'auto' turns it on only when the plan needs it to fit."
    )
    eval_every: int = Field(10, ge=1, description="Evaluate eval loss every N optimizer steps.")
    early_stopping_patience: int = Field(
        3, ge=0, description="Stop after this many evaluations without improvement (0: never stop early)."
    )
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest eval-loss drop that counts.")
    seed: int = Field(0, description="Seed for data order, split and initialisation.")
    checkpoint_every: int = Field(
        50, ge=0, description="Save a resumable checkpoint (to the output's checkpoints/ folder) every N steps "
        "and at the end; 0: only at the end."
    )
    num_gpus: int | None = Field(
        None, ge=1, le=1024, description="Training processes on this machine, one per GPU: DDP for LoRA and QLoRA, "
        "FSDP2 (sharded weights, gradients, optimizer) for full fine-tuning; the batch is split across them. "
        "Empty: what the plan asks for, else every visible GPU. On a CPU, more than 1 runs gloo processes.",
    )


class EvaluationSettings(_Settings):
    metric: ScoreName = Field(
        "exact_match", description="Headline score, and the one the promotion gate compares: exact_match (case, "
        "punctuation and spaces normalised), rouge1/rouge2/rougeL, chrf, bleu, json_valid or json_match. "
        "Every score is in [0, 1], higher is better.",
    )
    metrics: list[MetricName] = Field(
        default_factory=lambda: ["exact_match"],
        description="Metric modules computed on generated answers (shipped locally, work offline): exact_match, "
        "rouge, chrf, bleu, json_valid. The module of `metric` is always added.",
    )
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Generation length for the task metrics.")
    max_generation_rows: int = Field(64, ge=1, description="Eval rows used for generation (loss uses all).")
    max_eval_rows: int | None = Field(
        None, ge=1, description="Cap on the eval rows used for eval loss (the first N); empty: all of them."
    )
    batch_size: int = Field(16, ge=1, description="Rows per batch for eval loss and generation.")
    examples_in_report: int = Field(4, ge=0, le=50, description="Base-vs-tuned answers shown in the report.")

    @model_validator(mode="after")
    def _include_the_headline_module(self) -> EvaluationSettings:
        # The headline score must be computed; adding its module beats failing a run over it.
        if module_of(self.metric) not in self.metrics:
            self.metrics = [*self.metrics, module_of(self.metric)]
        return self


class PublishSettings(_Settings):
    dtype: PublishDtype = Field(
        "float32",
        description="dtype of the merged weights. float32 publishes exactly the model that was evaluated; "
        "'base' keeps the base checkpoint's dtype (half the size for a bf16 base, but rounding can change "
        "greedy answers where the model is unsure).",
    )
    adapter_only: bool = Field(
        False, description="Publish only the LoRA/QLoRA adapter (small uploads when the consumer has the base); "
        "full fine-tuning has no adapter and always publishes the whole model.",
    )
    min_improvement: float = Field(
        0.0, description="Promotion gate: latest.json moves to this run only when its tuned score "
        "(evaluation.metric) is at least the base model's plus this much.",
    )
    max_regression: float | None = Field(
        None, ge=0, description="Promotion gate against the published model: when set and a run is already "
        "promoted (latest.json), that model is evaluated on the same rows too, and this run is promoted only "
        "if its score is at least the published one's minus this much. Empty: no comparison.",
    )
    max_eval_loss_increase: float | None = Field(
        None, ge=0, description="Promotion gate: block when the tuned eval loss exceeds the base's by more than "
        "this (guards a metric gain bought with a worse model). Empty: loss is not gated.",
    )
    max_shard_size_mb: int = Field(2048, ge=1, description="Largest safetensors shard of the merged model (MB).")
    multipart_chunk_mb: int = Field(
        64, ge=5, le=5120, description="S3 multipart part size (MB); files larger than one part go multipart."
    )
    max_concurrency: int = Field(8, ge=1, le=64, description="Parallel S3 requests while uploading or downloading.")


class DataSettings(_Settings):
    """What ingest does with rows that break a rule, and the thresholds of its checks."""

    on_invalid: Literal["fail", "quarantine"] = Field(
        "fail", description="'fail' stops the run on any bad row; 'quarantine' sets bad rows aside, with the "
        "reason for each, in the run's quarantine files, and trains on the rest.",
    )
    max_quarantined_fraction: float = Field(
        0.05, ge=0, le=1, description="With 'quarantine', fail anyway when more than this share of rows is bad.",
    )
    min_rows: int = Field(1, ge=1, description="Fewest usable rows a dataset (each split) must keep.")
    max_row_bytes: int = Field(1_000_000, ge=1, description="Rows larger than this (bytes of text) are rejected.")
    max_file_bytes: int = Field(
        20 * 2**30, ge=1, description="Largest data file accepted (bytes, from its size on disk or in S3, checked "
        "before anything is read): a bound on what an upload can make a run read. Default 20 GiB.",
    )
    max_rows: int = Field(
        50_000_000, ge=1, description="Most rows a dataset (data or eval_data, all its files together) may have; "
        "reading stops, and the run fails, at the block of rows that passes it.",
    )
    duplicates: Literal["reject", "allow"] = Field(
        "reject", description="Exact and normalised (case, whitespace) copies of an earlier row.",
    )
    leakage: Literal["reject", "allow"] = Field(
        "reject", description="Eval rows that also appear (normalised) in the training data.",
    )
    max_truncated_fraction: float = Field(
        1.0, ge=0, le=1, description="Fail when more than this share of rows is longer than max_seq_len tokens.",
    )


class ModelLoadingSettings(_Settings):
    """What a model folder may make this process do while it loads. Both are off: a model is data."""

    trust_remote_code: bool = Field(
        False, description="Run Python code shipped inside the model folder (auto_map in config.json). That code "
        "runs with the worker's permissions and credentials: turn on only for a folder you have read and trust.",
    )
    allow_pickle_weights: bool = Field(
        False, description="Accept pickle weight files (pytorch_model.bin, adapter_model.bin, .pt) when the folder "
        "has no safetensors. Unpickling can run arbitrary code: prefer converting the folder to safetensors.",
    )


class FinetuneConfig(_Settings):
    model: str = Field(description="Local folder of a Hugging Face causal LM (config.json, safetensors, tokenizer).")
    data: str = Field(description="Training data: a local path or s3://bucket/key (.jsonl, .json, .csv, .parquet).")
    data_etag: str | None = Field(
        None, description="S3 ETag `data` must still have (event-triggered runs set it from the upload event): "
        "a run whose object was overwritten since stops before training, since the newer upload has its own run. "
        "Empty: not checked.",
    )
    eval_data: str | None = Field(None, description="Held-out data; when empty, a split of `data` is used.")
    data_format: DataFormat = Field(
        "auto", description="Row format; 'auto' detects it from the columns."
    )
    eval_fraction: float = Field(0.1, gt=0, le=0.5, description="Share of `data` held out when no eval_data.")
    method: MethodChoice = Field(
        MethodChoice.AUTO, description="'auto' picks the best method that fits memory: full > lora > qlora."
    )
    memory_budget_gib: float | None = Field(
        None, gt=0, description="Memory to plan within; default: free GPU memory, or available RAM on CPU."
    )
    output: str = Field("outputs", description="Where runs are published: a local folder or s3://bucket/prefix.")
    work_dir: str = Field(".finetune-work", description="Local scratch folder for data, checkpoints and staging.")
    aws_credentials_secret: str | None = Field(
        None, description="Name of a Prefect Secret block holding S3 credentials as JSON: aws_access_key_id, "
        "aws_secret_access_key and, for temporary keys, aws_session_token. Empty: boto3's own chain "
        "(environment, instance or pod role, ~/.aws).",
    )
    publish: PublishSettings = Field(default_factory=PublishSettings)
    resume: bool = Field(
        False, description="Continue from the newest checkpoint in `output` of an earlier run with the same "
        "model, data and settings (a retry of the same flow run always continues from its own)."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    data_checks: DataSettings = Field(default_factory=DataSettings)
    model_loading: ModelLoadingSettings = Field(default_factory=ModelLoadingSettings)

    @model_validator(mode="after")
    def _check_locations(self) -> FinetuneConfig:
        # Collect every problem, then raise once (pydantic reports them all together).
        problems = []
        for name in ("data", "eval_data"):
            uri = getattr(self, name)
            if uri is None:
                continue
            if not uri.strip():
                problems.append(f"{name} is empty: give a local path or s3://bucket/key")
            elif is_s3_uri(uri) and not split_s3_uri(uri)[1]:
                problems.append(f"{name}={uri!r} names a bucket but no object: use s3://bucket/path/file.jsonl")
            elif not uri.lower().endswith(DATA_SUFFIXES) and not _is_folder(uri):
                problems.append(f"{name}={uri!r} has an unsupported suffix: use one of {', '.join(DATA_SUFFIXES)}, "
                                "or a folder / s3 prefix ending in '/'")
        if self.data_etag is not None and not is_s3_uri(self.data):
            problems.append(f"data_etag is set but data={self.data!r} is not an s3:// object: drop data_etag")
        if is_s3_uri(self.output) and not split_s3_uri(self.output)[0]:
            problems.append(f"output={self.output!r} has no bucket: use s3://bucket/prefix")
        if not self.model.strip():
            problems.append("model is empty: give the folder of a Hugging Face model")
        if problems:
            raise ValueError("; ".join(problems))
        return self

