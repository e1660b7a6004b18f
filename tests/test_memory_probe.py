"""The memory probe (issue 16): a family without a formula is measured on the GPU, and the plan is made from it.

On CPU: the arithmetic from measured points to an estimate (tasks/planning/measured.py), and the
selector using a probe's result and saying so. On a GPU (marked `gpu`): the real probe on a small
model of a family without a formula, against the trainer's own peak at a third token count.
"""
import gc
import types
import weakref

import pytest

from tasks.planning.measured import (CHECKPOINTED_PROBE_TOKENS, PROBE_TOKENS, MethodProbe, ProbePoint,
                                     checkpointed_line, fit_line, measured_estimate)
from tasks.planning.memory import GIB, ModelShape, estimate_memory, overhead_bytes
from tasks.planning.methods import Method
from tasks.planning.selector import PlanError, select_measured_plan, select_plan
from tasks.store.manifest import memory_comparison

LAYERS, PER_LAYER, CHECKPOINT_INPUT, REST = 8, 3000, 512, 900  # bytes per token
FIXED_PLAIN, FIXED_CHECKPOINTED = 5_000_000, 2_000_000
MYSTERY = {"model_type": "mystery", "architectures": ["MysteryForCausalLM"], "hidden_size": 2048,
           "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
           "vocab_size": 128256, "tie_word_embeddings": True}


def true_step_bytes(tokens: int, checkpointed: int, square: int = 0, chunk: tuple[int, int] = (0, 0)) -> float:
    """A made-up model that keeps what checkpointed_line assumes: the truth the probe should recover."""
    if checkpointed == 0:
        per_token, fixed, scored = LAYERS * PER_LAYER + REST, FIXED_PLAIN, LAYERS
    else:
        per_token = (LAYERS - checkpointed) * PER_LAYER + checkpointed * CHECKPOINT_INPUT + PER_LAYER + REST
        fixed = FIXED_CHECKPOINTED + (FIXED_PLAIN - FIXED_CHECKPOINTED) * (LAYERS - checkpointed) / (LAYERS - 1)
        scored = LAYERS - checkpointed + 2
    return fixed + per_token * tokens + square * scored * tokens ** 2 + chunk[1] * min(tokens, chunk[0])


def probe_of(step_bytes=true_step_bytes, method="lora", layers=LAYERS, counts=(1024, 2048), recomputed=None,
             checkpointed_counts=None, **fields) -> MethodProbe:
    """A probe's result from a made-up model's `step_bytes(tokens, checkpointed layers)`; `recomputed(tokens)`:
    its peak while a layer is recomputed (what the probe measures with one trained token a row)."""
    points = {k: [ProbePoint(tokens=t, step_bytes=round(step_bytes(t, k))) for t in c]
              for k, c in ((0, counts), (layers, checkpointed_counts or counts))}
    defaults = dict(method=method, gpu="test GPU", layers=layers, weights_bytes=3 * GIB, optimizer_bytes=80 * 2**20,
                    checkpoint_input_bytes=CHECKPOINT_INPUT, plain=points[0], checkpointed=points[layers],
                    recomputed=[ProbePoint(tokens=t, step_bytes=round(recomputed(t))) for t in counts] if recomputed
                    else [])
    return MethodProbe(**{**defaults, **fields})


def test_two_points_give_fixed_bytes_and_bytes_per_token():
    line = fit_line([(1024, 5_000_000 + 1024 * 700), (2048, 5_000_000 + 2048 * 700)])
    assert line.fixed == pytest.approx(5_000_000) and line.per_token == pytest.approx(700)
    # a noisy third point above the fitted line raises it: the plan never falls below a measurement
    raised = fit_line([(1024, 1_000), (2048, 2_000), (1536, 2_500)])
    assert all(raised.fixed + raised.per_token * x >= y for x, y in [(1024, 1_000), (2048, 2_000), (1536, 2_500)])
    assert fit_line([(1024, 2_000), (2048, 1_000)]) == (2_000, 0)  # never fewer bytes for more tokens
    with pytest.raises(ValueError, match="two different token counts"):
        fit_line([(1024, 1), (1024, 2)])


@pytest.mark.parametrize("checkpointed", [0, 1, 3, 7, LAYERS])
@pytest.mark.parametrize("tokens", [1536, 6144, 16384])
def test_the_probe_recovers_any_checkpointing_and_size_from_its_two_ends(checkpointed, tokens):
    """Measured with no layer and with every layer checkpointed, at 1024 and 2048 tokens: the estimate for
    k checkpointed layers and another micro-batch size is what the made-up model keeps there."""
    assert probe_of().step_bytes(tokens, checkpointed) == pytest.approx(true_step_bytes(tokens, checkpointed),
                                                                        rel=1e-6)


def test_eager_attentions_square_term_is_kept_out_of_the_line():
    square = 6 * 32  # bf16 scores and fp32 probabilities of 32 heads, per token squared
    probe = probe_of(lambda t, k: true_step_bytes(t, k, square), square_bytes_per_layer=square)
    for checkpointed in (0, 3, LAYERS):
        assert probe.step_bytes(8192, checkpointed) == pytest.approx(true_step_bytes(8192, checkpointed, square),
                                                                     rel=1e-6)


def test_the_fused_losss_chunk_is_not_extrapolated():
    """The fused loss keeps a chunk of logits of at most 4194 tokens (a 32k vocabulary): measured at 1024 and
    2048 tokens it grows with them, but a micro-batch of 16k tokens holds no more of it than one of 4194."""
    chunk = (4194, 32000 * 6)
    probe = probe_of(lambda t, k: true_step_bytes(t, k, chunk=chunk), loss_chunk_tokens=chunk[0],
                     loss_chunk_bytes_per_token=chunk[1])
    for checkpointed in (0, 3, LAYERS):
        assert probe.step_bytes(16384, checkpointed) == pytest.approx(
            true_step_bytes(16384, checkpointed, chunk=chunk), rel=1e-6)
    unaware = probe_of(lambda t, k: true_step_bytes(t, k, chunk=chunk))
    assert unaware.step_bytes(16384, 0) > 1.5 * true_step_bytes(16384, 0, chunk=chunk)  # what the term prevents


def test_the_checkpointed_peak_is_the_larger_of_two_lines():
    """With every layer checkpointed the peak is while the loss runs (the inputs and a fixed chunk of logits)
    at small sizes, while backward recomputes a layer (more per token, no chunk) at large ones: the H200's
    figures of Llama 1B QLoRA. A line through 1024 and 2048 tokens alone is far under at 32k; the runs with
    one trained token a row measure the second line, the checkpointed runs at 8k and 16k tokens nearly."""
    chunk = dict(loss_chunk_tokens=1046, loss_chunk_bytes_per_token=769_536)  # 805 MB from 1046 tokens on

    def while_loss(tokens):
        return 255_000_000 + 88_700 * tokens + 769_536 * min(tokens, 1046)

    def while_recomputing(tokens):
        return 190_000 * tokens

    def peak(tokens, checkpointed):
        if checkpointed == 0:
            return 800_000_000 + 1_241_000 * tokens + 769_536 * min(tokens, 1046)
        return max(while_loss(tokens), while_recomputing(tokens))

    assert CHECKPOINTED_PROBE_TOKENS == (1024, 2048, 8192, 16384) and PROBE_TOKENS == (1024, 2048)
    first = probe_of(peak, **chunk)  # what the first probe measured
    assert first.step_bytes(32768, LAYERS) < 0.65 * peak(32768, LAYERS)
    both = probe_of(peak, recomputed=while_recomputing, **chunk)
    larger = probe_of(peak, checkpointed_counts=CHECKPOINTED_PROBE_TOKENS, **chunk)
    probe = probe_of(peak, recomputed=while_recomputing, checkpointed_counts=CHECKPOINTED_PROBE_TOKENS, **chunk)
    for tokens in (1024, 3000, 8192, 16384, 32768, 65536):
        assert both.step_bytes(tokens, LAYERS) == pytest.approx(peak(tokens, LAYERS), rel=1e-6)
        assert probe.step_bytes(tokens, LAYERS) == pytest.approx(peak(tokens, LAYERS), rel=1e-6)
    assert larger.step_bytes(32768, LAYERS) == pytest.approx(peak(32768, LAYERS), rel=0.08)  # the kink between
    assert probe.step_bytes(4096, 0) == pytest.approx(peak(4096, 0), rel=1e-6)
    # k of the layers checkpointed: never less than with all of them
    assert probe.step_bytes(16384, 3) >= probe.step_bytes(16384, LAYERS)
    assert "checkpointed [1024, 2048, 8192, 16384], recomputed [1024, 2048]" in probe.describe()
    assert "185.5 KiB with all 8" in probe.describe()  # the recomputed layer's bytes per token
    with pytest.raises(ValueError, match="recomputed: a probe needs points at two different token counts"):
        MethodProbe(**{**probe.model_dump(), "recomputed": [ProbePoint(tokens=1024, step_bytes=1)]})


def test_nothing_of_the_probed_model_outlives_the_probe(tiny_model, monkeypatch):
    """The plan stage trains in the same process right after the probe: once probe_memory returns, its model
    and every parameter are freed, without waiting for Python's collector (disabled here). On the H200 the
    decoder layers (in reference cycles: Liger binds their forwards) stayed allocated through the next
    training (0.6-3.4 GiB): the probe collected while it still held them."""
    import peft  # noqa: F401  imported first: an import's log records keep the importer's frames (and model)

    from tasks.config import LoraSettings
    from tasks.engine import memory_probe

    loaded = []

    def load_and_watch(*args, **kwargs):
        model = load_for_training(*args, **kwargs)
        for module in model.modules():  # what Liger does on CUDA: a forward bound to the instance (a cycle)
            module.forward = types.MethodType(type(module).forward, module)
        loaded.extend(weakref.ref(t) for t in (model, *model.parameters()))
        return model

    load_for_training = memory_probe.load_for_training
    monkeypatch.setattr(memory_probe, "load_for_training", load_and_watch)
    gc.collect()
    gc.disable()
    try:
        probe = memory_probe.probe_memory(str(tiny_model), "lora", LoraSettings(r=8), longest_row=64,
                                          token_counts=(64, 128), device="cpu", checkpointed_counts=(64, 128, 256))
        alive = sum(ref() is not None for ref in loaded)
    finally:
        gc.enable()
    assert probe is not None and [p.tokens for p in probe.checkpointed] == [64, 128, 256]
    assert [p.tokens for p in probe.recomputed] == [64, 128]
    assert len(loaded) > 10 and alive == 0, f"{alive} of the model and its {len(loaded) - 1} parameters still alive"


def test_a_probe_needs_two_token_counts():
    with pytest.raises(ValueError, match=r"plain: a probe needs points at two different token counts"):
        probe_of(counts=(1024, 1024))
    assert checkpointed_line(fit_line([(1, 10), (2, 20)]), fit_line([(1, 4), (2, 6)]), 1, 1, 0) == (2, 2)


def test_measured_estimate_adds_the_loaded_model_adamw_and_the_step():
    probe = probe_of()
    estimate = measured_estimate(probe, 4096, 3)
    step = probe.step_bytes(4096, 3)
    assert (estimate.weights, estimate.trainable_state, estimate.activations, estimate.logits) == (
        3 * GIB, 80 * 2**20, step, 0)
    assert estimate.overhead == overhead_bytes("cuda", Method.LORA, 3, 3 * GIB + 80 * 2**20 + step)
    assert (estimate.kind, estimate.measured, estimate.verified) == ("measured (probe)", True, True)
    assert estimate.basis.startswith("measured (probe) on test GPU")
    # two GPUs, adapters data-parallel: the all-reduce holds the adapters' gradients once more
    assert measured_estimate(probe, 4096, 3, num_gpus=2).trainable_state == 80 * 2**20 * 3 // 2
    with pytest.raises(ValueError, match="sharded full fine-tuning"):
        measured_estimate(probe_of(method="full"), 4096, 3, num_gpus=2)


def probe_from_formula(shape: ModelShape, method: str, activation_share: float) -> MethodProbe:
    """A probe result for `shape` whose steps keep `activation_share` of what the conservative formula says."""
    def step(tokens, checkpointed):
        e = estimate_memory(shape, method, "cuda", tokens, checkpointed > 0, checkpointed_layers=checkpointed)
        return (e.activations + e.logits) * activation_share
    plain = estimate_memory(shape, method, "cuda", 1024, False)
    return probe_of(step, method=method, layers=shape.num_layers, weights_bytes=plain.weights,
                    optimizer_bytes=plain.trainable_state, checkpoint_input_bytes=shape.hidden_size * 2)


PLAN = dict(budget_source="test", device="cuda", longest_row=2048, largest_step=16 * 2048)


def test_the_plan_uses_a_measured_estimate_and_says_so():
    shape = ModelShape.from_config(MYSTERY)
    assert not shape.verified
    measured = probe_from_formula(shape, "lora", 0.4)
    conservative = select_plan(shape, budget_bytes=int(40 * GIB), method="lora", **PLAN)
    plan = select_plan(shape, budget_bytes=int(40 * GIB), method="lora", probes={Method.LORA: measured}, **PLAN)
    # what the probe measured is what the plan is made from: less kept per token, so larger micro-batches fit
    assert plan.estimate.measured and plan.estimate.kind == "measured (probe)"
    assert plan.estimate == measured_estimate(measured, plan.tokens_per_micro_batch, plan.estimate.checkpointed_layers)
    assert plan.estimate.tokens > 2 * conservative.estimate.tokens
    assert conservative.estimate.kind == "conservative (unverified)"
    assert {r["method"]: r["estimate"] for r in plan.table()} == {
        Method.FULL: "conservative (unverified)", Method.LORA: "measured (probe)", Method.QLORA: "conservative (unverified)"}
    assert "estimate measured (probe) on test GPU" in plan.reason and "unverified" not in plan.reason
    assert plan.model_dump()["estimate"]["kind"] == "measured (probe)"  # what the manifest's plan records
    assert memory_comparison(plan.model_dump(), {})["estimate"] == "measured (probe)"  # and its memory section


def test_methods_are_probed_best_first_until_a_measured_one_fits():
    shape = ModelShape.from_config(MYSTERY)
    probed = []

    def measure(method):
        probed.append(method)
        return probe_from_formula(shape, method, 0.5)

    # 1.2B parameters: full fine-tuning's fp32 weights and AdamW moments (12 bytes each, 14 GiB) exceed
    # 12 GiB before any activation, so it is not even loaded
    plan = select_measured_plan(shape, measure, budget_bytes=int(12 * GIB), method="auto", **PLAN)
    assert (probed, plan.method, plan.estimate.kind) == ([Method.LORA], Method.LORA, "measured (probe)")
    probed.clear()
    plan = select_measured_plan(shape, measure, budget_bytes=int(120 * GIB), method="auto", **PLAN)
    assert (probed, plan.method, plan.estimate.kind) == ([Method.FULL], Method.FULL, "measured (probe)")
    probed.clear()
    plan = select_measured_plan(shape, measure, budget_bytes=int(120 * GIB), method="qlora", **PLAN)
    assert (probed, plan.method) == ([Method.QLORA], Method.QLORA)


def test_without_a_probe_the_plan_stays_conservative_and_formulas_are_never_probed():
    shape = ModelShape.from_config(MYSTERY)
    plan = select_measured_plan(shape, lambda method: None, budget_bytes=int(40 * GIB), method="lora", **PLAN)
    assert plan.estimate.kind == "conservative (unverified)" and "unverified" in plan.reason
    llama = ModelShape.from_config({**MYSTERY, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    plan = select_measured_plan(llama, lambda method: pytest.fail("a family with a formula was probed"),
                                budget_bytes=int(40 * GIB), method="auto", **PLAN)
    assert plan.estimate.kind == "formula"
    with pytest.raises(PlanError, match="no method fits"):
        select_measured_plan(shape, lambda method: pytest.fail("probed what cannot fit"), budget_bytes=GIB,
                             method="auto", **PLAN)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_the_probe_predicts_the_trainers_peak_on_a_gpu(tmp_path, method):
    """The real probe on a model of a family without a formula (StarCoder 2: LayerNorm, a plain MLP, its
    own head), at 1024 and 2048 tokens; then the trainer trains at 3072 tokens per micro-batch, and its
    peak allocation is within 10% of the probe's estimate of it (CUDA context and slack left out of both)."""
    import logging

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tasks.config import LoraSettings, TrainingSettings
    from tasks.data.tokenization import Example
    from tasks.engine.memory_probe import probe_memory
    from tasks.engine.modeling import load_for_training
    from tasks.engine.train_loop import train

    config = AutoConfig.for_model("starcoder2", hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                                  num_attention_heads=8, num_key_value_heads=4, vocab_size=8192,
                                  max_position_embeddings=4096, sliding_window=None, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "model")
    path, lora = str(tmp_path / "model"), LoraSettings(r=16, dropout=0.05)
    shape = ModelShape.from_config(config.to_dict())
    assert not shape.verified

    # cuBLAS keeps its workspaces (tens of MiB on Hopper) allocated once made: make them before counting
    layer = torch.nn.Linear(64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        layer(torch.ones(8, 64, device="cuda", requires_grad=True)).sum().backward()
    layer(torch.ones(8, 64, device="cuda", requires_grad=True)).sum().backward()
    del layer
    before = torch.cuda.memory_allocated()
    probe = probe_memory(path, method, lora, longest_row=512)
    left = torch.cuda.memory_allocated() - before  # what the training next in the process would find
    assert left < 64 * 2**20, f"the probe left {left / 2**20:.0f} MiB allocated"
    assert probe is not None and probe.seconds < 60
    assert [p.tokens for p in probe.plain] == [1024, 2048]
    assert [p.tokens for p in probe.recomputed] == [1024, 2048]
    tokens, checkpointed = 3072, 0
    predicted = measured_estimate(probe, tokens, checkpointed)

    model = load_for_training(path, method, "cuda", lora, False)
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 8192, (512,), generator=generator).tolist() for _ in range(6 * 3 + 1)]
    examples = [Example(input_ids=r, labels=r, truncated=False) for r in rows]
    settings = TrainingSettings(max_steps=3, batch_size=6, micro_batch_size=6, max_seq_len=512, eval_every=1000,
                                early_stopping_patience=0, checkpoint_every=0)
    outcome = train(model, examples[1:], examples[:1], settings, tokens, "cuda", tmp_path / "best",
                    logging.getLogger("test"), progress=False)
    allocated = predicted.weights + predicted.trainable_state + predicted.activations
    assert allocated == pytest.approx(outcome.peak_allocated_bytes, rel=0.10), (
        f"probe {allocated / 2**20:.0f} MiB vs trainer {outcome.peak_allocated_bytes / 2**20:.0f} MiB")

    plan = select_measured_plan(shape, lambda m: probe if m == method else None, budget_bytes=int(8 * GIB),
                                method=method, device="cuda", budget_source="test", longest_row=512,
                                largest_step=tokens)
    assert plan.estimate.kind == "measured (probe)" and "measured (probe) on" in plan.reason


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.usefixtures("prefect_api")
def test_the_flow_on_a_gpu_measures_a_family_without_a_formula(tiny_model, tmp_path):
    """The plan stage on a GPU worker probes a family without a formula; the manifest says the plan was measured."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from flows.finetune import finetune
    from tasks.data.tokenization import load_tokenizer
    from test_model_families import family_config

    folder = tmp_path / "starcoder2"
    tokenizer = load_tokenizer(str(tiny_model))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(family_config("starcoder2", tokenizer)).save_pretrained(folder)
    result = finetune(tiny_config(folder, tmp_path, method="lora"))
    manifest = json.loads((tmp_path / "out" / "runs" / result.run_id / "manifest.json").read_text())
    assert manifest["plan"]["estimate"]["kind"] == manifest["memory"]["estimate"] == "measured (probe)"
    assert "estimate measured (probe) on" in manifest["plan"]["reason"]
    assert result.tuned_eval_loss < result.base_eval_loss
