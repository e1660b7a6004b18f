"""The model card: README.md in the published model folder, for the people who deploy it. Pure.

It is rendered from the same facts as the manifest (written before the manifest, since the
manifest lists its checksum) and says what the model is, what it was trained on, how, how well,
and how to load it with plain transformers.
"""
from __future__ import annotations


def model_card(*, run_id: str, base_model: dict, data: dict, method: str, training: dict,
               evaluation: dict, adapter_only: bool, publish_dtype: str) -> str:
    base, tuned, metric = evaluation["base"], evaluation["tuned"], evaluation["metric"]
    # A Hub model is named by its id (the Hub links a card's base_model to it) and pinned to the commit trained on.
    name = base_model.get("repo_id") or base_model["path"]
    commit = f", commit `{base_model['revision']}`" if base_model.get("revision") else ""
    sources = "\n".join(f"- `{s['uri']}` ({s['rows']} rows, {s['data_format']}, sha256 `{s['sha256'][:16]}…`)"
                        for s in data.get("sources", []))
    return "\n\n".join([
        f"---\nbase_model: {name}\nlibrary_name: {'peft' if adapter_only else 'transformers'}\n"
        f"tags: [prefect-finetune, {method}]\n---",
        f"# Fine-tuned `{name}` (run `{run_id}`)",
        f"{'A LoRA adapter' if adapter_only else 'A standalone model'} fine-tuned with **{method}** from the base "
        f"model `{name}`{commit} ({base_model.get('model_type', '?')}, "
        f"{base_model.get('parameters', 0):,} parameters).",
        "## Data",
        sources or "(no sources recorded)",
        f"Train rows {data.get('train_rows', '?')}, eval rows {data.get('eval_rows', '?')} "
        f"({data.get('eval_origin', '?')}).",
        "## Training",
        f"{training['steps']} optimizer steps, best eval loss {training['best_eval_loss']:.4f} at step "
        f"{training['best_step']}; {training['trainable_parameters']:,} of {training['total_parameters']:,} "
        f"parameters trained.",
        "## Evaluation (same held-out rows)",
        "| model | eval loss | perplexity | " + metric + " |\n|---|---|---|---|\n"
        + "\n".join(f"| {r['label']} | {r['loss']:.4f} | {r['perplexity']:.2f} | {r['score']:.3f} |"
                    for r in (base, tuned)),
        "## How to load it",
        _load_snippet(name, base_model.get("revision") if base_model.get("repo_id") else None, adapter_only,
                      publish_dtype),
        "Check the download first: `prefect-finetune verify <output> --run " + run_id + "` compares every file "
        "with the sha256 in the run's `manifest.json`.",
    ])


def _load_snippet(base: str, revision: str | None, adapter_only: bool, publish_dtype: str) -> str:
    if adapter_only:
        pinned = f", revision={revision!r}" if revision else ""
        return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({base!r}{pinned})\n"
                "model.load_adapter(\"path/to/adapter\")  # this folder; needs peft installed\n"
                "tokenizer = AutoTokenizer.from_pretrained(\"path/to/adapter\")\n```")
    return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            "model = AutoModelForCausalLM.from_pretrained(\"path/to/merged\")  # this folder; weights are "
            f"{publish_dtype}\ntokenizer = AutoTokenizer.from_pretrained(\"path/to/merged\")\n```")
