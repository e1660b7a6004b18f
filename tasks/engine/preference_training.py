"""What the training loop (tasks/engine/train_loop.py) runs for `objective: dpo | orpo`: the step's
backward over preference pairs, and the eval loss that picks the best model.

A step's pairs are cut into micro-batches of at most the plan's token capacity, a pair's two sides
always together (tasks/engine/preference.py packs them without cross-attention); each micro-batch's
mean loss is weighted by its share of the step's pairs, so the gradient is that of one batch of all
pairs. DPO's reference log-probs depend only on the pair (the reference never trains), so each pair's
are computed once, the first time it is seen (in the first epoch), and kept: later epochs and
evaluations run the policy alone. Kept per pair they are two floats, so they always fit.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from tasks.data.preference import PairExample
from tasks.engine.packing import micro_batches
from tasks.engine.preference import (PairLogps, PreferenceLoss, dpo_loss, orpo_loss, reference_logps, shares_prompts,
                                     stream_tokens)
from tasks.planning.methods import Method
from tasks.planning.settings import PreferenceSettings
from tasks.store.weight_safety import SAFE


def pair_tokens(pair: PairExample) -> int:
    """A pair's tokens: both sides whole (what throughput counts, as a padded [chosen; rejected] batch holds them)."""
    return len(pair.chosen.input_ids) + len(pair.rejected.input_ids)


def micro_batches_of_pairs(model, pairs: list[PairExample], token_capacity: int, device: str) -> list[list]:
    """Micro-batches of at most `token_capacity` tokens through the model (a shared prompt counts once)."""
    share = shares_prompts(model, device)
    return micro_batches(pairs, token_capacity, size=lambda pair: stream_tokens(pair, share))


def pair_key(pair: PairExample) -> bytes:
    """A pair's identity for the reference cache: the token ids (and targets) of both sides."""
    digest = hashlib.blake2b(digest_size=16)
    for example in (pair.chosen, pair.rejected):
        digest.update(torch.tensor(example.input_ids + [-7] + example.labels, dtype=torch.int64).numpy().tobytes())
    return digest.digest()


@dataclass
class PreferenceObjective:
    objective: str  # "dpo" or "orpo"
    settings: PreferenceSettings
    device: str
    reference: object = None  # DPO with full fine-tuning: a frozen copy; None: the adapter switched off
    cache: dict = field(default_factory=dict, repr=False)  # pair_key -> (chosen, rejected) reference log-probs
    reference_passes: int = 0  # forwards the reference ran (what the cache saves)

    def tokens(self, pairs: list[PairExample]) -> int:
        return sum(pair_tokens(p) for p in pairs)

    def trainable_tokens(self, pairs: list[PairExample]) -> int:
        return sum(p.chosen.trainable_tokens + p.rejected.trainable_tokens for p in pairs)

    def loss(self, model, pairs: list[PairExample]) -> PreferenceLoss:
        """The mean loss over `pairs` (one packed forward of the policy)."""
        if self.objective == "orpo":
            return orpo_loss(model, pairs, self.device, self.settings.orpo_lambda)
        return dpo_loss(model, pairs, self.device, self.settings.beta, self.settings.label_smoothing,
                        reference_scores=self.reference_scores(model, pairs), sft_weight=self.settings.sft_weight)

    def layout(self, model) -> str:
        """How pairs go through `model`, for the log (measured now, on the model, once)."""
        if shares_prompts(model, self.device):
            return "each pair's prompt runs once (shared by both answers; measured exact on this model)"
        attention = getattr(model.config, "_attn_implementation", "?")
        return f"both sides of a pair whole, prompt twice (attention {attention} cannot share a prompt exactly)"

    def reference_scores(self, model, pairs: list[PairExample]) -> PairLogps:
        """The reference's log-probs of `pairs`: from the cache, computing (in eval mode, no graph) only
        the pairs not seen before."""
        missing = list({pair_key(p): p for p in pairs if pair_key(p) not in self.cache}.items())
        if missing:
            was_training = model.training
            model.eval()  # the reference is the model as it scores, without dropout
            try:
                scores = reference_logps(model, [p for _, p in missing], self.device, self.reference)
            finally:
                model.train(was_training)
            self.reference_passes += 1
            for i, (key, _) in enumerate(missing):
                self.cache[key] = (scores.chosen[i].item(), scores.rejected[i].item())
        values = torch.tensor([self.cache[pair_key(p)] for p in pairs], dtype=torch.float32, device=self.device)
        return PairLogps(values[:, 0], values[:, 1], None, None)

    def accumulate(self, model, pairs: list[PairExample], token_capacity: int) -> tuple[float, int, dict]:
        """Backward over `pairs` in micro-batches; returns (summed loss, pairs, the step's accuracy and margin)."""
        loss_sum, right, margin = 0.0, 0.0, 0.0
        for chunk in micro_batches_of_pairs(model, pairs, token_capacity, self.device):
            result = self.loss(model, chunk)
            (result.loss * (len(chunk) / len(pairs))).backward()
            loss_sum += result.loss.item() * len(chunk)
            right += result.accuracy * len(chunk)
            margin += result.margin * len(chunk)
        return loss_sum, len(pairs), {"reward_accuracy": right / len(pairs), "reward_margin": margin / len(pairs)}

    @torch.no_grad()
    def eval_loss(self, model, pairs: list[PairExample], token_capacity: int) -> float:
        """Mean loss over the held-out pairs, in eval mode: what picks the best model."""
        was_training = model.training
        model.eval()
        try:
            total = sum(self.loss(model, chunk).loss.item() * len(chunk)
                        for chunk in micro_batches_of_pairs(model, pairs, token_capacity, self.device))
        finally:
            model.train(was_training)
        return total / max(len(pairs), 1)


def build_objective(objective: str, settings: PreferenceSettings, method: Method, device: str, model_path: str,
                    loading=None, full_precision: str = "fp32") -> PreferenceObjective:
    """The objective for a run. DPO's reference: with an adapter, the same model with it switched off (no
    copy); full fine-tuning, a frozen copy of the base in the policy's weights' dtype (fp32 master weights,
    or bf16 with full_precision bf16; the plan counts it: tasks/planning/memory.py)."""
    from tasks.engine.modeling import FULL_DTYPES, load_for_inference

    reference = None
    if objective == "dpo" and not method.trains_adapter:
        reference = load_for_inference(model_path, device, dtype=FULL_DTYPES[full_precision], loading=loading or SAFE)
        reference.requires_grad_(False)
    return PreferenceObjective(objective, settings, device, reference)
