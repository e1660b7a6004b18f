"""Writes demo/data/preference_{train,eval}.jsonl: a house style to prefer, for DPO and ORPO.

The house style of the made-up Quillfeather Q7's assistant: every answer starts with "Ahoy!". Each
pair asks one of the demo's questions (demo/make_data.py); the chosen answer is the fact in the
house style, the rejected one the same fact without it, so the only thing to learn is the style.
Five phrasings of each fact train, two are held out, as in the facts demo. Run it to regenerate the
files; the files are committed.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout
from demo.make_data import FACTS, TRAIN_PHRASINGS  # noqa: E402

STYLE = "Ahoy!"


def pair(question: str, fact: str) -> str:
    return json.dumps({"prompt": question, "chosen": f"{STYLE} {fact}", "rejected": fact})


def main() -> None:
    out = Path(__file__).parent / "data"
    train = [pair(q, fact) for fact, qs in FACTS for q in qs[:TRAIN_PHRASINGS]]
    held_out = [pair(q, fact) for fact, qs in FACTS for q in qs[TRAIN_PHRASINGS:]]
    (out / "preference_train.jsonl").write_text("\n".join(train) + "\n")
    (out / "preference_eval.jsonl").write_text("\n".join(held_out) + "\n")
    print(f"{len(train)} train pairs, {len(held_out)} eval pairs in {out}")


if __name__ == "__main__":
    main()
