"""The demo: teach SmolLM2-135M-Instruct facts about a made-up e-reader, on a CPU, in a few minutes.

Runs the `finetune` flow on Prefect's embedded temporary server and publishes to ./outputs.
    python demo/run.py [--output s3://bucket/prefix] [--method auto|full|lora|qlora] [--objective sft|dpo|orpo]
With --objective dpo (or orpo) it teaches a house style instead, from preference pairs
(demo/make_preference_data.py): answers that start with "Ahoy!".
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

# The embedded server's first start runs migrations; give it time on a slow machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the Hub
# peft still reads a transformers attribute that warns of its v6 rename on every model load.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def demo_config(model: str, output: str, method: str):
    from tasks.config import FinetuneConfig

    return FinetuneConfig(
        model=model,
        data=str(ROOT / "demo" / "data" / "train.jsonl"),
        eval_data=str(ROOT / "demo" / "data" / "eval.jsonl"),
        method=method,
        output=output,
        work_dir=str(ROOT / ".finetune-work"),
        lora={"r": 16, "alpha": 32, "dropout": 0.0},
        training={"learning_rate": 1e-3, "lr_schedule": "constant", "max_steps": 20, "batch_size": 8,
                  "micro_batch_size": 8, "max_seq_len": 256, "eval_every": 5, "early_stopping_patience": 2},
        evaluation={"max_new_tokens": 32, "max_generation_rows": 16, "batch_size": 16, "examples_in_report": 4,
                    "metric": "exact_match", "metrics": ["exact_match", "rouge", "chrf"]},
    )


def demo_preference_config(model: str, output: str, method: str, objective: str = "dpo"):
    """The house-style preference demo: 40 training pairs, 16 held out, gated on preference accuracy."""
    from tasks.config import FinetuneConfig

    return FinetuneConfig(
        model=model,
        data=str(ROOT / "demo" / "data" / "preference_train.jsonl"),
        eval_data=str(ROOT / "demo" / "data" / "preference_eval.jsonl"),
        objective=objective,
        # DPO alone lowers both answers' likelihood here (they differ only by "Ahoy!"), and the model
        # then answers "Ahoy! Ahoy! Ahoy!"; the chosen answers' NLL (RPO) keeps the facts after it
        preference={"beta": 0.1, "sft_weight": 1.0},
        method=method,
        output=output,
        work_dir=str(ROOT / ".finetune-work"),
        lora={"r": 16, "alpha": 32, "dropout": 0.0},
        # 10 steps: held-out preference accuracy reaches 1.0 (about 90 s on a 2-core CPU)
        training={"learning_rate": 1e-3, "lr_schedule": "constant", "max_steps": 10, "batch_size": 8,
                  "micro_batch_size": 16, "max_seq_len": 256, "eval_every": 5, "early_stopping_patience": 2},
        evaluation={"max_new_tokens": 16, "max_generation_rows": 8, "batch_size": 16, "examples_in_report": 4,
                    "metric": "preference_accuracy", "metrics": ["exact_match", "chrf"]},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "outputs"))
    parser.add_argument("--method", default="lora", choices=["auto", "full", "lora", "qlora"])
    parser.add_argument("--objective", default="sft", choices=["sft", "dpo", "orpo"])
    args = parser.parse_args()

    from demo.prepare_model import ensure_smollm2
    from flows.finetune import finetune

    model = ensure_smollm2()
    if args.objective == "sft":
        config = demo_config(str(model), args.output, args.method)
    else:
        config = demo_preference_config(str(model), args.output, args.method, args.objective)
    result = finetune(config)
    print("\n" + "=" * 72)
    print(f"run {result.run_id} ({result.method}) published to {result.output_uri}")
    print(result.summary)
    print("=" * 72)
    if result.tuned_score <= result.base_score:
        sys.exit("the tuned model did not beat the base model on held-out questions")


if __name__ == "__main__":
    main()
