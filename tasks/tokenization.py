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
    tokens_lost: int = 0  # tokens cut off by truncation to max_seq_len

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
        through = render(tokenizer, conversation[: i + 1])
        if i == 0:  # a plain-text row: templates refuse to render an empty conversation
            before = through[: through.rfind(message["content"])] if message["content"] in through else full
        else:
            before = render(tokenizer, conversation[:i], add_generation_prompt=True)
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
    return Example(input_ids=ids[:max_seq_len], labels=labels[:max_seq_len], truncated=len(ids) > max_seq_len,
                   tokens_lost=max(0, len(ids) - max_seq_len))


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
    """`encode` for many conversations, fast: one template render per row and batched tokenization.

    The answer spans come from one render with marker characters around each assistant message
    (instead of 2 renders per assistant turn), and the label ranges from the tokenizer's char->token
    map (instead of a Python test per token). The first rows of each batch are also encoded the slow,
    obviously-right way; if any differs, the whole batch takes the slow way.
    """
    examples = []
    for start in range(0, len(conversations), ENCODE_BATCH):
        batch = conversations[start:start + ENCODE_BATCH]
        fast = _encode_batch(tokenizer, batch, max_seq_len)
        probe = min(VERIFY_ROWS, len(batch))
        if fast is None or fast[:probe] != [encode(tokenizer, c, max_seq_len) for c in batch[:probe]]:
            fast = [encode(tokenizer, c, max_seq_len) for c in batch]
        examples += fast
    return examples


ENCODE_BATCH = 4096  # rows per batched tokenizer call
VERIFY_ROWS = 8  # rows per batch checked against the one-row encoder
OPEN, CLOSE = "\ue000", "\ue001"  # private-use characters marking an answer inside one render


def _encode_batch(tokenizer, conversations: list[list[dict]], max_seq_len: int) -> list[Example] | None:
    if not tokenizer.is_fast:
        return None
    suffix = _answer_suffix(tokenizer)
    texts, spans = [], []
    for conversation in conversations:
        marked = _marked_render(tokenizer, conversation, suffix)
        if marked is None:
            return None
        texts.append(marked[0])
        spans.append(marked[1])
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    examples = []
    for encoding, row_spans in zip(encodings, spans):
        labels = _labels_from_spans(encoding, row_spans)
        if labels is None:
            return None
        ids = encoding.ids
        examples.append(Example(ids[:max_seq_len], labels[:max_seq_len], len(ids) > max_seq_len,
                                max(0, len(ids) - max_seq_len)))
    return examples


def _answer_suffix(tokenizer) -> str:
    """What the template writes after an assistant message's content (e.g. '<|im_end|>\\n'), learned once."""
    cached = getattr(tokenizer, "_finetune_answer_suffix", None)
    if cached is not None:
        return cached
    probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    through = render(tokenizer, probe)
    start = len(render(tokenizer, probe[:1], add_generation_prompt=True))
    suffix = through[start + 1:] if through[start:start + 1] == "a" else ""
    tokenizer._finetune_answer_suffix = suffix
    return suffix


def _marked_render(tokenizer, conversation: list[dict], suffix: str) -> tuple[str, list[tuple[int, int]]] | None:
    """(text, answer spans) from one render with markers around each assistant content; None if unsure."""
    marked = []
    for message in conversation:
        if OPEN in message["content"] or CLOSE in message["content"]:
            return None
        if message["role"] == "assistant":
            message = {**message, "content": OPEN + message["content"] + CLOSE}
        marked.append(message)
    raw = render(tokenizer, marked)
    pieces, spans, cursor, removed = [], [], 0, 0
    while (open_at := raw.find(OPEN, cursor)) >= 0:
        close_at = raw.find(CLOSE, open_at)
        if close_at < 0:
            return None
        pieces += [raw[cursor:open_at], raw[open_at + 1:close_at]]
        start, end = open_at - removed, close_at - removed - 1
        removed += 2
        cursor = close_at + 1
        spans.append((start, end))
    pieces.append(raw[cursor:])
    text = "".join(pieces)
    if len(spans) != sum(m["role"] == "assistant" for m in conversation):
        return None
    for i, (start, end) in enumerate(spans):
        if not text.startswith(suffix, end):
            return None
        spans[i] = (start, end + len(suffix))
    return text, spans


def _labels_from_spans(encoding, spans: list[tuple[int, int]]) -> list[int] | None:
    """Labels = ids where a token starts inside a span, else IGNORE_INDEX; a few lookups per span."""
    ids, offsets = encoding.ids, encoding.offsets
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
        if first is None or last is None:
            return None  # a character outside every token: leave it to the exact per-token encoder
        if offsets[first][0] < start:
            first += 1  # this token began before the answer: it is not the answer's
        labels[first:last + 1] = ids[first:last + 1]
    return labels


ENCODING_CACHE_VERSION = "1"  # bump when encode's output changes for the same input


def encoding_cache_key(tokenizer, content_key: str, max_seq_len: int) -> str:
    """Same data (content hash), same tokenizer (its full JSON) and template, same length: same Examples."""
    import hashlib

    parts = [ENCODING_CACHE_VERSION, content_key, str(max_seq_len), tokenizer.chat_template or "",
             hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def encode_all_cached(tokenizer, conversations: list[list[dict]], max_seq_len: int, cache_dir,
                      content_key: str) -> list[Example]:
    """encode_all, stored as flat numpy arrays under `cache_dir` so a re-run on the same data is a load.

    `content_key` must identify the conversations (e.g. the sha256 of the split file they came from).
    """
    from pathlib import Path

    import numpy as np

    path = Path(cache_dir) / f"encoded-{encoding_cache_key(tokenizer, content_key, max_seq_len)}.npz"
    if path.is_file():
        stored = np.load(path)
        if int(stored["rows"]) == len(conversations):
            return _examples_from_arrays(stored)
    examples = encode_all(tokenizer, conversations, max_seq_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    np.savez(partial, rows=len(examples), lengths=lengths,
             ids=np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int32, count=int(lengths.sum())),
             labels=np.fromiter((t for e in examples for t in e.labels), dtype=np.int32, count=int(lengths.sum())),
             truncated=np.array([e.truncated for e in examples], dtype=bool),
             lost=np.array([e.tokens_lost for e in examples], dtype=np.int64))
    partial.replace(path)  # readers never see half a cache file
    return examples


def _examples_from_arrays(stored) -> list[Example]:
    import numpy as np

    bounds = np.concatenate(([0], np.cumsum(stored["lengths"])))
    ids, labels, truncated = stored["ids"].tolist(), stored["labels"].tolist(), stored["truncated"].tolist()
    return [Example(ids[a:b], labels[a:b], t, lost) for a, b, t, lost in
            zip(bounds[:-1].tolist(), bounds[1:].tolist(), truncated, stored["lost"].tolist())]


def length_report(examples: list[Example], max_seq_len: int) -> dict:
    """Token lengths against max_seq_len: a histogram, the share of rows truncated and the tokens lost."""
    import numpy as np

    full = np.array([len(e.input_ids) + e.tokens_lost for e in examples], dtype=np.int64)
    edges = [0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 2**62]
    counts, _ = np.histogram(full, bins=edges)
    return {
        "rows": len(examples),
        "max_seq_len": max_seq_len,
        "histogram": {f"{lo}-{hi - 1}" if hi < 2**62 else f"{lo}+": int(c)
                      for lo, hi, c in zip(edges[:-1], edges[1:], counts) if c},
        "share_truncated": float(np.mean(full > max_seq_len)) if len(full) else 0.0,
        "tokens_lost": int(np.maximum(full - max_seq_len, 0).sum()),
        "tokens_total": int(full.sum()),
    }
