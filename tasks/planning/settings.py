"""How a run trains: the LoRA adapter and the optimisation settings. The planner sizes micro-batches from
them and the engine trains with them; tasks/config.py gathers them into the run's config."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown keys are typos (`learning_rte`): rejected
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


class TrainingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown keys are typos (`learning_rte`): rejected
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
    full_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Full fine-tuning only. 'fp32': fp32 master weights and AdamW moments under bf16 autocast "
        "(16 bytes a parameter). 'bf16': bf16 weights, gradients and moments, each update computed in fp32 and "
        "rounded stochastically, so small updates are not lost (8 bytes a parameter). 'auto': fp32 where it trains "
        "without gradient checkpointing, else bf16 where that recomputes less (one GPU).",
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


Objective = Literal["sft", "dpo", "orpo"]
PREFERENCE_OBJECTIVES = ("dpo", "orpo")  # the objectives that train on preference pairs


class PreferenceSettings(BaseModel):
    """DPO's and ORPO's knobs (tasks/engine/preference.py); read only when `objective` is dpo or orpo."""
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(
        0.1, gt=0, le=100, description="DPO: how far the tuned model may move from the reference (the base); "
        "higher keeps it closer. Also the scale of the implicit rewards in the evaluation's reward margin.",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="DPO: the share of pairs assumed to be labelled the wrong way round "
        "(conservative DPO); 0 trusts every label.",
    )
    sft_weight: float = Field(
        0.0, ge=0, le=100, description="DPO: weight of the chosen answers' mean token NLL added to the loss (RPO; "
        "TRL's loss_type ['sigmoid', 'sft'] with loss_weights [1, w]). DPO alone can push both answers' "
        "likelihood down when they differ little, so generation degrades; 0.2-1 keeps the chosen answers likely.",
    )
    orpo_lambda: float = Field(
        0.1, gt=0, le=100, description="ORPO: weight of the odds-ratio term next to the chosen answer's NLL "
        "(the paper's lambda; TRL's ORPOConfig.beta).",
    )
