"""Preference pairs: every accepted row form, the report's file/row/field/fix for every broken rule,
duplicates, prompt leakage, a split that keeps a prompt on one side, and answer-only labels."""
import json

import numpy as np
import pytest

from tasks.data.dataset import describe
from tasks.data.preference import PreferencePair, encode_pairs, read_preferences, scan_preferences, split_preferences
from tasks.data.schemas import DatasetError
from tasks.data.settings import DataSettings
from tasks.data.tokenization import IGNORE_INDEX


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_every_row_form_becomes_a_prompt_and_two_answers(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    rows = [
        {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green."},
        {"prompt": [system, user("Grass colour?")], "chosen": [assistant("Green.")], "rejected": "Red."},
        {"chosen": [user("Hi"), assistant("Hello"), user("Name?"), assistant("Quill.")],
         "rejected": [user("Hi"), assistant("Hello"), user("Name?"), assistant("No.")]},
        {"prompt": [user("Snow?")], "chosen": [user("Snow?"), assistant("White.")], "rejected": "Black."},
    ]
    data = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    assert data.pairs == [
        PreferencePair([user("Sky colour?")], "Blue.", "Green."),
        PreferencePair([system, user("Grass colour?")], "Green.", "Red."),
        PreferencePair([user("Hi"), assistant("Hello"), user("Name?")], "Quill.", "No."),  # shared prefix split off
        PreferencePair([user("Snow?")], "White.", "Black."),  # the repeated prompt is dropped from chosen
    ]
    assert data.rows == [1, 2, 3, 4]
    assert data.format_evidence == "fields chosen, rejected in 4 of 4 rows"


BAD_ROWS = [  # (row, rule, field as reported, a piece of the detail)
    ({"prompt": "Q", "chosen": "Same.", "rejected": " Same. "}, "same_answer", "rejected", "both are 'Same.'"),
    ({"prompt": "Q", "chosen": "  ", "rejected": "b"}, "not_blank", "chosen", "got '  '"),
    ({"chosen": [user("Hi"), assistant("Hello")], "rejected": [assistant("Go away")]}, "prompt_missing",
     "rejected", "while chosen starts with the prompt"),
    ({"chosen": [user("Hi"), assistant("a")], "rejected": [user("Hey"), assistant("b")]}, "prompt_mismatch",
     "rejected", "message 0 differs"),
    ({"chosen": "a", "rejected": "b"}, "no_prompt", "prompt", "answers without a prompt"),
    ({"prompt": [user("Q"), assistant("A")], "chosen": "a", "rejected": "b"}, "role_order", "prompt",
     "roles user, assistant"),
    ({"prompt": "Q", "chosen": [assistant("a"), assistant("b")], "rejected": "c"}, "answer_shape", "chosen",
     "roles assistant, assistant"),
    ({"prompt": "Q", "chosen": 5, "rejected": "b"}, "not_text_or_messages", "chosen", "got int 5"),
    ({"prompt": "Q", "rejected": "b"}, "missing", "chosen", "value is missing"),
    ({"prompt": "Q", "chosen": [{"role": "bot", "content": "a"}], "rejected": "b"}, "unknown_role", "chosen[0]",
     "role 'bot'"),
    ({"prompt": [user("Q"), None], "chosen": "a", "rejected": "b"}, "null_in_message", "prompt[1]", "got None"),
]


@pytest.mark.parametrize("row, rule, field, detail", BAD_ROWS, ids=[b[1] for b in BAD_ROWS])
def test_each_broken_rule_is_reported_with_file_row_field_and_fix(tmp_path, row, rule, field, detail):
    good = {"prompt": "Fine?", "chosen": "Yes.", "rejected": "No."}
    path = write_jsonl(tmp_path / "p.jsonl", [good, row])
    with pytest.raises(DatasetError) as error:
        read_preferences(path)
    message = str(error.value)
    assert f"({rule}) in 1 row(s)" in message
    assert f"{path} line 2" in message and detail in message
    if field != "(row)":
        assert f"column {field.split('[')[0]!r}" in message
    if "[" in field:
        assert f"({field})" in message
    assert "data_checks.on_invalid is 'fail'" in message


def test_all_broken_rows_are_reported_at_once_and_quarantine_keeps_the_rest(tmp_path):
    rows = [{"prompt": "Fine?", "chosen": "Yes.", "rejected": "No."}] + [b[0] for b in BAD_ROWS] + ["[1, 2]", "{broken"]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    scan, pairs = scan_preferences(path)
    report = describe(scan)
    assert report.startswith(f"{path}: {len(BAD_ROWS) + 2} problem(s) in {len(BAD_ROWS) + 2} of {len(rows)} row(s) "
                             "for the preference format")
    assert {rule for _, rule, _, _ in BAD_ROWS} | {"unreadable"} == set(scan.rule_counts())
    assert "expected a JSON object, got list" in report and "invalid JSON" in report
    kept = read_preferences(path, DataSettings(on_invalid="quarantine", max_quarantined_fraction=1.0))
    assert kept.rows == [1] and len(pairs) == 1


def test_oversized_rows_are_rejected(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "x" * 500, "rejected": "y"}])
    with pytest.raises(DatasetError, match=r"(?s)oversized.*line 1: .* bytes, the limit is 100"):
        read_preferences(path, DataSettings(max_row_bytes=100))


def test_duplicate_pairs_exact_and_normalised(tmp_path):
    pair = {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green."}
    rows = [pair, pair, {"prompt": "sky  COLOUR?", "chosen": "blue.", "rejected": "green."},
            {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Grey."}]  # same prompt, another pair: kept
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    scan, pairs = scan_preferences(path)
    assert scan.rule_counts() == {"duplicate": 1, "near_duplicate": 1}
    assert "line 2: same pair as line 1" in describe(scan) and "line 3: same pair as line 1" in describe(scan)
    assert [p.rejected for p in pairs] == ["Green.", "Grey."]
    allowed = read_preferences(path, DataSettings(duplicates="allow"))
    assert len(allowed) == 4


def test_eval_pairs_whose_prompt_was_trained_on_are_leakage(tmp_path):
    train = read_preferences(write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green."}]))
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [
        {"prompt": "Grass colour?", "chosen": "Green.", "rejected": "Blue."},
        {"prompt": [user("sky colour?")], "chosen": "It is blue.", "rejected": "Purple."}])
    with pytest.raises(DatasetError, match=r"(?s)prompt_leakage.*eval.jsonl line 2: the same prompt"):
        read_preferences(eval_path, reference=train.prompt_hashes)
    assert len(read_preferences(eval_path, DataSettings(leakage="allow"), reference=train.prompt_hashes)) == 2


def test_split_keeps_every_prompt_on_one_side(tmp_path):
    rows = [{"prompt": f"Question {q}?", "chosen": f"Good {q} {k}.", "rejected": f"Bad {q} {k}."}
            for q in range(10) for k in range(3)]
    data = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    train, evaluation = split_preferences(data, 0.2, seed=0)
    assert len(train) + len(evaluation) == 30 and len(evaluation) == 6
    assert not set(train.prompt_hashes.tolist()) & set(evaluation.prompt_hashes.tolist())
    assert split_preferences(data, 0.2, seed=0)[1].rows == evaluation.rows  # deterministic
    one_prompt = read_preferences(write_jsonl(tmp_path / "one.jsonl", rows[:3]))
    with pytest.raises(DatasetError, match="1 distinct prompt"):
        split_preferences(one_prompt, 0.2, seed=0)


def test_parquet_pairs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["Q1", "Q2"], "chosen": ["a", "c"], "rejected": ["b", "c"]}),
                   tmp_path / "p.parquet")
    scan, pairs = scan_preferences(str(tmp_path / "p.parquet"))
    assert [p.chosen for p in pairs] == ["a"]
    assert "p.parquet row 2: both are 'c'" in describe(scan)


def decoded(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_both_sides_are_encoded_with_only_their_answer_as_targets(tiny_tokenizer):
    pairs = [PreferencePair([user("What is the Q7?")], "An e-reader.", "A bird."),
             PreferencePair([user("Hi"), assistant("Hello there"), user("Name?")], "Quill.", "No.")]
    encoded = encode_pairs(tiny_tokenizer, pairs, 256)
    for pair, example in zip(pairs, encoded):
        assert decoded(tiny_tokenizer, example.chosen) == pair.chosen + "<|im_end|>\n"
        assert decoded(tiny_tokenizer, example.rejected) == pair.rejected + "<|im_end|>\n"
        prompt_c = example.chosen.input_ids[:example.chosen.labels.index(next(
            t for t in example.chosen.labels if t != IGNORE_INDEX))]
        assert example.rejected.input_ids[:len(prompt_c)] == prompt_c  # the same prompt tokens on both sides
    # the earlier assistant turn of a multi-turn prompt is context, not a target
    assert "Hello there" in tiny_tokenizer.decode(encoded[1].chosen.input_ids)
    assert "Hello" not in decoded(tiny_tokenizer, encoded[1].chosen)
    assert np.all([not e.chosen.truncated for e in encoded])


def test_a_preference_file_is_detected_and_read_as_chosen_conversations_with_their_rejected_answers(tmp_path):
    from tasks.data.validation import check_source, materialise, read_dataset

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"},
                                              {"prompt": "R", "chosen": "c", "rejected": "c"}])
    verdict = check_source(path, "auto", DataSettings(on_invalid="quarantine", max_quarantined_fraction=0.5))
    assert verdict.data_format == "preference" and verdict.rule_counts == {"same_answer": 1}
    dataset, quarantined = materialise(verdict)
    assert dataset.conversations == [[user("Q"), assistant("a")]] and dataset.rejected == ["b"]
    assert quarantined[0]["line"] == 2 and quarantined[0]["data"]["rejected"] == "c"
    with pytest.raises(DatasetError, match="same_answer"):
        read_dataset(path)  # on_invalid 'fail'


def test_a_split_keeps_every_pair_of_a_prompt_on_one_side_and_writes_the_rejected_answers(tmp_path):
    from tasks.data.dataset import read_conversations, split_dataset, write_conversations
    from tasks.data.preference import read_pairs
    from tasks.data.validation import read_dataset

    rows = [{"prompt": f"Q{i % 5}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(20)]
    dataset = read_dataset(write_jsonl(tmp_path / "p.jsonl", rows))
    train, held_out = split_dataset(dataset, 0.2, seed=0)
    prompts = [{c[0]["content"] for c in part.conversations} for part in (train, held_out)]
    assert len(train) + len(held_out) == 20 and prompts[0].isdisjoint(prompts[1]) and len(prompts[1]) == 1
    write_conversations(held_out, tmp_path / "eval.jsonl")
    assert read_conversations(tmp_path / "eval.jsonl")[1] == held_out.conversations  # the chosen sides
    assert [p.rejected for p in read_pairs(tmp_path / "eval.jsonl")] == held_out.rejected
