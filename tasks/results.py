"""What the stages hand each other: one module, so a stage depends on these types and never on
another stage. Pure (pydantic only), so flows, workers and tests can read them without Prefect or torch."""
from __future__ import annotations

from pydantic import BaseModel

from tasks.planning.methods import Method
from tasks.planning.selector import TrainingPlan


class TrackedRun(BaseModel):
    """The MLflow run that tracks a flow run (tasks/track.py); run_id None: the server could not be reached."""
    uri: str
    experiment_id: str | None = None
    run_id: str | None = None
    url: str | None = None  # the run's page in the MLflow UI
    model_version: str | None = None  # of the registered model, once promoted


class TrackingReport(BaseModel):
    """What MLflow tracking did in a flow run (tasks/track.py)."""
    url: str | None  # the MLflow run's page; None: no run could be created
    model_version: str | None = None  # registered when the run was promoted
    missed: list[str] = []  # what could not be logged (also the `mlflow-tracking` artifact)
    seconds: float  # spent in MLflow calls, the first import of mlflow included


class RunInfo(BaseModel):
    run_id: str
    flow_run_id: str | None
    run_dir: str  # local scratch: data splits, checkpoints, the staged run folder
    output_uri: str  # where the finished run folder is published: <output>/runs/<run-id>
    started_at: str
    tracking: TrackedRun | None = None  # with `tracking.uri` set; recorded in the manifest's "run"


class DataSource(BaseModel):
    uri: str
    sha256: str
    rows: int  # rows kept
    data_format: str
    format_evidence: str
    read: int = 0
    quarantined: int = 0
    problems: dict[str, int] = {}  # rule -> rows that broke it
    validation: str = "ran"  # or "cached"
    hub: dict | None = None  # a Hugging Face Hub dataset: repo_id, config, split, requested_revision, commit, endpoint


class IngestResult(BaseModel):
    train_path: str
    eval_path: str
    train_rows: int
    eval_rows: int
    sources: list[DataSource]
    eval_origin: str  # "held-out file" or how the split was made
    quarantine_paths: list[str] = []  # one JSONL per source with bad rows: row, reasons, data
    mix: dict | None = None  # `data` as a list: each source's weight or cap, usable rows and rows taken (tasks.data.mixing)
    token_lengths: dict[str, dict] = {}  # split -> histogram, share truncated, tokens lost (tasks.data.tokenization)


class PlanResult(BaseModel):
    plan: TrainingPlan
    token_stats: dict
    model_parameters: int
    model_type: str


class TrainResult(BaseModel):
    """What the train task hands on: the engine's TrainOutcome (tasks/engine/train_loop.py, which imports
    torch and so cannot be imported here) plus where the checkpoint is and what it holds."""
    method: Method
    checkpoint_dir: str  # the best checkpoint: a peft adapter, or a whole model for full fine-tuning
    steps: int
    best_step: int
    best_eval_loss: float
    stopped_early: bool
    seconds: float
    trained_tokens: int
    processed_tokens: int
    resumed_from_step: int
    resumed_from: str | None
    trainable_parameters: int
    total_parameters: int
    peak_memory_bytes: int  # the largest of the processes' peaks when several trained
    peak_memory_kind: str
    peak_allocated_bytes: int
    history: list[dict]
    tokens_per_micro_batch: int  # as trained: the plan's, unless an out-of-memory error lowered it
    gradient_checkpointing: bool
    checkpointed_layers: int | None = None  # with checkpointing, only the first this many layers (None: all)
    memory_step_downs: list[dict]  # each out-of-memory error and what was tried next
    world_size: int = 1  # training processes (GPUs) across every machine


class ExportResult(BaseModel):
    """The model as it will be published, staged before anything is scored: the tuned evaluation loads this
    folder, so the gate scores exactly what is published (a QLoRA run's merge into the full-precision base,
    in the published dtype; not the 4-bit base + adapter it trained)."""
    folder: str  # <run_dir>/publish: adapter/ (LoRA, QLoRA) and merged/ (unless publish.adapter_only)
    verification: dict  # the export's checks (tasks/engine/export.py), or {"adapter_only": True}


class EvalResult(BaseModel):
    label: str  # base, tuned or published
    loss: float
    perplexity: float
    metric: str  # the headline score's name (evaluation.metric)
    score: float  # scores[metric]
    scores: dict[str, float]  # every score of the chosen metric modules
    eval_rows: int
    generated_rows: int
    answers: list[dict]
    run_id: str | None = None  # for the published model: which run it is
    from_cache: str | None = None  # the stored score it was read from (tasks/store/score_cache.py); None: scored here
    pair_logps: list[list[float]] | None = None  # preference runs: [chosen, rejected] summed log-probs per eval pair
    scored_as: dict = {}  # the weights scored and their dtype, e.g. {"weights": "merged", "dtype": "bfloat16"}
