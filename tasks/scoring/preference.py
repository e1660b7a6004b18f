"""Scores of a model on held-out preference pairs, from its summed answer log-probs. Pure.

The implicit reward of an answer is beta * (log p_model - log p_reference), DPO's reward, with the
base model as the reference for every model scored (base, tuned, published), so the scores compare.
The base's own rewards are 0, so its preference accuracy is 0 by definition (TRL's
`rewards/accuracies` counts a tie as wrong too); `logp_accuracy`, the share of pairs whose chosen
answer the model finds more likely outright, is the figure that base and tuned both have.
"""
from __future__ import annotations


def pair_scores(logps: list[list[float]], reference: list[list[float]], beta: float) -> dict[str, float]:
    """`logps`, `reference`: [chosen, rejected] summed log-probs per pair, in the same order."""
    if len(logps) != len(reference):
        raise ValueError(f"{len(logps)} pairs scored against {len(reference)} reference pairs: the eval split changed "
                         "between the base's evaluation and this one")
    n = max(len(logps), 1)
    rewards = [(beta * (c - rc), beta * (r - rr)) for (c, r), (rc, rr) in zip(logps, reference)]
    return {
        "preference_accuracy": sum(c > r for c, r in rewards) / n,
        "reward_margin": sum(c - r for c, r in rewards) / n,
        "logp_accuracy": sum(c > r for c, r in logps) / n,
        "chosen_logps": sum(c for c, _ in logps) / n,
        "rejected_logps": sum(r for _, r in logps) / n,
    }
