"""DPO and ORPO over packed pairs compute what TRL's trainers compute: same losses, same gradients.

TRL (a test-only dependency) runs its own code on the same tiny model and pairs: a real
`DPOTrainer` (its `_compute_loss`, with its own reference handling: adapters disabled, or a
reference copy), and `ORPOTrainer`'s batch loss. Ours runs on a second copy of the same weights with
pairs packed into one stream; theirs on a right-padded [chosen; rejected] batch.
"""
import copy
import types

import pytest
import torch

from tasks.data.preference import PreferencePair, encode_pairs
from tasks.data.tokenization import IGNORE_INDEX
from tasks.engine.attention import install_packed_attention
from tasks.engine.packing import pack
from tasks.engine.preference import (adapter_disabled, dpo_loss, lay_out, orpo_loss, pair_logps, reference_logps,
                                     SHARES_PROMPTS, shared_prefix, shares_prompts)

trl = pytest.importorskip("trl")
TOLERANCE = 1e-5
BETA = 0.1
PAIRS = [
    PreferencePair([{"role": "user", "content": "What is the Quillfeather Q7?"}],
                   "An e-reader with a 7 inch screen.", "A kind of bird."),
    PreferencePair([{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "How long does the battery last?"}],
                   "Six weeks.", "I do not know anything about batteries, sorry, ask someone else."),
    PreferencePair([{"role": "user", "content": "Is it waterproof?"}, {"role": "assistant", "content": "Yes."},
                    {"role": "user", "content": "How deep?"}], "Two metres for an hour.", "Very deep."),
]


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    return encode_pairs(tiny_tokenizer, PAIRS, 128)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


def perturb_adapter(model, seed: int = 1) -> None:
    """LoRA starts as the identity (B = 0): give B weights so policy and reference differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def base_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def our_lora_model(path, trl_model):
    """A second PeftModel with the very weights of TRL's (TRL patches its own copy's forward)."""
    from peft import get_peft_model

    model = get_peft_model(base_model(path), lora_config())
    state = {name: p for name, p in trl_model.state_dict().items() if ".ref." not in name}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "lora" in m]
    return model


def padded_batch(examples, pad_id: int) -> dict:
    """TRL's collator output: [chosen...; rejected...] right-padded, with the completion mask."""
    rows = [e.chosen for e in examples] + [e.rejected for e in examples]
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        attention[i, :n] = 1
        completion[i, :n] = torch.tensor([label != IGNORE_INDEX for label in row.labels])
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def dpo_trainer(model, tokenizer, tmp_path, loss_type: str | list, label_smoothing: float = 0.0, ref_model=None,
                peft_config=None, loss_weights=None):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA,
                     loss_type=loss_type if isinstance(loss_type, list) else [loss_type], loss_weights=loss_weights,
                     label_smoothing=label_smoothing, report_to=[], use_cpu=True, bf16=False, fp16=False,
                     save_strategy="no", max_length=None)
    data = Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}])  # unused: batches are given
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.model.train()
    return trainer


def gradients(model) -> dict:
    return {name.replace(".default", ""): p.grad.detach().clone() for name, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def max_difference(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys() and ours
    return max((ours[n] - theirs[n]).abs().max().item() for n in ours)


def compare(ours_loss, ours_model, theirs_loss, theirs_model, what: str) -> None:
    ours_loss.backward()
    theirs_loss.backward()
    grads_ours, grads_theirs = gradients(ours_model), gradients(theirs_model)
    grad_diff = max_difference(grads_ours, grads_theirs)
    loss_diff = abs(ours_loss.item() - theirs_loss.item())
    print(f"{what}: loss {ours_loss.item():.6f} vs TRL {theirs_loss.item():.6f} (|diff| {loss_diff:.2e}), "
          f"max |grad diff| {grad_diff:.2e} over {len(grads_ours)} tensors")
    assert loss_diff <= TOLERANCE
    assert grad_diff <= TOLERANCE
    assert max(g.abs().max().item() for g in grads_ours.values()) > 100 * TOLERANCE  # a real signal was compared


@pytest.mark.parametrize("pairs", [slice(0, 3), slice(1, 2)], ids=["three-pairs", "one-pair"])
def test_dpo_with_adapter_matches_trl(tiny_model, tiny_tokenizer, examples, tmp_path, pairs):
    trainer = dpo_trainer(base_model(tiny_model), tiny_tokenizer, tmp_path, "sigmoid", peft_config=lora_config())
    perturb_adapter(trainer.model)
    ours = our_lora_model(tiny_model, trainer.model)
    ours.train()
    batch = padded_batch(examples[pairs], tiny_tokenizer.pad_token_id)
    theirs_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    result = dpo_loss(ours, examples[pairs], "cpu", BETA)
    assert abs(theirs_loss.item() - 0.6931) > 1e-3  # policy and reference really differ
    compare(result.loss, ours, theirs_loss, trainer.model, f"DPO LoRA {pairs}")


def test_dpo_with_the_chosen_nll_matches_trl_sigmoid_plus_sft(tiny_model, tiny_tokenizer, examples, tmp_path):
    """preference.sft_weight w: TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, w] (RPO)."""
    trainer = dpo_trainer(base_model(tiny_model), tiny_tokenizer, tmp_path, ["sigmoid", "sft"],
                          peft_config=lora_config(), loss_weights=[1.0, 0.5])
    perturb_adapter(trainer.model)
    ours = our_lora_model(tiny_model, trainer.model)
    ours.train()
    theirs_loss = trainer._compute_loss(trainer.model, padded_batch(examples, tiny_tokenizer.pad_token_id),
                                        return_outputs=False)
    plain = dpo_loss(ours, examples, "cpu", BETA).loss.item()
    ours_loss = dpo_loss(ours, examples, "cpu", BETA, sft_weight=0.5).loss
    assert ours_loss.item() - plain > 0.5  # the NLL term is really there (tokens of a tiny model: NLL ~ 5)
    compare(ours_loss, ours, theirs_loss, trainer.model, "DPO LoRA + 0.5 x chosen NLL")


def test_dpo_label_smoothing_matches_trl_conservative_form(tiny_model, tiny_tokenizer, examples, tmp_path):
    """TRL 1.x's "sigmoid" ignores label_smoothing; the smoothed (conservative) sigmoid it used to
    compute is what its "aot" loss computes for one pair (its sort over the batch is then a no-op)."""
    trainer = dpo_trainer(base_model(tiny_model), tiny_tokenizer, tmp_path, "aot", label_smoothing=0.2,
                          peft_config=lora_config())
    perturb_adapter(trainer.model)
    ours = our_lora_model(tiny_model, trainer.model)
    ours.train()
    one = examples[2:3]
    theirs_loss = trainer._compute_loss(trainer.model, padded_batch(one, tiny_tokenizer.pad_token_id),
                                        return_outputs=False)
    compare(dpo_loss(ours, one, "cpu", BETA, label_smoothing=0.2).loss, ours, theirs_loss, trainer.model,
            "DPO LoRA, label smoothing 0.2")


def test_dpo_full_fine_tuning_with_a_reference_copy_matches_trl(tiny_model, tiny_tokenizer, examples, tmp_path):
    policy_theirs = base_model(tiny_model)
    with torch.no_grad():  # move the policy away from the reference
        generator = torch.Generator().manual_seed(2)
        for parameter in policy_theirs.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    policy_ours = copy.deepcopy(policy_theirs)
    reference = base_model(tiny_model).eval()
    trainer = dpo_trainer(policy_theirs, tiny_tokenizer, tmp_path, "sigmoid", ref_model=base_model(tiny_model))
    policy_ours.train()
    theirs_loss = trainer._compute_loss(trainer.model, padded_batch(examples, tiny_tokenizer.pad_token_id),
                                        return_outputs=False)
    result = dpo_loss(policy_ours, examples, "cpu", BETA, reference=reference)
    compare(result.loss, policy_ours, theirs_loss, trainer.model, "DPO full fine-tuning")
    assert all(p.grad is None for p in reference.parameters())  # the reference never trains


def orpo_stub(beta: float):
    """ORPOTrainer's methods need only these attributes of a trainer: run TRL's own code on them."""
    from trl.experimental.orpo import ORPOTrainer

    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    stub = types.SimpleNamespace(beta=beta, accelerator=accelerator, is_encoder_decoder=False, padding_value=0,
                                 aux_loss_enabled=False)
    for name in ("concatenated_inputs", "get_batch_logps"):
        setattr(stub, name, getattr(ORPOTrainer, name))
    for name in ("odds_ratio_loss", "concatenated_forward", "get_batch_loss_metrics"):
        setattr(stub, name, types.MethodType(getattr(ORPOTrainer, name), stub))
    return stub


def orpo_batch(examples, pad_id: int) -> dict:
    """ORPOTrainer's collated batch: chosen_* and rejected_* padded tensors, labels masking the prompt."""
    padded = padded_batch(examples, pad_id)
    n = len(examples)
    labels = padded["input_ids"].masked_fill(padded["completion_mask"] == 0, IGNORE_INDEX)
    return {"chosen_input_ids": padded["input_ids"][:n], "chosen_attention_mask": padded["attention_mask"][:n],
            "chosen_labels": labels[:n], "rejected_input_ids": padded["input_ids"][n:],
            "rejected_attention_mask": padded["attention_mask"][n:], "rejected_labels": labels[n:]}


def test_orpo_matches_trl(tiny_model, tiny_tokenizer, examples):
    from peft import get_peft_model

    theirs = get_peft_model(base_model(tiny_model), lora_config())
    perturb_adapter(theirs)
    ours = copy.deepcopy(theirs)
    theirs.train(), ours.train()
    theirs_loss, metrics = orpo_stub(BETA).get_batch_loss_metrics(
        theirs, orpo_batch(examples, tiny_tokenizer.pad_token_id))
    result = orpo_loss(ours, examples, "cpu", BETA, nll_on="sequence")
    assert result.accuracy == metrics["rewards/accuracies"]
    compare(result.loss, ours, theirs_loss, theirs, "ORPO (NLL over the chosen sequence, as TRL)")


def test_orpo_on_answers_differs_from_trl_only_in_the_nll(tiny_model, tiny_tokenizer, examples):
    """The default trains the chosen answer only; the odds-ratio term is the same as TRL's."""
    from peft import get_peft_model
    from trl.experimental.orpo import ORPOTrainer

    model = get_peft_model(base_model(tiny_model), lora_config())
    perturb_adapter(model)
    with torch.no_grad():
        sequence = orpo_loss(model, examples, "cpu", BETA, nll_on="sequence").loss
        answer = orpo_loss(model, examples, "cpu", BETA, nll_on="answer").loss
        batch = orpo_batch(examples, tiny_tokenizer.pad_token_id)
        logits = model(input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits
        answer_logps = ORPOTrainer.get_batch_logps(logits, batch["chosen_labels"])
        answer_nll = -answer_logps.sum() / (batch["chosen_labels"][:, 1:] != IGNORE_INDEX).sum()
        labels = batch["chosen_input_ids"].masked_fill(batch["chosen_attention_mask"] == 0, IGNORE_INDEX)
        sequence_nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         labels[:, 1:].reshape(-1))
    assert abs((answer - sequence).item() - (answer_nll - sequence_nll).item()) <= TOLERANCE
    assert abs((answer - sequence).item()) > 1e-3


def test_reference_with_adapter_disabled_equals_the_base_model(tiny_model, examples):
    from peft import get_peft_model

    model = get_peft_model(base_model(tiny_model), lora_config())
    perturb_adapter(model)
    policy = pair_logps(model, examples, "cpu")
    reference = reference_logps(model, examples, "cpu")
    base = pair_logps(base_model(tiny_model), examples, "cpu")
    torch.testing.assert_close(reference.chosen, base.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(reference.rejected, base.rejected, atol=1e-5, rtol=0)
    assert (policy.chosen - reference.chosen).abs().max() > 1e-2  # the adapter is back on afterwards
    assert not reference.chosen.requires_grad
    torch.testing.assert_close(pair_logps(model, examples, "cpu").chosen, policy.chosen)


def test_full_model_without_reference_copy_is_refused(tiny_model, examples):
    with pytest.raises(ValueError, match="frozen reference copy"), adapter_disabled(base_model(tiny_model)):
        pass


def test_packed_pairs_give_the_log_probs_of_each_side_run_alone(tiny_model, examples):
    model = base_model(tiny_model)
    assert not shares_prompts(model, "cpu")  # SDPA keeps each side whole
    stream = lay_out(examples, share=False)
    assert stream.query_lengths == [len(s.input_ids) for e in examples for s in (e.chosen, e.rejected)]
    together = pair_logps(model, examples, "cpu")
    for i, example in enumerate(examples):
        for side, got in (("chosen", together.chosen[i]), ("rejected", together.rejected[i])):
            row = getattr(example, side)
            alone = pack([row])
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([alone.input_ids])).logits[0]
            targets = torch.tensor(alone.targets)
            keep = targets != IGNORE_INDEX
            expected = torch.log_softmax(logits[keep], -1).gather(1, targets[keep][:, None]).sum()
            assert abs(got.item() - expected.item()) <= TOLERANCE, (i, side)
    assert together.chosen_tokens.tolist() == [e.chosen.trainable_tokens for e in examples]


@pytest.mark.parametrize("objective", ["dpo", "orpo", "orpo-sequence"])
def test_a_shared_prompt_runs_once_and_gives_the_same_losses_and_gradients(tiny_model, examples, objective):
    """The packed attention computes each pair's prompt once (the rejected side reads its keys from
    the chosen side): the stream is shorter by the prompts, and loss and gradients are those of both
    sides laid out whole."""
    from peft import get_peft_model

    model = get_peft_model(base_model(tiny_model), lora_config())
    perturb_adapter(model)
    install_packed_attention(model)
    assert shares_prompts(model, "cpu")

    def run(share: bool):
        setattr(model, SHARES_PROMPTS, share)  # the same model, with and without sharing
        model.zero_grad()
        if objective == "dpo":
            loss = dpo_loss(model, examples, "cpu", BETA, 0.1).loss
        else:
            loss = orpo_loss(model, examples, "cpu", BETA, "sequence" if objective == "orpo-sequence" else "answer").loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared_loss, shared_grads = run(True)
    whole_loss, whole_grads = run(False)
    assert abs(shared_loss.item() - whole_loss.item()) <= TOLERANCE
    assert shared_grads.keys() == whole_grads.keys() and shared_grads
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, whole_grads[name], atol=TOLERANCE, rtol=1e-4, msg=name)
    prompts = [shared_prefix(e) for e in examples]
    assert all(p > 5 for p in prompts)  # the chat template's prompt is what both sides share
    whole, shared = lay_out(examples, share=False), lay_out(examples, share=True)
    assert len(whole.input_ids) - len(shared.input_ids) == sum(prompts)
    assert shared.scored.count(shared.scored[0]) == 2  # the prompt's last token predicts both answers' first


def test_a_side_without_answer_tokens_is_refused(tiny_tokenizer, tiny_model):
    cut = encode_pairs(tiny_tokenizer, PAIRS[:1], 6)  # max_seq_len cuts both answers off
    with pytest.raises(ValueError, match="pair 0: the chosen side has no answer token"):
        pair_logps(base_model(tiny_model), cut, "cpu")


def test_prompt_sharing_is_measured_again_for_another_attention_and_off_with_attention_dropout(tiny_model):
    model = base_model(tiny_model)
    install_packed_attention(model)
    assert shares_prompts(model, "cpu")
    model.set_attn_implementation("sdpa")  # SDPA would ignore the key positions: never share there
    assert not shares_prompts(model, "cpu")
    dropping = base_model(tiny_model)
    dropping.config.attention_dropout = 0.1  # training would take the general attention path
    install_packed_attention(dropping)
    assert not shares_prompts(dropping, "cpu")
