import pytest

from tasks.data.dataset import to_conversation
from tasks.data.tokenization import IGNORE_INDEX, encode, generation_task, length_stats, render


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
    from tasks.data.tokenization import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    tokenizer.chat_template = None
    example = encode(tokenizer, [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], 512)
    assert trained_text(tokenizer, example) == "A.<|im_end|>\n\n"


def test_plain_text_rows_train_the_whole_text(tiny_tokenizer):
    example = encode(tiny_tokenizer, to_conversation({"text": "The Q7 weighs 173 grams."}, "text"), max_seq_len=512)
    assert trained_text(tiny_tokenizer, example) == "The Q7 weighs 173 grams.<|im_end|>\n"


def test_generation_continues_a_plain_text_row_from_its_first_half(tiny_tokenizer):
    chat = to_conversation({"prompt": "How heavy is it?", "completion": "It weighs 173 grams."}, "prompt_completion")
    prompt, reference = generation_task(tiny_tokenizer, chat)
    assert prompt == render(tiny_tokenizer, chat[:-1], add_generation_prompt=True)
    assert reference == "It weighs 173 grams."

    text = to_conversation({"text": "The Quillfeather Q7 weighs 173 grams and lasts 41 days."}, "text")
    prompt, reference = generation_task(tiny_tokenizer, text)
    # the prompt is the row as training rendered it, cut after its first half of words
    assert render(tiny_tokenizer, text).startswith(prompt) and prompt.endswith("The Quillfeather Q7 weighs 173")
    assert reference == "grams and lasts 41 days."
    assert generation_task(tiny_tokenizer, to_conversation({"text": "Hello"}, "text"))[1] == "Hello"


def test_mask_marks_exactly_the_answer_tokens(tiny_tokenizer):
    """The mask itself, token by token: prompt and template tokens are ignored, answer tokens trained."""
    conversation = to_conversation({"prompt": "Weight?", "completion": "173 grams"}, "prompt_completion")
    example = encode(tiny_tokenizer, conversation, max_seq_len=512)
    view = "".join(f"[{tiny_tokenizer.decode([t])}]" if label != IGNORE_INDEX else tiny_tokenizer.decode([t])
                   for t, label in zip(example.input_ids, example.labels))
    assert view.startswith("<|im_start|>user\nWeight?<|im_end|>\n<|im_start|>assistant\n[")
    assert view.replace("][", "").endswith("[173 grams<|im_end|>\n]")


def test_batched_encoding_equals_the_one_row_encoder(tiny_tokenizer):
    from conftest import DEMO_DATA
    from tasks.data.tokenization import TemplateLayout, _encode_batch, encode_all

    _, conversations = read_conversations_demo(DEMO_DATA)
    conversations += [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Weight?"},
                       {"role": "assistant", "content": " 173 grams "}],
                      [{"role": "assistant", "content": "plain text row"}]]
    for max_seq_len in (512, 24):
        one_by_one = [encode(tiny_tokenizer, c, max_seq_len) for c in conversations]
        layout = TemplateLayout.learn(tiny_tokenizer)
        assert _encode_batch(tiny_tokenizer, layout, conversations, max_seq_len) == one_by_one  # the fast path itself
        assert encode_all(tiny_tokenizer, conversations, max_seq_len) == one_by_one


def read_conversations_demo(folder):
    import json

    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    return None, [r["messages"] for r in rows]


def test_encodings_are_cached_by_content_tokenizer_and_length(tiny_tokenizer, tmp_path):
    from tasks.data.tokenization import encode_all, encode_all_cached, length_report

    conversations = [[{"role": "user", "content": "word " * n}, {"role": "assistant", "content": "done"}]
                     for n in (1, 5, 40)]
    first = encode_all_cached(tiny_tokenizer, conversations, 32, tmp_path, content_key="sha-a")
    assert first == encode_all(tiny_tokenizer, conversations, 32)
    assert len(list(tmp_path.glob("encoded-*.npz"))) == 1
    assert encode_all_cached(tiny_tokenizer, conversations, 32, tmp_path, content_key="sha-a") == first
    encode_all_cached(tiny_tokenizer, conversations, 64, tmp_path, content_key="sha-a")
    encode_all_cached(tiny_tokenizer, conversations, 32, tmp_path, content_key="sha-b")
    assert len(list(tmp_path.glob("encoded-*.npz"))) == 3
    report = length_report(first, 32)
    assert [e.truncated for e in first] == [False, True, True]
    assert report["share_truncated"] == 2 / 3 and report["tokens_lost"] == first[1].tokens_lost + first[2].tokens_lost
    assert first[2].tokens_lost == len(encode_all(tiny_tokenizer, conversations[2:], 4096)[0].input_ids) - 32
    assert sum(report["histogram"].values()) == 3


def test_a_template_that_refuses_plain_text_rows_still_batches_chat(tiny_model):
    from tasks.data.tokenization import TemplateLayout, encode_all, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('user first') }}"
                               "{% endif %}" + tokenizer.chat_template)
    layout = TemplateLayout.learn(tokenizer)
    assert layout is not None and "assistant" not in layout.start
    chat = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]
    assert encode_all(tokenizer, chat, 64) == [encode(tokenizer, chat[0], 64)]
