"""Packed training computes what padded training computes: same loss, same gradients, same mask."""
import pytest
import torch
import torch.nn.functional as F

import tasks.engine.loss
from conftest import DEMO_DATA
from tasks.config import LoraSettings
from tasks.data.tokenization import IGNORE_INDEX, encode_all
from tasks.data.validation import read_dataset
from tasks.engine.loss import linear_cross_entropy_sum
from tasks.engine.modeling import load_for_training
from tasks.engine.packing import micro_batches, pack
from tasks.engine.train_loop import accumulate_gradients, mean_loss


@pytest.fixture(scope="module")
def rows(tiny_tokenizer):
    conversations = read_dataset(str(DEMO_DATA / "train.jsonl")).conversations[:12]
    return encode_all(tiny_tokenizer, conversations, 128)


def padded_loss(model, rows, pad_id: int) -> torch.Tensor:
    """The reference: one right-padded batch through the model's own forward (its own attention,
    masks and logits) and a plain summed cross-entropy."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r.input_ids)], labels[i, :len(r.labels)], mask[i, :len(r.input_ids)] = (
            torch.tensor(r.input_ids), torch.tensor(r.labels), 1)
    logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False).logits.float()
    labels = labels.to(model.device)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_packed_gradients_equal_padded_gradients(tiny_model, tiny_tokenizer, rows, method):
    lora = LoraSettings(r=8, dropout=0.0)
    torch.manual_seed(0)
    reference = load_for_training(str(tiny_model), method, "cpu", lora, False)
    torch.manual_seed(0)
    packed = load_for_training(str(tiny_model), method, "cpu", lora, False)
    tokens = sum(r.trainable_tokens for r in rows)
    (padded_loss(reference, rows, tiny_tokenizer.pad_token_id) / tokens).backward()
    capacity = 3 * max(len(r.input_ids) for r in rows)  # several rows per micro-batch, several micro-batches
    assert 1 < len(micro_batches(rows, capacity)) < len(rows)
    loss_sum, step_tokens = accumulate_gradients(packed, rows, capacity, "cpu")
    assert step_tokens == tokens
    with torch.no_grad():
        assert loss_sum == pytest.approx(padded_loss(reference, rows, tiny_tokenizer.pad_token_id).item(), rel=1e-5)
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in packed.named_parameters() if p.requires_grad}
    assert expected.keys() == got.keys() and expected
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_rows_do_not_see_each_other(tiny_model, rows):
    """A row's loss is the same alone and packed after another row: no attention across rows."""
    model = load_for_training(str(tiny_model), "full", "cpu", LoraSettings(), False)
    alone = mean_loss(model, [rows[1]], 10_000, "cpu")
    together = [mean_loss(model, [rows[0], rows[1]], 10_000, "cpu"), mean_loss(model, [rows[0]], 10_000, "cpu")]
    n0, n1 = rows[0].trainable_tokens, rows[1].trainable_tokens
    # the pair's token-weighted mean is exactly the two rows' losses combined
    assert together[0] == pytest.approx((together[1] * n0 + alone * n1) / (n0 + n1), rel=1e-5)


def test_the_mask_survives_packing(rows):
    packed = pack(rows[:3])
    assert len(packed.input_ids) == len(packed.targets) == len(packed.position_ids) == sum(packed.lengths)
    start = 0
    for row, n in zip(rows[:3], packed.lengths):
        assert packed.position_ids[start:start + n] == list(range(n))
        assert packed.targets[start:start + n - 1] == row.labels[1:]  # only answer tokens are targets
        assert packed.targets[start + n - 1] == IGNORE_INDEX  # never predict the next row's first token
        start += n
    assert packed.trainable_tokens == sum(r.trainable_tokens for r in rows[:3])


def test_micro_batches_keep_every_row_within_capacity(rows):
    capacity = max(len(r.input_ids) for r in rows) + 40
    batches = micro_batches(rows, capacity)
    assert sorted(id(r) for b in batches for r in b) == sorted(id(r) for r in rows)
    assert all(sum(len(r.input_ids) for r in b) <= capacity for b in batches)
    assert micro_batches(rows, capacity) == batches  # deterministic
    with pytest.raises(ValueError, match="exceeds the micro-batch capacity"):
        micro_batches(rows, 8)


@pytest.mark.parametrize("head_trains", [False, True])
def test_chunked_cross_entropy_equals_the_plain_one(monkeypatch, head_trains):
    monkeypatch.setattr(tasks.engine.loss, "CHUNK_BYTES", 4 * 50 * 7)  # 7 rows per chunk: several chunks
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=head_trains)
    targets = torch.randint(0, 50, (30,))
    expected = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    expected_grads = torch.autograd.grad(expected, [hidden, weight] if head_trains else [hidden])
    got = linear_cross_entropy_sum(hidden, weight, targets, torch.float32)
    got_grads = torch.autograd.grad(got, [hidden, weight] if head_trains else [hidden])
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)
