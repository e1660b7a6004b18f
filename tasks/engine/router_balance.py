"""The router's load-balancing loss of a mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), as training runs.

The Switch Transformer auxiliary loss (transformers' `load_balancing_loss_func`): the number of experts
times the sum over experts of (share of tokens routed there) x (mean router probability), about
top-k when tokens spread evenly, higher as they crowd onto few experts. Every training micro-batch
measures it; the trainer reports its token-weighted mean per step (`router_balance_loss` in the
history, so the manifest and the report carry it). It joins the objective only as transformers adds
it: when the config sets `output_router_logits` (weighed by `router_aux_loss_coef`) and the router
trains, i.e. full fine-tuning. LoRA leaves the router frozen (tasks/engine/modeling.MOE_LORA_TARGETS),
so there it is a reading of how the frozen router spreads the new data.
"""
from __future__ import annotations

import weakref

import torch

from tasks.engine.modeling import EXPERT_COUNT_FIELDS

_READINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [(loss, tokens)] this step


def experts_of(config) -> tuple[int, int] | None:
    """(experts, experts per token) of a mixture-of-experts config, else None."""
    experts = next((getattr(config, n) for n in EXPERT_COUNT_FIELDS if getattr(config, n, None)), None)
    return (experts, config.num_experts_per_tok) if experts and getattr(config, "num_experts_per_tok", None) else None


def router_outputs_wanted(model) -> dict:
    """Keyword arguments for the decoder: the router logits, while a mixture of experts trains."""
    if model.training and torch.is_grad_enabled() and experts_of(model.config):
        return {"output_router_logits": True}
    return {}


def add_balance_loss(model, outputs, loss: torch.Tensor, trainable_tokens: int) -> torch.Tensor:
    """Record this micro-batch's balance loss; return `loss` (a sum over answer tokens) with it added
    where it belongs to the objective (module docstring), weighed per answer token like the loss."""
    router_logits = getattr(outputs, "router_logits", None)
    if not router_logits:
        return loss
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # the same in every MoE family

    experts, top_k = experts_of(model.config)
    balance = load_balancing_loss_func(router_logits, experts, top_k)
    _READINGS.setdefault(model, []).append((balance.detach(), trainable_tokens))
    if getattr(model.config, "output_router_logits", False) and _router_trains(model):
        coefficient = getattr(model.config, "router_aux_loss_coef", 0.0)
        loss = loss + coefficient * balance.to(loss.dtype) * trainable_tokens
    return loss


def step_balance_loss(model) -> float | None:
    """The token-weighted mean balance loss of the micro-batches since the last call (None: no MoE)."""
    readings = _READINGS.pop(model, None)
    if not readings:
        return None
    tokens = sum(n for _, n in readings)
    return float(sum(value * n for value, n in readings) / max(tokens, 1))


def _router_trains(model) -> bool:
    """Whether a router (`mlp.gate`, in every MoE family transformers has) has trainable weights."""
    return any(p.requires_grad for name, p in model.named_parameters() if name.endswith("mlp.gate.weight"))
