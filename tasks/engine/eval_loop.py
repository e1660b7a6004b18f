"""Held-out evaluation: loss and perplexity on the answers, and task metrics on generated answers."""
from __future__ import annotations

import math

import torch

from tasks.data.tokenization import Example, generation_task
from tasks.engine.train_loop import mean_loss
from tasks.scoring.metrics import compute_metrics
from tasks.scoring.settings import EvaluationSettings


@torch.no_grad()
def generate_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int,
                     batch_size: int, device: str) -> list[str]:
    """Greedy answers to each conversation's last question (or continuations of each plain-text row's
    first half: tokenization.generation_task), batched with left padding."""
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    answers = []
    for start in range(0, len(conversations), batch_size):
        prompts = [generation_task(tokenizer, c)[0] for c in conversations[start:start + batch_size]]
        batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def evaluate_model(model, tokenizer, conversations: list[list[dict]], examples: list[Example],
                   settings: EvaluationSettings, device: str) -> dict:
    """Eval loss and perplexity on (at most `max_eval_rows`) rows, the chosen metrics on generated answers."""
    examples = examples[: settings.max_eval_rows]  # None: all
    capacity = settings.batch_size * max(len(e.input_ids) for e in examples)  # rows per pass, packed
    loss = mean_loss(model, examples, capacity, device)
    chosen = conversations[: settings.max_generation_rows]
    predictions = generate_answers(model, tokenizer, chosen, settings.max_new_tokens, settings.batch_size, device)
    references = [generation_task(tokenizer, c)[1] for c in chosen]
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "scores": compute_metrics(settings.metrics, predictions, references),
        "eval_rows": len(examples),
        "generated_rows": len(chosen),
        "answers": [
            {"question": c[-2]["content"] if len(c) > 1 else c[-1]["content"][: -len(r) or None].strip(),
             "reference": r, "prediction": p}
            for c, r, p in zip(chosen, references, predictions)
        ],
    }


@torch.no_grad()
def pair_log_probs(model, pairs: list, token_capacity: int, device: str) -> list[list[float]]:
    """[chosen, rejected] summed answer log-probs of every held-out pair, in order (packed micro-batches)."""
    from tasks.engine.preference import pair_logps, shares_prompts, stream_tokens

    model.eval()
    share = shares_prompts(model, device)
    out, start = [], 0
    while start < len(pairs):  # in order: consecutive pairs up to the capacity (at least one)
        end, used = start + 1, stream_tokens(pairs[start], share)
        while end < len(pairs) and used + stream_tokens(pairs[end], share) <= token_capacity:
            used, end = used + stream_tokens(pairs[end], share), end + 1
        scores = pair_logps(model, pairs[start:end], device)
        out += [[c, r] for c, r in zip(scores.chosen.tolist(), scores.rejected.tolist())]
        start = end
    return out
