"""Conversations -> token ids and labels, with loss only on the assistant's tokens.

The text is rendered once with the model's chat template; each assistant message's character span
is found by rendering the conversation up to it, and a token is trained when its characters fall
inside such a span. Working on characters, not on separately tokenized pieces, keeps the mask right
when BPE merges across a boundary. No torch here: plain lists in, plain lists out.
"""
from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy skips
FALLBACK_TEMPLATE_ROLE = "### {role}:\n"  # for tokenizers without a chat template (base models)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def trainable_tokens(self) -> int:
        """Tokens the loss counts: labels shift by one, so the first position is never predicted."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(
        FALLBACK_TEMPLATE_ROLE.format(role=m["role"]) + m["content"]
        + (tokenizer.eos_token or "" if m["role"] == "assistant" else "") + "\n\n"
        for m in messages
    )
    return text + (FALLBACK_TEMPLATE_ROLE.format(role="assistant") if add_generation_prompt else "")


def prompt_text(tokenizer, conversation: list[dict]) -> str:
    """Everything before the final assistant answer, ready for generation."""
    return render(tokenizer, conversation[:-1], add_generation_prompt=True)


def assistant_spans(tokenizer, conversation: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    full = render(tokenizer, conversation)
    spans = []
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, conversation[:i], add_generation_prompt=True)
        through = render(tokenizer, conversation[: i + 1])
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            # Some templates rewrite earlier turns (e.g. drop past reasoning); train the last turn only.
            if i == len(conversation) - 1:
                raise ValueError(
                    "the tokenizer's chat template does not render a conversation as a prefix of its "
                    "continuation, so the answer's tokens cannot be located; use a template that does"
                )
            continue
        spans.append((len(before), len(through)))
    return full, spans


def encode(tokenizer, conversation: list[dict], max_seq_len: int) -> Example:
    if not tokenizer.is_fast:
        raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer; answer masking needs character "
                         "offsets, which only fast tokenizers give: save the model with a tokenizer.json")
    text, spans = assistant_spans(tokenizer, conversation)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    labels = [
        token if any(start <= char_start < end for start, end in spans) else IGNORE_INDEX
        for token, (char_start, _) in zip(ids, encoding["offset_mapping"])
    ]
    return Example(input_ids=ids[:max_seq_len], labels=labels[:max_seq_len], truncated=len(ids) > max_seq_len)


def length_stats(examples: list[Example], max_seq_len: int) -> dict:
    lengths = sorted(len(e.input_ids) for e in examples)
    n = len(lengths)
    return {
        "rows": n,
        "max_seq_len": max_seq_len,
        "tokens_min": lengths[0],
        "tokens_median": lengths[n // 2],
        "tokens_p95": lengths[min(n - 1, int(0.95 * n))],
        "tokens_max": lengths[-1],
        "tokens_total": sum(lengths),
        "trainable_tokens": sum(e.trainable_tokens for e in examples),
        "rows_truncated": sum(e.truncated for e in examples),
        "rows_without_trainable_tokens": sum(e.trainable_tokens == 0 for e in examples),
    }


def encode_all(tokenizer, conversations: list[list[dict]], max_seq_len: int) -> list[Example]:
    return [encode(tokenizer, c, max_seq_len) for c in conversations]
