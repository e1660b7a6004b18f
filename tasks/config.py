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

from tasks.data.hub_datasets import hub_problem, is_hub_dataset
from tasks.data.settings import DataFormat, DataSettings, DataSourceSpec
from tasks.data.sources import DATA_SUFFIXES
from tasks.planning.methods import Method, MethodChoice
from tasks.planning.settings import PREFERENCE_OBJECTIVES, LoraSettings, Objective, PreferenceSettings, TrainingSettings
from tasks.reports.settings import ArtifactSettings
from tasks.scoring.metrics import PAIR_SCORES
from tasks.scoring.settings import EvaluationSettings
from tasks.store.base_run import model_spelling_problem
from tasks.store.hub import HubSettings, ResolvedModel
from tasks.store.objects import is_s3_uri, split_s3_uri
from tasks.store.weight_safety import ModelLoadingSettings
from tasks.tracking.settings import TrackingSettings

# The settings of each part live with the part that uses them; imported here, they make up the run's config
# (and `from tasks.config import TrainingSettings` keeps working).
__all__ = ["ArtifactSettings", "DataFormat", "DataSettings", "DataSourceSpec", "EvaluationSettings", "FinetuneConfig",
           "HubSettings", "LoraSettings", "Method", "MethodChoice", "ModelLoadingSettings", "Objective",
           "PreferenceSettings", "PublishSettings", "TrackingSettings", "TrainingSettings"]


PublishDtype = Literal["float32", "bfloat16", "float16", "base"]


def _is_folder(uri: str) -> bool:
    """A folder of data files (or a saved `datasets` folder), or an s3:// prefix ending in '/'."""
    return uri.endswith("/") or (not is_s3_uri(uri) and Path(uri).is_dir())


def _location_problem(name: str, uri: str) -> str | None:
    """What is wrong with a data location, with the fix; None when it can be read."""
    if not uri.strip():
        return f"{name} is empty: give a local path, s3://bucket/key or hf://datasets/<org>/<name>"
    if is_hub_dataset(uri):
        problem = hub_problem(uri)
        return f"{name}: {problem}" if problem else None
    if is_s3_uri(uri) and not split_s3_uri(uri)[1]:
        return f"{name}={uri!r} names a bucket but no object: use s3://bucket/path/file.jsonl"
    if not uri.lower().endswith(DATA_SUFFIXES) and not _is_folder(uri):
        return (f"{name}={uri!r} has an unsupported suffix: use one of {', '.join(DATA_SUFFIXES)}, a folder / s3 "
                "prefix ending in '/', or a Hub dataset hf://datasets/<org>/<name>")
    return None


def result_storage_problem(value: str) -> str | None:
    """Why `value` is not an s3://bucket/prefix, an absolute folder or a 'block-type/name' slug, else None."""
    if is_s3_uri(value):
        return None if split_s3_uri(value)[0] else f"result_storage={value!r} has no bucket: use s3://bucket/prefix"
    if Path(value).expanduser().is_absolute():
        return None
    if value.count("/") == 1 and all(part.strip() for part in value.split("/")):
        return None
    return (f"result_storage={value!r} is not an s3://bucket/prefix, an absolute folder or a storage block "
            "'block-type/name' (e.g. 's3-bucket/results')")


class _Settings(BaseModel):
    # Unknown keys are typos (e.g. `learning_rte`): reject them instead of silently ignoring.
    model_config = ConfigDict(extra="forbid")


class PublishSettings(_Settings):
    dtype: PublishDtype = Field(
        "float32",
        description="dtype of the merged weights, and the dtype every model is scored in: the gate scores the "
        "merged folder as saved (QLoRA included: not the 4-bit base it trained on) and the base in this dtype. "
        "float32 is exact; 'base' keeps the base checkpoint's dtype (half the size for a bf16 base, but "
        "rounding can change greedy answers where the model is unsure).",
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
        "safetensors, tokenizer), or a run published in `output` as run:<run-id> (run:latest: the promoted run), "
        "e.g. an SFT run to start DPO from: its merged model, checked against its manifest. A folder that exists "
        "wins over a Hub id or run of the same spelling.",
    )
    model_revision: str | None = Field(
        None, description="For a Hub id: the branch, tag or commit sha to use (as transformers' `revision=`). "
        "Empty: the repo's default branch; the commit it resolved to is recorded in the manifest and model card.",
    )
    hub: HubSettings = Field(default_factory=HubSettings)
    data: str | list[DataSourceSpec] = Field(
        description="Training data: a local path or s3://bucket/key (.jsonl, .json, .csv, .parquet), or a Hugging "
        "Face Hub dataset as hf://datasets/<org>/<name> (its train split); or a list of sources to mix, each with "
        "a weight or a row cap (max_rows), and for a Hub dataset its config, split and revision.",
    )
    data_etag: str | None = Field(
        None, description="S3 ETag `data` must still have (event-triggered runs set it from the upload event): "
        "a run whose object was overwritten since stops before training, since the newer upload has its own run. "
        "Empty: not checked.",
    )
    eval_data: str | None = Field(None, description="Held-out data (a path, s3:// or hf://datasets/ URI); when "
                                  "empty, a split of `data` (of the mix, for a list) is used.")
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
    aws_credentials_block: str | None = Field(
        None, description="Name of a prefect-aws AwsCredentials block: its keys (or profile), role to assume, "
        "region and S3 endpoint are used for every S3 call of the run, the training processes included. "
        "Use this or aws_credentials_secret, not both.",
    )
    result_storage: str | None = Field(
        None, description="Where the cached data-validation result is kept, so any worker can reuse it: an "
        "s3://bucket/prefix, an absolute local folder, or a Prefect storage block as 'block-type/name' (e.g. "
        "'s3-bucket/results'). Empty: <output>/prefect-results when output is on S3, else Prefect's local "
        "result storage.",
    )
    artifacts: ArtifactSettings = Field(default_factory=ArtifactSettings)
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
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)

    @model_validator(mode="after")
    def _check_locations(self) -> FinetuneConfig:
        # Collect every problem, then raise once (pydantic reports them all together).
        problems = []
        sources = self.data if isinstance(self.data, list) else []
        named = [("data", self.data)] if isinstance(self.data, str) else \
            [(f"data[{i}].path", s.path) for i, s in enumerate(sources)]
        for name, uri in named + ([("eval_data", self.eval_data)] if self.eval_data is not None else []):
            if problem := _location_problem(name, uri):
                problems.append(problem)
        if isinstance(self.data, list) and not self.data:
            problems.append("data is an empty list: give at least one source (path and weight)")
        seen = set()
        for i, source in enumerate(sources):
            key = (source.path, source.config, source.split)
            if key in seen:
                problems.append(f"data[{i}]: {source.path!r} is listed twice: keep one entry (its rows would be "
                                "drawn twice)")
            seen.add(key)
        if self.data_etag is not None and not (isinstance(self.data, str) and is_s3_uri(self.data)):
            problems.append(f"data_etag is set but data={self.data_label!r} is not an s3:// object: drop data_etag")
        if is_s3_uri(self.output) and not split_s3_uri(self.output)[0]:
            problems.append(f"output={self.output!r} has no bucket: use s3://bucket/prefix")
        if self.aws_credentials_secret and self.aws_credentials_block:
            problems.append("aws_credentials_secret and aws_credentials_block are both set: keep one")
        if self.result_storage is not None and (problem := result_storage_problem(self.result_storage)):
            problems.append(problem)
        if not self.model.strip():
            problems.append("model is empty: give a Hugging Face Hub id (org/name) or the folder of a Hugging Face "
                            "model")
        elif problem := model_spelling_problem(self.model, self.model_revision):
            problems.append(problem)
        problems += self._objective_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def data_sources(self) -> list[DataSourceSpec]:
        """`data` as a list of sources: a single path is the whole of the mix (weight 1)."""
        if isinstance(self.data, list):
            return self.data
        return [DataSourceSpec(path=self.data, weight=1.0)]

    @property
    def data_label(self) -> str:
        """`data` in words, for messages: the path, or the mix's paths."""
        return self.data if isinstance(self.data, str) else " + ".join(s.path for s in self.data)

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
        if self.preference.sft_weight and self.objective != "dpo":
            problems.append(f"preference.sft_weight={self.preference.sft_weight} adds the chosen answers' NLL to DPO's "
                            f"loss, but objective is {self.objective!r}"
                            f"{' (ORPO has that NLL already; its weight is orpo_lambda)' if self.objective == 'orpo' else ''}"
                            ": set it to 0, or objective to 'dpo'")
        if preference and (self.training.num_gpus or 1) > 1:
            problems.append(f"objective {self.objective!r} trains in one process for now: set training.num_gpus to "
                            "1 (or leave it empty on a one-GPU machine)")
        if self.training.full_precision == "bf16" and (self.training.num_gpus or 1) > 1:
            problems.append("training.full_precision 'bf16' trains in one process for now: set training.num_gpus to 1, "
                            "or full_precision to 'fp32' or 'auto' (auto keeps fp32 on several GPUs)")
        return problems

    def with_local_model(self, model: ResolvedModel) -> FinetuneConfig:
        """This run with `model` read from the local folder it resolved to (a Hub id's snapshot in the cache);
        not validated again: the folder is where the validated id led."""
        return self.model_copy(update={"model": model.path, "model_revision": None})
