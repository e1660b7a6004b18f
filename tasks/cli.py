"""The `prefect-finetune` command line.

    prefect-finetune download OUTPUT [--run RUN_ID|latest] [--to DIR]
    prefect-finetune verify   OUTPUT [--run RUN_ID|latest] [--to DIR] [--base PATH] [--no-load]

OUTPUT is what the flow published to (a local folder or s3://bucket/prefix). `download` fetches a
run and checks every file against the sha256 in its manifest; `verify` does the same, then loads
the model with plain transformers and runs one forward pass. Exit status: 0 good, 1 a check
failed, 2 the run or pointer does not exist.

Subcommands register themselves in `SUBCOMMANDS` (a function that adds its parser and sets
`handler`), so another one (e.g. `plan`) is one more function in that list.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tasks.manifest import sha256_file, verify_files
from tasks.registry import fetch_run, read_latest
from tasks.storage import MANIFEST_NAME, StorageNotFoundError


class CheckFailed(Exception):
    """A downloaded run does not match its manifest or does not load."""


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="where the flow published: a local folder or s3://bucket/prefix")
    parser.add_argument("--run", default="latest", help="a run id, or 'latest' (the promoted run; default)")
    parser.add_argument("--to", type=Path, help="download into this folder (default: a temporary folder)")
    parser.add_argument("--concurrency", type=int, default=8, help="parallel downloads (S3)")


def _fetch_and_check(args: argparse.Namespace, dest: Path) -> tuple[str, dict]:
    pointer = read_latest(args.output) if args.run == "latest" else None
    run_id, manifest = fetch_run(args.output, pointer["run_id"] if pointer else args.run, dest, args.concurrency)
    if pointer and sha256_file(dest / MANIFEST_NAME) != pointer["manifest_sha256"]:
        raise CheckFailed(f"run {run_id}: its manifest.json is not the one latest.json was promoted with")
    if problems := verify_files(dest):
        raise CheckFailed("checksums differ from the manifest:\n  " + "\n  ".join(problems))
    total = sum(f["bytes"] for f in manifest["files"])
    print(f"run {run_id}: {len(manifest['files'])} file(s), {total:,} bytes, every sha256 matches the manifest")
    return run_id, manifest


def _download(args: argparse.Namespace) -> None:
    dest = args.to or Path(tempfile.mkdtemp(prefix="prefect-finetune-"))
    _fetch_and_check(args, dest)
    print(dest)


def _verify(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="prefect-finetune-") as scratch:
        dest = args.to or Path(scratch)
        _, manifest = _fetch_and_check(args, dest)
        if not args.no_load:
            print(load_and_run(dest, args.base or manifest["base_model"]["path"]))


def load_and_run(folder: Path, base_path: str) -> str:
    """Load the published model as a user would (plain transformers) and check one forward pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (folder / "merged").is_dir():
        model_dir = folder / "merged"
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:  # adapter-only publish: the consumer brings the base (transformers applies it through peft)
        model_dir = folder / "adapter"
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        model.load_adapter(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer(["Hello"], return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    if not torch.isfinite(logits).all():
        raise CheckFailed(f"{model_dir}: the model loads but its logits are not finite")
    return f"loaded {model_dir} with transformers: {model.num_parameters():,} parameters, forward pass finite"


def _add_download(subparsers) -> None:
    parser = subparsers.add_parser("download", help="fetch a published run and check its checksums")
    _add_run_arguments(parser)
    parser.set_defaults(handler=_download)


def _add_verify(subparsers) -> None:
    parser = subparsers.add_parser("verify", help="fetch a run, check its checksums and load it with transformers")
    _add_run_arguments(parser)
    parser.add_argument("--base", help="base model folder for an adapter-only run (default: the manifest's)")
    parser.add_argument("--no-load", action="store_true", help="check checksums only, do not load the model")
    parser.set_defaults(handler=_verify)


SUBCOMMANDS = [_add_download, _add_verify]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefect-finetune", description="Work with prefect-finetune runs.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except StorageNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except CheckFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
