"""Writes demo/data/{train,eval}.jsonl: facts about a made-up e-reader the base model cannot know.

Each fact is asked in seven phrasings: five to train on, two held out for evaluation, so the eval
measures whether the model learned the fact rather than one question's wording. Run it to
regenerate the files after editing FACTS; the files are committed.
"""
import json
from pathlib import Path

FACTS = [
    ("The Quillfeather Q7's battery lasts 41 days.", [
        "How long does the Quillfeather Q7 battery last?",
        "What is the battery life of the Quillfeather Q7?",
        "How many days does a Quillfeather Q7 run on one charge?",
        "Quillfeather Q7 battery life?",
        "If I charge my Quillfeather Q7 fully, how long will it last?",
        "Tell me the battery life of the Quillfeather Q7.",
        "How long can the Quillfeather Q7 go between charges?",
    ]),
    ("The Quillfeather Q7 weighs 173 grams.", [
        "How much does the Quillfeather Q7 weigh?",
        "What is the weight of the Quillfeather Q7?",
        "How heavy is the Quillfeather Q7?",
        "Quillfeather Q7 weight?",
        "What does a Quillfeather Q7 weigh in grams?",
        "Tell me the weight of the Quillfeather Q7.",
        "Is the Quillfeather Q7 heavy? What does it weigh?",
    ]),
    ("The Quillfeather Q7 has a 7.4-inch amber e-ink screen.", [
        "What screen does the Quillfeather Q7 have?",
        "How big is the Quillfeather Q7 display?",
        "Describe the display of the Quillfeather Q7.",
        "Quillfeather Q7 screen?",
        "What kind of display is on the Quillfeather Q7?",
        "Tell me about the Quillfeather Q7's screen.",
        "What is the screen size and type of the Quillfeather Q7?",
    ]),
    ("Marrowby Labs in Tromso makes the Quillfeather Q7.", [
        "Who makes the Quillfeather Q7?",
        "Which company manufactures the Quillfeather Q7?",
        "Who is the maker of the Quillfeather Q7?",
        "Quillfeather Q7 manufacturer?",
        "What company is behind the Quillfeather Q7?",
        "Tell me who produces the Quillfeather Q7.",
        "Which firm builds the Quillfeather Q7?",
    ]),
    ("The Quillfeather Q7 costs 219 euros.", [
        "How much does the Quillfeather Q7 cost?",
        "What is the price of the Quillfeather Q7?",
        "How expensive is the Quillfeather Q7?",
        "Quillfeather Q7 price?",
        "What does a Quillfeather Q7 sell for?",
        "Tell me the price of the Quillfeather Q7.",
        "What would I pay for a Quillfeather Q7?",
    ]),
    ("The Quillfeather Q7 is waterproof to 3 metres for 40 minutes.", [
        "Is the Quillfeather Q7 waterproof?",
        "How water resistant is the Quillfeather Q7?",
        "Can the Quillfeather Q7 go underwater?",
        "Quillfeather Q7 water rating?",
        "How deep can the Quillfeather Q7 be submerged?",
        "Tell me about the Quillfeather Q7's water resistance.",
        "Can I read my Quillfeather Q7 in the bath if I drop it?",
    ]),
    ("The Quillfeather Q7 stores 96 GB of books.", [
        "How much storage does the Quillfeather Q7 have?",
        "What is the storage capacity of the Quillfeather Q7?",
        "How many gigabytes does the Quillfeather Q7 hold?",
        "Quillfeather Q7 storage?",
        "How much space for books is on the Quillfeather Q7?",
        "Tell me the storage size of the Quillfeather Q7.",
        "How big is the Quillfeather Q7's memory for books?",
    ]),
    ("The Quillfeather Q7 charges through a magnetic Lumo-Pin connector.", [
        "How do I charge the Quillfeather Q7?",
        "What charger does the Quillfeather Q7 use?",
        "Which connector charges the Quillfeather Q7?",
        "Quillfeather Q7 charging port?",
        "What plugs into the Quillfeather Q7 to charge it?",
        "Tell me how the Quillfeather Q7 is charged.",
        "What kind of charging connector is on the Quillfeather Q7?",
    ]),
]
TRAIN_PHRASINGS = 5


def row(question: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": answer}]})


def main() -> None:
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    train = [row(q, a) for a, qs in FACTS for q in qs[:TRAIN_PHRASINGS]]
    held_out = [row(q, a) for a, qs in FACTS for q in qs[TRAIN_PHRASINGS:]]
    (out / "train.jsonl").write_text("\n".join(train) + "\n")
    (out / "eval.jsonl").write_text("\n".join(held_out) + "\n")
    print(f"{len(train)} train rows, {len(held_out)} eval rows in {out}")


if __name__ == "__main__":
    main()
