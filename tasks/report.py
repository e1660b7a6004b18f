"""The run summary people read in the Prefect UI (markdown artifact) and the terminal. Pure."""
from __future__ import annotations

from tasks.memory import GIB


def _table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def headline(manifest: dict) -> str:
    base, tuned = manifest["evaluation"]["base"], manifest["evaluation"]["tuned"]
    return (f"{manifest['evaluation']['metric']} on {tuned['generated_rows']} held-out answers: "
            f"base {base['score']:.3f} -> tuned {tuned['score']:.3f}; "
            f"eval loss {base['loss']:.4f} -> {tuned['loss']:.4f} "
            f"(perplexity {base['perplexity']:.2f} -> {tuned['perplexity']:.2f})")


def promotion_line(manifest: dict, promoted: bool | None) -> str:
    decision = manifest.get("promotion") or {}
    if promoted is None or not decision:
        return ""
    verdict = "**promoted**: `latest.json` now points at this run" if promoted else \
        "**not promoted**: `latest.json` unchanged, the run stays published"
    return f"Promotion gate `{decision['gate']}`: {verdict} ({decision['reason']})."


def summary_markdown(manifest: dict, output_uri: str, examples: int, promoted: bool | None = None) -> str:
    run, data, plan, training = manifest["run"], manifest["data"], manifest["plan"], manifest["training"]
    evaluation = manifest["evaluation"]
    base, tuned, metric = evaluation["base"], evaluation["tuned"], evaluation["metric"]
    stats = data["token_stats"]
    parts = [
        f"# Fine-tuning run `{run['run_id']}`",
        f"**{headline(manifest)}**",
        f"Published to `{output_uri}` (method **{plan['method']}**, base `{manifest['base_model']['path']}`).",
        promotion_line(manifest, promoted),
        "## Data",
        _table(["source", "format", "rows", "sha256"],
               [[s["uri"], s["data_format"], s["rows"], s["sha256"][:16]] for s in data["sources"]]),
        f"Train rows {data['train_rows']}, eval rows {data['eval_rows']} ({data['eval_origin']}). "
        f"Tokens per train row: median {stats['tokens_median']}, p95 {stats['tokens_p95']}, "
        f"max {stats['tokens_max']} (max_seq_len {stats['max_seq_len']}, {stats['rows_truncated']} truncated).",
        "## Plan",
        plan["reason"],
        _table(["method", "micro-batch", "grad ckpt", "estimated GiB", "fits", "chosen"],
               [[c["estimate"]["method"], c["estimate"]["micro_batch_size"],
                 c["estimate"]["gradient_checkpointing"], f"{c['estimate']['total'] / GIB:.2f}", c["fits"],
                 "yes" if c["estimate"]["method"] == plan["method"] else ""]
                for c in plan["candidates"]]),
        "## Training",
        f"{training['steps']} steps in {training['seconds']:.1f} s, {training['trained_tokens']:,} answer tokens; "
        f"best eval loss {training['best_eval_loss']:.4f} at step {training['best_step']}"
        f"{' (stopped early)' if training['stopped_early'] else ''}. Peak memory "
        f"{training['peak_memory_bytes'] / GIB:.2f} GiB ({training['peak_memory_kind']}), estimated "
        f"{plan['estimate']['total'] / GIB:.2f} GiB.",
        "## Evaluation (same held-out rows)",
        _table(["model", "eval loss", "perplexity", metric],
               [[r["label"], f"{r['loss']:.4f}", f"{r['perplexity']:.2f}", f"{r['score']:.3f}"]
                for r in (base, tuned)]),
    ]
    if examples:
        rows = [[b["question"], b["reference"], b["prediction"], t["prediction"]]
                for b, t in list(zip(base["answers"], tuned["answers"]))[:examples]]
        parts += ["## Example answers", _table(["question", "reference", "base", "tuned"], rows)]
    return "\n\n".join(p for p in parts if p)

