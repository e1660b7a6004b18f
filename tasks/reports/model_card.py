"""The model card: README.md in the published model folder, for the people who deploy it. Pure.

It is rendered from the same facts as the manifest (written before the manifest, since the
manifest lists its checksum) and says what the model is, what it was trained on, how, how well,
and how to load it with plain transformers. Its metadata is huggingface_hub's `ModelCardData`, so the
Hub (and `ModelCard.load(...).data`) reads it: base model, license (the base card's, when it has one),
datasets by URI with their sha256, and the tuned model's held-out scores as `model-index` eval results.
"""
from __future__ import annotations

from pathlib import Path

LICENSE_FIELDS = ("license", "license_name", "license_link")  # license_name/link come with `license: other`


def base_model_license(model_folder: str) -> dict:
    """The license fields of the base model's own card (`<folder>/README.md`), or {} when it has none.

    The base card is data from the model's publisher: a card whose metadata does not parse gives no
    license (the card then says so) rather than failing the run."""
    from huggingface_hub import ModelCard

    path = Path(model_folder) / "README.md"
    if not path.is_file():
        return {}
    try:
        data = ModelCard.load(path, ignore_metadata_errors=True).data
    except Exception:  # noqa: BLE001 - malformed YAML in someone else's card: no license to copy
        return {}
    return {field: getattr(data, field) for field in LICENSE_FIELDS if getattr(data, field, None)}


def card_data(*, run_id: str, base_model: dict, data: dict, method: str, evaluation: dict,
              adapter_only: bool):
    """The card's metadata as huggingface_hub's ModelCardData (the YAML block at the top of README.md)."""
    from huggingface_hub import EvalResult, ModelCardData

    name = base_name(base_model)
    sources = data.get("sources", [])
    tuned = evaluation["tuned"]
    held_out = _eval_source(data)
    scores = {"eval_loss": tuned["loss"], "perplexity": tuned["perplexity"], **tuned.get("scores", {})}
    results = [EvalResult(task_type="text-generation", task_name="fine-tuning held-out evaluation",
                          dataset_type=held_out.get("uri", "held-out"),
                          dataset_name=Path(held_out.get("uri", "held-out")).name or "held-out",
                          dataset_split=data.get("eval_origin"), dataset_revision=held_out.get("sha256"),
                          metric_type=metric, metric_name=metric, metric_value=round(float(value), 6))
               for metric, value in scores.items()]
    return ModelCardData(
        base_model=name, library_name="peft" if adapter_only else "transformers",
        tags=["prefect-finetune", str(method)], model_name=f"{_short_name(base_model)}-{method}-{run_id}",
        datasets=[s["uri"] for s in sources] or None, eval_results=results or None,
        metrics=sorted(scores) or None, pipeline_tag="text-generation",
        **base_model.get("license", {}),
        # not a Hub field: which bytes trained the model (a URI alone can be overwritten)
        dataset_checksums=[{"uri": s["uri"], "sha256": s["sha256"], "rows": s.get("rows")} for s in sources] or None,
    )


def base_name(base_model: dict) -> str:
    """A Hub model's id; a published run's merged folder (model: run:<id>); else the local folder."""
    if run := base_model.get("run"):
        return f"{run['run_uri']}/merged"
    return base_model.get("repo_id") or base_model["path"]


def _short_name(base_model: dict) -> str:
    """The base's last name part (a published run: `run-<id>`, not its `merged` folder)."""
    return f"run-{base_model['run']['run_id']}" if base_model.get("run") else Path(base_name(base_model)).name


def _started_from(run: dict) -> str:
    """Which published run the base is, and that run's own base."""
    own = run.get("base_model", {})
    own_name = base_name(own) if own.get("path") or own.get("run") else "?"
    return (f"The base is run `{run['run_id']}` (`{run['requested']}`; {run.get('objective', 'sft')}, "
            f"{run.get('method') or '?'}), published in `{run['output']}`; that run was fine-tuned from "
            f"`{own_name}`. Fetch it, checked against its manifest, with "
            f"`prefect-finetune download {run['output']} --run {run['run_id']}` (its `merged` folder).")


def _eval_source(data: dict) -> dict:
    """The source the eval rows came from: the held-out file, else the training data they were split off."""
    sources = data.get("sources", [])
    if not sources:
        return {}
    return sources[1] if data.get("eval_origin") == "held-out file" and len(sources) > 1 else sources[0]


def model_card(*, run_id: str, base_model: dict, data: dict, method: str, training: dict,
               evaluation: dict, adapter_only: bool, publish_dtype: str) -> str:
    base, tuned, metric = evaluation["base"], evaluation["tuned"], evaluation["metric"]
    # A Hub model is named by its id (the Hub links a card's base_model to it) and pinned to the commit trained on.
    name = base_name(base_model)
    commit = f", commit `{base_model['revision']}`" if base_model.get("revision") else ""
    metadata = card_data(run_id=run_id, base_model=base_model, data=data, method=method, evaluation=evaluation,
                         adapter_only=adapter_only)
    sources = "\n".join(f"- `{s['uri']}` ({s['rows']} rows, {s['data_format']}, sha256 `{s['sha256'][:16]}…`)"
                        for s in data.get("sources", []))
    license_line = (f"License: `{metadata.license}`, from the base model's card." if metadata.license else
                    "License: the base model's card states none; check the base model's terms before use.")
    return "\n\n".join([
        f"---\n{metadata.to_yaml()}\n---",
        f"# Fine-tuned `{name}` (run `{run_id}`)",
        f"{'A LoRA adapter' if adapter_only else 'A standalone model'} fine-tuned with **{method}** from the base "
        f"model `{name}`{commit} ({base_model.get('model_type', '?')}, "
        f"{base_model.get('parameters', 0):,} parameters).",
        *([_started_from(base_model["run"])] if base_model.get("run") else []),
        license_line,
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
                    for r in (base, tuned))
        + (f"\n\nEach model was scored as it is published: the tuned row is `{tuned['scored_as']['weights']}` in "
           f"{tuned['scored_as']['dtype']}, the base in {base['scored_as']['dtype']}."
           if tuned.get("scored_as") and base.get("scored_as") else ""),
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
