"""Upload throughput of a published run folder against moto's S3 server, and the bytes a repeated
publish of the same run sends again (goal: zero).

    .venv/bin/python benchmarks/publish_s3_throughput.py [--size-mb 1024] [--shards 2] [--part-mb 64] [--concurrency 8]

Builds a model-shaped folder (safetensors-sized random shards plus the small json files) in a
temporary directory, publishes it with the same code the flow uses (tasks/store/transfer.py: SHA-256
checksums, multipart, read-back verification), publishes it again, and prints the figures.
moto keeps objects in this process, so the figure is a lower bound on what the client side can do
on this machine (both ends share the CPU), not an S3 figure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.store.manifest import file_entries  # noqa: E402
from tasks.store.transfer import upload_folder  # noqa: E402

MB = 2**20


def build_folder(folder: Path, size_mb: int, shards: int) -> int:
    merged = folder / "merged"
    merged.mkdir(parents=True)
    block = os.urandom(MB)  # incompressible, and cheap to repeat with a counter so blocks differ
    for index in range(shards):
        with open(merged / f"model-{index + 1:05d}-of-{shards:05d}.safetensors", "wb") as handle:
            for i in range(size_mb // shards):
                handle.write(i.to_bytes(8, "little") + index.to_bytes(8, "little") + block[16:])
    for name, content in {"config.json": {"model_type": "llama"}, "generation_config.json": {"eos_token_id": 2},
                          "tokenizer_config.json": {}}.items():
        (merged / name).write_text(json.dumps(content))
    (merged / "README.md").write_text("# model card\n")
    (folder / "manifest.json").write_text(json.dumps({"files": file_entries(folder)}))
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--part-mb", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    scratch = Path(tempfile.mkdtemp(prefix="publish-bench-"))
    try:
        total = build_folder(scratch / "run-1", args.size_mb, args.shards)
        dest = "s3://bench/models/runs/run-1"
        started = time.perf_counter()
        first = upload_folder(scratch / "run-1", dest, args.part_mb * MB, args.concurrency)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        again = upload_folder(scratch / "run-1", dest, args.part_mb * MB, args.concurrency)
        again_s = time.perf_counter() - started
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        server.stop()
    print(f"folder: {total / MB:,.0f} MB, {first.files_sent} files ({args.shards} shard(s)); part {args.part_mb} MB, "
          f"concurrency {args.concurrency}; {os.cpu_count()} CPU core(s) shared with moto")
    print(f"first publish : {first.bytes_sent / MB:,.0f} MB sent in {first_s:.1f} s = "
          f"{first.bytes_sent / MB / first_s:,.1f} MB/s (includes local sha256 passes and read-back checks)")
    print(f"repeat publish: {again.bytes_sent} bytes re-sent, {again.files_skipped} file(s) skipped "
          f"({again.bytes_skipped / MB:,.0f} MB) in {again_s:.1f} s")


if __name__ == "__main__":
    main()
