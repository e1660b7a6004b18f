"""The train task's answer to an out-of-memory error: a leaner configuration, recorded, and the run
goes on. On a GPU the error is real (a memory cap); on CPU it is injected where training starts."""
import logging

import pytest
import torch

from conftest import DEMO_DATA
from tasks.config import LoraSettings, TrainingSettings
from tasks.planning.selector import Attempt

SETTINGS = TrainingSettings(max_steps=2, batch_size=8, max_seq_len=128, eval_every=2, learning_rate=1e-3)


def _examples(tokenizer):
    from tasks.data.tokenization import encode_all
    from tasks.data.validation import read_dataset

    return encode_all(tokenizer, read_dataset(str(DEMO_DATA / "train.jsonl")).conversations, 128)


def _parts(model_dir, tokenizer, device, tmp_path):
    """(load, run, longest row): what the train task hands to train_within_memory."""
    from tasks.engine.modeling import load_for_training
    from tasks.engine.train_loop import train

    examples = _examples(tokenizer)

    def load(attempt):
        return load_for_training(str(model_dir), attempt.method, device, LoraSettings(r=8),
                                 attempt.gradient_checkpointing)

    def run(model, attempt, restarted):
        return train(model, examples[8:], examples[:8], SETTINGS, attempt.tokens_per_micro_batch, device,
                     tmp_path / "best", logging.getLogger("test"), progress=False)

    return load, run, max(len(e.input_ids) for e in examples)


def _within_memory(load, run, longest):
    from tasks.engine.train_loop import train_within_memory

    first = Attempt(method="full", tokens_per_micro_batch=4 * longest, gradient_checkpointing=False)
    return train_within_memory(load, run, first, planned_tokens=4 * longest, longest_row=longest,
                               method_fixed=False, log=logging.getLogger("test"))


def test_out_of_memory_steps_down_until_training_fits(tiny_model, tiny_tokenizer, tmp_path):
    attempts = []
    load, run, longest = _parts(tiny_model, tiny_tokenizer, "cpu", tmp_path)

    def full_does_not_fit(model, attempt, restarted):
        attempts.append((attempt.method, attempt.gradient_checkpointing, restarted))
        if attempt.method == "full":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return run(model, attempt, restarted)

    outcome, final, downs = _within_memory(load, full_does_not_fit, longest)
    assert final.method == "lora" and final.gradient_checkpointing and outcome.steps == 2
    assert [d["out_of_memory"]["method"] for d in downs] == ["full"] * len(downs)
    assert downs[-1]["next"]["method"] == "lora" and "injected" in downs[0]["error"]
    assert attempts[0] == ("full", False, False) and attempts[-1] == ("lora", True, True)


def test_out_of_memory_everywhere_names_every_attempt(tiny_model, tiny_tokenizer, tmp_path):
    def nothing_fits(model, attempt, restarted):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    load, _, longest = _parts(tiny_model, tiny_tokenizer, "cpu", tmp_path)
    with pytest.raises(MemoryError, match=r"every configuration tried \(full \(fp32 weights\) at \d+ tokens.*qlora at \d+ tokens "
                                          r"per micro-batch, gradient checkpointing on\)"):
        _within_memory(load, nothing_fits, longest)


@pytest.mark.gpu
def test_a_real_out_of_memory_error_steps_down_on_gpu(tiny_model, tiny_tokenizer, tmp_path):
    """A 0.7B model whose full fine-tuning needs ~12 GiB, on a GPU capped at 6 GiB."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = tmp_path / "model-0.7b"
    shutil.copytree(tiny_model, model_dir)
    config = AutoConfig.from_pretrained(tiny_model)
    config.update(dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=12, num_attention_heads=16,
                       num_key_value_heads=4, initializer_range=0.02))
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(model_dir)
    load, run, longest = _parts(model_dir, tiny_tokenizer, "cuda", tmp_path)
    held = []  # what the process holds on the GPU as each attempt starts: nothing left from the last

    def load_counting(attempt):
        held.append((torch.cuda.memory_allocated(), torch.cuda.memory_reserved()))
        return load(attempt)

    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(6 * 2**30 / torch.cuda.mem_get_info()[1])
    try:
        outcome, final, downs = _within_memory(load_counting, run, longest)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    print("allocated, reserved at each attempt:", held)
    assert max(allocated for allocated, _ in held) < 2**27, held
    assert final.method == "lora" and downs and downs[0]["out_of_memory"]["method"] == "full"
    assert all("out of memory" in d["error"] for d in downs), downs
    assert outcome.steps == 2 and outcome.peak_memory_bytes < 6.5 * 2**30
