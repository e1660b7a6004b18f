"""The fine-tuning run's parameters: one typed pydantic model.

The flow takes a single `FinetuneConfig`, so the Prefect UI renders it as a form (Literal fields
become dropdowns) and the server rejects values outside the JSON schema (types, enums, bounds)
before a run is created; the cross-field checks below run when the flow starts, before any task.
Pure: no Prefect, no torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.data.settings import DataFormat, DataSettings
from tasks.data.sources import DATA_SUFFIXES
from tasks.planning.methods import Method, MethodChoice
from tasks.planning.settings import PREFERENCE_OBJECTIVES, LoraSettings, Objective, PreferenceSettings, TrainingSettings
from tasks.scoring.metrics import PAIR_SCORES
from tasks.scoring.settings import EvaluationSettings
from tasks.store.hub import HubSettings, ResolvedModel, model_problem
from tasks.store.objects import is_s3_uri, split_s3_uri
from tasks.store.weight_safety import ModelLoadingSettings

# The settings of each part live with the part that uses them; imported here, they make up the run's config
# (and `from tasks.config import TrainingSettings` keeps working).
__all__ = ["DataFormat", "DataSettings", "EvaluationSettings", "FinetuneConfig", "HubSettings", "LoraSettings",
           "Method", "MethodChoice", "ModelLoadingSettings", "Objective", "PreferenceSettings", "PublishSettings",
           "TrainingSettings"]


PublishDtype = Literal["float32", "bfloat16", "float16", "base"]


def _is_folder(uri: str) -> bool:
    """A folder of data files (or a saved `datasets` folder), or an s3:// prefix ending in '/'."""
    return uri.endswith("/") or (not is_s3_uri(uri) and Path(uri).is_dir())


class _Settings(BaseModel):
    # Unknown keys are typos (e.g. `learning_rte`): reject them instead of silently ignoring.
    model_config = ConfigDict(extra="forbid")


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


class FinetuneConfig(_Settings):
    model: str = Field(
        description="The causal LM to fine-tune: a Hugging Face Hub id (org/name, e.g. Qwen/Qwen2.5-0.5B-Instruct), "
        "downloaded into the Hub cache (see `hub`), or a local folder of a Hugging Face model (config.json, "
        "safetensors, tokenizer). A folder that exists wins over a Hub id of the same spelling.",
    )
    model_revision: str | None = Field(
        None, description="For a Hub id: the branch, tag or commit sha to use (as transformers' `revision=`). "
        "Empty: the repo's default branch; the commit it resolved to is recorded in the manifest and model card.",
    )
    hub: HubSettings = Field(default_factory=HubSettings)
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
    objective: Objective = Field(
        "sft", description="'sft' learns the answers of chat, instruction, prompt/completion or text rows; 'dpo' "
        "and 'orpo' learn from preference rows (prompt, chosen, rejected): DPO against the base model as the "
        "reference, ORPO without one. See `preference` for their settings.",
    )
    preference: PreferenceSettings = Field(default_factory=PreferenceSettings)
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
            problems.append("model is empty: give a Hugging Face Hub id (org/name) or the folder of a Hugging Face "
                            "model")
        elif problem := model_problem(self.model, self.model_revision):
            problems.append(problem)
        problems += self._objective_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _objective_problems(self) -> list[str]:
        """The objective, the row format and the gate's metric must agree (ingest checks detected formats)."""
        problems = []
        preference = self.objective in PREFERENCE_OBJECTIVES
        if self.data_format == "preference" and not preference:
            problems.append("data_format is 'preference' but objective is 'sft': set objective to 'dpo' or 'orpo' "
                            "to learn from the pairs, or give chat rows (the prompt, then the chosen answer) for SFT")
        if preference and self.data_format not in ("auto", "preference"):
            problems.append(f"objective {self.objective!r} learns from preference rows (prompt, chosen, rejected) "
                            f"but data_format is {self.data_format!r}: set data_format to 'preference' or 'auto', "
                            "or set objective to 'sft'")
        if self.evaluation.metric in PAIR_SCORES and not preference:
            problems.append(f"evaluation.metric {self.evaluation.metric!r} scores preference pairs, but objective is "
                            "'sft': choose a metric of generated answers (e.g. exact_match), or objective dpo/orpo")
        if preference and (self.training.num_gpus or 1) > 1:
            problems.append(f"objective {self.objective!r} trains in one process for now: set training.num_gpus to "
                            "1 (or leave it empty on a one-GPU machine)")
        return problems

    def with_local_model(self, model: ResolvedModel) -> FinetuneConfig:
        """This run with `model` read from the local folder it resolved to (a Hub id's snapshot in the cache);
        not validated again: the folder is where the validated id led."""
        return self.model_copy(update={"model": model.path, "model_revision": None})
