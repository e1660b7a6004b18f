import pytest

from tasks.dataset import to_conversation
from tasks.tokenization import IGNORE_INDEX, encode, length_stats, render


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


@pytest.mark.parametrize("data_format,row", [
    ("instruction", {"instruction": "How heavy is it?", "input": "The Q7", "output": "It weighs 173 grams."}),
    ("prompt_completion", {"prompt": "How heavy is it?", "completion": "It weighs 173 grams."}),
    ("chat", {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "How heavy is it?"},
                           {"role": "assistant", "content": "It weighs 173 grams."}]}),
])
def test_only_the_answer_is_trained_in_every_format(tiny_tokenizer, data_format, row):
    example = encode(tiny_tokenizer, to_conversation(row, data_format), max_seq_len=512)
    assert trained_text(tiny_tokenizer, example) == "It weighs 173 grams.<|im_end|>\n"
    assert tiny_tokenizer.decode(example.input_ids) == render(tiny_tokenizer, to_conversation(row, data_format))


def test_every_assistant_turn_is_trained_in_multi_turn_chat(tiny_tokenizer):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Weight?"}, {"role": "assistant", "content": "173 grams"}]
    example = encode(tiny_tokenizer, conversation, max_seq_len=512)
    assert trained_text(tiny_tokenizer, example) == "Hello<|im_end|>\n173 grams<|im_end|>\n"


def test_truncation_is_counted(tiny_tokenizer):
    conversation = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "done"}]
    short = encode(tiny_tokenizer, conversation, max_seq_len=16)
    assert len(short.input_ids) == 16 and short.truncated and short.trainable_tokens == 0
    stats = length_stats([short, encode(tiny_tokenizer, conversation, 512)], 16)
    assert stats["rows_truncated"] == 1 and stats["rows_without_trainable_tokens"] == 1


def test_tokenizer_without_chat_template_gets_a_plain_one(tiny_model):
    from tasks.tokenization import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    tokenizer.chat_template = None
    example = encode(tokenizer, [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], 512)
    assert trained_text(tokenizer, example) == "A.<|im_end|>\n\n"
