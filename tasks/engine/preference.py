"""Preference objectives over packed pairs: DPO (sigmoid, with label smoothing) and ORPO (issue 21).

A pair's two sides (prompt + chosen, prompt + rejected) are packed into one token stream, chosen
then rejected, each with its own positions, so neither attends to the other (tasks/engine/packing.py,
tasks/engine/attention.py) and one forward computes both: what a padded [chosen; rejected] batch
computes, minus the padding. Each side's score is the summed log-probability of its answer tokens
(the labels of tasks/data/preference.py mask the prompt). Where the model allows it (measured once per
model: `shares_prompts`), the prompt both sides begin with runs once: the rejected side's answer reads
the prompt's keys from the chosen side (tasks/engine/attention.py takes each segment's key positions).

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
import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from tasks.data.preference import PairExample
from tasks.data.tokenization import IGNORE_INDEX, Example
from tasks.engine.attention import KEY_INDEX, PACKED_VARLEN, PACKING_EXACT, cu_seq_lens

# ---- laying pairs out and scoring their answers ----------------------------------------------------

@dataclass
class PairStream:
    """Pairs laid out as one token stream for one forward.

    A pair is its chosen side whole, then its rejected side. Where the model can share (see
    `shares_prompts`), the rejected side starts after the tokens both sides begin with (the prompt):
    its queries then read the prompt's keys from the chosen side's segment, so the prompt runs through
    the model once. Segment i's queries are its `query_lengths[i]` tokens of the stream, in order; its
    keys are the next `key_lengths[i]` stream positions of `key_index` (segment after segment), causal
    from the end (the last query sees every key). Scoring: entry j is the log-prob of token `targets[j]` given the stream up to position
    `scored[j]`, for side `rows[j]` (2 * pair, + 1 for rejected); `answer[j]`: a token of the answer
    (the prompt's next tokens are only scored for ORPO's sequence NLL)."""
    input_ids: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    query_lengths: list[int] = field(default_factory=list)
    key_index: list[int] = field(default_factory=list)
    key_lengths: list[int] = field(default_factory=list)
    scored: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    answer: list[bool] = field(default_factory=list)

    @property
    def shared(self) -> bool:
        return self.key_lengths != self.query_lengths

    def segments(self) -> list[tuple[int, int]]:
        """(start, end) of each segment in the stream."""
        ends = list(itertools.accumulate(self.query_lengths))
        return list(zip([0] + ends[:-1], ends))


def shared_prefix(pair: PairExample) -> int:
    """How many leading tokens both sides have alike and score on neither side (the prompt, as far as
    both tokenize it alike): what a shared layout computes once. Each side keeps at least one token."""
    chosen, rejected = pair.chosen, pair.rejected
    limit = min(len(chosen.input_ids), len(rejected.input_ids)) - 1
    n = 0
    while (n < limit and chosen.input_ids[n] == rejected.input_ids[n]
           and chosen.labels[n] == IGNORE_INDEX and rejected.labels[n] == IGNORE_INDEX):
        n += 1
    return n


def lay_out(pairs: list[PairExample], share: bool, prompt_nll: bool = False) -> PairStream:
    """The stream of `pairs`; `share`: the rejected side reuses the shared prefix; `prompt_nll`: also score
    each chosen side's prompt tokens (not as answer)."""
    stream = PairStream()
    for i, pair in enumerate(pairs):
        start = len(stream.input_ids)
        prefix = shared_prefix(pair) if share else 0
        for side, row in enumerate((pair.chosen, pair.rejected)):
            skip = prefix if side else 0  # tokens this side reads from the chosen segment instead
            own = len(stream.input_ids) - skip  # stream position of this side's token t is own + t (t >= skip)
            stream.input_ids += row.input_ids[skip:]
            stream.position_ids += range(skip, len(row.input_ids))
            stream.query_lengths.append(len(row.input_ids) - skip)
            stream.key_index += [*range(start, start + skip), *range(own + skip, own + len(row.input_ids))]
            stream.key_lengths.append(len(row.input_ids))
            for t in range(1, len(row.input_ids)):  # the token before t predicts token t
                is_answer = row.labels[t] != IGNORE_INDEX
                if is_answer or (prompt_nll and side == 0):
                    stream.scored.append(start + t - 1 if t - 1 < skip else own + t - 1)
                    stream.targets.append(row.input_ids[t] if not is_answer else row.labels[t])
                    stream.rows.append(2 * i + side)
                    stream.answer.append(is_answer)
    return stream


def stream_tokens(pair: PairExample, share: bool) -> int:
    """Tokens `pair` puts through the model."""
    return len(pair.chosen.input_ids) + len(pair.rejected.input_ids) - (shared_prefix(pair) if share else 0)


def _inputs(model, stream: PairStream, device) -> dict:
    """The model's inputs for `stream`: its segments' boundaries go to the packed attention
    (tasks/engine/attention.py); other attentions keep rows apart by the position ids."""
    batch = {"input_ids": torch.tensor([stream.input_ids], device=device),
             "position_ids": torch.tensor([stream.position_ids], device=device)}
    if torch.device(device).type == "cuda" or _attention(model) == PACKED_VARLEN:
        batch["cu_seq_lens_q"] = cu_seq_lens(stream.query_lengths, device)
        batch["cu_seq_lens_k"] = cu_seq_lens(stream.key_lengths, device)
        batch["max_length_q"], batch["max_length_k"] = max(stream.query_lengths), max(stream.key_lengths)
    if stream.shared:
        batch[KEY_INDEX] = torch.tensor(stream.key_index, device=device)
    return batch


def _attention(model) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def scored_logps(model, stream: PairStream, device) -> torch.Tensor:
    """The log-prob of every scored entry of `stream`, in fp32; shape (entries,). Logits are made only
    at the scored positions (logits_to_keep)."""
    if not getattr(model, PACKING_EXACT, True) and len(stream.query_lengths) > 1:
        # this model lets packed rows see each other (attention.check_packing): one side at a time
        if stream.shared:
            raise ValueError("a shared-prompt layout needs a model whose packed rows stay apart")
        parts = []
        for start, end in stream.segments():
            picked = [j for j, p in enumerate(stream.scored) if start <= p < end]
            side = PairStream(stream.input_ids[start:end], stream.position_ids[start:end], [end - start],
                              list(range(end - start)), [end - start], [stream.scored[j] - start for j in picked],
                              [stream.targets[j] for j in picked], [0] * len(picked), [True] * len(picked))
            parts.append((picked, scored_logps(model, side, device)))
        out = torch.zeros(len(stream.scored), dtype=torch.float32, device=device)
        for picked, values in parts:
            out[picked] = values
        return out
    if not stream.scored:
        return torch.zeros(0, dtype=torch.float32, device=device)
    batch = _inputs(model, stream, device)
    keep = torch.tensor(stream.scored, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
        logits = model(**batch, use_cache=False, logits_to_keep=keep).logits[0]
    targets = torch.tensor(stream.targets, device=device)
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


def side_sums(values: torch.Tensor, stream: PairStream, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) over the answer entries of each side; shape (2 * pairs,), chosen at even indices."""
    answer = torch.tensor(stream.answer, dtype=torch.bool, device=values.device)
    rows = torch.tensor(stream.rows, dtype=torch.long, device=values.device)[answer]
    sums = torch.zeros(2 * pairs, dtype=values.dtype, device=values.device).index_add(0, rows, values[answer])
    return sums, torch.bincount(rows, minlength=2 * pairs)


@dataclass
class PairLogps:
    """Summed answer log-probs of each pair's sides, and their answer token counts; shape (pairs,)."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def pair_logps(model, pairs: list[PairExample], device) -> PairLogps:
    """One forward over both sides of every pair (the prompt once where the model shares it)."""
    stream = lay_out(pairs, shares_prompts(model, device))
    sums, counts = side_sums(scored_logps(model, stream, device), stream, len(pairs))
    _require_answers(counts)
    return PairLogps(sums[0::2], sums[1::2], counts[0::2], counts[1::2])


def _require_answers(counts: torch.Tensor) -> None:
    empty = (counts == 0).nonzero().squeeze(1).tolist()
    if empty:
        pair, side = divmod(empty[0], 2)
        raise ValueError(f"pair {pair}: the {('chosen', 'rejected')[side]} side has no answer token (cut off by "
                         "max_seq_len?); its log-probability would be 0 and the comparison meaningless. Raise "
                         "training.max_seq_len or drop pairs whose prompt fills it")


# attribute set on a model: (the attention measured with, whether a pair's prompt runs once); a bool forces it
SHARES_PROMPTS = "_finetune_shares_prompts"


@torch.no_grad()
def shares_prompts(model, device) -> bool:
    """Whether a pair's shared prompt can run through `model` once, measured on the model the first time:
    its attention must be this project's packed attention (which reads keys apart from queries,
    tasks/engine/attention.py) and the rejected side's log-probs must equal those of the side laid out
    whole. Anything else (SDPA on CPU, eager, a family that drops the key index) keeps each side whole."""
    known = getattr(model, SHARES_PROMPTS, None)
    if isinstance(known, bool):  # set by hand (tests, benchmarks)
        return known
    if known is not None and known[0] == _attention(model):
        return known[1]
    exact = False
    dropout = getattr(model.config, "attention_dropout", 0.0) or 0.0  # trains on the general path, which cannot share
    if _attention(model) == PACKED_VARLEN and getattr(model, PACKING_EXACT, True) and not dropout:
        vocab = model.get_input_embeddings().weight.shape[0]
        generator = torch.Generator().manual_seed(0)
        prompt, chosen, rejected = (torch.randint(min(3, vocab - 1), vocab, (n,), generator=generator).tolist()
                                    for n in (13, 7, 11))
        pair = PairExample(Example(prompt + chosen, [IGNORE_INDEX] * 13 + chosen, False),
                           Example(prompt + rejected, [IGNORE_INDEX] * 13 + rejected, False))
        was_training = model.training
        model.eval()  # no dropout: the two layouts must be compared on the same function
        try:
            together = scored_logps(model, lay_out([pair], share=True), device)
            apart = scored_logps(model, lay_out([pair], share=False), device)
        finally:
            model.train(was_training)
        tolerance = (2e-2 if torch.device(device).type == "cuda" else 1e-4) * max(apart.abs().max().item(), 1.0)
        exact = bool((together - apart).abs().max().item() <= tolerance)
    setattr(model, SHARES_PROMPTS, (_attention(model), exact))  # measured for this attention only
    return exact


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
def reference_logps(model, pairs: list[PairExample], device, reference=None) -> PairLogps:
    """The reference's log-probs: `reference` (a frozen copy, for full fine-tuning), else `model`
    with its adapter disabled. Computed without a graph: the reference never trains."""
    if reference is not None:
        return pair_logps(reference, pairs, device)
    with adapter_disabled(model):
        return pair_logps(model, pairs, device)


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
             reference=None, reference_scores: PairLogps | None = None, sft_weight: float = 0.0) -> PreferenceLoss:
    """DPO's loss over `pairs`, averaged over pairs. `reference_scores`: the reference's log-probs
    when already known (computed once per epoch and cached), else computed here. `sft_weight`: plus
    that times the mean NLL of the chosen answers' tokens (RPO)."""
    ref = reference_scores or reference_logps(model, pairs, device, reference)
    policy = pair_logps(model, pairs, device)
    loss = dpo_losses(policy.chosen, policy.rejected, ref.chosen, ref.rejected, beta, label_smoothing).mean()
    if sft_weight:
        loss = loss - sft_weight * policy.chosen.sum() / policy.chosen_tokens.sum()
    return PreferenceLoss(loss, beta * (policy.chosen - ref.chosen).detach(),
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
    stream = lay_out(pairs, shares_prompts(model, device), prompt_nll=nll_on == "sequence")
    values = scored_logps(model, stream, device)
    sums, counts = side_sums(values, stream, len(pairs))
    _require_answers(counts)
    chosen_mean, rejected_mean = sums[0::2] / counts[0::2], sums[1::2] / counts[1::2]
    on_chosen = torch.tensor([row % 2 == 0 for row in stream.rows], dtype=torch.bool, device=values.device)
    nll = -values[on_chosen].sum() / on_chosen.sum()
    ratio = odds_ratio_terms(chosen_mean, rejected_mean)
    return PreferenceLoss(nll - beta * ratio.mean(), beta * chosen_mean.detach(), beta * rejected_mean.detach())
