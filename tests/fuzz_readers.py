"""Fuzz every dataset reader: whatever the bytes, reading gives rows or a DatasetError that names the
file, never another exception.

Cases, from a valid small file of each kind (.jsonl, .json, .csv, .parquet, .arrow): the file
cut at every byte offset (1,718 cases, always run), then seeded random cases: truncation at a
byte offset, bit flips, random bytes behind each suffix, deeply nested JSON, huge numbers / NaN /
Infinity, gzip bytes without a .gz suffix, a corrupt Parquet footer, a zero-byte file, and a
folder that mixes suffixes. tests/test_fuzz_readers.py runs 300 seeded cases and every 4th cut
in CI; run this file for more:

    python tests/fuzz_readers.py [--cases 10000] [--seed 0]
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.data.schemas import DatasetError  # noqa: E402
from tasks.data.validation import read_dataset  # noqa: E402

ROWS = [{"prompt": "What is 2+2?", "completion": "4"}, {"prompt": "Capital of France?", "completion": "Paris"},
        {"prompt": "Say \"hi\", please", "completion": "hi\nthere"}]


def valid_bytes(suffix: str) -> bytes:
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    if suffix == ".json":
        return json.dumps(ROWS).encode()
    if suffix == ".csv":
        out = io.StringIO()
        out.write('prompt,completion\n"What is 2+2?",4\n"Capital of France?",Paris\n"Say ""hi"", please","hi\nthere"\n')
        return out.getvalue().encode()
    table = pa.Table.from_pylist(ROWS)
    sink = io.BytesIO()
    if suffix == ".parquet":
        pq.write_table(table, sink)
    else:  # .arrow: the IPC stream a `datasets` folder holds
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    return sink.getvalue()


SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")


def mutate(rng: random.Random, kind: str, suffix: str) -> bytes:
    data = valid_bytes(suffix)
    if kind == "truncate":
        return data[:rng.randrange(len(data) + 1)]
    if kind == "bitflip":
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    if kind == "random":
        return rng.randbytes(rng.randint(1, 512))
    if kind == "nested":
        depth = rng.choice([100, 1000, 10_000, 100_000])
        value = "[" * depth + "]" * depth
        row = '{"prompt": %s, "completion": "x"}' % value
        return (row + "\n").encode() if suffix == ".jsonl" else ("[" + row + "]").encode()
    if kind == "numbers":
        value = rng.choice(["1e999999", "-1e999999", "NaN", "Infinity", "-Infinity", "9" * 5000, "1e-999999"])
        row = '{"prompt": %s, "completion": %s}' % (value, value)
        return (row + "\n").encode() if suffix == ".jsonl" else ("[" + row + "]").encode()
    if kind == "compressed":
        return gzip.compress(data)
    if kind == "footer":  # Parquet keeps its schema in the footer: damage the last bytes
        cut = rng.randint(1, min(64, len(data)))
        return data[:-cut] + rng.randbytes(cut)
    if kind == "empty":
        return b""
    raise ValueError(kind)


KINDS = {"truncate": SUFFIXES, "bitflip": SUFFIXES, "random": SUFFIXES, "nested": (".jsonl", ".json"),
         "numbers": (".jsonl", ".json"), "compressed": SUFFIXES, "footer": (".parquet",), "empty": SUFFIXES}


def read(path: Path) -> str:
    """'rows' (usable) or 'refused'; AssertionError on any other exception, or an error not naming the file.
    Read as the flow reads by default: every row checked, any bad row refuses the file."""
    try:
        read_dataset(str(path))
        return "rows"
    except DatasetError as error:
        named = path.name if path.is_file() else str(path)
        if named not in str(error):
            raise AssertionError(f"DatasetError does not name {named}: {error}") from error
        return "refused"
    except Exception as error:  # noqa: BLE001 - that is the finding
        raise AssertionError(f"{path.name}: {type(error).__name__} escaped: {error}\n{traceback.format_exc()}")


def mixed_folder(root: Path, rng: random.Random) -> Path:
    folder = root / f"mixed-{rng.randrange(10**9)}"
    folder.mkdir()
    for suffix in rng.sample(SUFFIXES, 2):
        (folder / f"part{suffix}").write_bytes(valid_bytes(suffix))
    return folder


def cases(rng: random.Random, count: int):
    """(kind, suffix) pairs, every kind and suffix covered before random picks."""
    every = [(kind, suffix) for kind, suffixes in KINDS.items() for suffix in suffixes] + [("mixed", "/")]
    for i in range(count):
        yield every[i] if i < len(every) else rng.choice(every)


def run(count: int, seed: int, root: Path) -> Counter:
    rng, outcomes = random.Random(seed), Counter()
    for i, (kind, suffix) in enumerate(cases(rng, count)):
        if kind == "mixed":
            path = mixed_folder(root, rng)
        else:
            path = root / f"case{i}-{kind}{suffix}"
            path.write_bytes(mutate(rng, kind, suffix))
        outcomes[(kind, suffix, read(path))] += 1
        if path.is_file():
            path.unlink()
    return outcomes


def every_truncation(root: Path, step: int = 1) -> Counter:
    """The valid file of each kind cut at every `step`-th byte offset from 0 (empty), and at its full length."""
    outcomes = Counter()
    for suffix in SUFFIXES:
        data = valid_bytes(suffix)
        for offset in sorted({*range(0, len(data), step), len(data)}):
            path = root / f"cut{offset}{suffix}"
            path.write_bytes(data[:offset])
            outcomes[("every-cut", suffix, read(path))] += 1
            path.unlink()
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        try:
            outcomes = every_truncation(Path(root)) + run(args.cases, args.seed, Path(root))
        except AssertionError as finding:
            print(f"FOUND: {finding}")
            return 1
    for (kind, suffix, outcome), n in sorted(outcomes.items()):
        print(f"{kind:<11}{suffix:<9}{outcome:<8}{n:>6}")
    print(f"{sum(outcomes.values())} cases ({args.cases} seeded, the rest every truncation): {sum(n for k, n in outcomes.items() if k[2] == 'rows')} read, "
          f"{sum(n for k, n in outcomes.items() if k[2] == 'refused')} refused with a DatasetError naming the file, "
          "0 other exceptions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
