"""Preference objectives over packed pairs: DPO (sigmoid, with label smoothing) and ORPO (issue 21).

A pair's two sides (prompt + chosen, prompt + rejected) are packed into one token stream, chosen
then rejected, each with its own positions, so neither attends to the other (tasks/engine/packing.py,
tasks/engine/attention.py) and one forward computes both: what a padded [chosen; rejected] batch
computes, minus the padding. Each side's score is the summed log-probability of its answer tokens
(the labels of tasks/data/preference.py mask the prompt).

DPO compares the policy with a frozen reference. With an adapter (LoRA, QLoRA) the reference is the
same model with the adapter switched off (peft's `disable_adapter()`): no second copy in memory.
Full fine-tuning passes a frozen copy. ORPO needs no reference: the NLL of the chosen answer plus
beta times the log-odds-ratio term of the two sides' mean token log-probs.

The formulas are TRL's (tests/test_preference_losses.py compares losses and gradients with TRL's
own trainers): DPO as `DPOTrainer` with loss_type="sigmoid", where label smoothing eps gives the
conservative form -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d) (TRL's "sigmoid" before
1.0; TRL 1.x applies that expression in its "aot" loss); ORPO as `ORPOTrainer`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from tasks.data.preference import PairExample
from tasks.data.tokenization import IGNORE_INDEX
from tasks.engine.attention import PACKING_EXACT, cu_seq_lens
from tasks.engine.packing import PackedRows, pack

# ---- packing and per-sequence log-probs -----------------------------------------------------------

def pack_pairs(pairs: list[PairExample]) -> PackedRows:
    """Stream order chosen_0, rejected_0, chosen_1, rejected_1, ...: row 2i is pair i's chosen side."""
    return pack([side for pair in pairs for side in (pair.chosen, pair.rejected)])


def _row_ids(packed: PackedRows, device) -> torch.Tensor:
    """The row each token of the stream belongs to."""
    lengths = torch.tensor(packed.lengths, device=device)
    return torch.repeat_interleave(torch.arange(len(packed.lengths), device=device), lengths)


def _inputs(input_ids: list[int], position_ids: list[int], lengths: list[int], device) -> dict:
    batch = {"input_ids": torch.tensor([input_ids], device=device),
             "position_ids": torch.tensor([position_ids], device=device)}
    if torch.device(device).type == "cuda":  # the varlen attention's row boundaries (tasks/engine/attention.py)
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_seq_lens(lengths, device)
        batch["max_length_q"] = batch["max_length_k"] = max(lengths)
    return batch


def token_logps(model, packed: PackedRows, targets: torch.Tensor, device) -> torch.Tensor:
    """log p(targets[t] | stream up to t) at every position with a target, 0 elsewhere; shape (T,).

    Logits are made only where a target is (logits_to_keep), in fp32 for the log-softmax."""
    if len(packed.lengths) > 1 and not getattr(model, PACKING_EXACT, True):
        # this model lets packed rows see each other (attention.check_packing): one row at a time
        parts, start = [], 0
        for n in packed.lengths:
            row = PackedRows(packed.input_ids[start:start + n], packed.position_ids[start:start + n],
                             packed.targets[start:start + n], [n])
            parts.append(token_logps(model, row, targets[start:start + n], device))
            start += n
        return torch.cat(parts)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    out = torch.zeros(len(targets), dtype=torch.float32, device=device)
    if not len(keep):
        return out
    batch = _inputs(packed.input_ids, packed.position_ids, packed.lengths, device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
        logits = model(**batch, use_cache=False, logits_to_keep=keep).logits[0]
    picked = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[keep][:, None]).squeeze(1)
    return out.index_put((keep,), picked)


def summed_logps(per_token: torch.Tensor, mask: torch.Tensor, row_ids: torch.Tensor,
                 rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs, count of tokens) per row, over the positions where `mask` is set."""
    sums = torch.zeros(rows, dtype=per_token.dtype, device=per_token.device).index_add(
        0, row_ids[mask], per_token[mask])
    counts = torch.bincount(row_ids[mask], minlength=rows)
    return sums, counts


@dataclass
class PairLogps:
    """Summed answer log-probs of each pair's sides, and their answer token counts; shape (pairs,)."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def pair_logps(model, pairs: list[PairExample], device, packed: PackedRows | None = None) -> PairLogps:
    """One packed forward over both sides of every pair."""
    packed = packed or pack_pairs(pairs)
    targets = torch.tensor(packed.targets, device=device)
    per_token = token_logps(model, packed, targets, device)
    sums, counts = summed_logps(per_token, targets != IGNORE_INDEX, _row_ids(packed, device), len(packed.lengths))
    _require_answers(counts)
    return PairLogps(sums[0::2], sums[1::2], counts[0::2], counts[1::2])


def _require_answers(counts: torch.Tensor) -> None:
    empty = (counts == 0).nonzero().squeeze(1).tolist()
    if empty:
        pair, side = divmod(empty[0], 2)
        raise ValueError(f"pair {pair}: the {('chosen', 'rejected')[side]} side has no answer token (cut off by "
                         "max_seq_len?); its log-probability would be 0 and the comparison meaningless. Raise "
                         "training.max_seq_len or drop pairs whose prompt fills it")


# ---- the reference ----------------------------------------------------------------------------

@contextlib.contextmanager
def adapter_disabled(model):
    """The base model under a peft adapter: the reference of adapter training, at no memory cost."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise ValueError(f"{type(model).__name__} has no adapter to switch off; full fine-tuning needs a frozen "
                         "reference copy of the base model (pass `reference=`)")
    with disable():
        yield model


@torch.no_grad()
def reference_logps(model, pairs: list[PairExample], device, reference=None,
                    packed: PackedRows | None = None) -> PairLogps:
    """The reference's log-probs: `reference` (a frozen copy, for full fine-tuning), else `model`
    with its adapter disabled. Computed without a graph: the reference never trains."""
    if reference is not None:
        return pair_logps(reference, pairs, device, packed)
    with adapter_disabled(model):
        return pair_logps(model, pairs, device, packed)


# ---- the losses ---------------------------------------------------------------------------------

@dataclass
class PreferenceLoss:
    loss: torch.Tensor  # what backward() is called on
    chosen_rewards: torch.Tensor  # per pair, detached: DPO's implicit reward beta * log(pi / ref)
    rejected_rewards: torch.Tensor

    @property
    def accuracy(self) -> float:
        """Share of pairs whose chosen side scores higher: the preference accuracy."""
        return (self.chosen_rewards > self.rejected_rewards).float().mean().item()

    @property
    def margin(self) -> float:
        return (self.chosen_rewards - self.rejected_rewards).mean().item()


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
               reference_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per pair: -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d), where d is how much more
    the policy than the reference prefers chosen over rejected. eps (label smoothing) is the
    assumed share of pairs whose preference label is wrong."""
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing}: use a value in [0, 0.5), the share of pairs assumed "
                         "to be labelled the wrong way round")
    d = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)


def dpo_loss(model, pairs: list[PairExample], device, beta: float, label_smoothing: float = 0.0,
             reference=None, reference_scores: PairLogps | None = None) -> PreferenceLoss:
    """DPO's loss over `pairs`, averaged over pairs. `reference_scores`: the reference's log-probs
    when already known (computed once per epoch and cached), else computed here."""
    packed = pack_pairs(pairs)
    ref = reference_scores or reference_logps(model, pairs, device, reference, packed)
    policy = pair_logps(model, pairs, device, packed)
    losses = dpo_losses(policy.chosen, policy.rejected, ref.chosen, ref.rejected, beta, label_smoothing)
    return PreferenceLoss(losses.mean(), beta * (policy.chosen - ref.chosen).detach(),
                          beta * (policy.rejected - ref.rejected).detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation: log1p(-exp(x)) far from 0, log(-expm1(x)) near it."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_terms(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor) -> torch.Tensor:
    """Per pair: log sigmoid(log odds(chosen) - log odds(rejected)), odds(y) = p / (1 - p) with p the
    mean token probability of the answer (ORPO, eq. 4 and 7)."""
    c, r = chosen_mean_logps.float(), rejected_mean_logps.float()
    return F.logsigmoid((c - r) - (log1mexp(c) - log1mexp(r)))


def orpo_loss(model, pairs: list[PairExample], device, beta: float,
              nll_on: Literal["answer", "sequence"] = "answer") -> PreferenceLoss:
    """ORPO over `pairs`: mean NLL of the chosen tokens minus beta times the mean odds-ratio term.

    `nll_on`: "answer" (default) trains the chosen answer's tokens, as the SFT objective of this
    project and the ORPO paper's L_SFT = -log P(y_w | x); "sequence" also the chosen side's prompt
    tokens, as TRL's ORPOTrainer does (its comment: "computed over the full prompt and response")."""
    packed = pack_pairs(pairs)
    answers = torch.tensor(packed.targets, device=device)
    rows = _row_ids(packed, device)
    nll_targets = answers
    if nll_on == "sequence":  # every next token of a chosen row (even rows) is a target too
        following = torch.tensor(_next_tokens(packed), device=device)
        nll_targets = torch.where((rows % 2 == 0) & (following != IGNORE_INDEX), following, answers)
    per_token = token_logps(model, packed, nll_targets, device)
    sums, counts = summed_logps(per_token, answers != IGNORE_INDEX, rows, len(packed.lengths))
    _require_answers(counts)
    chosen_mean, rejected_mean = sums[0::2] / counts[0::2], sums[1::2] / counts[1::2]
    nll_mask = (nll_targets != IGNORE_INDEX) & (rows % 2 == 0)
    nll = -per_token[nll_mask].sum() / nll_mask.sum()
    ratio = odds_ratio_terms(chosen_mean, rejected_mean)
    return PreferenceLoss(nll - beta * ratio.mean(), beta * chosen_mean.detach(), beta * rejected_mean.detach())


def _next_tokens(packed: PackedRows) -> list[int]:
    """The token each position is followed by in its own row; IGNORE_INDEX at a row's last token."""
    out, start = [], 0
    for n in packed.lengths:
        out += packed.input_ids[start + 1:start + n] + [IGNORE_INDEX]
        start += n
    return out
