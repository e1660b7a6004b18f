"""The `prefect-finetune` command line.

    prefect-finetune download OUTPUT [--run RUN_ID|latest] [--to DIR]
    prefect-finetune verify   OUTPUT [--run RUN_ID|latest] [--to DIR] [--base PATH] [--no-load]
    prefect-finetune plan     --model PATH|ORG/NAME|run:ID --gpu-gib N [N ...] [--gpus N] [--data PATH] [--method auto]
                              [--objective sft|dpo|orpo] [--output OUTPUT (for run:ID)] ...
    prefect-finetune validate DATA [--eval-data PATH] [--format F] [--model PATH] [--json] [--on-invalid ...]
    prefect-finetune promote  OUTPUT RUN_ID [--reason TEXT]
    prefect-finetune rollback OUTPUT [--reason TEXT]
    prefect-finetune reconcile [--grace SECONDS] [--max-reannounce N] [--dry-run] [--json]

OUTPUT is what the flow published to (a local folder or s3://bucket/prefix). `download` fetches a
run and checks every file against the sha256 in its manifest; `verify` does the same, then loads
the model with plain transformers and runs one forward pass. `plan` prints what the memory planner
would choose on GPUs of the given sizes (the smallest that fits, given several), from the model's
config.json and the data's token lengths, without Prefect, a GPU or the weights (for a Hub id, config.json
alone is downloaded, plus the tokenizer with --data). `validate` runs the
ingest task's checks on a dataset (and, with --model, its token lengths) without a run, for a data
team's own CI: every bad row is named by file, row and field. `promote` points `latest.json` at a
published run by hand (only a complete one: every file checked against its manifest); `rollback`
points it back at the run it replaced (the replaced pointer is kept in `history/`); both move the MLflow
`champion` alias with it when the run was tracked with `tracking.register_model` (tasks/tracking/champion.py).
`reconcile` announces again the uploads that were announced but got no flow run (tasks/data/s3_reconcile.py;
PREFECT_API_URL names the server). Exit status: 0 good (data usable), 1 a check failed, nothing fits or the data
is not usable (reconcile: an upload still has no run after every copy), 2 the run, pointer, model or data does
not exist.

Subcommands register themselves in `SUBCOMMANDS` (a function that adds its parser and sets
`handler`), so another one (e.g. `plan`) is one more function in that list.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import get_args

from tasks.config import DataFormat, DataSettings, LoraSettings, MethodChoice, TrainingSettings
from tasks.planning.memory import UnsupportedModelError
from tasks.store.manifest import sha256_file
from tasks.store.objects import MANIFEST_NAME, StorageNotFoundError
from tasks.store.registry import PromotionError, fetch_run, promote, read_latest
from tasks.store.transfer import ChecksumMismatchError


class CheckFailed(Exception):
    """A downloaded run does not match its manifest or does not load."""


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="where the flow published: a local folder or s3://bucket/prefix")
    parser.add_argument("--run", default="latest", help="a run id, or 'latest' (the promoted run; default)")
    parser.add_argument("--to", type=Path, help="download into this folder (default: a temporary folder)")
    parser.add_argument("--concurrency", type=int, default=8, help="parallel downloads (S3)")


def _fetch_and_check(args: argparse.Namespace, dest: Path) -> tuple[str, dict]:
    pointer = read_latest(args.output) if args.run == "latest" else None
    try:  # the download checks every file against the manifest's sha256
        run_id, manifest = fetch_run(args.output, pointer["run_id"] if pointer else args.run, dest, args.concurrency)
    except ChecksumMismatchError as error:
        raise CheckFailed("checksums differ from the manifest:\n  " + "\n  ".join(error.problems or [str(error)]))
    if pointer and sha256_file(dest / MANIFEST_NAME) != pointer["manifest_sha256"]:
        raise CheckFailed(f"run {run_id}: its manifest.json is not the one latest.json was promoted with")
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
    from tasks.engine.export import forward_published

    model_dir, parameters, finite = forward_published(folder, base_path)
    if not finite:
        raise CheckFailed(f"{model_dir}: the model loads but its logits are not finite")
    return f"loaded {model_dir} with transformers: {parameters:,} parameters, forward pass finite"


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja")


def _add_plan(subparsers) -> None:
    parser = subparsers.add_parser("plan", help="print the memory plan for a model, data and GPU size(s)")
    parser.add_argument("--model", required=True,
                        help="a Hugging Face Hub id (org/name), a model folder, its config.json, an s3:// prefix "
                        "holding config.json, or run:<run-id> / run:latest, a run published in --output")
    parser.add_argument("--output", help="for --model run:...: the output (folder or s3://) whose registry holds it")
    parser.add_argument("--objective", default="sft", choices=["sft", "dpo", "orpo"],
                        help="dpo and orpo: --data holds preference pairs, planned as both sides together; full "
                        "DPO also holds a frozen reference copy")
    parser.add_argument("--revision", help="for a Hub id: branch, tag or commit (default: the default branch)")
    parser.add_argument("--cache-dir", help="for a Hub id: the Hugging Face cache folder (default: HF_HUB_CACHE, "
                        "else HF_HOME/hub)")
    parser.add_argument("--gpu-gib", type=float, nargs="+", required=True,
                        help="GPU memory in GiB; several sizes (e.g. 24 80 141): the smallest that fits")
    parser.add_argument("--gpus", type=int, default=1,
                        help="GPUs per machine: full fine-tuning is sharded across them (FSDP2), adapters use DDP")
    parser.add_argument("--data", help="training data (path or s3://); without it every row is max-seq-len long")
    parser.add_argument("--data-format", default="auto")
    parser.add_argument("--method", default="auto", choices=[m.value for m in MethodChoice])
    parser.add_argument("--max-seq-len", type=int, default=TrainingSettings().max_seq_len)
    parser.add_argument("--batch-size", type=int, default=TrainingSettings().batch_size, help="rows per step")
    parser.add_argument("--micro-batch-size", type=int, default=TrainingSettings().micro_batch_size,
                        help="at most this many longest rows per forward pass")
    parser.add_argument("--gradient-checkpointing", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--full-precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="full fine-tuning's weights (training.full_precision)")
    parser.add_argument("--lora-r", type=int, default=LoraSettings().r)
    parser.add_argument("--safety", type=float, default=0.9, help="share of each GPU's memory to plan for")
    parser.add_argument("--no-fused-kernels", action="store_true",
                        help="plan for a worker without liger-kernel (the `gpu` extra)")
    parser.set_defaults(handler=_plan)


def _plan(args: argparse.Namespace) -> None:
    import json

    from tasks.planning.memory import GIB, ModelShape
    from tasks.planning.selector import PlanError, WorkPoolSpec, select_work_pool

    with tempfile.TemporaryDirectory(prefix="prefect-finetune-") as scratch:
        model_dir = _model_files(args, Path(scratch))
        shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()),
                                       source=f"{args.model} config.json")
        longest, largest_step, typical_step, origin = _token_lengths(args, model_dir)
    pools = [WorkPoolSpec(name=f"{gib:g} GiB", gpu_gib=gib, gpus=args.gpus) for gib in args.gpu_gib]
    try:
        pool, plan = select_work_pool(
            shape, pools, safety=args.safety, method=args.method, longest_row=longest, largest_step=largest_step,
            typical_step=typical_step, max_rows_per_micro_batch=args.micro_batch_size, gradient_checkpointing=args.gradient_checkpointing,
            lora_r=args.lora_r, fused_kernels=not args.no_fused_kernels, objective=args.objective,
            full_precision=args.full_precision)
    except PlanError as error:
        raise CheckFailed(str(error)) from error
    print(f"model: {shape.model_type}, {shape.parameters / 1e9:.2f}B parameters; rows: {origin}")
    print(f"GPU: {pool.gpu_gib:g} GiB{f' x {pool.gpus}' if pool.gpus > 1 else ''}, planning within "
          f"{args.safety:.0%} ({plan.budget_bytes / GIB:.2f} GiB per GPU)")
    print(f"{'method':<7}{'tokens/micro-batch':>20}{'grad ckpt':>11}{'estimated GiB':>15}  fits")
    for row in plan.table():
        checkpointed = row["checkpointed_layers"]
        ckpt = "off" if not checkpointed else "on" if checkpointed == shape.num_layers else f"{checkpointed} layers"
        print(f"{row['method']:<7}{row['tokens_per_micro_batch']:>20,}{ckpt:>11}"
              f"{row['estimated_gib']:>15.2f}  {'yes' if row['fits'] else 'no'}{'  <- chosen' if row['chosen'] else ''}")
    print(f"plan: {plan.reason}; {plan.micro_batches_per_step} micro-batch(es) in the largest step")


def _model_files(args: argparse.Namespace, scratch: Path) -> Path:
    """A local folder with the model's config.json (and its tokenizer when there is one)."""
    from tasks.store.base_run import is_run_reference, model_spelling_problem, resolve_base_run
    from tasks.store.hub import hub_config, is_hub_id, resolve_model
    from tasks.store.objects import is_s3_uri, join_uri, read_object

    model = args.model
    if problem := model_spelling_problem(model, args.revision):
        raise CheckFailed(problem.replace("model_revision", "--revision").replace("model=", "--model="))
    if is_run_reference(model):
        if not args.output:
            raise CheckFailed(f"--model {model} is a published run: give --output, the folder or s3:// prefix "
                              "whose registry holds it")
        return Path(resolve_base_run(model, args.output, str(scratch), weights=False).path)
    if is_hub_id(model) and not args.data:  # config.json alone, never the weights
        return hub_config(model, args.revision, args.cache_dir).parent
    if is_hub_id(model):  # and the tokenizer, to count the data's tokens
        return Path(resolve_model(model, args.revision, args.cache_dir, weights=False).path)
    if is_s3_uri(model):
        (scratch / "config.json").write_bytes(read_object(join_uri(model, "config.json")).data)
        for name in TOKENIZER_FILES:
            try:
                (scratch / name).write_bytes(read_object(join_uri(model, name)).data)
            except StorageNotFoundError:
                pass
        return scratch
    path = Path(model)
    folder = path.parent if path.name == "config.json" else path
    if not (folder / "config.json").is_file():
        raise StorageNotFoundError(f"{model}: no config.json there; give a Hugging Face Hub id (org/name), a model "
                                   "folder, its config.json or an s3:// prefix holding config.json")
    return folder


def _token_lengths(args: argparse.Namespace, model_dir: Path) -> tuple[int, int, int, str]:
    """(longest row, largest step, typical step) in tokens, and where they come from."""
    if not args.data:
        if args.objective != "sft":  # a pair: both sides, each up to max-seq-len (as the router plans it)
            step = args.batch_size * 2 * args.max_seq_len
            return 2 * args.max_seq_len, step, step, f"no --data: every pair taken as 2 x {args.max_seq_len} tokens"
        step = args.batch_size * args.max_seq_len
        return args.max_seq_len, step, step, f"no --data: every row taken as {args.max_seq_len} tokens"
    from tasks.data.tokenization import encode_all, load_tokenizer
    from tasks.data.validation import read_dataset
    from tasks.planning.selector import step_tokens

    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise CheckFailed(f"{args.model}: no tokenizer files next to config.json, so --data cannot be measured "
                          "in tokens; drop --data to plan for rows of --max-seq-len tokens")
    tokenizer = load_tokenizer(str(model_dir))
    if args.objective != "sft":  # a pair's two sides go through the model together
        from tasks.data.preference import encode_pairs, read_preferences

        pairs = encode_pairs(tokenizer, read_preferences(args.data).pairs, args.max_seq_len)
        lengths = sorted(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)
        unit = "pairs"
    else:
        conversations = read_dataset(args.data, args.data_format).conversations
        lengths = sorted(len(e.input_ids) for e in encode_all(tokenizer, conversations, args.max_seq_len))
        unit = "rows"
    return (lengths[-1], *step_tokens(lengths, args.batch_size),
            f"{len(lengths)} {unit} of {args.data}, median {lengths[len(lengths) // 2]} tokens, "
            f"longest {lengths[-1]} (max-seq-len {args.max_seq_len})")


def _add_validate(subparsers) -> None:
    parser = subparsers.add_parser("validate", help="check a dataset as the ingest task does, without a run or a model")
    parser.add_argument("data", help="the training data: a file, a folder or s3://")
    parser.add_argument("--eval-data", help="held-out data; also checked for rows leaked from the training data")
    parser.add_argument("--format", default="auto", choices=get_args(DataFormat), help="row format (default: detect)")
    parser.add_argument("--model", help="a model folder: also report token lengths with its tokenizer and template")
    parser.add_argument("--max-seq-len", type=int, default=TrainingSettings().max_seq_len)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    for name, field in DataSettings.model_fields.items():  # every data_checks setting, as the flow has it
        choices = get_args(field.annotation) or None
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=field.default, choices=choices,
                            type=None if choices else type(field.default), help=field.description)
    parser.set_defaults(handler=_validate)


def _validate(args: argparse.Namespace) -> None:
    import json

    from tasks.data.schemas import DatasetError
    from tasks.data.validation import check_source, enforce, materialise

    checks = DataSettings(**{name: getattr(args, name) for name in DataSettings.model_fields})
    verdicts, problems, tokens = [], [], {}
    for uri in filter(None, (args.data, args.eval_data)):
        try:
            verdicts.append(check_source(uri, args.format, checks, verdicts[0].kept_hashes if verdicts else None))
            enforce(verdicts[-1], checks)
        except DatasetError as error:
            problems.append(str(error))
    if args.model and not problems:
        from tasks.data.tokenization import encode_all, length_report, load_tokenizer, require_few_truncated

        tokenizer = load_tokenizer(args.model)
        for split, verdict in zip(("train", "eval"), verdicts):
            tokens[split] = length_report(encode_all(tokenizer, materialise(verdict)[0].conversations,
                                                     args.max_seq_len), args.max_seq_len)
            try:
                require_few_truncated(tokens[split], checks.max_truncated_fraction, verdict.source)
            except DatasetError as error:
                problems.append(str(error))
    report = {"usable": not problems, "problems": problems, "tokens": tokens,
              "sources": [{"uri": v.source, "format": v.data_format, "format_evidence": v.format_evidence,
                           "read": v.read, "kept": v.kept, "quarantined": v.quarantined, "rules": v.rule_counts,
                           "sha256": v.sha256, "report": v.report} for v in verdicts]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_validation(report)
    if problems:
        raise CheckFailed(f"{args.data}: not usable ({len(problems)} problem(s) above)")


def _print_validation(report: dict) -> None:
    for source in report["sources"]:
        print(f"{source['uri']}: {source['format']} rows ({source['format_evidence']}); {source['read']} read = "
              f"{source['kept']} kept + {source['quarantined']} bad")
        if source["report"]:
            print(source["report"])
    for split, lengths in report["tokens"].items():
        print(f"{split} tokens per row {lengths['histogram']}; {lengths['share_truncated']:.1%} longer than "
              f"max_seq_len={lengths['max_seq_len']}")
    reports = [s["report"] for s in report["sources"] if s["report"]]
    for problem in report["problems"]:  # a policy's verdict follows the report printed above: not twice
        print(next((problem.removeprefix(r).strip() for r in reports if problem.startswith(r)), problem))
    print("usable: yes" if report["usable"] else "usable: no")


def _add_promote(subparsers) -> None:
    parser = subparsers.add_parser("promote", help="point latest.json at a published run, by hand")
    parser.add_argument("output", help="where the flow published: a local folder or s3://bucket/prefix")
    parser.add_argument("run_id", help="the run to promote (a folder under OUTPUT/runs/)")
    parser.add_argument("--reason", default="promoted by hand", help="recorded in latest.json and its history")
    parser.set_defaults(handler=_promote)


def _add_rollback(subparsers) -> None:
    parser = subparsers.add_parser("rollback", help="point latest.json back at the run it replaced")
    parser.add_argument("output", help="where the flow published: a local folder or s3://bucket/prefix")
    parser.add_argument("--reason", default="rolled back by hand", help="recorded in latest.json and its history")
    parser.set_defaults(handler=_rollback)


def _promote(args: argparse.Namespace, run_id: str | None = None) -> None:
    pointer = promote(args.output, run_id or args.run_id, {"promote": True, "reason": args.reason, "by": "cli"})
    was = pointer["previous"]["run_id"] if pointer["previous"] else "nothing"
    print(f"latest.json -> run {pointer['run_id']} (promoted {pointer['promoted_at']}; before: {was})")
    _move_champion(args.output, pointer)


def _move_champion(output: str, pointer: dict) -> None:
    """A run tracked in MLflow with registration on: its registered model's alias follows latest.json. An
    MLflow failure is printed, not raised: latest.json has moved either way."""
    from tasks.store.registry import read_run_manifest

    manifest = read_run_manifest(output, pointer["run_id"])
    if (tracking := (manifest.get("config") or {}).get("tracking")) and tracking.get("uri"):
        from tasks.tracking.champion import move_champion_of

        if said := move_champion_of(manifest, pointer["run_uri"], lambda text: print(text, file=sys.stderr)):
            print(said)


def _rollback(args: argparse.Namespace) -> None:
    latest = read_latest(args.output)
    if latest is None:
        raise StorageNotFoundError(f"{args.output}: no latest.json, so nothing to roll back")
    if not latest.get("previous"):
        raise CheckFailed(f"{args.output}: run {latest['run_id']} is the first promoted run; there is none before it")
    _promote(args, latest["previous"]["run_id"])


def _add_reconcile(subparsers) -> None:
    from tasks.data.s3_reconcile import GRACE, MAX_REANNOUNCE

    parser = subparsers.add_parser("reconcile", help="announce again the uploads that never got a flow run")
    parser.add_argument("--grace", type=float, default=GRACE.total_seconds(),
                        help="seconds an upload is left alone after it was announced (default %(default).0f)")
    parser.add_argument("--max-reannounce", type=int, default=MAX_REANNOUNCE,
                        help="announce one upload again at most this many times (default %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be announced again, send nothing")
    parser.add_argument("--json", action="store_true", help="print the counts and URIs as JSON")
    parser.set_defaults(handler=_reconcile)


def _reconcile(args: argparse.Namespace) -> None:
    import json
    from datetime import timedelta

    import httpx
    from prefect.settings import PREFECT_API_URL

    from flows.reconcile import reconcile  # the flow's pass, through flows/: a stage never imports another stage

    if args.grace < 0 or args.max_reannounce < 0:
        raise CheckFailed(f"--grace {args.grace:g} --max-reannounce {args.max_reannounce}: neither may be negative")
    if not PREFECT_API_URL.value():  # else Prefect would start a temporary server of its own and reconcile that
        raise CheckFailed("PREFECT_API_URL is not set: set it (or your Prefect profile's) to the server's API, "
                          "e.g. http://prefect.internal:4200/api")
    try:
        result = reconcile(timedelta(seconds=args.grace), args.max_reannounce, dry_run=args.dry_run)
    except httpx.HTTPError as error:  # refused, timed out, or an error status after the client's retries
        raise CheckFailed(f"the Prefect API at {PREFECT_API_URL.value()} did not answer: {error!r}; check "
                          "PREFECT_API_URL and that the server is up") from None
    if args.json:
        print(json.dumps(result.counts() | {"reannounced_uris": [u.obj.uri for u in result.reannounce],
                                            "gave_up_uris": [u.obj.uri for u in result.gave_up + result.partial]}))
    else:
        for upload in result.reannounce:
            print(f"{'would announce' if args.dry_run else 'announced'} again: {upload.obj.uri} (etag {upload.obj.etag})")
        print(result.summary())
    if result.gave_up or result.partial:
        raise CheckFailed("some uploads have no flow run after every copy, or runs of only some of their deployments: "
                          + ", ".join(u.obj.uri for u in result.gave_up + result.partial))


SUBCOMMANDS = [_add_download, _add_verify, _add_plan, _add_validate, _add_promote, _add_rollback, _add_reconcile]


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
    except (CheckFailed, UnsupportedModelError, PromotionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
