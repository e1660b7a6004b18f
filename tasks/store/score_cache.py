"""Base-model scores kept under the output, so a retrain on an unchanged base and eval set does not score the
base again (a nightly retrain on new training data, the same base and the same held-out rows). Pure.

    <output>/score-cache/base/<key>.json    {"key", "scored_at", "identity", "result": the EvalResult as a dict}

The key is a sha256 of everything that decides the score: the model folder's content (every file: weights,
config, tokenizer and its chat template), the eval split's content, the evaluation settings, how the model is
loaded (device, 4-bit, the loading settings), the max sequence length (it truncates eval rows), the source of
the code that computes a score, and the versions of the libraries it runs on. Any change is a new key, so the
base is scored again; nothing is ever looked up by path or date.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from tasks.store.manifest import library_versions, sha256_file
from tasks.store.objects import StorageNotFoundError, join_uri, read_object, write_object

SCORE_CACHE = "score-cache"
KEY_SCHEMA = "1"  # bump when what goes into the key changes meaning
TASKS = Path(__file__).resolve().parent.parent
# The code between a model folder and its score: loading, eval loss, generation, encoding, the metrics.
SCORING_SOURCES = ("engine", "scoring", "data/tokenization.py", "evaluate.py")
SCORING_LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "bitsandbytes", "evaluate", "rouge-score",
                     "sacrebleu", "numpy")


def base_score_uri(output: str, key: str) -> str:
    return join_uri(output, SCORE_CACHE, "base", f"{key}.json")


def base_score_key(model_dir: str, eval_split: str, settings: dict) -> tuple[str, dict]:
    """(key, what it was made from). `settings`: everything else that changes the score (JSON-able)."""
    identity = {"schema": KEY_SCHEMA, "model": model_content(Path(model_dir)), "eval_data": sha256_file(Path(eval_split)),
                "settings": settings, "code": scoring_code_version(), "libraries": library_versions(SCORING_LIBRARIES)}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return key, identity


def model_content(folder: Path) -> str:
    """A sha256 over every file's relative path and content. A file in the Hugging Face cache is a link to a
    blob named by its hash, and that name is used instead of hashing gigabytes of weights again."""
    if not folder.is_dir():  # an empty hash would give every such "model" the same key
        raise NotADirectoryError(f"{folder}: not a local model folder, its content cannot be hashed")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{_content_id(path)}\n".encode())
    return digest.hexdigest()


def _content_id(path: Path) -> str:
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs":
        return f"blob:{target.name}"
    return sha256_file(target)


def scoring_code_version() -> str:
    """A sha256 of the source of the scoring code: editing it re-scores, with no version number to forget."""
    files = []
    for name in SCORING_SOURCES:
        path = TASKS / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(TASKS).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def read_base_score(output: str, key: str) -> dict | None:
    """The stored entry for `key`, or None when there is none. Other errors (access, network) propagate."""
    try:
        stored = read_object(base_score_uri(output, key))
    except StorageNotFoundError:
        return None
    entry = json.loads(stored.data)
    if entry.get("key") != key:  # a copied or hand-edited file: not this key's score
        raise ValueError(f"{base_score_uri(output, key)} holds the score of key {entry.get('key')!r}")
    return entry


def write_base_score(output: str, key: str, identity: dict, result: dict) -> str:
    """Store a base model's score under `key`; returns where."""
    uri = base_score_uri(output, key)
    entry = {"key": key, "scored_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "identity": identity, "result": result}
    write_object(uri, json.dumps(entry, indent=2).encode())
    return uri
