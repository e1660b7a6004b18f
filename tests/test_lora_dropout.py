"""LoRA dropout fused into the adapter's A matrix: same arithmetic as peft's, less saved memory."""
import torch

from tasks.config import LoraSettings
from tasks.engine.lora_dropout import DropoutLinear, _DropoutLinear, _mask
from tasks.engine.modeling import load_for_training


def test_backward_matches_the_numerical_gradient():
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: _DropoutLinear.apply(a, w, 0.3, 1234), (x, weight))


def test_forward_is_dropout_then_linear_with_a_reproducible_mask():
    x, weight = torch.randn(6, 8), torch.randn(4, 8)
    out = _DropoutLinear.apply(x, weight, 0.5, 7)
    mask = _mask(x, 0.5, 7)
    assert 0 < mask.sum() < mask.numel()  # some inputs dropped, some kept
    torch.testing.assert_close(out, (x * mask / 0.5) @ weight.T)


def test_lora_layers_use_it_and_evaluation_has_no_dropout(tiny_model):
    model = load_for_training(str(tiny_model), "lora", "cpu", LoraSettings(r=4, dropout=0.2), False)
    fused = [m for m in model.modules() if isinstance(m, DropoutLinear)]
    assert fused and all(m.p == 0.2 for m in fused)
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    ids = torch.randint(0, 100, (1, 12))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.train()
    for m in fused:  # make the adapters matter, so dropout shows in the output
        torch.nn.init.normal_(model.get_submodule(_b_path(model, m)).weight)
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def _b_path(model, a_module) -> str:
    name = next(n for n, m in model.named_modules() if m is a_module)
    return name.replace("lora_A", "lora_B")


def test_without_dropout_the_adapters_keep_no_copy_of_their_input(tiny_model):
    """With dropout 0 peft would cast each adapter's input to the adapters' fp32 and keep that copy
    for backward: a bf16 base then keeps twice what the estimate counts (measured on an H200: 8B LoRA
    ran out of memory at a 48 GiB cap the plan fitted). The adapters share the bf16 input instead,
    keeping what they keep with dropout, less the mask's seed."""
    from tasks.engine.modeling import prepare_for_training

    def saved_bytes(dropout: float) -> int:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.bfloat16)
        model = prepare_for_training(model, "lora", "cpu", LoraSettings(r=4, dropout=dropout), False).train()
        kept = {}

        def count(tensor):
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autocast("cpu", dtype=torch.bfloat16), \
                torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            model(input_ids=torch.randint(0, 100, (1, 64))).logits.sum()
        return sum(kept.values())

    assert saved_bytes(0.0) <= saved_bytes(0.1)
