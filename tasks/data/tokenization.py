"""Conversations -> token ids and labels, with loss only on the assistant's tokens.

The text is rendered once with the model's chat template; each assistant message's character span
is found by rendering the conversation up to it, and a token is trained when its characters fall
inside such a span. Working on characters, not on separately tokenized pieces, keeps the mask right
when BPE merges across a boundary. No torch here: plain lists in, plain lists out.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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


def load_tokenizer(path: str, loading=None):
    """The tokenizer of a model folder; `loading` (ModelLoadingSettings) defaults to no remote code."""
    from transformers import AutoTokenizer

    from tasks.store.weight_safety import SAFE, tokenizer_kwargs

    tokenizer = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs(loading or SAFE))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    from jinja2 import TemplateError

    try:
        return _render_with_template(tokenizer, messages, add_generation_prompt)
    except TemplateError:
        if not is_plain_text(messages):
            raise
    # Gemma's and Mistral's templates refuse a conversation that does not start with the user: a plain-text
    # row is then its text as a base model reads text, between the tokenizer's BOS and EOS.
    return (tokenizer.bos_token or "") + messages[0]["content"] + (tokenizer.eos_token or "")


def _render_with_template(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The model's chat template, or for a tokenizer without one (a base model) a plain role-marked layout."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(
        FALLBACK_TEMPLATE_ROLE.format(role=m["role"]) + m["content"]
        + (tokenizer.eos_token or "" if m["role"] == "assistant" else "") + "\n\n"
        for m in messages
    )
    return text + (FALLBACK_TEMPLATE_ROLE.format(role="assistant") if add_generation_prompt else "")


def is_plain_text(conversation: list[dict]) -> bool:
    """A `text` row: one assistant message, which nothing asks for (tasks/data/dataset.to_conversation)."""
    return len(conversation) == 1 and conversation[0]["role"] == "assistant"


def prompt_text(tokenizer, conversation: list[dict]) -> str:
    """Everything before the final assistant answer, ready for generation."""
    return render(tokenizer, conversation[:-1], add_generation_prompt=True)


def generation_task(tokenizer, conversation: list[dict]) -> tuple[str, str]:
    """What to generate from, and the reference the generation is scored against. A chat row: its
    last question and the answer. A plain-text row (one assistant message: nothing asks for it):
    its first half of words, as rendered in training, and the rest, so the metrics score how the
    model continues text like what it learned."""
    answer = conversation[-1]["content"]
    if not is_plain_text(conversation):
        return prompt_text(tokenizer, conversation), answer
    words = answer.split(" ")
    head = " ".join(words[: len(words) // 2])  # empty for one word: the whole text is the reference
    rendered = render(tokenizer, conversation)
    before = rendered[: rendered.rfind(answer)] if answer in rendered else ""
    return before + head, answer[len(head):].strip()


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
        if full.startswith(before) and full.startswith(through) and len(through) > len(before):
            spans.append((len(before), len(through)))
        elif i > 0 and (span := _answer_span_by_search(tokenizer, full, conversation, i,
                                                       spans[-1][1] if spans else 0)):
            spans.append(span)
        elif i == len(conversation) - 1:
            raise ValueError(
                "the tokenizer's chat template does not render a conversation as a prefix of its "
                "continuation, so the answer's tokens cannot be located; use a template that does"
            )
        # else: an earlier answer the template rewrites beyond recognition is not trained; the last one is
    return full, spans


def _answer_span_by_search(tokenizer, full: str, conversation: list[dict], i: int,
                           cursor: int) -> tuple[int, int] | None:
    """An answer whose template renders the conversation up to it as no prefix of the whole: Phi-3 ends only the
    last answer with an end-of-text token, Qwen3 gives only the last answer its thinking block (and drops past
    answers' reasoning), Mistral's places the system prompt in the last question, and only when the conversation
    ends with a question (so a training row loses it). Found in the whole text instead: the answer as written
    (trimmed, or its part after a reasoning block the template dropped) after its question and before the next
    one, followed by the template's end-of-turn marker, which is trained with it."""
    marker = _end_of_turn_marker(tokenizer)
    following = conversation[i + 1]["content"].strip() if i + 1 < len(conversation) else ""
    question = conversation[i - 1]["content"].strip()
    asked = full.find(question, cursor)
    if not marker or not question or asked < 0:
        return None
    after_question = asked + len(question)
    next_question = full.find(following, after_question) if following else -1
    next_question = next_question if next_question >= 0 else len(full)
    content = conversation[i]["content"]
    for answer in dict.fromkeys((content.strip(), content.split("</think>")[-1].strip())):
        start = full.find(answer, after_question) if answer else -1
        end = start + len(answer)
        if 0 <= start and end <= next_question and full.startswith(marker, end):
            return start, end + len(marker)
    return None


def _end_of_turn_marker(tokenizer) -> str:
    """What the template writes after every answer, mid-conversation and at its end alike (`<|im_end|>\\n`,
    `<end_of_turn>\\n`, `<|eot_id|>`, `<|end|>\\n`, `</s>`): the common start of the two. Empty when the template
    writes nothing there or refuses the probe."""
    cached = getattr(tokenizer, "_finetune_end_of_turn", None)
    if cached is not None:
        return cached
    markers = [f"\ue000{i}\ue001" for i in range(4)]
    roles = ("user", "assistant", "user", "assistant")
    try:
        text = render(tokenizer, [{"role": r, "content": m} for r, m in zip(roles, markers)])
    except Exception:  # noqa: BLE001  a template may refuse the probe: no marker, no earlier-turn recovery
        text = ""
    cuts = [text.find(m) for m in markers]
    marker = ""
    if text and -1 not in cuts and cuts == sorted(cuts):
        between = text[cuts[1] + len(markers[1]):cuts[2]]
        after_last = text[cuts[3] + len(markers[3]):]
        common = len(os.path.commonprefix([between, after_last]))
        # whole tokens only: `<|end|>\\n<|user|>` and `<|end|>\\n<|endoftext|>` share `<|end|>\\n<|`
        offsets = tokenizer(between, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        marker = between[:max((end for _, end in offsets if end <= common), default=0)]
    tokenizer._finetune_end_of_turn = marker
    return marker


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
    """`encode` for many conversations, fast: no template engine per row, batched tokenization.

    The chat template is learned once as the text it writes at the start, between two roles and
    after the last answer (`TemplateLayout`), so a row renders by joining strings and its answer
    spans are known while joining; label ranges come from the tokenizer's char->token map instead
    of a Python test per token. The first rows of every batch are also encoded the slow,
    obviously-right way; if any differs, or the template depends on more than the roles, the batch
    takes the slow way.
    """
    layout = TemplateLayout.learn(tokenizer)
    examples = []
    for start in range(0, len(conversations), ENCODE_BATCH):
        batch = conversations[start:start + ENCODE_BATCH]
        fast = _encode_batch(tokenizer, layout, batch, max_seq_len) if layout else None
        probe = min(VERIFY_ROWS, len(batch))
        if fast is None or fast[:probe] != [encode(tokenizer, c, max_seq_len) for c in batch[:probe]]:
            fast = [encode(tokenizer, c, max_seq_len) for c in batch]
        examples += fast
    return examples


ENCODE_BATCH = 4096  # rows per batched tokenizer call
VERIFY_ROWS = 8  # rows per batch checked against the one-row encoder
_PROBES = (("system", "user", "assistant", "user", "assistant"), ("user", "assistant", "user", "assistant"),
           ("assistant",))  # every role order a valid row can have: chat with/without system, plain text


@dataclass
class TemplateLayout:
    """A chat template as fixed strings: before the first message (by its role), between two roles,
    and after the final answer. Valid only for templates that depend on nothing but the roles."""
    start: dict[str, str]
    between: dict[tuple[str, str], str]
    end: str

    @classmethod
    def learn(cls, tokenizer) -> TemplateLayout | None:
        cached = getattr(tokenizer, "_finetune_template_layout", False)
        if cached is not False:
            return cached
        layout = cls._probe(tokenizer)
        tokenizer._finetune_template_layout = layout
        return layout

    @classmethod
    def _probe(cls, tokenizer) -> TemplateLayout | None:
        start, between, ends = {}, {}, set()
        for roles in _PROBES:
            markers = [f"\ue000{i}\ue001" for i in range(len(roles))]
            try:
                # The template itself: a plain-text row it refuses is rendered row by row (render's fallback).
                text = _render_with_template(tokenizer, [{"role": r, "content": m} for r, m in zip(roles, markers)])
            except Exception:  # noqa: BLE001  a template may refuse an order (e.g. assistant first): skip it
                continue
            cuts = [text.find(m) for m in markers]
            if -1 in cuts or cuts != sorted(cuts):
                return None
            gaps = [text[:cuts[0]]] + [text[cuts[i] + len(markers[i]):cuts[i + 1]] for i in range(len(cuts) - 1)]
            start.setdefault(roles[0], gaps[0])
            for pair, gap in zip(zip(roles, roles[1:]), gaps[1:]):
                if between.setdefault(pair, gap) != gap:
                    return None  # the text between two roles depends on the position: not a fixed layout
            ends.add(text[cuts[-1] + len(markers[-1]):])
        if len(ends) != 1 or ("assistant", "user") not in between:
            return None
        end = ends.pop()
        if not between[("assistant", "user")].startswith(end):
            return None  # an answer's span must end the same way mid-conversation and at the end
        return cls(start, between, end)

    def render(self, conversation: list[dict]) -> tuple[str, list[tuple[int, int]]] | None:
        """(text, answer spans), or None when the roles are outside what was learned."""
        first = conversation[0]["role"]
        if first not in self.start:
            return None
        pieces, spans, length = [self.start[first]], [], len(self.start[first])
        for i, message in enumerate(conversation):
            if i:
                gap = self.between.get((conversation[i - 1]["role"], message["role"]))
                if gap is None:
                    return None
                pieces.append(gap)
                length += len(gap)
            pieces.append(message["content"])
            if message["role"] == "assistant":
                spans.append((length, length + len(message["content"]) + len(self.end)))
            length += len(message["content"])
        pieces.append(self.end)
        return "".join(pieces), spans


def _encode_batch(tokenizer, layout: TemplateLayout, conversations: list[list[dict]],
                  max_seq_len: int) -> list[Example] | None:
    if not tokenizer.is_fast:
        return None
    texts, spans = [], []
    for conversation in conversations:
        rendered = layout.render(conversation)
        if rendered is None:
            return None
        texts.append(rendered[0])
        spans.append(rendered[1])
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    examples = []
    for encoding, row_spans in zip(encodings, spans):
        ids = encoding.ids
        labels = _labels_from_spans(encoding, ids, row_spans)
        if labels is None:
            return None
        examples.append(Example(ids[:max_seq_len], labels[:max_seq_len], len(ids) > max_seq_len,
                                max(0, len(ids) - max_seq_len)))
    return examples


def _labels_from_spans(encoding, ids: list[int], spans: list[tuple[int, int]]) -> list[int] | None:
    """Labels = ids where a token starts inside a span, else IGNORE_INDEX; a few lookups per span."""
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
        if first is None or last is None:
            return None  # a character outside every token: leave it to the exact per-token encoder
        if encoding.token_to_chars(first)[0] < start:
            first += 1  # this token began before the answer: it is not the answer's
        labels[first:last + 1] = ids[first:last + 1]
    return labels


ENCODING_CACHE_VERSION = "2"  # bump when encode's output changes for the same input


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


def require_few_truncated(report: dict, limit: float, source: str) -> None:
    """Raise DatasetError when more than `limit` of the rows are longer than max_seq_len."""
    from tasks.data.schemas import DatasetError

    if report["share_truncated"] > limit:
        raise DatasetError(
            f"{source}: {report['share_truncated']:.1%} of rows are longer than training.max_seq_len="
            f"{report['max_seq_len']} tokens (limit data_checks.max_truncated_fraction={limit}); "
            f"{report['tokens_lost']:,} of {report['tokens_total']:,} tokens would be cut (lengths: "
            f"{report['histogram']}). Raise max_seq_len or shorten the rows")


class EncodingSettings(Protocol):
    """What encoding reads of a run's config (tasks.config.FinetuneConfig has it)."""
    model: str
    work_dir: str

    @property
    def model_loading(self): ...

    @property
    def training(self): ...


def encoded_split(config: EncodingSettings, split_file: Path | str, conversations: list | None = None,
                  tokenizer=None) -> tuple[list, list]:
    """A split's conversations and their token ids and answer masks, encoded once: cached on disk by
    content + tokenizer + template + max_seq_len, so ingest, plan, train and evaluate share the work."""
    from tasks.data.dataset import read_conversations
    from tasks.store.manifest import sha256_file

    if conversations is None:
        conversations = read_conversations(str(split_file))[1]
    examples = encode_all_cached(tokenizer or load_tokenizer(config.model, config.model_loading), conversations,
                                 config.training.max_seq_len, Path(config.work_dir) / "cache" / "encoded",
                                 sha256_file(Path(split_file)))
    return conversations, examples
