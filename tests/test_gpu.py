"""On a CUDA GPU: LoRA and QLoRA through the whole flow (bf16 compute, 4-bit NF4 base)."""
import pytest

from conftest import tiny_config
from flows.finetune import finetune

pytestmark = [pytest.mark.gpu, pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_methods_on_gpu(tiny_model, tmp_path, method):
    result = finetune(tiny_config(tiny_model, tmp_path, method=method))
    assert result.tuned_eval_loss < result.base_eval_loss


def test_bf16_full_fine_tuning_through_the_flow_on_gpu(tiny_model, tmp_path):
    """full_precision bf16 on CUDA: bf16 weights trained by the Triton AdamW kernel; the loss falls."""
    training = {"learning_rate": 3e-3, "lr_schedule": "constant", "max_steps": 8, "batch_size": 8,
                "max_seq_len": 128, "eval_every": 4, "early_stopping_patience": 0, "full_precision": "bf16"}
    result = finetune(tiny_config(tiny_model, tmp_path, method="full", training=training))
    assert result.tuned_eval_loss < result.base_eval_loss - 0.2


def test_the_bf16_adamw_kernel_rounds_fp32_adamw_to_a_neighbour_without_bias():
    """The CUDA kernel of Bf16AdamW against fp32 AdamW on the CPU, from the same bf16 start: each weight
    lands on one of the two bf16 values around the fp32 result, and on average on the result itself."""
    import torch

    from tasks.engine.bf16_adamw import Bf16AdamW

    torch.manual_seed(0)
    start = (torch.randn(1 << 20) + 4).bfloat16().float()  # ~4: a bf16 step (1/32) far above one update
    gradient = torch.randn(1 << 20).bfloat16().float()  # as ours gets it, so the moments compare too
    reference = torch.nn.Parameter(start.clone())
    reference.grad = gradient.clone()
    torch_adamw = torch.optim.AdamW([reference], lr=1e-3, weight_decay=0.1)
    torch_adamw.step()
    ours = torch.nn.Parameter(start.clone().bfloat16().cuda())
    ours.grad = gradient.bfloat16().cuda()
    optimizer = Bf16AdamW([ours], lr=1e-3, weight_decay=0.1)
    optimizer.step()
    from test_bf16_adamw import assert_bf16_neighbours

    for got, expected in ((ours, reference), (optimizer.state[ours]["exp_avg"], torch_adamw.state[reference]["exp_avg"]),
                          (optimizer.state[ours]["exp_avg_sq"], torch_adamw.state[reference]["exp_avg_sq"])):
        assert_bf16_neighbours(got, expected)  # the weight and both moments: each kernel draw in range
    got, expected = ours.detach().float().cpu(), reference.detach()
    moved = (start - expected).abs().mean()
    assert (got - expected).mean().abs() < 0.01 * moved  # unbiased: the errors cancel across a million weights


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_varlen_packing_matches_padded_batches_on_gpu(tiny_model, tiny_tokenizer, method):
    """On CUDA the packed rows go through varlen FlashAttention and the fused loss in bf16."""
    import torch

    from conftest import DEMO_DATA
    from tasks.config import LoraSettings
    from tasks.data.tokenization import encode_all
    from tasks.data.validation import read_dataset
    from tasks.engine.modeling import load_for_training
    from tasks.engine.train_loop import accumulate_gradients, mean_loss
    from test_packing import padded_loss

    rows = encode_all(tiny_tokenizer, read_dataset(str(DEMO_DATA / "train.jsonl")).conversations[:12], 128)
    torch.manual_seed(0)
    model = load_for_training(str(tiny_model), method, "cuda", LoraSettings(r=8, dropout=0.0), False)
    assert model.config._attn_implementation == "packed_varlen"
    tokens = sum(r.trainable_tokens for r in rows)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        reference = padded_loss(model, rows, tiny_tokenizer.pad_token_id).item() / tokens
    assert mean_loss(model, rows, 3 * 128, "cuda") == pytest.approx(reference, rel=2e-2)
    loss_sum, _ = accumulate_gradients(model, rows, 3 * 128, "cuda")
    assert loss_sum / tokens == pytest.approx(reference, rel=2e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)



@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_shared_prompt_on_gpu_gives_each_side_its_own_log_probs(tiny_model, tiny_tokenizer, method):
    """varlen FlashAttention with more keys than queries aligns them at the end: a rejected side that
    reads the prompt's keys from the chosen side scores as if laid out whole (bf16 tolerance)."""
    import torch

    from tasks.config import LoraSettings
    from tasks.data.preference import PreferencePair, encode_pairs
    from tasks.engine.modeling import load_for_training
    from tasks.engine.preference import SHARES_PROMPTS, dpo_loss, lay_out, pair_logps, shares_prompts

    pairs = encode_pairs(tiny_tokenizer, [
        PreferencePair([{"role": "user", "content": f"Question {i}: what does the Quillfeather Q{i} do?"}],
                       "It reads e-books." * (i + 1), "No idea.") for i in range(6)], 128)
    torch.manual_seed(0)
    model = load_for_training(str(tiny_model), method, "cuda", LoraSettings(r=8, dropout=0.0), False)
    assert shares_prompts(model, "cuda")
    shared = lay_out(pairs, share=True)
    assert len(shared.input_ids) < len(lay_out(pairs, share=False).input_ids)
    results = {}
    for share in (True, False):
        setattr(model, SHARES_PROMPTS, share)
        model.zero_grad()
        with torch.no_grad():
            scores = pair_logps(model, pairs, "cuda")
        loss = dpo_loss(model, pairs, "cuda", 0.1).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[share] = (scores.chosen, scores.rejected, loss.item(), grads)
    (c1, r1, l1, g1), (c2, r2, l2, g2) = results[True], results[False]
    torch.testing.assert_close(c1, c2, rtol=2e-2, atol=0.5)
    torch.testing.assert_close(r1, r2, rtol=2e-2, atol=0.5)
    assert l1 == pytest.approx(l2, rel=2e-2, abs=1e-3)
    assert torch.nn.functional.cosine_similarity(g1, g2, dim=0) > 0.99


@pytest.mark.parametrize("objective, method, checkpointing",
                         [("dpo", "lora", "off"), ("dpo", "qlora", "on"), ("dpo", "full", "off"), ("orpo", "lora", "on")])
def test_preference_tuning_through_the_flow_on_gpu(tiny_model, tmp_path, objective, method, checkpointing):
    """DPO and ORPO on CUDA through the flow: the shared prompt (probed at the first step), with and
    without gradient checkpointing, and full DPO's reference copy; held-out preference accuracy rises
    and the run publishes."""
    from test_preference_flow import preference_config

    training = {"learning_rate": 3e-3, "lr_schedule": "constant", "max_steps": 8, "batch_size": 8,
                "max_seq_len": 128, "eval_every": 4, "early_stopping_patience": 0,
                "gradient_checkpointing": checkpointing}
    result = finetune(preference_config(tiny_model, tmp_path, objective=objective, method=method,
                                        training=training))
    assert result.method == method
    assert result.scores["tuned"]["preference_accuracy"] > 0.5 and result.promoted
