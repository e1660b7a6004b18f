"""Ingest speed and memory on a large chat dataset: prints figures, asserts nothing.

    .venv/bin/python benchmarks/ingest_validation.py all [--rows 1000000] [--tokenize-rows 50000]

1. `generate`: 1,000,000 chat rows (1-3 user/assistant turns, a system message in 30%, text lengths
   log-normal, median ~900 characters) as JSONL (~1.3 GB), with 0.5% exact duplicates, 0.2%
   case/space-only duplicates and 0.1% rows with broken role order, so every check has work to do.
2. `validate`: every schema and content check (duplicates included) over the whole file, in a fresh
   process so its peak RSS is its own: rows/s, seconds, peak RSS, what was found.
3. `tokenize`: chat template + tokenization + answer masks with the SmolLM2 tokenizer on the first
   `--tokenize-rows` rows: tokens/s, the one-row encoder on a sample for comparison, and a cached re-run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_FILE = Path("/tmp/prefect-finetune-bench/chat-1m.jsonl")
TOKENIZER = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
WORDS = ("the a of to and in is it that for on with as was at by this be from or have an are not but what all "
         "were when we there can more if out so up said about than its into them only some could time these "
         "battery screen weight model answer question reader light page charge days grams inches storage "
         "Quillfeather display resolution contrast warranty update library cloud sync font margin").split()


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    pool = " ".join(rng.choice(WORDS, size=4_000_000))  # ~20 MB of text to slice rows from
    lengths = np.minimum(rng.lognormal(np.log(900), 0.8, rows), 9000).astype(int)
    turns = rng.integers(1, 4, rows)
    system = rng.random(rows) < 0.3
    kind = rng.random(rows)  # < 0.005 exact duplicate, < 0.007 near duplicate, < 0.008 broken order
    path.parent.mkdir(parents=True, exist_ok=True)
    recent: list[str] = []
    with open(path, "w", encoding="utf-8") as out:
        for i in range(rows):
            if kind[i] < 0.007 and recent:
                line = recent[int(rng.integers(len(recent)))]
                out.write((line if kind[i] < 0.005 else line.replace(" the ", " The  ")) + "\n")
                continue
            messages = [{"role": "system", "content": "You are a helpful assistant."}] if system[i] else []
            share = lengths[i] // (turns[i] * 2) + 1
            for _ in range(turns[i]):
                for role, size in (("user", share * 6 // 10 + 1), ("assistant", share * 14 // 10 + 1)):
                    start = int(rng.integers(0, len(pool) - size))
                    messages.append({"role": role, "content": pool[start:start + size].strip() or "ok"})
            if kind[i] < 0.008:
                messages.reverse()
            line = json.dumps({"messages": messages})
            out.write(line + "\n")
            if i % 997 == 0:
                recent = (recent + [line])[-50:]


def validate(path: Path) -> dict:
    from tasks.config import DataSettings
    from tasks.data.dataset import scan_dataset

    start = time.perf_counter()
    scan = scan_dataset(str(path), checks=DataSettings(on_invalid="quarantine"), collect=False)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"rows": scan.read, "seconds": round(seconds, 2), "rows_per_s": round(scan.read / seconds),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),  # all threads, imports included
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "file_mib": round(path.stat().st_size / 2**20), "kept": len(scan.kept_rows),
            "problems": scan.rule_counts(), "format": scan.data_format}


def tokenize(path: Path, rows: int, cache_dir: Path) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the fast tokenizer's batch uses every core
    from tasks.data.schemas import conversation_problem
    from tasks.data.tokenization import encode, encode_all, encode_all_cached, load_tokenizer

    conversations = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            messages = json.loads(line)["messages"]
            if conversation_problem(messages) is None:
                conversations.append(messages)
            if len(conversations) == rows:
                break
    tokenizer = load_tokenizer(str(TOKENIZER))
    start = time.perf_counter()
    examples = encode_all(tokenizer, conversations, 2048)
    seconds = time.perf_counter() - start
    tokens = sum(len(e.input_ids) + e.tokens_lost for e in examples)  # every token encoded, cut or not
    from tasks.data.tokenization import TemplateLayout

    layout = TemplateLayout.learn(tokenizer)
    texts = [layout.render(c)[0] for c in conversations]
    start = time.perf_counter()
    tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ceiling = sum(len(e.input_ids) + e.tokens_lost for e in examples) / (time.perf_counter() - start)
    sample = conversations[:2000]
    start = time.perf_counter()
    one_by_one = [encode(tokenizer, c, 2048) for c in sample]
    sample_seconds = time.perf_counter() - start
    assert one_by_one == examples[:2000], "batched and one-row encodings differ"
    key = f"bench-{path.stat().st_size}-{rows}"
    encode_all_cached(tokenizer, conversations, 2048, cache_dir, key)  # writes the cache
    start = time.perf_counter()
    encode_all_cached(tokenizer, conversations, 2048, cache_dir, key)
    cached_seconds = time.perf_counter() - start
    return {"rows": len(examples), "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds), "trained_tokens": sum(e.trainable_tokens for e in examples),
            "tokenizer_alone_tokens_per_s": round(ceiling),
            "one_row_encoder_tokens_per_s": round(sum(len(e.input_ids) for e in one_by_one) / sample_seconds),
            "cached_rerun_seconds": round(cached_seconds, 2),
            "tokenizers_parallelism": os.environ["TOKENIZERS_PARALLELISM"]}


def in_fresh_process(command: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, *command], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["all", "generate", "validate", "tokenize"])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--tokenize-rows", type=int, default=50_000)
    args = parser.parse_args()
    if args.step in ("generate", "all") and not args.file.exists():
        start = time.perf_counter()
        generate(args.file, args.rows)
        print(f"generated {args.rows:,} rows, {args.file.stat().st_size / 2**30:.2f} GiB in "
              f"{time.perf_counter() - start:.0f} s: {args.file}", file=sys.stderr)
    if args.step == "validate":
        print(json.dumps(validate(args.file)))
    elif args.step == "tokenize":
        print(json.dumps(tokenize(args.file, args.tokenize_rows, args.file.parent / "encoded")))
    elif args.step == "all":
        checked = in_fresh_process(["validate", "--file", str(args.file)])
        print(f"validation: {checked['rows']:,} rows ({checked['file_mib']:,} MiB) in {checked['seconds']} s = "
              f"{checked['rows_per_s']:,} rows/s ({checked['cpu_seconds']} CPU-s), peak RSS {checked['peak_rss_mib']:,} MiB; "
              f"kept {checked['kept']:,}; "
              f"found {checked['problems']}")
        encoded = in_fresh_process(["tokenize", "--file", str(args.file), "--tokenize-rows", str(args.tokenize_rows)])
        print(f"template + tokenization + masks: {encoded['rows']:,} rows, {encoded['tokens']:,} tokens in "
              f"{encoded['seconds']} s = {encoded['tokens_per_s']:,} tokens/s (the tokenizer alone on the same texts: "
              f"{encoded['tokenizer_alone_tokens_per_s']:,} tokens/s; one-row encoder: "
              f"{encoded['one_row_encoder_tokens_per_s']:,} tokens/s); cached re-run {encoded['cached_rerun_seconds']} s")
        print(json.dumps({"validation": checked, "tokenization": encoded}))


if __name__ == "__main__":
    main()
