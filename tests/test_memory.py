import pytest

from tasks.planning.memory import GIB, ModelShape, UnsupportedModelError, estimate_memory
from tasks.planning.selector import Attempt, PlanError, select_plan, step_down, token_capacities

SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
           "tie_word_embeddings": True}
LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "tie_word_embeddings": False}
LLAMA_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
            "tie_word_embeddings": True}


def test_parameter_counts_match_real_models():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    for settings in (SMOLLM2, {**SMOLLM2, "tie_word_embeddings": False, "num_hidden_layers": 2}):
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**settings))
        real = sum(p.numel() for p in model.parameters())
        assert ModelShape.from_config(settings).parameters == real
    assert round(ModelShape.from_config(LLAMA_8B).parameters / 1e9, 2) == 8.03  # as in ANCHORS.md


def test_lora_parameter_count_matches_peft(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    import json

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape = ModelShape.from_config(json.loads((tiny_model / "config.json").read_text()))
    assert shape.lora_parameters(8) == trainable


def test_methods_order_and_checkpointing():
    shape = ModelShape.from_config(LLAMA_8B)
    est = {m: estimate_memory(shape, m, "cuda", 8192, False) for m in ("full", "lora", "qlora")}
    assert est["full"].total > est["lora"].total > est["qlora"].total
    assert est["full"].gib > 16 * 8.03e9 / GIB  # 16 bytes per parameter before activations
    checkpointed = estimate_memory(shape, "lora", "cuda", 8192, True)
    assert checkpointed.activations < est["lora"].activations / 5
    assert estimate_memory(shape, "lora", "cuda", 16384, False).activations == 2 * est["lora"].activations
    unfused = estimate_memory(shape, "lora", "cuda", 8192, False, fused_kernels=False)
    assert unfused.activations > est["lora"].activations  # transformers' own norms and MLP keep more


def test_only_a_model_that_is_no_causal_lm_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"my.json: model_type 'mamba' lacks hidden_size"):
        ModelShape.from_config({"model_type": "mamba", "architectures": ["MambaForCausalLM"],
                                "num_hidden_layers": 2, "vocab_size": 10}, source="my.json")
    with pytest.raises(UnsupportedModelError, match=r"BertForMaskedLM\) name no causal LM.*ForCausalLM"):
        ModelShape.from_config({**LLAMA_1B, "model_type": "bert", "architectures": ["BertForMaskedLM"]})
    with pytest.raises(UnsupportedModelError, match=r"'t5' is an encoder-decoder model.*decoder-only"):
        ModelShape.from_config({**LLAMA_1B, "model_type": "t5", "is_encoder_decoder": True})
    with pytest.raises(UnsupportedModelError, match=r"names no architectures and model_type 'mystery'"):
        ModelShape.from_config({**LLAMA_1B, "model_type": "mystery"})
    # a causal LM without a formula is estimated (conservatively), not refused
    gpt2 = ModelShape.from_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 768,
                                   "n_layer": 12, "n_head": 12, "vocab_size": 50257})
    assert (gpt2.verified, gpt2.hidden_size, gpt2.intermediate_size, gpt2.num_layers) == (False, 768, 3072, 12)
    # a state-space causal LM: no attention heads, estimated as a transformer of its sizes (more parameters than it has)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    mamba = {"model_type": "mamba", "architectures": ["MambaForCausalLM"], "hidden_size": 768,
             "intermediate_size": 1536, "num_hidden_layers": 24, "vocab_size": 50280, "state_size": 16}
    shape = ModelShape.from_config(mamba)
    with torch.device("meta"):
        real = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.for_model(**mamba)).parameters())
    assert (shape.verified, shape.num_heads) == (False, 6) and real <= shape.parameters
    mystery = {**LLAMA_1B, "model_type": "mystery", "architectures": ["MysteryForCausalLM"]}
    assert not ModelShape.from_config(mystery).verified


@pytest.mark.parametrize("config", [
    {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32768},
    {"model_type": "qwen3", "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
     "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
     "tie_word_embeddings": True},
    {"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18,
     "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 256000,
     "tie_word_embeddings": True},
    {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
     "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064},
    {"model_type": "gemma3", "text_config": {**LLAMA_1B, "model_type": "qwen2"}},  # a multimodal wrapper
], ids=["mistral", "qwen3", "gemma", "phi3", "text_config"])
def test_parameter_counts_of_other_architectures(config):
    """The estimator's parameter count is what transformers builds (meta device: no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**config, **config.get("text_config", {})}
    fields.pop("text_config", None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields))
    assert ModelShape.from_config(config).parameters == pytest.approx(sum(p.numel() for p in model.parameters()),
                                                                     rel=2e-3)  # qwen2's q/k/v biases


def plan(budget_gib, method="auto", **kw):
    kw.setdefault("full_precision", "fp32")  # the planner's choices over fp32 full fine-tuning; auto: its own tests
    return select_plan(ModelShape.from_config(LLAMA_8B), budget_bytes=int(budget_gib * GIB), budget_source="test",
                       device="cuda", method=method, longest_row=2048, largest_step=16384, **kw)


def need(method, tokens, checkpointing):
    return estimate_memory(ModelShape.from_config(LLAMA_8B), method, "cuda", tokens, checkpointing).gib


def test_token_capacities_step_down_by_quarter_octaves_to_the_longest_row():
    assert token_capacities(2048, 16384) == [16384, 13777, 11585, 9741, 8192, 6888, 5792, 4870, 4096, 3444, 2896,
                                             2435, 2048]
    assert token_capacities(2048, 3000) == [3000, 2522, 2121, 2048]
    assert token_capacities(2048, 16384, max_rows=2) == [4096, 3444, 2896, 2435, 2048]
    assert token_capacities(300, 200) == [300]  # one row per micro-batch is the least there is


def test_a_step_is_planned_as_its_largest_and_its_typical_size():
    from tasks.planning.selector import step_tokens

    assert step_tokens([300, 100, 400, 200], 2) == (700, 500)  # the 2 longest; 2 rows of the mean, 250
    assert step_tokens([300, 100], 8) == (400, 400)  # a step cannot hold more rows than there are


def test_speed_is_planned_for_the_usual_step_and_memory_for_the_largest():
    """An average step of 8.6k tokens (27 chat rows) with a largest of 16k: the plan takes a micro-batch
    that holds the usual step whole, even if that means checkpointing layers, and its memory is
    estimated for a full micro-batch, so the largest step fits too (in two)."""
    usual = plan(48, method="lora", typical_step=8636)
    assert usual.tokens_per_micro_batch >= 8636 and usual.estimate.total <= 48 * GIB
    largest_only = plan(48, method="lora")
    assert largest_only.tokens_per_micro_batch != usual.tokens_per_micro_batch


def test_auto_prefers_quality_then_speed():
    big = plan(need("full", 16384, False) + 1)
    assert (big.method, big.tokens_per_micro_batch, big.gradient_checkpointing, big.micro_batches_per_step) == \
        ("full", 16384, False, 1)
    # Just short of full at its smallest: the best LoRA configuration, without checkpointing if it fits.
    lora = plan(need("full", 2048, True) - 0.1)
    assert lora.method == "lora" and lora.estimate.total <= (need("full", 2048, True) - 0.1) * GIB
    assert lora.tokens_per_micro_batch * lora.micro_batches_per_step >= 16384
    assert [c.estimate.method for c in lora.candidates] == ["full", "lora", "qlora"]
    assert [c.fits for c in lora.candidates] == [False, True, True]
    assert plan(need("lora", 2048, True) - 0.1).method == "qlora"


def test_fewer_micro_batches_against_recomputed_layers(monkeypatch):
    """The plan weighs a micro-batch's fixed cost against recomputation: with a budget that holds 4096
    tokens plainly, a step of 16k goes in one micro-batch with some layers checkpointed, since four
    micro-batches cost more (measured, benchmarks/results/capped_speed_h200_2026-12-01.md). Were
    micro-batches free, it would recompute nothing and take four."""
    from tasks.planning import selector

    budget = need("lora", 4096, False) + 0.01
    chosen = plan(budget, method="lora")
    assert (chosen.tokens_per_micro_batch, chosen.micro_batches_per_step) == (16384, 1)
    assert 0 < chosen.checkpointed_layers < 32
    monkeypatch.setattr(selector, "MICRO_BATCH_OVERHEAD_TOKENS", 0)
    free = plan(budget, method="lora")
    assert (free.tokens_per_micro_batch, free.gradient_checkpointing, free.micro_batches_per_step) == (4096, False, 4)
    assert plan(need("lora", 2048, False) - 0.1, method="lora").gradient_checkpointing


def test_checkpointing_only_as_many_layers_as_the_budget_needs():
    """Between a plain micro-batch and a fully checkpointed one, the plan checkpoints the first layers
    only, the fewest that fit; the engine is told how many and the reason says so."""
    shape = ModelShape.from_config(LLAMA_8B)
    chosen = plan(24, method="lora")
    k, tokens = chosen.checkpointed_layers, chosen.tokens_per_micro_batch
    assert chosen.gradient_checkpointing and 0 < k < 32 and f"on for {k} of 32 layers" in chosen.reason

    def gib(layers):
        return estimate_memory(shape, "lora", "cuda", tokens, True, checkpointed_layers=layers).gib

    assert gib(k) <= 24 < gib(k - 1) and gib(32) < gib(k) < need("lora", tokens, False)
    assert chosen.estimate.checkpointed_layers == k and chosen.table()[1]["checkpointed_layers"] == k
    assert plan(24, method="lora", gradient_checkpointing="on").checkpointed_layers is None  # 'on': every layer
    assert plan(200, method="lora").checkpointed_layers is None and not plan(200).gradient_checkpointing


def test_out_of_memory_with_some_layers_checkpointed_steps_down_to_all():
    partial = Attempt(method="lora", tokens_per_micro_batch=8192, gradient_checkpointing=True, checkpointed_layers=20)
    halved = step_down(partial, planned_tokens=8192, longest_row=4096, method_fixed=True)
    assert (halved.tokens_per_micro_batch, halved.checkpointed_layers) == (4096, 20)
    every = step_down(halved, planned_tokens=8192, longest_row=4096, method_fixed=True)
    assert (every.tokens_per_micro_batch, every.gradient_checkpointing, every.checkpointed_layers) == (8192, True, None)
    assert step_down(every.model_copy(update={"tokens_per_micro_batch": 4096}), planned_tokens=8192,
                     longest_row=4096, method_fixed=True) is None


def test_forced_method_that_cannot_fit_says_what_it_needs():
    budget = need("full", 2048, True) - 0.1
    with pytest.raises(PlanError, match=rf"method 'full' needs at least {need('full', 2048, True):.2f} GiB .*"
                                        rf"budget is {budget:.2f} GiB .*use lora"):
        plan(budget, method="full")
    with pytest.raises(PlanError, match="no method fits: the smallest, qlora.*use a GPU of at least "
                                        r"\d+ GiB \(the smallest common size that fits: 16 GiB\)"):
        plan(need("qlora", 2048, True) - 0.1)


def test_checkpointing_off_is_respected():
    budget = need("lora", 2048, False) - 0.1
    assert plan(budget).method == "lora"
    assert plan(budget, gradient_checkpointing="off").method == "qlora"


def test_forced_method_still_shows_every_candidate():
    forced = plan(need("full", 16384, False) + 1, method="lora")
    assert forced.method == "lora"
    assert [(c.estimate.method, c.fits) for c in forced.candidates] == [("full", True), ("lora", True), ("qlora", True)]
    assert [row["chosen"] for row in forced.table()] == [False, True, False]


def test_out_of_memory_steps_down_in_order():
    attempt = Attempt(method="full", tokens_per_micro_batch=8192, gradient_checkpointing=False)
    seen = []
    while attempt:
        seen.append((attempt.method, attempt.tokens_per_micro_batch, attempt.gradient_checkpointing))
        attempt = step_down(attempt, planned_tokens=8192, longest_row=2048, method_fixed=False)
    assert seen == [("full", 8192, False), ("full", 4096, False), ("full", 2048, False),
                    ("full", 8192, True), ("full", 4096, True), ("full", 2048, True),
                    ("lora", 8192, True), ("lora", 4096, True), ("lora", 2048, True),
                    ("qlora", 8192, True), ("qlora", 4096, True), ("qlora", 2048, True)]
    forced = Attempt(method="full", tokens_per_micro_batch=2048, gradient_checkpointing=True)
    assert step_down(forced, planned_tokens=8192, longest_row=2048, method_fixed=True) is None
    # full_precision auto on one GPU: bf16 weights (half the bytes) before giving up full fine-tuning
    bf16 = step_down(forced, planned_tokens=8192, longest_row=2048, method_fixed=True, bf16_allowed=True)
    assert (bf16.method, bf16.full_precision, bf16.tokens_per_micro_batch, bf16.checkpointed_layers) == \
        ("full", "bf16", 8192, None)
    last = bf16.model_copy(update={"tokens_per_micro_batch": 2048})
    assert step_down(last, planned_tokens=8192, longest_row=2048, method_fixed=False, bf16_allowed=True).method == "lora"


def test_smallest_work_pool_that_fits():
    from tasks.planning.selector import WorkPoolSpec, select_work_pool

    pools = [WorkPoolSpec(name="h200", gpu_gib=141), WorkPoolSpec(name="l4", gpu_gib=24),
             WorkPoolSpec(name="a100", gpu_gib=80)]
    kw = dict(method="lora", longest_row=2048, largest_step=16384)
    pool, chosen = select_work_pool(ModelShape.from_config(LLAMA_8B), pools, **kw)
    assert pool.name == ("l4" if need("lora", 1, True) <= 24 * 0.9 else "a100")
    assert chosen.budget_bytes == int(pool.gpu_gib * 0.9 * GIB) and pool.name in chosen.reason
    llama_1b = ModelShape.from_config(LLAMA_1B)
    pool, chosen = select_work_pool(llama_1b, pools, **{**kw, "method": "full", "full_precision": "fp32"})
    assert (pool.name, chosen.method) == ("a100", "full")  # 16 bytes per parameter alone is 18.5 GiB
    pool, chosen = select_work_pool(llama_1b, pools, **{**kw, "method": "full"})  # auto: bf16 at 8 bytes fits an L4
    assert (pool.name, chosen.method, chosen.estimate.full_precision) == ("l4", "full", "bf16")
    with pytest.raises(PlanError, match=r"no work pool's GPU fits(.|\n)*l4 \(24 GiB\)(.|\n)*a100(.|\n)*h200"):
        select_work_pool(ModelShape.from_config(LLAMA_8B), pools, **{**kw, "method": "full", "full_precision": "fp32"})


@pytest.mark.parametrize("method", ["full", "full-bf16", "lora", "qlora"])
@pytest.mark.parametrize("checkpointed", [0, 2, 4], ids=["no-ckpt", "ckpt-2-of-4", "ckpt"])
def test_estimate_follows_what_the_trainer_keeps_for_backward(method, checkpointed, tmp_path):
    """Binds the estimator to the trainer: the bytes autograd keeps from the trainer's own forward
    pass (packed rows, fused loss, LoRA's fused dropout), counted with saved-tensor hooks on CPU, are
    what the estimator says, with none, some or all layers checkpointed. A change to the trainer that
    keeps more or less fails here; the GPU figures (benchmarks/gpu_memory.py) are the fine check."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tasks.config import LoraSettings
    from tasks.data.tokenization import Example
    from tasks.engine.modeling import _load_4bit, prepare_for_training
    from tasks.planning.memory import kept_for_backward

    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 600, "tie_word_embeddings": True}
    fields = {k: v for k, v in config.items() if k != "model_type"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **fields))
    if method == "qlora":
        model.save_pretrained(tmp_path)
        model = _load_4bit(str(tmp_path), "cpu")
    method, precision = (method, "fp32") if method != "full-bf16" else ("full", "bf16")
    if precision == "bf16":
        model = model.to(torch.bfloat16)  # as load_for_training loads it for full_precision bf16
    model = prepare_for_training(model, method, "cpu", LoraSettings(r=8, dropout=0.05), checkpointed > 0,
                                 checkpointed_layers=checkpointed).train()
    rows = [Example(input_ids=list(range(1, 129)), labels=list(range(1, 129)), truncated=False)] * 4
    kept = bytes_kept_for_backward(model, rows)
    estimated = kept_for_backward(ModelShape.from_config(config), method, "cpu", 512, checkpointed > 0, lora_r=8,
                                  checkpointed_layers=checkpointed, full_precision=precision)
    assert estimated == pytest.approx(kept, rel=0.06)


def test_sharding_lets_full_fine_tuning_fit_on_several_gpus():
    """FSDP2 splits weights, gradients and AdamW states across GPUs: 8B full fine-tuning needs more
    than 90% of an H200 alone, and fits on each of two; adapters (DDP) need as much per GPU as on one."""
    shape = ModelShape.from_config(LLAMA_8B)
    one, two = (estimate_memory(shape, "full", "cuda", 2048, True, num_gpus=n) for n in (1, 2))
    assert one.gib > 141 * 0.9 > two.gib and two.trainable_state == one.trainable_state // 2
    lora_one, lora_two = (estimate_memory(shape, "lora", "cuda", 2048, True, num_gpus=n) for n in (1, 2))
    assert lora_one.weights == lora_two.weights and lora_two.total > lora_one.total
    chosen = select_plan(shape, budget_bytes=int(141 * 0.9 * GIB), budget_source="test", device="cuda",
                         method="auto", longest_row=2048, largest_step=16384, num_gpus=2)
    assert (chosen.method, chosen.num_gpus) == ("full", 2) and "2 GPUs (FSDP2, sharded)" in chosen.reason
    alone = select_plan(shape, budget_bytes=int(141 * 0.9 * GIB), budget_source="test", device="cuda",
                        method="auto", longest_row=2048, largest_step=16384, full_precision="fp32")
    assert alone.method == "lora"


def bytes_kept_for_backward(model, rows) -> int:
    """What autograd keeps for backward (weights left out) from one packed micro-batch of `rows`
    through the trainer's loss, counted with saved-tensor hooks on CPU."""
    import torch

    from tasks.engine.packing import pack
    from tasks.engine.train_loop import summed_loss

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def count(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        summed_loss(model, pack(rows), "cpu")
    return sum(kept.values())


def test_bf16_full_fine_tuning_holds_half_the_bytes_a_parameter():
    """bf16 weights and moments (tasks/engine/bf16_adamw.py): 2 + 4 bytes a parameter where fp32 master
    weights hold 4 + 8 (gradients are weighed against the activations in both), and no autocast copies."""
    shape = ModelShape.from_config(LLAMA_1B)
    fp32, bf16 = (estimate_memory(shape, "full", "cuda", 8192, False, full_precision=p) for p in ("fp32", "bf16"))
    assert bf16.weights == 2 * shape.parameters and bf16.trainable_state == 4 * shape.parameters
    assert fp32.weights > 4 * shape.parameters and fp32.trainable_state == 8 * shape.parameters
    assert bf16.activations < fp32.activations and bf16.full_precision == "bf16"
    dpo = estimate_memory(shape, "full", "cuda", 8192, False, full_precision="bf16", objective="dpo")
    assert dpo.weights == 2 * bf16.weights  # DPO's reference copy of the base is bf16 too
    lora = estimate_memory(shape, "lora", "cuda", 8192, False, full_precision="bf16")
    assert lora == estimate_memory(shape, "lora", "cuda", 8192, False)  # adapters ignore it


def test_auto_full_precision_takes_bf16_only_where_fp32_would_recompute():
    """'auto' keeps fp32 master weights where they train without checkpointing, and takes bf16 where
    fp32 would recompute layers (or not fit); on the CPU and on several GPUs it stays fp32. A forced
    bf16 on several GPUs is refused with the fix."""
    shape = ModelShape.from_config(LLAMA_1B)

    def plan_1b(budget_gib, **kw):
        kw = {"device": "cuda", "method": "full", **kw}
        return select_plan(shape, budget_bytes=int(budget_gib * GIB), budget_source="test", longest_row=2048,
                           largest_step=8192, **kw)

    roomy = plan_1b(120)
    assert (roomy.estimate.full_precision, roomy.gradient_checkpointing) == ("fp32", False)
    fp32_tight = plan_1b(30, full_precision="fp32")
    assert fp32_tight.gradient_checkpointing  # fp32 master weights at the seed recipe's peak: recomputation
    tight = plan_1b(30)
    assert tight.estimate.full_precision == "bf16" and not tight.gradient_checkpointing
    assert "bf16 weights and AdamW moments" in tight.reason
    assert plan_1b(30, device="cpu").estimate.full_precision == "fp32"
    assert plan_1b(30, full_precision="bf16", device="cpu").estimate.full_precision == "bf16"  # asked for
    assert plan_1b(60, num_gpus=2).estimate.full_precision == "fp32"
    with pytest.raises(PlanError, match="set training.num_gpus to 1, or full_precision to 'fp32' or 'auto'"):
        plan_1b(60, num_gpus=2, full_precision="bf16")
    # checkpointing forced on: fp32 recomputes as much as bf16 would, so it stays; off: fp32 while it fits at all
    assert plan_1b(30, gradient_checkpointing="on").estimate.full_precision == "fp32"
    off = plan_1b(30, gradient_checkpointing="off")
    assert (off.estimate.full_precision, off.gradient_checkpointing) == ("fp32", False)
    assert plan_1b(18, gradient_checkpointing="off").estimate.full_precision == "bf16"  # fp32 does not fit at all


def test_auto_plans_8b_full_fine_tuning_in_bf16_on_an_80_gib_gpu():
    """With method and full_precision auto, full fine-tuning (the best quality) of an 8B model fits an 80 GiB GPU
    in bf16, where with fp32 master weights only LoRA did."""
    kw = dict(budget_bytes=int(0.9 * 80 * GIB), budget_source="test", device="cuda", method="auto",
              longest_row=2048, largest_step=16384)
    shape = ModelShape.from_config(LLAMA_8B)
    chosen = select_plan(shape, **kw)
    assert (chosen.method, chosen.estimate.full_precision) == ("full", "bf16")
    assert select_plan(shape, full_precision="fp32", **kw).method == "lora"
