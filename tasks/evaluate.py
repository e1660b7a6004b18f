"""Stage 4, evaluate: the base and the tuned model on the same held-out rows, in the same run."""
from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.config import FinetuneConfig
from tasks.dataset import read_conversations
from tasks.ingest import IngestResult
from tasks.plan import PlanResult
from tasks.tokenization import encode_all, load_tokenizer
from tasks.train import TrainResult


class EvalResult(BaseModel):
    label: str
    loss: float
    perplexity: float
    metric: str
    score: float
    eval_rows: int
    generated_rows: int
    answers: list[dict]


@task(name="evaluate", task_run_name="evaluate-{label}", cache_policy=NO_CACHE)
def evaluate(config: FinetuneConfig, data: IngestResult, planned: PlanResult, label: str,
             trained: TrainResult | None = None) -> EvalResult:
    from tasks.evaluation import evaluate_model
    from tasks.modeling import load_for_inference

    device = planned.plan.device
    # Evaluate in the precision the run trained in: a QLoRA plan means a bf16 base may not fit.
    quantized = planned.plan.method == "qlora"
    tokenizer = load_tokenizer(config.model)
    _, conversations = read_conversations(data.eval_path)
    examples = encode_all(tokenizer, conversations, config.training.max_seq_len)
    if trained is None:
        model = load_for_inference(config.model, device, quantized=quantized)
    elif trained.is_adapter:
        model = load_for_inference(config.model, device, adapter=trained.checkpoint_dir, quantized=quantized)
    else:
        model = load_for_inference(trained.checkpoint_dir, device)
    scores = evaluate_model(model, tokenizer, conversations, examples, config.evaluation, device)
    metric = config.evaluation.metric
    get_run_logger().info("%s: eval loss %.4f, perplexity %.2f, %s %.3f (%d generated answers)", label,
                          scores["loss"], scores["perplexity"], metric, scores[metric], scores["generated_rows"])
    return EvalResult(label=label, loss=scores["loss"], perplexity=scores["perplexity"], metric=metric,
                      score=scores[metric], eval_rows=scores["eval_rows"], generated_rows=scores["generated_rows"],
                      answers=scores["answers"])
