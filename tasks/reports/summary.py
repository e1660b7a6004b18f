"""The run summary people read in the Prefect UI (markdown artifact) and the terminal. Pure."""
from __future__ import annotations

from tasks.planning.memory import GIB
from tasks.reports.loss_curve import LOSS_CURVE_NAME
from tasks.scoring.metrics import PAIR_SCORES
from tasks.scoring.overfitting import overfitting_warning


def _table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def headline(manifest: dict) -> str:
    base, tuned = manifest["evaluation"]["base"], manifest["evaluation"]["tuned"]
    scored = f"{len(tuned['pair_logps'])} held-out pairs" if manifest["evaluation"]["metric"] in PAIR_SCORES \
        else f"{tuned['generated_rows']} held-out answers"
    return (f"{manifest['evaluation']['metric']} on {scored}: "
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


def evaluated_models(manifest: dict) -> list[dict]:
    """base, tuned, and the published model when the gate compared with it: all on the same rows."""
    evaluation = manifest["evaluation"]
    return [evaluation[label] for label in ("base", "tuned", "published") if evaluation.get(label)]


def metrics_table_rows(manifest: dict) -> list[dict]:
    """One row per evaluated model, every score (the table artifact; the markdown shows the same)."""
    rows = []
    for result in evaluated_models(manifest):
        model = result["label"] + (f" ({result['run_id']})" if result.get("run_id") else "")
        rows.append({"model": model, "eval_loss": round(result["loss"], 4), "perplexity": round(result["perplexity"], 2),
                     **{name: round(value, 4) for name, value in result.get("scores", {}).items()}})
    return rows


def _metrics_markdown(manifest: dict) -> str:
    rows = metrics_table_rows(manifest)
    header = list(rows[0])
    return _table(header, [[row.get(key, "") for key in header] for row in rows])


def _gate_markdown(manifest: dict) -> str:
    checks = (manifest.get("promotion") or {}).get("details", {}).get("checks", [])
    if not checks:
        return ""
    return _table(["check", "passed", "numbers"], [[c["name"], "yes" if c["passed"] else "**no**", c["detail"]]
                                                   for c in checks])


def _training_notes(manifest: dict) -> str:
    warning = overfitting_warning(manifest["training"].get("history", []))
    curve = any(f["path"] == LOSS_CURVE_NAME for f in manifest.get("files", []))
    notes = [f"Loss curve: `{LOSS_CURVE_NAME}` in the run folder (train and eval loss per step)." if curve else "",
             f"**Warning**: {warning}" if warning else ""]
    for down in manifest["training"].get("memory_step_downs", []):
        failed, leaner = down["out_of_memory"], down["next"]
        notes.append(f"Out of memory with {failed['method']} at {failed['tokens_per_micro_batch']} tokens per "
                     f"micro-batch (checkpointing {'on' if failed['gradient_checkpointing'] else 'off'})"
                     + (f"; continued with {leaner['method']} at {leaner['tokens_per_micro_batch']} tokens "
                        f"(checkpointing {'on' if leaner['gradient_checkpointing'] else 'off'})." if leaner else "."))
    return "\n\n".join(n for n in notes if n)


def _reused_base_line(base: dict) -> str:
    if not base.get("from_cache"):
        return ""
    return (f"The base model's scores were reused from `{base['from_cache']}`: an earlier run scored the same base "
            "files on the same eval rows with the same settings and scoring code.")


def summary_markdown(manifest: dict, output_uri: str, examples: int, promoted: bool | None = None) -> str:
    run, data, plan, training = manifest["run"], manifest["data"], manifest["plan"], manifest["training"]
    evaluation = manifest["evaluation"]
    base, tuned, metric = evaluation["base"], evaluation["tuned"], evaluation["metric"]
    published = evaluation.get("published")
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
        _table(["method", "tokens per micro-batch", "grad ckpt", "estimated GiB", "estimate", "fits", "chosen"],
               [[c["estimate"]["method"], c["estimate"]["tokens"],
                 c["estimate"]["gradient_checkpointing"], f"{c['estimate']['total'] / GIB:.2f}",
                 c["estimate"].get("kind", "formula"), c["fits"],  # kind: formula, measured (probe), conservative
                 "yes" if c["estimate"]["method"] == plan["method"] else ""]
                for c in plan["candidates"]]),
        "## Training",
        f"{training['steps']} steps in {training['seconds']:.1f} s, {training['trained_tokens']:,} answer tokens; "
        f"best eval loss {training['best_eval_loss']:.4f} at step {training['best_step']}"
        f"{' (stopped early)' if training['stopped_early'] else ''}. Peak memory "
        f"{training['peak_memory_bytes'] / GIB:.2f} GiB ({training['peak_memory_kind']}), estimated "
        f"{plan['estimate']['total'] / GIB:.2f} GiB.",
        _training_notes(manifest),
        "## Evaluation (same held-out rows)",
        f"Headline and gate metric: **{metric}**; {tuned['eval_rows']} rows for eval loss, "
        f"{tuned['generated_rows']} generated answers per model (greedy).",
        _reused_base_line(base),
        _metrics_markdown(manifest),
        "## Promotion gate",
        _gate_markdown(manifest),
    ]
    if examples:
        models = [base, tuned] + ([published] if published else [])
        rows = [[answers[0]["question"], answers[0]["reference"], *(a["prediction"] for a in answers)]
                for answers in list(zip(*(m["answers"] for m in models)))[:examples]]
        parts += ["## Example answers", _table(["question", "reference", *(m["label"] for m in models)], rows)]
    return "\n\n".join(p for p in parts if p)

