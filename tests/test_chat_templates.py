"""Answer masking with each family's real chat template (tests/chat_templates/, copied from the models'
tokenizer_config.json), applied by a small BPE tokenizer built offline with that family's special tokens.

For every family: only the assistant answers (each with the template's end-of-turn marker, which teaches the
model to stop) are targets; the system prompt (given or the template's default), the questions and every
template token are masked; the batched encoder agrees with the one-row encoder.
"""
from functools import lru_cache
from pathlib import Path

import pytest

from conftest import demo_texts
from tasks.data.tokenization import IGNORE_INDEX, encode, encode_all, generation_task, render

TEMPLATES = Path(__file__).parent / "chat_templates"


class Family:
    def __init__(self, template: str, bos: str | None, eos: str, specials: list[str], end: str, system: str = "yes",
                 final_end: str | None = None, default_system: str | None = None, answer_prefix: str = ""):
        self.template, self.bos, self.eos, self.specials = template, bos, eos, specials
        self.end = end  # what closes an answer mid-conversation: trained with it
        self.final_end = end if final_end is None else final_end  # what closes the last answer
        self.system = system  # whether the template renders a system message in a training row: yes, no, refuses
        self.default_system = default_system  # text the template adds when the row has no system message
        self.answer_prefix = answer_prefix  # what the template writes before the last answer, inside its turn


FAMILIES = {
    "gemma2": Family("gemma2.jinja", "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>\n",
                     system="refuses"),
    "gemma3": Family("gemma3.jinja", "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>", "<start_of_image>"],
                     "<end_of_turn>\n"),
    "qwen2.5": Family("qwen2.5.jinja", None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"], "<|im_end|>\n",
                      default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "qwen3": Family("qwen3.jinja", None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>", "<think>", "</think>"],
                    "<|im_end|>\n", answer_prefix="<think>\n\n</think>\n\n"),
    "llama3.2": Family("llama3.2.jinja", "<|begin_of_text|>", "<|eot_id|>",
                       ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"], "<|eot_id|>",
                       default_system="Cutting Knowledge Date: December 2023"),
    "mistral-nemo": Family("mistral-nemo.jinja", "<s>", "</s>", ["[INST]", "[/INST]"], "</s>", system="no"),
    "phi3.5": Family("phi3.5.jinja", "<s>", "<|endoftext|>", ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
                     "<|end|>\n", final_end="<|end|>\n<|endoftext|>"),
}
SYSTEM, Q1, A1, Q2, A2 = "Answer briefly.", "How heavy is it?", "It weighs 173 grams.", "And the battery?", "41 days."


@lru_cache(maxsize=None)
def family_tokenizer(name: str):
    """A fast BPE tokenizer trained on the demo texts, with the family's special tokens and real template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    family = FAMILIES[name]
    specials = [t for t in dict.fromkeys(["<unk>", family.bos, family.eos, *family.specials]) if t]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(demo_texts(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token=family.bos,
                                        eos_token=family.eos, pad_token=family.eos)
    tokenizer.chat_template = (TEMPLATES / family.template).read_text().removesuffix("\n")
    return tokenizer


def trained_pieces(tokenizer, example) -> list[str]:
    """Each run of consecutive target tokens, decoded."""
    pieces, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            pieces.append(tokenizer.decode(run))
            run = []
    return pieces + ([tokenizer.decode(run)] if run else [])


def masked_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX])


def conversation(name: str, turns: int = 2, system: bool = True) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}] if system and FAMILIES[name].system != "refuses" else []
    for question, answer in [(Q1, A1), (Q2, A2)][:turns]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


@pytest.mark.parametrize("name", FAMILIES)
def test_only_the_answers_are_targets_in_a_multi_turn_chat(name):
    tokenizer, family = family_tokenizer(name), FAMILIES[name]
    chat = conversation(name)
    example = encode(tokenizer, chat, max_seq_len=1024)
    assert tokenizer.decode(example.input_ids) == render(tokenizer, chat)  # the ids are the rendered text
    assert trained_pieces(tokenizer, example) == [A1 + family.end, family.answer_prefix + A2 + family.final_end]


@pytest.mark.parametrize("name", FAMILIES)
def test_the_prompt_system_prompt_and_template_tokens_are_masked(name):
    tokenizer, family = family_tokenizer(name), FAMILIES[name]
    chat = conversation(name)
    example = encode(tokenizer, chat, max_seq_len=1024)
    masked = masked_text(tokenizer, example)
    for text in [Q1, Q2, family.specials[0], *([SYSTEM] if family.system == "yes" else [])]:
        assert text in masked, f"{text!r} should be masked"
    assert example.labels[0] == IGNORE_INDEX
    # the targets are exactly the answers' tokens: nothing else of the row is one
    answers = [A1 + family.end, family.answer_prefix + A2 + family.final_end]
    assert sum(label != IGNORE_INDEX for label in example.labels) == sum(
        len(tokenizer(answer, add_special_tokens=False).input_ids) for answer in answers)


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.default_system])
def test_a_default_system_prompt_is_rendered_and_masked(name):
    tokenizer, family = family_tokenizer(name), FAMILIES[name]
    chat = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]
    example = encode(tokenizer, chat, max_seq_len=1024)
    assert family.default_system in render(tokenizer, chat)
    assert family.default_system in masked_text(tokenizer, example)
    assert trained_pieces(tokenizer, example) == [family.answer_prefix + A1 + family.final_end]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_plain_text_row_is_trained_and_continued_with_every_template(name):
    # A plain-text row is one assistant message. Gemma's and Mistral's templates refuse a conversation that does
    # not start with the user: such a row is then its text between the tokenizer's BOS and EOS, never an error
    # (the row failed in ingest's token count, training and evaluation alike).
    tokenizer = family_tokenizer(name)
    text = "The Quillfeather Q7 weighs 173 grams and lasts 41 days."
    row = [{"role": "assistant", "content": text}]
    example = encode(tokenizer, row, max_seq_len=1024)
    [trained] = trained_pieces(tokenizer, example)
    assert trained.startswith(text) and len(trained) > len(text)  # with the end marker that teaches it to stop
    prompt, reference = generation_task(tokenizer, row)
    assert render(tokenizer, row).startswith(prompt) and prompt.endswith("The Quillfeather Q7 weighs 173")
    assert reference == "grams and lasts 41 days."
    if name in ("gemma2", "gemma3", "mistral-nemo"):
        assert render(tokenizer, row) == FAMILIES[name].bos + text + FAMILIES[name].eos


def test_qwen3_trains_the_last_answers_thinking_and_drops_earlier_reasoning_as_its_template_does():
    """Qwen3's template renders the last answer with its thinking block (an empty one when the row has none)
    and earlier answers without theirs: the last answer's reasoning is trained, the earlier answer's text is
    trained without its reasoning, which the rendered text does not hold."""
    tokenizer = family_tokenizer("qwen3")
    chat = [{"role": "user", "content": Q1}, {"role": "assistant", "content": f"<think>\nGrams.\n</think>\n\n{A1}"},
            {"role": "user", "content": Q2}, {"role": "assistant", "content": f"<think>\nDays.\n</think>\n\n{A2}"}]
    example = encode(tokenizer, chat, max_seq_len=1024)
    assert trained_pieces(tokenizer, example) == [f"{A1}<|im_end|>\n", f"<think>\nDays.\n</think>\n\n{A2}<|im_end|>\n"]
    assert "Grams." not in tokenizer.decode(example.input_ids)
    assert "<|im_start|>assistant\n" in masked_text(tokenizer, example)


def test_mistral_nemo_drops_the_system_prompt_from_a_training_row_and_trains_every_answer():
    """Its template puts the system prompt into the last message only when that is a question (at generation
    time), so a row that ends with an answer renders without it, and the prompt up to the last answer is no
    prefix of the row: the answers are found in the row's text instead. Known limit: such a model is trained
    without the system prompt it is given at inference."""
    tokenizer = family_tokenizer("mistral-nemo")
    chat = conversation("mistral-nemo")
    assert render(tokenizer, chat) == f"<s>[INST]{Q1}[/INST]{A1}</s>[INST]{Q2}[/INST]{A2}</s>"
    assert SYSTEM in render(tokenizer, chat[:-1], add_generation_prompt=True)
    assert trained_pieces(tokenizer, encode(tokenizer, chat, 1024)) == [f"{A1}</s>", f"{A2}</s>"]


@pytest.mark.parametrize("name", FAMILIES)
def test_the_batched_encoder_agrees_with_the_one_row_encoder(name):
    tokenizer = family_tokenizer(name)
    rows = [conversation(name), conversation(name, turns=1), conversation(name, system=False),
            [{"role": "assistant", "content": "The Q7 weighs 173 grams."}]] * 3
    rows = [r for r in rows if _renders(tokenizer, r)]
    assert encode_all(tokenizer, rows, 1024) == [encode(tokenizer, r, 1024) for r in rows]


def _renders(tokenizer, row) -> bool:
    try:
        render(tokenizer, row)
    except Exception:  # noqa: BLE001  e.g. Gemma 2 refuses a conversation that does not start with the user
        return False
    return True
